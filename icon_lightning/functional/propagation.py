"""Neighbour propagation on a square, row-stochastic (B, B) neighbourhood: walks on the graph."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional.masking import normalize_rows


def propagate(p: Tensor, steps: int, uniform: bool = False, valid: Tensor | None = None) -> Tensor:
    """P̃ ∝ P + P² + … + P^s, or with ``uniform`` ∝ 1[P + … + P^s > 0]; rows renormalised after masking.

    p: (B, B) row-stochastic; candidates are the anchors themselves, in the same order.
    steps: s ≥ 1 (s = 1 returns p unchanged up to masking; s = 2 adds one-step walks).
    """
    # P is sparse for graph neighbourhoods (k non-zeros a row): multiply with a sparse left factor, so one
    # step costs nnz(P)·B instead of B³.
    # Walk in at least float32: sparse CUDA matmuls have no bf16 kernel, and sums of powers lose mass in bf16.
    work = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
    left = work.to_sparse() if (work != 0).float().mean() < 0.25 else work
    total = work
    power = work
    for _ in range(steps - 1):
        power = left @ power
        total = total + power
    if uniform:
        total = (total > 0).to(work.dtype)
    return normalize_rows(total, valid).to(p.dtype)
