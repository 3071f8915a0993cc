"""k-NN speed: exact cosine k-NN of N × D float32 rows with FAISS and with chunked torch.

    python -m benchmarks.knn [--n 50000 --d 384 --k 10]   → benchmarks/results/knn_<device>.json

Effective GFLOP/s = 2·N²·D / time; the ratio is to this machine's fp32 matmul GFLOP/s measured in the same run.
Also times the k-NN cache's key, the SHA-256 of every feature byte (``NeighbourTable.fingerprint``), on an
ImageNet-sized memory-mapped fp16 array (1,281,167 × 1,024, 2.6 GB; ``--fingerprint-rows 0`` skips it), twice,
into its own ``knn_fingerprint_<device>.json`` (``--fingerprint-only`` runs just that).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import matmul_gflops, write_result
from icon_lightning.data.neighbours import NeighbourTable, faiss_gpus, knn_faiss, knn_torch


def time_fingerprint(rows: int, dim: int) -> dict:
    """Seconds to fingerprint a (rows, dim) float16 memory map, written here in blocks (never whole in RAM)."""
    with tempfile.TemporaryDirectory() as folder:
        array = np.lib.format.open_memmap(Path(folder) / "x.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
        rng = np.random.default_rng(0)
        for start in range(0, rows, 65536):
            array[start : start + 65536] = rng.standard_normal((min(65536, rows - start), dim), dtype=np.float32)
        array.flush()
        array = np.load(Path(folder) / "x.npy", mmap_mode="r")
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            NeighbourTable.fingerprint(array)
            seconds.append(time.perf_counter() - start)
        del array
    gb = rows * dim * 2 / 1e9
    print(f"fingerprint {rows} × {dim} fp16 ({gb:.2f} GB): {seconds[0]:.2f} s, again {seconds[1]:.2f} s")
    return {"rows": rows, "dim": dim, "dtype": "float16", "gigabytes": gb, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--fingerprint-rows", type=int, default=1_281_167)
    parser.add_argument("--fingerprint-dim", type=int, default=1024)
    parser.add_argument("--fingerprint-only", action="store_true")
    parser.add_argument("--out", default=None, help="file name under benchmarks/results (knn_<device>.json)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fingerprint_rows:
        name = f"knn_fingerprint_{device}.json" if args.out is None else f"fingerprint_{args.out}"
        write_result(name, time_fingerprint(args.fingerprint_rows, args.fingerprint_dim))
    if args.fingerprint_only:
        return
    x = np.random.default_rng(0).normal(size=(args.n, args.d)).astype(np.float32)
    flops = 2 * args.n**2 * args.d
    peak = matmul_gflops(device=device)
    rows = []
    backends = [
        ("faiss-" + ("gpu" if faiss_gpus() else "cpu"), lambda: knn_faiss(x, args.k)),
        ("torch-" + device, lambda: knn_torch(x, args.k, args.chunk_size, device)),
    ]
    for name, fn in backends:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        gflops = flops / seconds / 1e9
        rows.append({"backend": name, "seconds": seconds, "gflops": gflops, "fraction_of_matmul": gflops / peak})
        print(f"{name:12s} {seconds:7.2f} s  {gflops:8.1f} GFLOP/s  {gflops / peak:.2f} of matmul ({peak:.1f})")
    write_result(
        args.out or f"knn_{device}.json", {"n": args.n, "d": args.d, "k": args.k, "matmul_gflops": peak, "rows": rows}
    )


if __name__ == "__main__":
    main()
