"""Gaussian neighbourhood on input features → SNE (fixed σ) and t-SNE (σ_i from a perplexity)."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional import (
    gaussian_log_affinity,
    masked_log_softmax,
    normalize_rows,
    pairwise_sqeuclidean,
    sigma_for_perplexity,
)
from icon_lightning.rows import Rows
from icon_lightning.supervisory.base import Supervisory, target_dtype


class Gaussian(Supervisory):
    """p(j|i) ∝ exp(−‖x_i − x_j‖² / 2σ_i²) on ``features``.

    sigma: fixed bandwidth (SNE). Ignored when ``perplexity`` is given.
    perplexity: per-anchor σ_i by bisection so that exp(H(p(.|i))) = perplexity (t-SNE).
    symmetric: replace p by the row-normalised (p + pᵀ)/2 (t-SNE's symmetrisation; square batches only).
    """

    def __init__(self, sigma: float = 1.0, perplexity: float | None = None, symmetric: bool = False) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma: expected a positive bandwidth, got {sigma}")
        if perplexity is not None and perplexity <= 1:
            raise ValueError(f"perplexity: expected a value > 1, got {perplexity}")
        self.sigma = sigma
        self.perplexity = perplexity
        self.symmetric = symmetric

    @torch.no_grad()
    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        if anchors.features is None or candidates.features is None:
            raise ValueError("features: required by supervisory.Gaussian but missing from the rows")
        sqdist = pairwise_sqeuclidean(anchors.features, candidates.features)
        if self.perplexity is not None:
            if self.perplexity >= sqdist.shape[1]:
                raise ValueError(
                    f"perplexity: expected fewer than the {sqdist.shape[1]} candidates, got {self.perplexity}"
                )
            sigma = sigma_for_perplexity(sqdist, self.perplexity, valid)
        else:
            sigma = self.sigma
        p = masked_log_softmax(gaussian_log_affinity(sqdist, sigma), valid).exp()
        if self.symmetric:
            if p.shape[0] != p.shape[1]:
                raise ValueError(f"symmetric: needs candidates == anchors, got p of shape {tuple(p.shape)}")
            p = normalize_rows((p + p.T) / 2, valid)
        return p.to(target_dtype(anchors))
