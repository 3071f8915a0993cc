"""Where this process stands in a torch.distributed job."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_zero_first(build: Callable[[], T], then: Callable[[], T] | None = None) -> T:
    """Rank 0 builds, the rest wait: ``build()`` on rank 0 while the other processes wait at a barrier, then
    ``then()`` (default ``build()``) on them, which finds what rank 0 wrote. Without a process group: ``build()``.
    The one form of "rank 0 builds, everyone waits" (k-NN table, shared views, extracted features)."""
    rank, size = world()
    result = build() if rank == 0 else None
    if size > 1:
        torch.distributed.barrier()
    return result if rank == 0 else (then or build)()
