"""Log-kernels on embeddings: unnormalised log k(x_i, y_j), (B, M). Normalisation happens later."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional.distances import pairwise_sqeuclidean


def log_exponential_kernel(x: Tensor, y: Tensor, gamma: float, temperature: float, eps: float = 1e-12) -> Tensor:
    """log k = −(‖x−y‖² + ε)^(γ/2) / τ: γ=2 Gaussian, γ=1 Laplacian, γ=0.5 (Kernel-InfoNCE, Tan et al.).

    ε sits *inside* the power so the gradient of ‖·‖^γ stays finite at zero distance for γ < 2; the
    kernel is exact in log space, so no 1e-6 is ever added to exp(logits).
    """
    return -torch.pow(pairwise_sqeuclidean(x, y) + eps, gamma / 2.0) / temperature


def log_student_t_kernel(x: Tensor, y: Tensor, dof: float = 1.0) -> Tensor:
    """log k = −(ν+1)/2 · log(1 + ‖x−y‖²/ν): the heavy-tailed kernel of t-SNE (ν = 1) and t-SimCLR."""
    return -(dof + 1.0) / 2.0 * torch.log1p(pairwise_sqeuclidean(x, y) / dof)
