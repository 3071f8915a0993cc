"""Helpers shared by the benchmark scripts: timing, matmul throughput, atomic JSON results."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from icon_lightning.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3, device: str = "cpu", warmups: int = 1, statistic=min) -> float:
    """``statistic`` (default: the fastest) of ``repeats`` timed calls of ``fn`` after ``warmups`` untimed ones."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistic(times)


def best_of(fn, repeats: int = 3, device: str = "cpu") -> float:
    """Fastest of ``repeats`` timed calls, after one warm-up (less noisy than the mean on a shared machine)."""
    return timed(fn, repeats, device)


def matmul_gflops(n: int = 2048, device: str = "cpu", dtype=torch.float32) -> float:
    """This machine's fp32 matmul throughput now (GFLOP/s), for ratios measured in the same run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b, 5, device) / 1e9


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """``payload`` with this machine's description, written atomically to ``path`` (default: results/<name>)."""
    path = Path(path) if path is not None else RESULTS / name
    atomic_write_json(path, {"machine": machine(), **payload})
    print(f"wrote {path}")
    return path
