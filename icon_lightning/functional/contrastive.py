"""Losses on raw similarity logits that are not a KL between two neighbourhoods."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional.cluster import log_matmul_exp, weighted_log_dot


def sc_infonce(s: Tensor, positive: Tensor, alpha: float, beta: float) -> Tensor:
    """(B,) SC-InfoNCE per anchor: −α s_i+ + log Σ_{j≠+} e^{s_ij} + β/(M−1) Σ_{j≠+} s_ij.

    s: (B, M) similarity logits; positive: (B, M) bool with exactly one True per row.
    """
    m = s.shape[1]
    s_pos = (s * positive).sum(1)
    negatives = torch.logsumexp(s.masked_fill(positive, float("-inf")), 1)
    s_neg_sum = s.masked_fill(positive, 0.0).sum(1)
    return -alpha * s_pos + negatives + beta / (m - 1) * s_neg_sum


def scan_consistency(log_probs_a: Tensor, log_probs_c: Tensor, p: Tensor) -> Tensor:
    """(B,) SCAN's consistency term −Σ_j p_ij log⟨φ_i, φ_j⟩ (Van Gansbeke et al., 2020).

    log_probs_a: (B, K) anchors' log cluster probabilities; log_probs_c: (M, K) candidates'; p: (B, M) weights
    over each anchor's neighbours (SCAN samples one neighbour; p averages over them). Entries with p = 0 count 0
    and are never computed (``weighted_log_dot``).
    """
    return -weighted_log_dot(p, log_probs_a, log_probs_c)


def entropy(probs: Tensor) -> Tensor:
    """H(probs) of a (K,) distribution; 0·log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum()


def beta_pmi(log_probs_a: Tensor, log_probs_c: Tensor, log_prior: Tensor, beta: float) -> Tensor:
    """(B, M) TEMI's β-PMI: log Σ_c (φ_ic ψ_jc)^β / π_c (Adaloglou et al., 2023).

    log_probs_a: (B, K) student log-probabilities; log_probs_c: (M, K) teacher log-probabilities;
    log_prior: (K,) log of the cluster prior π. β = 1 is the pointwise mutual information of the pair.
    """
    return log_matmul_exp(beta * log_probs_a, beta * log_probs_c - log_prior)


def weighted_beta_pmi(
    weight: Tensor, log_probs_a: Tensor, log_probs_c: Tensor, log_prior: Tensor, beta: float
) -> Tensor:
    """(B,) Σ_j w_ij β-PMI_ij over the pairs with w_ij > 0 only (``beta_pmi`` at those entries; w: (B, M))."""
    return weighted_log_dot(weight, beta * log_probs_a, beta * log_probs_c - log_prior)
