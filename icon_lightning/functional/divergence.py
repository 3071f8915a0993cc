"""KL(p ‖ q) per anchor, with p == 0 entries contributing exactly 0."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_divergence(p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row true KL Σ_j p (log p − log q) and cross-entropy −Σ_j p log q, both (B,).

    Entries with p == 0 contribute exactly 0 to both, even where log_q == -inf, and their gradient is 0
    (no NaN). An entry with p > 0 and log_q == -inf gives +inf, which is the true value.
    """
    positive = p > 0
    safe_log_q = torch.where(positive, log_q, torch.zeros_like(log_q))
    cross_entropy = -(p * safe_log_q).sum(-1)
    neg_entropy = (p * torch.log(torch.where(positive, p, torch.ones_like(p)))).sum(-1)  # = xlogy(p, p), ~3× faster
    return neg_entropy + cross_entropy, cross_entropy
