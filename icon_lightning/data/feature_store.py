"""Extract frozen-backbone features once and keep them as memory-mapped ``.npy`` files with JSON metadata.

One array per (backbone, weights, dataset, split, transform, view), named by the hash of those keys. The
``.npy`` is written to a temporary name and renamed when complete; the ``.json`` beside it is written the
same way, last, and is what marks the array as trusted. An interrupted extraction therefore leaves at most
temporary files, which are never read.

Every cached array (features here, the shared float16 views of ``shared_views``) is verified before use against
the size and CRC-32 of its file recorded in its ``.json`` when it was written: a corrupt, truncated or foreign
file is named in a warning, removed and rebuilt, never used. zlib's CRC-32 sums 3.7 GB/s here (blake2b 1.2,
SHA-256 1.7; the standard library's fastest), ``file_checksum`` 2.9 GB/s over a memory-mapped file, so a million
rows of 768 float32 (3 GiB) cost about 1.1 s from the page cache; each file is read once per process
(``verified_problem``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from icon_lightning.data.cpu_forward import (
    channels_last,
    forward_in_micro_batches,
    micro_batch_size,
    reuse_freed_memory,
)
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.distributed import rank_zero_first
from icon_lightning.distributed import world as distributed_world
from icon_lightning.io import atomic_write_json, publishing, remove_stale_temporaries, reserve, write_error

_CHECKSUM_BLOCK = 1 << 24  # bytes per zlib.crc32 call: the GIL is released while each block is summed
_VERIFIED: set[tuple] = set()  # (path, size, mtime, inode, checksum) of the files this process has verified


def file_checksum(path: str | Path) -> str:
    """``crc32:<8 hex>`` of every byte of ``path``, summed over a read-only memory map in 16 MiB blocks (a large
    cache is never read into memory whole)."""
    crc = 0
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > 0:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, len(view), _CHECKSUM_BLOCK):
                    crc = zlib.crc32(view[start : start + _CHECKSUM_BLOCK], crc)
    return f"crc32:{crc:08x}"


def file_record(path: Path) -> dict:
    """What a cache's ``.json`` records of its file when it is written: its size and checksum."""
    return {"bytes": path.stat().st_size, "checksum": file_checksum(path)}


def _remember_verified(path: Path, checksum: str) -> None:
    stat = path.stat()
    _VERIFIED.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, checksum))


def verified_problem(path: Path, record: dict) -> str | None:
    """What is wrong with the file at ``path`` against the ``bytes`` and ``checksum`` recorded when it was
    written (``file_record``), or None when it is intact. The whole file is read once per process while its
    size, modification time and inode stay the same; a changed file is read again."""
    expected_size, expected = record.get("bytes"), record.get("checksum")
    if not isinstance(expected, str) or not isinstance(expected_size, int):
        return "no checksum was recorded for it"
    try:
        stat = path.stat()
        if stat.st_size != expected_size:
            return f"{stat.st_size} bytes where {expected_size} were written (truncated or replaced)"
        if (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, expected) in _VERIFIED:
            return None
        found = file_checksum(path)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if found != expected:
        return f"checksum {found} where {expected} was recorded when it was written (corrupt or foreign bytes)"
    _remember_verified(path, expected)
    return None


def discard(problem: str, *paths: Path) -> None:
    """Warn (one line naming the first path and ``problem``) and remove ``paths``, so that the caller rebuilds."""
    warnings.warn(f"{paths[0]}: {problem}; removed, rebuilt", stacklevel=3)
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # a read-only cache folder: say which file could not go
            raise write_error(path, error, f"remove it ({problem})") from None


def first_non_finite(array: np.ndarray, block_rows: int = 65536) -> str | None:
    """Where ``array`` (N, D) first holds NaN or inf, read in row blocks (no N × D mask), or None."""
    for start in range(0, len(array), block_rows):
        bad = ~np.isfinite(array[start : start + block_rows])
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            value = float(array[start + row, column])
            what = "NaN" if np.isnan(value) else "inf (values beyond float32's range, ±3.4e38, become inf)"
            return f"{what} at row {start + row}, column {column}"
    return None


@dataclass(frozen=True)
class FeatureKey:
    """What a cached array depends on; its ``digest`` names the files."""

    backbone: str
    dataset: str
    transform: str
    view: str = "clean"
    precision: str = "fp32"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


