"""Global-batch helpers for DDP: gather rows from every process, with gradients where the loss needs them."""

from __future__ import annotations

import torch
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather(x: Tensor, with_grad: bool = False) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, in rank order.

    with_grad: use the autograd-aware collective, whose backward all-reduces the gradient, so a loss
    computed over the global batch sends every rank's share back to its own rows.
    """
    rank, size = world()
    if size == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x))
    parts = [torch.empty_like(x) for _ in range(size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)
