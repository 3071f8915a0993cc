"""Exact k nearest neighbours by cosine similarity (FAISS or chunked torch), walks on the k-NN graph, and
the k-NN label-agreement diagnostic.

Self is excluded by dataset index in every chunk, not by position in the first one.

A cached table (``NeighbourTable``, an ``.npz``) is verified as it is read: zip's CRC-32 of each array, recorded
when the file was written, is checked over every byte, and the table must index the features it was built from.
A corrupt, truncated, empty or foreign file is named in a warning, removed and rebuilt, never used. The walk pools
(``walks``) are not cached: they are derived from the verified table in memory.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from icon_lightning.distributed import rank_zero_first
from icon_lightning.io import atomic_write


def content_digest(array: np.ndarray, block_bytes: int = 1 << 26) -> str:
    """SHA-256 (first 20 hex digits) of an array's shape, dtype and contents, hashed in row blocks."""
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    rows = max(1, block_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        digest.update(memoryview(np.ascontiguousarray(array[start : start + rows])).cast("B"))
    return digest.hexdigest()[:20]


def _as_unit_tensor(features) -> torch.Tensor:
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: cached arrays are read-only maps
    if x.ndim != 2:
        raise ValueError(f"features: expected an (N, D) array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features: expected finite values, found NaN or inf")
    return F.normalize(x, dim=1)


SAFE_MAGNITUDE = 2.0**50  # |x| beyond [2^-50, 2^50]: squares and sums could leave float32's range


def centred_unit_rows(features, mean: np.ndarray | None = None) -> np.ndarray:
    """(N, D) float32 copy of ``features`` minus ``mean`` (default: their own mean), each row L2-normalised:
    the preprocessing every clustering here uses before cosine k-NN.

    Values beyond ``SAFE_MAGNITUDE`` (either way) are first scaled by a power of two, which is exact and leaves
    unit rows unchanged, so that the mean and the norm neither overflow nor underflow: float32 features near 1e30
    used to give every row a norm of inf and so a zero row."""
    x = np.array(features, dtype=np.float32)
    parts = (x,) if mean is None else (x, np.asarray(mean))
    size = max(max(float(p.max(initial=0.0)), -float(p.min(initial=0.0))) for p in parts)  # no |x| copy of x
    scale = 1.0
    if size > 0 and not 1 / SAFE_MAGNITUDE <= size <= SAFE_MAGNITUDE:
        scale = 2.0 ** -np.ceil(np.log2(size))  # the largest value becomes at most 1
        x *= np.float32(scale)
    x -= x.mean(0, keepdims=True) if mean is None else np.asarray(mean) * scale  # exact: a power of two
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def knn_torch(features, k: int, chunk_size: int = 4096, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) indices and cosine similarities of each row's k nearest other rows, by chunked matmul."""
    x = _as_unit_tensor(features)
    n = len(x)
    if not 0 < k < n:
        raise ValueError(f"k: expected 0 < k < N = {n}, got {k}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = x.to(device)
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sim = x[start:stop] @ x.T  # (chunk, N)
        rows = torch.arange(stop - start, device=device)
        sim[rows, rows + start] = float("-inf")  # self sits at column start + r, in every chunk
        top = sim.topk(k, dim=1)
        indices[start:stop] = top.indices.cpu().numpy()
        sims[start:stop] = top.values.cpu().numpy()
    return indices, sims


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn_faiss(features, k: int, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search on L2-normalised rows (``IndexFlatIP``), on GPUs when faiss has any."""
    import faiss

    x = _as_unit_tensor(features).numpy()
    n, d = x.shape
    if not 0 < k < n:
        raise ValueError(f"k: expected 0 < k < N = {n}, got {k}")
    index = faiss.IndexFlatIP(d)
    if use_gpu is None:
        use_gpu = faiss_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    sims, found = index.search(x, k + 1)
    indices = np.empty((n, k), dtype=np.int64)
    out_sims = np.empty((n, k), dtype=np.float32)
    for_rows = found != np.arange(n)[:, None]  # drop self wherever it appears (ties may put it second)
    for_rows[for_rows.sum(1) > k, k] = False  # self absent (exact duplicates): drop the last instead
    indices[:] = found[for_rows].reshape(n, k)
    out_sims[:] = sims[for_rows].reshape(n, k)
    return indices, out_sims


def knn(features, k: int, backend: str = "auto", chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """k-NN by cosine: ``faiss``, ``torch`` or ``auto`` (faiss when importable)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend: expected 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss"
        except ImportError:
            backend = "torch"
    return knn_faiss(features, k) if backend == "faiss" else knn_torch(features, k, chunk_size)


def walks(neighbours: np.ndarray, steps: int) -> np.ndarray:
    """(N, k + k² + … + k^steps) endpoints of all walks of 1..steps steps on the k-NN graph, kept as index
    tables (never an N × N matrix). Column block s holds the k^s endpoints of s-step walks; an endpoint's
    multiplicity in block s over k^s is the entry of P^s for P uniform over the k neighbours."""
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, got {steps}")
    blocks = [neighbours]
    for _ in range(steps - 1):
        blocks.append(neighbours[blocks[-1]].reshape(len(neighbours), -1))
    return np.concatenate(blocks, axis=1)


def symmetric_degree(neighbours: np.ndarray) -> np.ndarray:
    """(N,) degree of each item in the symmetrised k-NN graph: |N(i) ∪ {j : i ∈ N(j)}| (normalized cuts)."""
    from scipy.sparse import coo_matrix

    n, k = neighbours.shape
    adj = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), neighbours.reshape(-1))), shape=(n, n)).tocsr()
    return np.asarray(((adj + adj.T) > 0).sum(1)).reshape(-1).astype(np.float32)