class FeatureStore:
    """A folder of ``<digest>.npy`` + ``<digest>.json`` pairs. Opening it removes the temporary files that
    interrupted extractions of this host left behind."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.root, error, "create the feature cache folder") from None
        remove_stale_temporaries(self.root)

    def paths(self, key: FeatureKey) -> tuple[Path, Path]:
        return self.root / f"{key.digest}.npy", self.root / f"{key.digest}.json"

    def load(self, key: FeatureKey) -> np.ndarray | None:
        """The cached (N, D) array, memory-mapped read-only, or None when absent. A file that is partial, stale,
        corrupt or foreign is named in a warning and removed (the caller extracts it again)."""
        array_path, meta_path = self.paths(key)
        if not (array_path.is_file() or meta_path.is_file()):
            return None
        problem = _entry_problem(key, array_path, meta_path)
        if problem is not None:
            discard(problem, array_path, meta_path)
            return None
        return np.load(array_path, mmap_mode="r")

    def write(
        self, key: FeatureKey, shape: tuple[int, int], fill: Callable[[np.ndarray], None], dtype: str = "float32"
    ) -> np.ndarray:
        """Create the array under a temporary name, let ``fill`` write every row, then publish it."""
        array_path, meta_path = self.paths(key)
        start = time.time()
        with publishing(array_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            reserve(tmp, tmp.stat().st_size, array_path)  # a full disk fails here, named, not as SIGBUS mid-write
            fill(out)
            bad = first_non_finite(out)
            if bad is not None:
                raise ValueError(
                    f"{array_path}: features of {key.dataset} through {key.backbone} (view {key.view}): expected "
                    f"finite float32 values, found {bad}"
                )
            out.flush()
            del out
            record = file_record(tmp)
        _remember_verified(array_path, record["checksum"])  # renamed: the same inode, size and time
        meta = {
            "digest": key.digest,
            "key": asdict(key),
            "shape": list(shape),
            "dtype": dtype,
            **record,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - start, 3),
        }
        try:
            atomic_write_json(meta_path, meta)
        except BaseException:
            array_path.unlink(missing_ok=True)  # an array without its .json is never read: do not keep its bytes
            raise
        return self.load(key)


def _entry_problem(key: FeatureKey, array_path: Path, meta_path: Path) -> str | None:
    """What keeps the store's entry of ``key`` from being used, or None (``FeatureStore.load``)."""
    if not array_path.is_file():
        return f"its array {array_path.name} is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"no {meta_path.name} beside it (an interrupted write, or a file from elsewhere)"
    except (OSError, ValueError) as error:
        return f"unreadable metadata in {meta_path.name} ({type(error).__name__})"
    if not isinstance(meta, dict) or meta.get("digest") != key.digest or meta.get("key") != asdict(key):
        return f"{meta_path.name} records another key (foreign or stale metadata)"
    if "checksum" not in meta:  # written before checksums were recorded: adopted once, checked from now on
        return _adopt(array_path, meta_path, meta)
    return verified_problem(array_path, meta) or _array_problem(array_path, meta)


def _array_problem(array_path: Path, meta: dict) -> str | None:
    """Whether the .npy at ``array_path`` opens with the shape and dtype ``meta`` recorded."""
    try:
        array = np.load(array_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        return f"not a readable .npy ({type(error).__name__}: {error})"
    if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
        return f"shape {array.shape} {array.dtype} where {meta.get('shape')} {meta.get('dtype')} was written"
    return None


def _adopt(array_path: Path, meta_path: Path, meta: dict) -> str | None:
    """An entry written before checksums were recorded: used when its array opens with the recorded shape and
    dtype and is finite, and its size and checksum are recorded now (one warning); else what is wrong."""
    problem = _array_problem(array_path, meta)
    bad = first_non_finite(np.load(array_path, mmap_mode="r")) if problem is None else None
    if problem is not None or bad is not None:
        return problem or f"expected finite values, found {bad}"
    record = file_record(array_path)
    atomic_write_json(meta_path, {**meta, **record})
    _remember_verified(array_path, record["checksum"])
    warnings.warn(
        f"{array_path}: written before cache checksums were recorded; its CRC-32 is recorded now and verified "
        "from now on",
        stacklevel=4,
    )
    return None


class ViewDataset(Dataset):
    """A dataset seen through ``transform`` with randomness fixed by (seed, view, index): view v of item i is
    the same image in every epoch, process and worker."""

    def __init__(self, dataset: IndexedDataset, transform: Callable | None, view: int = 0, seed: int = 0) -> None:
        self.dataset, self.transform, self.view, self.seed = dataset, transform, view, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x = self.dataset.load(int(i))
        if self.transform is not None and self.view < 0:  # the clean view is deterministic: no seeding
            x = self.transform(x)
        elif self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.view, int(i))) & 0x7FFFFFFF)
                x = self.transform(x)
        return x, int(self.dataset.labels[i]), int(i)


