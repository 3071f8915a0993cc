"""Gaussian affinities on input features: fixed σ (SNE) or per-point σ_i matched to a perplexity (t-SNE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_log_affinity(sqdist: Tensor, sigma: Tensor | float) -> Tensor:
    """(B, M) −d²_ij / (2σ_i²); ``sigma`` is a scalar or a (B,) per-anchor bandwidth."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        sigma = sigma.unsqueeze(-1)
    return -sqdist / (2.0 * sigma**2)


@torch.no_grad()
def sigma_for_perplexity(sqdist: Tensor, perplexity: float, valid: Tensor | None = None, steps: int = 64) -> Tensor:
    """(B,) σ_i such that the entropy of p(.|i) ∝ exp(−d²_ij / 2σ_i²) equals log(perplexity).

    Bisection on log β_i, β = 1/(2σ²), vectorised over rows; entropy is monotone in β so 64 halvings of
    a range of e^±40 reach float64 precision. Rows are searched in float64.
    """
    d = sqdist.double()
    if valid is not None:
        d = d.masked_fill(~valid, float("inf"))
    target = math.log(perplexity)
    lo = torch.full(d.shape[:1], -40.0, dtype=torch.float64, device=d.device)
    hi = torch.full_like(lo, 40.0)
    # Shift distances by each row's smallest valid distance: does not change p, keeps exp() in range.
    d = d - d.amin(-1, keepdim=True)
    for _ in range(steps):
        mid = (lo + hi) / 2
        log_w = -d * mid.exp().unsqueeze(-1)
        log_p = log_w - torch.logsumexp(log_w, -1, keepdim=True)
        entropy = -torch.where(torch.isfinite(log_p), log_p.exp() * log_p, torch.zeros_like(log_p)).sum(-1)
        too_flat = entropy > target  # entropy falls as β grows
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    beta = ((lo + hi) / 2).exp()
    return torch.sqrt(1.0 / (2.0 * beta)).to(sqdist.dtype)
