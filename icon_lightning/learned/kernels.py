"""Kernels on embeddings: Gaussian (SNE, InfoNCE), Student-t (t-SNE, t-SimCLR), exponential (Kernel-InfoNCE)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from icon_lightning.functional import (
    check_positive,
    cosine_similarity,
    log_exponential_kernel,
    log_student_t_kernel,
    pairwise_sqeuclidean,
)
from icon_lightning.learned.base import Learned
from icon_lightning.rows import Rows


class Gaussian(Learned):
    """q(j|i) ∝ exp(s_ij / τ) on embeddings z.

    metric: ``sqeuclidean`` s = −‖z_i − z_j‖² (SNE: τ = 1, i.e. σ² = 1/2);
            ``cosine`` s = cos(z_i, z_j) (InfoNCE / SimCLR / SupCon / CLIP with temperature τ);
            ``dot`` s = ⟨z_i, z_j⟩ (cross-entropy against class prototypes: the logits of a linear layer).
    On the unit sphere −‖x−y‖²/τ = 2cos/τ − 2/τ, so ``sqeuclidean`` at τ equals ``cosine`` at τ/2 there.
    """

    def __init__(self, metric: Literal["sqeuclidean", "cosine", "dot"] = "cosine", temperature: float = 0.5) -> None:
        super().__init__()
        if metric not in ("sqeuclidean", "cosine", "dot"):
            raise ValueError(f"metric: expected 'sqeuclidean', 'cosine' or 'dot', got {metric!r}")
        self.metric = metric
        self.temperature = check_positive("temperature", temperature)

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:
        x, y = anchors.z, candidates.z
        if self.metric == "cosine":
            s = cosine_similarity(x, y)
        elif self.metric == "dot":
            s = x @ y.T
        else:
            s = -pairwise_sqeuclidean(x, y)
        return s / self.temperature


class StudentT(Learned):
    """q(j|i) ∝ (1 + ‖z_i − z_j‖²/ν)^(−(ν+1)/2): t-SNE (ν = 1) and t-SimCLR."""

    def __init__(self, dof: float = 1.0) -> None:
        super().__init__()
        self.dof = check_positive("dof", dof)

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:
        return log_student_t_kernel(anchors.z, candidates.z, self.dof)


class ExponentialKernel(Learned):
    """q(j|i) ∝ exp(−(‖z_i − z_j‖² + ε)^(γ/2) / τ) (Kernel-InfoNCE, Tan et al., ICLR 2024).

    gamma: γ = 2 Gaussian, 1 Laplacian, 0.5 the heavier-tailed kernel.
    normalize: L2-normalise z first (the whole embedding, before ``part`` is taken).
    part: use ``all`` of z, or its ``first_half`` / ``second_half`` (Concatenation Sum kernels).
    """

    def __init__(
        self,
        gamma: float = 1.0,
        temperature: float = 0.5,
        eps: float = 1e-12,
        normalize: bool = True,
        part: Literal["all", "first_half", "second_half"] = "all",
    ) -> None:
        super().__init__()
        if not 0 < gamma <= 2:
            raise ValueError(f"gamma: expected 0 < γ ≤ 2 (a positive-definite exponential kernel), got {gamma}")
        if part not in ("all", "first_half", "second_half"):
            raise ValueError(f"part: expected 'all', 'first_half' or 'second_half', got {part!r}")
        self.gamma = float(gamma)
        self.temperature = check_positive("temperature", temperature)
        self.eps = float(eps)
        self.normalize = normalize
        self.part = part

    def _select(self, z: Tensor) -> Tensor:
        if self.normalize:
            z = F.normalize(z, dim=-1)
        if self.part == "all":
            return z
        if z.shape[-1] % 2:
            raise ValueError(f"part: splitting z in halves needs an even dimension, got D={z.shape[-1]}")
        half = z.shape[-1] // 2
        return z[:, :half] if self.part == "first_half" else z[:, half:]

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:
        return log_exponential_kernel(
            self._select(anchors.z), self._select(candidates.z), self.gamma, self.temperature, self.eps
        )