@torch.inference_mode()
def extract(
    backbone: nn.Module,
    dataset: Dataset,
    out: np.ndarray | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    indices: np.ndarray | None = None,
    precision: str = "bf16",
    distributed: bool = True,
    cpu_tuning: bool = True,
) -> np.ndarray:
    """Run ``backbone`` over ``dataset`` (items ``(x, label, index)``) and fill ``out[index]`` (N, D).

    Batched under ``inference_mode``, bf16 autocast on CUDA unless ``precision="fp32"`` (the CPU always runs
    fp32), a progress bar in images/s. Under DDP each
    rank extracts the indices ``rank::world`` and rank 0 gathers and fills by dataset index, so the order
    in which processes or workers finish never matters. ``indices`` restricts to a subset (tests).
    ``distributed=False``: this process extracts every index alone, with no collective (see ``cached_features``).
    On the CPU (``cpu_tuning``, the default) the backbone runs ``channels_last`` in micro-batches below glibc's
    mmap threshold while freed memory is kept for reuse (``cpu_forward``: page faults had cost more system time
    than the computation's user time); ``cpu_tuning=False`` runs the loader's batches as they come (benchmarks).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = backbone.to(device).eval()
    tuned = cpu_tuning and device.type == "cpu"
    if tuned:
        backbone = backbone.to(memory_format=torch.channels_last)
    rank, world = distributed_world() if distributed else (0, 1)
    n = len(dataset)
    todo = np.arange(n) if indices is None else np.asarray(indices)
    shard = todo[rank::world]
    loader = DataLoader(
        Subset(dataset, shard.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    got_index, got_feats = [], []
    bar = tqdm(total=len(shard), unit="img", unit_scale=True, desc="extract", disable=not progress or rank != 0)
    stream = out is not None and world == 1  # write each batch straight into the (memory-mapped) output
    bf16 = effective_precision(device, precision) == "bf16"
    micro = None
    with reuse_freed_memory() if tuned else contextlib.nullcontext():
        for x, _, index in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if tuned:
                    micro = micro or micro_batch_size(backbone, channels_last(x[:1]))
                    feats = forward_in_micro_batches(backbone, x, micro).float()
                else:
                    feats = backbone(x).float().cpu()
            if stream:
                out[index.numpy()] = feats.numpy()
            else:
                got_index.append(index)
                got_feats.append(feats)
            bar.update(len(index))
    bar.close()
    if stream:
        return out
    index = torch.cat(got_index) if got_index else torch.zeros(0, dtype=torch.long)
    feats = torch.cat(got_feats) if got_feats else torch.zeros(0, 0)
    if world > 1:
        index, feats = _gather_to_rank0(index, feats, device)
    if out is None:
        out = np.zeros((n, feats.shape[1]), dtype=np.float32)
    if rank == 0:
        out[index.numpy()] = feats.numpy()
    return out


def _gather_to_rank0(index: Tensor, feats: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """All ranks' (index, features) on rank 0, padded to the largest shard for the collective."""
    dist = torch.distributed
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [torch.zeros(1, dtype=torch.long, device=comm_device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(index)], device=comm_device))
    longest = int(max(s.item() for s in sizes))
    pad_i = torch.full((longest,), -1, dtype=torch.long, device=comm_device)
    pad_f = torch.zeros(longest, feats.shape[1], device=comm_device)
    pad_i[: len(index)] = index.to(comm_device)
    pad_f[: len(index)] = feats.to(comm_device)
    all_i = [torch.empty_like(pad_i) for _ in sizes]
    all_f = [torch.empty_like(pad_f) for _ in sizes]
    dist.all_gather(all_i, pad_i)
    dist.all_gather(all_f, pad_f)
    index, feats = torch.cat(all_i).cpu(), torch.cat(all_f).cpu()
    keep = index >= 0
    return index[keep], feats[keep]


def effective_precision(device: torch.device, precision: str) -> str:
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: expected 'bf16' or 'fp32', got {precision!r}")
    return precision if device.type == "cuda" else "fp32"


