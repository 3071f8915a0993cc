"""Pairwise distances and similarities between anchors x (B, D) and candidates y (M, D)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pairwise_sqeuclidean(x: Tensor, y: Tensor) -> Tensor:
    """(B, M) squared euclidean distances ‖x_i − y_j‖², via the Gram matrix, clamped at 0.

    Unlike ``torch.cdist`` followed by a square, the gradient is finite at zero distance.
    """
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(0) - 2.0 * x @ y.T
    return sq.clamp_min(0.0)


def cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """(B, M) cosine similarities between the rows of x and y."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
