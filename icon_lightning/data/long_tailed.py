"""Long-tailed subsets of a labelled set: class sizes falling geometrically from the head class to the tail.

The rule (Cui et al., 2019; Cao et al., 2019, "CIFAR-10-LT"), for C classes and an imbalance ratio r ≥ 1:

    n_c = floor(n_max · r^(-rank_c / (C - 1)))

- ``n_max`` is the size of the *smallest* class of the given set, so every class can supply its quota without
  replacement (on a balanced set such as CIFAR-10 test it is every class's size; on MNIST test, whose classes hold
  892–1,135 rows, it is 892);
- ``rank_c`` is the class's place in a fixed order: the sorted labels, so class 0 is the largest (``n_max`` rows)
  and the last class the smallest (``floor(n_max / r)`` rows). The order does not change with the seed: every seed
  of a benchmark row scores on sets of the same class sizes, and seeds differ only in which rows are drawn;
- the rows of each class are drawn without replacement by ``numpy.random.default_rng(seed)`` (a permutation per
  class, classes in rank order) and nothing else, so one (labels, r, seed) gives the same indices on any machine
  with the same NumPy major version.

``r = 1`` gives every class ``n_max`` rows (a balanced subset; the whole set when it is balanced). Float error in
``r^(-rank/(C-1))`` is kept from flooring an exact integer down (e.g. 1000 / 100 = 10): the product is rounded to
6 decimals before the floor.
"""

from __future__ import annotations

import math

import numpy as np


def long_tailed_sizes(num_classes: int, n_max: int, ratio: float) -> np.ndarray:
    """(C,) int64 class sizes from the head class to the tail: ``floor(n_max · ratio^(-rank / (C - 1)))``."""
    _check_ratio(ratio)
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"num_classes, n_max: expected both >= 1, got {num_classes}, {n_max}")
    rank = np.arange(num_classes, dtype=np.float64)
    exponent = -rank / (num_classes - 1) if num_classes > 1 else rank
    return np.floor(np.round(n_max * float(ratio) ** exponent, 6)).astype(np.int64)


def long_tailed_indices(labels, ratio: float, seed: int) -> np.ndarray:
    """Sorted (N_lt,) int64 row indices of ``labels`` (N,) forming its long-tailed subset (module docstring): class
    ``classes[rank]`` (sorted labels) keeps ``long_tailed_sizes(C, n_max, ratio)[rank]`` of its rows, drawn by
    ``default_rng(seed)``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a non-empty 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if classes[0] < 0:
        raise ValueError(
            f"labels: expected class labels >= 0 (a long-tailed subset needs every row's class), got {classes[0]}"
        )
    n_max = int(counts.min())
    sizes = long_tailed_sizes(len(classes), n_max, ratio)
    if sizes[-1] < 1:
        raise ValueError(
            f"ratio: {ratio} leaves the tail class {classes[-1]} floor({n_max} / {ratio}) = 0 rows; expected a ratio "
            f"<= {n_max} (the smallest class's size)"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for label, size in zip(classes, sizes, strict=True):
        rows = np.flatnonzero(labels == label)
        chosen.append(rows[rng.permutation(len(rows))[:size]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise ValueError(f"ratio: expected a number >= 1 (the largest class's size over the smallest), got {ratio!r}")
    if not math.isfinite(ratio) or ratio < 1:
        raise ValueError(
            f"ratio: expected a finite number >= 1 (the largest class's size over the smallest), got {ratio}"
        )