def cached_features(
    store: FeatureStore,
    backbone,
    dataset: IndexedDataset,
    transform: Callable | None,
    view: str = "clean",
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device=None,
    progress: bool = True,
    precision: str = "bf16",
    distributed: bool = True,
    cpu_tuning: bool = True,
) -> np.ndarray:
    """Features of ``dataset`` under ``transform`` (view ``clean`` or ``aug<v>``), extracted once.

    Call on every rank under DDP: all ranks extract their shard, rank 0 writes, the others then read.
    ``distributed=False``: only this process runs it, so it extracts everything alone and joins no collective
    (``prepare_data`` on rank 0 while the other ranks wait in Lightning's barrier; a collective there deadlocks).
    ``cpu_tuning``: see ``extract`` (the features are the same to float rounding either way).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = effective_precision(device, precision)
    # The clean view is deterministic: one entry for every seed (written as seed 0, the key it always had).
    view_seed = seed if view != "clean" else 0
    key = FeatureKey(backbone.cache_key, dataset.cache_key, repr(transform), f"{view}:seed={view_seed}", precision)
    cached = store.load(key)
    if cached is not None:
        return cached
    view_id = int(view[3:]) if view.startswith("aug") else -1
    source = ViewDataset(dataset, transform, view=view_id, seed=seed)
    rank, world = distributed_world() if distributed else (0, 1)
    if world > 1:
        feats = extract(
            backbone,
            source,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            precision=precision,
            cpu_tuning=cpu_tuning,
        )
        return rank_zero_first(
            lambda: store.write(key, feats.shape, lambda out: out.__setitem__(slice(None), feats)),
            then=lambda: store.load(key),
        )
    dim = backbone.feature_dim or int(np.prod(source[0][0].shape))
    return store.write(
        key,
        (len(dataset), dim),
        lambda out: extract(
            backbone,
            source,
            out,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            precision=precision,
            distributed=distributed,
            cpu_tuning=cpu_tuning,
        ),
    )


VIEWS_SUFFIX = ".views16"


def shared_views(root: Path, raws: list[np.ndarray], mean: np.ndarray | None, block_rows: int = 65536) -> np.ndarray:
    """(P, N, D) float16 memory map of P cached views, centred by ``mean`` and L2-normalised (as they are when
    ``mean`` is None), written once under ``root`` and read-only afterwards.

    Every process of a node maps the same file, so the page cache holds one copy however many processes train,
    where each used to hold its own float32 stack (README "Memory at scale"). The name hashes the views' cache
    files (or contents) and the mean, so other features never reuse it.
    """
    from icon_lightning.data.neighbours import centred_unit_rows, content_digest

    digest = hashlib.sha256(repr(mean is None).encode())
    for raw in raws:
        name = getattr(raw, "filename", None)
        digest.update((Path(name).name if name else content_digest(raw)).encode())
    if mean is not None:
        digest.update(np.ascontiguousarray(mean, dtype=np.float32).tobytes())
    path = Path(root) / f"{digest.hexdigest()[:20]}{VIEWS_SUFFIX}"
    shape = (len(raws), *raws[0].shape)
    views = _verified_views(path, shape)
    if views is not None:
        return views
    with publishing(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        reserve(tmp, tmp.stat().st_size, path)
        for v, raw in enumerate(raws):
            for start in range(0, shape[1], block_rows):
                block = raw[start : start + block_rows]
                out[v, start : start + block_rows] = block if mean is None else centred_unit_rows(block, mean)
        out.flush()
        del out
        record = file_record(tmp)
    _remember_verified(path, record["checksum"])
    atomic_write_json(_views_meta(path), {"shape": list(shape), "dtype": "float16", **record})
    return np.load(path, mmap_mode="r")


def _views_meta(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _verified_views(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The views file at ``path`` when it matches the size and checksum recorded beside it (``<name>.json``) and
    ``shape``; otherwise, if there is a file, a warning naming it and what is wrong, and it is removed."""
    meta_path = _views_meta(path)
    if not (path.is_file() or meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        problem = verified_problem(path, meta) if isinstance(meta, dict) else f"unreadable {meta_path.name}"
    except FileNotFoundError:
        problem = f"no {meta_path.name} beside it (written by an older version, or interrupted)"
    except (OSError, ValueError) as error:
        problem = f"unreadable {meta_path.name} ({type(error).__name__})"
    if problem is None:
        try:
            views = np.load(path, mmap_mode="r")
            if views.shape == shape and views.dtype == np.float16:
                return views
            problem = f"shape {views.shape} {views.dtype} where {shape} float16 was expected"
        except (ValueError, OSError, EOFError) as error:
            problem = f"not a readable .npy ({type(error).__name__}: {error})"
    discard(problem, path, meta_path)
    return None
