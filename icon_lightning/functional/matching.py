"""Hungarian matching of predicted clusters to classes (scipy's linear_sum_assignment)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_clusters: int, num_classes: int) -> Tensor:
    """(K, C) counts of (predicted cluster, true class) pairs."""
    flat = pred.long() * num_classes + target.long()
    return torch.bincount(flat, minlength=num_clusters * num_classes).view(num_clusters, num_classes)


def hungarian_accuracy(confusion: Tensor) -> tuple[float, Tensor]:
    """Accuracy under the best one-to-one cluster→class map, and that map as a (K,) tensor (-1: unmatched).

    Works for K ≠ C (rectangular assignment: min(K, C) pairs are matched).
    """
    counts = confusion.detach().cpu().numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = torch.full((counts.shape[0],), -1, dtype=torch.long)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    total = counts.sum()
    return (float(counts[rows, cols].sum() / total) if total else 0.0), mapping
