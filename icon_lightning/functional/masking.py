"""Masking of invalid pairs (self pairs) and row normalisation, in linear and in log space.

``valid`` is a (B, M) bool tensor: True where candidate j may be a neighbour of anchor i. Both p and q
use the same ``valid`` so self pairs are masked on both sides by one rule.
"""

from __future__ import annotations

import torch
from torch import Tensor


def self_pairs_valid(num_anchors: int, num_candidates: int, offset: int = 0, device=None) -> Tensor:
    """(B, M) mask that is False at the self pair (i, offset + i) and True elsewhere.

    ``offset`` is the position of the first anchor among the candidates, e.g. ``rank * B`` when the local
    anchors of one DDP process are compared with the gathered global batch.
    """
    valid = torch.ones(num_anchors, num_candidates, dtype=torch.bool, device=device)
    rows = torch.arange(num_anchors, device=device)
    cols = rows + offset
    keep = cols < num_candidates
    valid[rows[keep], cols[keep]] = False
    return valid


def normalize_rows(weights: Tensor, valid: Tensor | None = None) -> Tensor:
    """Row-normalise non-negative (B, M) ``weights`` after zeroing invalid pairs.

    Rows without any mass stay exactly zero (an anchor without a positive among the candidates); callers
    leave such anchors out of the mean.
    """
    if valid is not None:
        weights = weights.masked_fill(~valid, 0.0)
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def masked_log_softmax(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """log_softmax over candidates of (B, M) ``scores`` with invalid pairs at exactly -inf.

    A row whose valid entries are all -inf stays all -inf instead of turning into NaN.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(scores, dim=-1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    return scores - norm
