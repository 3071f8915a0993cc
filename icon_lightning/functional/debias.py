"""Debiasing: mix a neighbourhood with the uniform one, (1−α)·p + α/M over the valid candidates."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _count(valid: Tensor | None, like: Tensor) -> Tensor:
    if valid is None:
        return torch.full(like.shape[:-1] + (1,), like.shape[-1], dtype=like.dtype, device=like.device)
    return valid.sum(-1, keepdim=True).to(like.dtype)


def debias(p: Tensor, alpha: float, valid: Tensor | None = None) -> Tensor:
    """(B, M) p~ = (1−α) p + α/M, M counting valid candidates; invalid pairs and empty rows stay 0."""
    if alpha == 0.0:
        return p
    m = _count(valid, p)
    uniform = (1.0 / m).expand_as(p) if valid is None else valid.to(p.dtype) / m.clamp_min(1)
    has_mass = p.sum(-1, keepdim=True) > 0
    return torch.where(has_mass, (1.0 - alpha) * p + alpha * uniform, p)


def log_debias(log_q: Tensor, alpha: float, valid: Tensor | None = None) -> Tensor:
    """(B, M) log q~ = logaddexp(log(1−α) + log q, log(α/M)); invalid pairs stay -inf."""
    if alpha == 0.0:
        return log_q
    m = _count(valid, log_q).clamp_min(1)
    out = torch.logaddexp(log_q + math.log1p(-alpha), math.log(alpha) - torch.log(m))
    if valid is not None:
        out = out.masked_fill(~valid, float("-inf"))
    return out
