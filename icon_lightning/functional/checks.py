"""Argument checks that raise `ValueError` naming the offending argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor


def check_shape(name: str, x: Tensor, ndim: int, size: dict[int, int] | None = None) -> None:
    """Raise unless ``x`` has ``ndim`` dimensions and the given sizes, e.g. ``size={0: B}``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    for dim, want in (size or {}).items():
        if x.shape[dim] != want:
            raise ValueError(f"{name}: expected size {want} in dimension {dim}, got shape {tuple(x.shape)}")


def check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or ±inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")


def check_alpha(name: str, alpha: float) -> float:
    """Debiasing weight must lie in [0, 1): at 1 the target would be uniform and carry no signal."""
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1), got {alpha}")
    return alpha


def check_positive(name: str, value: float) -> float:
    """Raise unless ``value`` > 0 (temperatures, bandwidths, regularisation strengths); returns it as a float."""
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return float(value)
