"""Losses on raw similarity logits that are not a KL between two neighbourhoods."""

from __future__ import annotations

import torch
from torch import Tensor


def sc_infonce(s: Tensor, positive: Tensor, alpha: float, beta: float) -> Tensor:
    """(B,) SC-InfoNCE per anchor: −α s_i+ + log Σ_{j≠+} e^{s_ij} + β/(M−1) Σ_{j≠+} s_ij.

    s: (B, M) similarity logits; positive: (B, M) bool with exactly one True per row.
    """
    m = s.shape[1]
    s_pos = (s * positive).sum(1)
    negatives = torch.logsumexp(s.masked_fill(positive, float("-inf")), 1)
    s_neg_sum = s.masked_fill(positive, 0.0).sum(1)
    return -alpha * s_pos + negatives + beta / (m - 1) * s_neg_sum
