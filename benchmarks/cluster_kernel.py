"""Time the shared-cluster-likelihood kernel against a plain matmul of the same shape, in one run.

    python -m benchmarks.cluster_kernel [--device cuda] [--out benchmarks/results/cluster_kernel_<device>.json]

For each (B, K): forward+backward of ``functional.log_cluster_affinity`` (the B×B×K kernel as one matmul
plus its exact underflow repair), of the naive (B, B, K) logsumexp where it fits in memory, and of a plain
B×K @ K×B matmul. Reports ms, achieved FLOP/s (2·B·B·K per product) and the ratio to the plain matmul.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import timed, write_result
from icon_lightning.functional import log_cluster_affinity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="256,1024,4096")
    parser.add_argument("--clusters", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = args.device
    rows = []
    for b in map(int, args.sizes.split(",")):
        for k in map(int, args.clusters.split(",")):
            logits = torch.randn(b, k, device=device, requires_grad=True)

            def kernel(logits=logits):
                log_phi = torch.log_softmax(logits, -1)
                log_cluster_affinity(log_phi, log_phi).sum().backward()

            def naive(logits=logits):
                log_phi = torch.log_softmax(logits, -1)
                log_size = torch.logsumexp(log_phi, 0)
                torch.logsumexp(log_phi.unsqueeze(1) + (log_phi - log_size).unsqueeze(0), -1).sum().backward()

            a = torch.randn(b, k, device=device, requires_grad=True)

            def matmul(a=a):
                (a @ a.T).sum().backward()

            flops = 3 * 2 * b * b * k  # forward product + two backward products
            t_kernel, t_matmul = (timed(f, args.repeats, device, 2, statistics.median) for f in (kernel, matmul))
            naive_bytes = b * b * k * 4 * 3
            t_naive = (
                timed(naive, max(2, args.repeats // 3), device, 2, statistics.median) if naive_bytes < 8e9 else None
            )
            row = {
                "B": b,
                "K": k,
                "kernel_ms": 1e3 * t_kernel,
                "matmul_ms": 1e3 * t_matmul,
                "naive_ms": None if t_naive is None else 1e3 * t_naive,
                "kernel_tflops": flops / t_kernel / 1e12,
                "matmul_tflops": flops / t_matmul / 1e12,
                "fraction_of_matmul": t_matmul / t_kernel,
            }
            rows.append(row)
            naive_text = "n/a (B·B·K too big)" if t_naive is None else f"{row['naive_ms']:.2f}"
            print(
                f"B={b:5d} K={k:5d} kernel {row['kernel_ms']:8.2f} ms  matmul {row['matmul_ms']:8.2f} ms  "
                f"naive {naive_text:>10}  fraction {row['fraction_of_matmul']:.2f}",
                flush=True,
            )
    payload = {"device": device, "dtype": "float32", "statistic": "median of repeats after 2 warm-ups", "rows": rows}
    write_result(f"cluster_kernel_{device}.json", payload, args.out)


if __name__ == "__main__":
    main()
