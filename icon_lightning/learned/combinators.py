"""Combinators on learned distributions: debiasing in log space, kernel mixtures inside one softmax."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from icon_lightning.functional import check_alpha
from icon_lightning.learned.base import Learned
from icon_lightning.rows import Rows


class Debiased(Learned):
    """log q~ = logaddexp(log(1−α) + log q, log(α/M)) over the valid candidates (α ∈ [0, 1))."""

    def __init__(self, base: Learned, alpha: float = 0.6) -> None:
        super().__init__()
        self.base = base
        self.alpha = check_alpha("q.alpha (learned.Debiased, the learned side's debiasing)", alpha)

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        return self.base.debiased(anchors, candidates, valid, self.alpha)

    def sparse_kl(self, p, anchors: list[Rows], candidates: list[Rows], alpha: float = 0.0):
        # (1−β)((1−α) q + α/M) + β/M = (1−α)(1−β) q + (1 − (1−α)(1−β))/M: debiasing composes.
        return self.base.sparse_kl(p, anchors, candidates, 1.0 - (1.0 - alpha) * (1.0 - self.alpha))


class KernelMixture(Learned):
    """Kernels added inside one softmax: q ∝ Σ_k w_k K_k, as a weighted logaddexp of log-kernels.

    Kernel-InfoNCE's "Simple Sum" (every kernel on all of z) and "Concatenation Sum" (each kernel on its
    half of z, via ``ExponentialKernel(part=...)``).
    """

    def __init__(self, kernels: list[Learned], weights: list[float] | None = None) -> None:
        super().__init__()
        if not kernels:
            raise ValueError("kernels: expected at least one kernel")
        weights = [1.0] * len(kernels) if weights is None else list(weights)
        if len(weights) != len(kernels) or any(w <= 0 for w in weights):
            raise ValueError(f"weights: expected {len(kernels)} positive numbers, got {weights}")
        self.kernels = nn.ModuleList(kernels)
        self.weights = weights

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:
        parts = [math.log(w) + k.log_kernel(anchors, candidates) for w, k in zip(self.weights, self.kernels)]
        return torch.logsumexp(torch.stack(parts), dim=0)