def label_agreement(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Mean fraction of each item's neighbours that share its label (a diagnostic, never a training signal)."""
    labels = np.asarray(labels)
    return float((labels[neighbours] == labels[:, None]).mean())


@dataclass
class NeighbourTable:
    """The k-NN table of a feature array, saved beside it as ``<features-digest>.knn<k>.npz``."""

    indices: np.ndarray  # (N, k) int64
    similarities: np.ndarray  # (N, k) float32

    @staticmethod
    def fingerprint(features: np.ndarray) -> str:
        """SHA-256 of the features' shape, dtype and every byte, read in blocks of rows (a memory map is never
        loaded whole). Any changed value gives a new fingerprint; ``make bench-knn`` times it at ImageNet size."""
        return content_digest(features)

    @classmethod
    def build_or_load(
        cls, features: np.ndarray, k: int, path: str | Path, backend: str = "auto", fingerprint: str | None = None
    ) -> NeighbourTable:
        """The table saved at ``path`` if it was built from these features (``fingerprint``, hashed here when not
        given), else built and saved there."""
        path = Path(path)
        fingerprint = fingerprint or cls.fingerprint(features)
        if path.exists():
            table, problem = cls._read(path, fingerprint, len(features), k)
            if table is not None:
                return table
            warnings.warn(f"{path}: {problem}; removed, rebuilt", stacklevel=2)
            path.unlink(missing_ok=True)
        indices, sims = knn(features, k, backend)
        atomic_write(
            path,
            lambda f: np.savez(f, indices=indices, similarities=sims, fingerprint=np.array(fingerprint)),
            binary=True,
        )
        return cls(indices, sims)

    @classmethod
    def _read(cls, path: Path, fingerprint: str, n: int, k: int) -> tuple[NeighbourTable | None, str]:
        """The table at ``path`` if it is intact and was built from the features of ``fingerprint`` (N = ``n``,
        width ``k``), else None and what is wrong. Reading each array whole checks zip's CRC-32 of it."""
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
            if magic != b"PK\x03\x04":  # every np.savez archive starts so
                return None, "empty file" if not magic else f"not an .npz archive (it starts {magic!r})"
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                return None, f"a single {loaded.dtype} array, not the .npz of a k-NN table"
            with loaded as npz:
                found = str(npz["fingerprint"])
                if found != fingerprint:
                    return None, f"built from other features (fingerprint {found}, expected {fingerprint})"
                indices, sims = npz["indices"], npz["similarities"]
        except (
            OSError,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            EOFError,
            zipfile.BadZipFile,
            zlib.error,
        ) as error:
            return None, f"unreadable or corrupt k-NN table ({type(error).__name__}: {' '.join(str(error).split())})"
        if indices.shape != (n, k) or sims.shape != (n, k) or indices.dtype.kind not in "iu":
            return None, f"a table of shape {indices.shape} {indices.dtype}, expected ({n}, {k}) integers"
        if n and (indices.min() < 0 or indices.max() >= n or not np.isfinite(sims).all()):
            return None, f"indices outside 0..{n - 1} or non-finite similarities"
        return cls(indices, sims), ""

    @classmethod
    def in_folder(
        cls, features: np.ndarray, k: int, folder: str | Path, backend: str = "auto", fingerprint: str | None = None
    ) -> NeighbourTable:
        """``build_or_load`` at ``<folder>/<fingerprint>.knn<k>.npz``, hashing the features once for both."""
        fingerprint = fingerprint or cls.fingerprint(features)
        return cls.build_or_load(features, k, Path(folder) / f"{fingerprint}.knn{k}.npz", backend, fingerprint)


@dataclass(frozen=True)
class NeighbourIndex:
    """The dataset-level neighbourhood a DataModule serves: the k-NN table, the degrees of its symmetrised graph
    (normalized cuts) and the pool of sampled neighbours (endpoints of 1..walk_steps-step walks)."""

    table: torch.Tensor  # (N, k) int64
    degree: torch.Tensor  # (N,)
    pool: np.ndarray  # (N, k + … + k^walk_steps)

    @classmethod
    def build(
        cls, features: np.ndarray, k: int, walk_steps: int, folder: str | Path, backend: str = "auto"
    ) -> NeighbourIndex:
        """From the cached table under ``folder`` (built there if missing). Under torch.distributed, rank 0 builds
        or loads it first and the other processes then load the file it wrote."""
        fingerprint = NeighbourTable.fingerprint(features)  # a hash of every byte: once for both calls below
        table = rank_zero_first(lambda: NeighbourTable.in_folder(features, k, folder, backend, fingerprint))
        indices = torch.as_tensor(table.indices)
        return cls(indices, torch.from_numpy(symmetric_degree(table.indices)), walks(table.indices, walk_steps))
