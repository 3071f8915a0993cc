"""k-NN speed: exact cosine k-NN of N × D float32 rows with FAISS and with chunked torch.

    python -m benchmarks.knn [--n 50000 --d 384 --k 10]   → benchmarks/results/knn_<device>.json

Effective GFLOP/s = 2·N²·D / time; the ratio is to this machine's fp32 matmul GFLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import matmul_gflops, write_result
from icon_lightning.data.neighbours import faiss_gpus, knn_faiss, knn_torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
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
    write_result(f"knn_{device}.json", {"n": args.n, "d": args.d, "k": args.k, "matmul_gflops": peak, "rows": rows})


if __name__ == "__main__":
    main()
