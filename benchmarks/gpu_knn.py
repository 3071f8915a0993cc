"""k-NN table on the GPU against the CPU path: agreement of the neighbour ids and similarities, and timings.

    python -m benchmarks.gpu_knn [--device cuda|cpu] [--features X.npz] [--n N] [--k 10] [--out FILE.json]

Features: the shared CIFAR-10 test features (``cifar10_test_effnetlite0_r128.npz``, ``features`` float16
10000 × 1280) when present, else a synthetic mixture of 10 Gaussian clusters of the same shape (``--n``
rows, ``--dim`` wide). They are centred and L2-normalised as the DataModule does, then each backend builds
the (N, k) cosine k-NN table (self excluded) with the library's own functions
(``icon_lightning.data.neighbours``):

* the reference, ``torch-cpu``: the chunked torch brute force on the CPU (``knn_torch(device="cpu")``);
* ``--device cuda``: ``faiss-gpu`` (``knn_faiss(use_gpu=True)``, skipped with the reason when faiss has no
  GPU), ``torch-cuda`` (``knn_torch(device="cuda")``) and ``faiss-cpu``;
* ``--device cpu``: ``faiss-cpu`` (skipped when faiss is not importable), so the comparison runs anywhere.

For each backend against the reference: ``id_agreement`` (fraction of (row, rank) entries with the same
neighbour id), ``set_agreement`` (fraction of each row's k ids found in the reference row, order ignored),
``max_similarity_diff`` (max |s − s_ref| over rank-aligned entries; the cosine distance is 1 − s, so it is
also the max distance difference), the label agreement of its table when labels are known, and seconds (one
timed call after a small warm-up). Exit status 1 when a backend that ran falls below ``--min-agreement`` or
above ``--max-similarity-diff``; 0 otherwise (skipped backends do not fail the check).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result
from icon_lightning.data.neighbours import centred_unit_rows, faiss_gpus, knn_faiss, knn_torch, label_agreement

SHARED_DATA = Path(os.environ.get("ICON_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_FEATURES = SHARED_DATA / "features" / "cifar10_test_effnetlite0_r128.npz"


def load_features(path: str | Path | None, n: int | None, dim: int, seed: int = 0) -> tuple[np.ndarray, object, dict]:
    """(N, D) centred unit rows, labels or None, and a description of where they came from."""
    path = Path(path) if path else DEFAULT_FEATURES
    if path.is_file():
        with np.load(path) as npz:
            features = npz["features"]
            labels = npz["labels"] if "labels" in npz.files else None
        source = {"source": str(path), "dtype": str(features.dtype), "shape": list(features.shape)}
        if n is not None and n < len(features):
            pick = np.random.default_rng(seed).choice(len(features), n, replace=False)
            pick.sort()
            features, labels = features[pick], (None if labels is None else labels[pick])
            source["subset"] = f"{n} rows drawn with seed {seed}"
    else:
        n = n or 10_000
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, size=n)
        centres = rng.standard_normal((10, dim), dtype=np.float32)
        features = centres[labels] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
        source = {"source": f"synthetic: 10 Gaussian clusters ({path} is absent)", "dtype": "float32"}
        source["shape"] = [n, dim]
    return centred_unit_rows(features), labels, source


def compare(indices: np.ndarray, sims: np.ndarray, ref_indices: np.ndarray, ref_sims: np.ndarray) -> dict:
    """Agreement of one (N, k) table with the reference table."""
    same_set = (indices[:, :, None] == ref_indices[:, None, :]).any(2)
    return {
        "id_agreement": float((indices == ref_indices).mean()),
        "set_agreement": float(same_set.mean()),
        "rows_identical": float((indices == ref_indices).all(1).mean()),
        "max_similarity_diff": float(np.abs(sims - ref_sims).max()),
    }


def backends(device: str) -> list[tuple[str, object, str | None]]:
    """(name, function of (x, k) or None, reason skipped) for ``device``, the reference excluded."""
    try:
        gpus = faiss_gpus()
        faiss_missing = None
    except ImportError as error:
        gpus, faiss_missing = 0, f"faiss is not importable ({error})"
    out = []
    if device == "cuda":
        reason = faiss_missing or (None if gpus else "faiss has no GPU support here (faiss.get_num_gpus() == 0)")
        out.append(("faiss-gpu", None if reason else (lambda x, k: knn_faiss(x, k, use_gpu=True)), reason))
        reason = None if torch.cuda.is_available() else "torch sees no CUDA device"
        out.append(("torch-cuda", None if reason else (lambda x, k: knn_torch(x, k, device="cuda")), reason))
    out.append(("faiss-cpu", None if faiss_missing else (lambda x, k: knn_faiss(x, k, use_gpu=False)), faiss_missing))
    return out


def timed_call(fn, x: np.ndarray, k: int) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    fn(x[: min(len(x), 256)], min(k, 8))  # warm-up: GPU context, faiss resources, kernels
    start = time.perf_counter()
    out = fn(x, k)
    return out, time.perf_counter() - start


def run(device: str, features, n: int | None, dim: int, k: int, min_agreement: float, max_diff: float) -> dict:
    x, labels, source = load_features(features, n, dim)
    (ref_indices, ref_sims), ref_s = timed_call(lambda a, kk: knn_torch(a, kk, device="cpu"), x, k)
    rows = [{"backend": "torch-cpu", "reference": True, "seconds": ref_s}]
    if labels is not None:
        rows[0]["label_agreement"] = label_agreement(ref_indices, labels)
    failures = []
    for name, fn, reason in backends(device):
        if fn is None:
            rows.append({"backend": name, "skipped": reason})
            continue
        try:
            (indices, sims), seconds = timed_call(fn, x, k)
        except Exception as error:  # one backend failing is recorded; the others still run
            rows.append({"backend": name, "error": f"{type(error).__name__}: {error}"})
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        row = {
            "backend": name,
            "seconds": seconds,
            "speedup_over_reference": ref_s / seconds,
            **compare(indices, sims, ref_indices, ref_sims),
        }
        if labels is not None:
            row["label_agreement"] = label_agreement(indices, labels)
        row["ok"] = row["id_agreement"] >= min_agreement and row["max_similarity_diff"] <= max_diff
        if not row["ok"]:
            failures.append(f"{name}: ids agree {row['id_agreement']:.4f}, max|Δs| {row['max_similarity_diff']:.1e}")
        rows.append(row)
    return {
        "device": device,
        "features": source,
        "n": len(x),
        "dim": x.shape[1],
        "k": k,
        "preprocessing": "centred, L2-normalised rows (centred_unit_rows); cosine k-NN, self excluded",
        "reference": "torch-cpu (knn_torch, device='cpu')",
        "thresholds": {"min_id_agreement": min_agreement, "max_similarity_diff": max_diff},
        "rows": rows,
        "failures": failures,
        "ok": not failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--features", default=None, help=f"an .npz with 'features' (default {DEFAULT_FEATURES})")
    parser.add_argument("--n", type=int, default=None, help="rows (a seeded subset of the file; synthetic: 10000)")
    parser.add_argument("--dim", type=int, default=1280, help="width of the synthetic features")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--min-agreement", type=float, default=0.99, help="least id agreement a backend may show")
    parser.add_argument("--max-similarity-diff", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="file under benchmarks/results or a path (gpu_knn_<device>.json)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args.device, args.features, args.n, args.dim, args.k, args.min_agreement, args.max_similarity_diff)
    for row in result["rows"]:
        if "skipped" in row or "error" in row:
            print(f"{row['backend']:11s} {row.get('skipped') or row['error']}")
        else:
            print(f"{row['backend']:11s} {row['seconds']:7.3f} s", end="")
            if not row.get("reference"):
                print(f"  ids {row['id_agreement']:.4f}  max|Δs| {row['max_similarity_diff']:.2e}", end="")
            print()
    write_result(args.out or f"gpu_knn_{args.device}.json", result)
    for failure in result["failures"]:
        print(f"gpu_knn: FAILED {failure}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
