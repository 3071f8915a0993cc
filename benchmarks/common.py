"""Helpers shared by the benchmark scripts: timing, matmul throughput, atomic JSON results, long-tailed set names, and
the generated blocks of README.md and docs/*.md (found by their markers wherever they are)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------- long-tailed sets
# ``<set>_lt<r>``: the long-tailed version of a labelled set with imbalance ratio r (icon_lightning.data.long_tailed:
# class sizes floor(n_max · r^(-rank/(C-1))), class 0 largest, rows drawn by default_rng(seed), one subset per seed).
LONG_TAILED_RATIOS = (10, 100)
LONG_TAILED_RULE = (
    "class sizes floor(n_max * r^(-rank/(C-1))), n_max the smallest class's size in the full set, class 0 largest "
    "(fixed order), rows of each class drawn without replacement by numpy default_rng(seed) "
    "(icon_lightning.data.long_tailed)"
)


def long_tailed_names(bases: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``<base>_lt<r>`` for every base set and every ratio of ``LONG_TAILED_RATIOS``."""
    return tuple(f"{base}_lt{r}" for base in bases for r in LONG_TAILED_RATIOS)


def long_tailed_name(name: str) -> tuple[str, int | None]:
    """(base set, imbalance ratio) of ``<base>_lt<r>``; (name, None) for any other name."""
    match = re.fullmatch(r"(.+)_lt(\d+)", name)
    return (match[1], int(match[2])) if match else (name, None)


def long_tailed_subset(labels: np.ndarray, ratio: int, seed: int) -> tuple[np.ndarray, dict]:
    """The sorted indices of the long-tailed subset of ``labels`` for ``seed``, and its record for a results file:
    ratio, seed, class sizes (head class to tail), size, the sha256 of the indices (int64 bytes) and the rule."""
    # Imported here: icon_lightning.data's package imports the DataModule (Lightning), which the light benchmarks
    # that use this module (k-NN, kernels) need not pay for.
    from icon_lightning.data.long_tailed import long_tailed_indices

    index = long_tailed_indices(labels, ratio, seed)
    _, sizes = np.unique(np.asarray(labels)[index], return_counts=True)  # in rank order: the sorted labels
    record = {
        "ratio": ratio,
        "seed": seed,
        "class_sizes": [int(n) for n in sizes],
        "size": int(len(index)),
        "of": int(len(labels)),
        "indices_sha256": hashlib.sha256(index.tobytes()).hexdigest(),
        "rule": LONG_TAILED_RULE,
    }
    return index, record


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold a generated block: README.md, then every ``docs/*.md``."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def block_file(markers: tuple[str, str], root: Path = ROOT) -> Path:
    """The one page of ``pages(root)`` that holds the generated block between ``markers`` (README's tables moved to
    docs/ pages: a generator writes wherever its block is); none, or more than one, is a one-line error."""
    holders = [page for page in pages(root) if page.is_file() and markers[0] in page.read_text()]
    if len(holders) != 1:
        found = ", ".join(str(page.relative_to(root)) for page in holders) or "none of them"
        raise ValueError(f"{markers[0]}: expected in exactly one of README.md and docs/*.md, found in {found}")
    text = holders[0].read_text()
    if markers[1] not in text[text.index(markers[0]) :]:
        raise ValueError(f"{markers[1]}: expected after {markers[0]} in {holders[0].relative_to(root)}")
    return holders[0]


def readme_block(text: str, *, markers: tuple[str, str]) -> str:
    """A generated part of a page: the text between its two ``markers``."""
    start, end = (text.index(m) for m in markers)
    return text[start + len(markers[0]) : end].strip()


def read_block(markers: tuple[str, str], root: Path = ROOT) -> str:
    """The generated block between ``markers``, from the page that holds it (``block_file``)."""
    return readme_block(block_file(markers, root).read_text(), markers=markers)


def write_readme_block(table: str, path: Path | None = None, *, markers: tuple[str, str]) -> Path:
    """Replace the part between ``markers`` by ``table`` (the rest of the file as it was), in ``path`` or, by
    default, in the one page of README.md and docs/*.md that holds the markers (``block_file``); returns the page."""
    path = Path(path) if path is not None else block_file(markers)
    text = path.read_text()
    start, end = (text.index(m) for m in markers)
    path.write_text(text[: start + len(markers[0])] + "\n" + table.strip() + "\n" + text[end:])
    return path
