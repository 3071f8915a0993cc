"""The shared cluster likelihood q(j|i) = Σ_c φ_ic φ_jc / Σ_k φ_kc in log space."""

from __future__ import annotations

import torch
from torch import Tensor

REPAIR_ELEMENTS = 1 << 22  # at most 4 M pair × cluster terms per exact-repair block (16 MB in float32)

# Below this row total, normalising in probability space loses relative precision (float32 normals end ~1e-38).
PROBABILITY_SPACE_MIN = 1e-30


def log_matmul_exp(a: Tensor, b: Tensor) -> Tensor:
    """(B, M) log Σ_c exp(a_ic + b_jc) for a (B, K), b (M, K), without a (B, M, K) intermediate.

    Shifts each row by its maximum and multiplies the exponentials (one matmul). Entries whose sum
    underflows to 0 (pairs whose mass is more than ~e^-80 below the row scales) are recomputed exactly
    with a logsumexp over K for just those pairs, so the result is exact everywhere and never -inf for
    finite inputs.
    """
    a_max = a.amax(-1, keepdim=True)
    b_max = b.amax(-1, keepdim=True)
    s = torch.exp(a - a_max) @ torch.exp(b - b_max).T
    tiny = torch.finfo(s.dtype).tiny
    under = s <= tiny
    out = torch.log(torch.where(under, torch.ones_like(s), s)) + a_max + b_max.T
    if bool(under.any()):
        i, j = under.nonzero(as_tuple=True)
        chunk = max(1, REPAIR_ELEMENTS // a.shape[-1])  # bounded (pairs, K) blocks, also for very sharp heads
        for start in range(0, len(i), chunk):
            ii, jj = i[start : start + chunk], j[start : start + chunk]
            out = out.index_put((ii, jj), log_dot_pairs(a, b, ii, jj))
    return out


def log_dot_pairs(a: Tensor, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """(P,) log Σ_c exp(a_{i_n c} + b_{j_n c}) for the P pairs (i_n, j_n) only: ``log_matmul_exp`` at those
    entries, exactly (a logsumexp over K)."""
    return torch.logsumexp(a[i] + b[j], dim=-1)


def weighted_log_dot(weight: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(B,) Σ_j w_ij log Σ_c exp(a_ic + b_jc) over the pairs with w_ij > 0 (w: (B, M); pairs with w = 0 count 0).

    Only those pairs are computed: a k-NN weight of k pairs per row costs B·k·K, where the dense
    ``log_matmul_exp`` costs B·M·K forward and backward. Each row's pairs are one segment (``nonzero`` lists them
    row by row), summed by ``segment_reduce``: no atomic adds, so the same bits on every run and device."""
    i, j = (weight > 0).nonzero(as_tuple=True)
    terms = weight[i, j] * log_dot_pairs(a, b, i, j)
    lengths = torch.bincount(i, minlength=len(weight))
    return torch.segment_reduce(terms, "sum", lengths=lengths, unsafe=True, initial=0)


def log_cluster_affinity(log_phi_a: Tensor, log_phi_c: Tensor, log_weight_c: Tensor | None = None) -> Tensor:
    """(B, M) log q(j|i) before masking: log Σ_c φ_ic w_j φ_jc / Σ_k w_k φ_kc.

    log_phi_a: (B, K) log cluster probabilities of the anchors.
    log_phi_c: (M, K) log cluster probabilities of the candidates.
    log_weight_c: optional (M,) log weights w_j of the candidates: the degree d_j for the
        normalized-cuts variant; uniform (None) for k-means and I-Con clustering.
    Cluster sizes n_c = Σ_k w_k φ_kc are taken over the candidates.
    """
    if log_weight_c is not None:
        log_phi_c = log_phi_c + log_weight_c.unsqueeze(-1)
    log_size = torch.logsumexp(log_phi_c, dim=0)  # (K,)
    return log_matmul_exp(log_phi_a, log_phi_c - log_size)


def log_debiased_cluster_affinity(
    log_phi_a: Tensor,
    log_phi_c: Tensor,
    alpha: float,
    valid: Tensor | None = None,
    log_weight_c: Tensor | None = None,
) -> Tensor | None:
    """(B, M) log q~ = log((1−α) q + α/M) of the shared cluster likelihood q (masked, row-normalised).

    The same value as ``log_debias(masked_log_softmax(log_cluster_affinity(...)), α, valid)``, in about a
    third of the (B, M) passes: because q~ ≥ α/M > 0, probability space is exact to rounding here. An
    affinity small enough to underflow is below float precision next to α/M, so it changes nothing.
    Returns None (the caller takes the log-space path) when α = 0 or a row's total affinity is so small
    that normalising it in probability space would lose precision (an anchor alone in a very sharp cluster).
    """
    if alpha == 0.0:
        return None
    if log_weight_c is not None:
        log_phi_c = log_phi_c + log_weight_c.unsqueeze(-1)
    log_size = torch.logsumexp(log_phi_c, dim=0)  # (K,)
    s = torch.exp(log_phi_a) @ torch.exp(log_phi_c - log_size).T  # (B, M) affinities φ_ic w_j φ_jc / n_c
    if valid is not None:
        s = s.masked_fill(~valid, 0.0)
        m = valid.sum(-1, keepdim=True).clamp_min(1).to(s.dtype)
    else:
        m = torch.full_like(s[:, :1], s.shape[-1])
    total = s.sum(-1, keepdim=True)
    if bool((total < PROBABILITY_SPACE_MIN).any()):
        return None
    out = torch.log(s * ((1.0 - alpha) / total) + alpha / m)
    return out if valid is None else out.masked_fill(~valid, float("-inf"))
