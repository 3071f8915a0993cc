"""K without labels: the range ``--data.num_clusters auto`` searches (``models.choose_k`` does the search).

The default range, stated before any result was looked at (issue 32): K from 2 to min(``RANGE_MAX``, N //
``ROWS_PER_CLUSTER``) (at least 2), i.e. at most 50 clusters and at least 20 rows a cluster on average.
``--data.num_clusters_range [lo, hi]`` overrides it; the search clusters the judge's subsample rows (at most
``judge.SAMPLE``), so hi stays below their number."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from icon_lightning.data.prepared import source
from icon_lightning.metrics.judge import SAMPLE

RANGE_MAX = 50  # the largest K the default range searches
ROWS_PER_CLUSTER = 20  # the default range's K keeps at least this many rows a cluster on average


def searched_rows(n: int) -> int:
    """How many rows the search clusters and judges: the judge's subsample of ``n`` rows."""
    return min(n, SAMPLE)


def default_range(n: int) -> tuple[int, int]:
    """The default (lo, hi) for ``n`` rows: (2, min(50, n // 20)), hi at least 2 and below the searched rows."""
    return 2, max(2, min(RANGE_MAX, n // ROWS_PER_CLUSTER, searched_rows(n) - 1))


def checked_range(value, n: int) -> tuple[int, int]:
    """``data.num_clusters_range`` (None: ``default_range``) for ``n`` rows, or one line naming it."""
    if value is None:
        return default_range(n)
    rows = searched_rows(n)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in value)
        or not 2 <= value[0] <= value[1] < rows
    ):
        raise ValueError(
            f"data.num_clusters_range: expected [lo, hi] with 2 ≤ lo ≤ hi < {rows} (the rows the search clusters: "
            f"min(N = {n}, {SAMPLE})), got {list(value) if isinstance(value, (list, tuple)) else value!r}"
        )
    return int(value[0]), int(value[1])


def search_features(prep, dataset) -> np.ndarray:
    """(N, D) float32 clean train features of ``dataset``, prepared by ``prep`` (a ``FeaturePrep``) as the fit
    prepares them (their own mean, ``normalize``): what the search reads (never labels)."""
    return prep.prepared(prep.raw(dataset, "clean", distributed=False))


class ClusterCount:
    """K of a DataModule (``data.num_clusters``): ``requested`` (an int; None: the number of classes; ``"auto"``:
    searched over ``range`` (lo, hi)), the K a search chose (``resolve``) and its record (``search``, for
    ``metrics.json``); ``features()``: the prepared train features the search reads (``search_features``)."""

    def __init__(self, requested, k_range: tuple[int, int] | None, features: Callable[[], np.ndarray]) -> None:
        self.requested, self.range, self.features = requested, k_range, features
        self.chosen: int | None = None
        self.search: dict | None = None

    @classmethod
    def of(cls, num_clusters, num_clusters_range, dataset, features: Callable[[], np.ndarray]) -> ClusterCount:
        """``data.num_clusters`` and ``data.num_clusters_range`` for ``dataset``: ``auto`` when asked for, or unset
        without labels, with its checked range; a range without ``auto`` is one line naming it."""
        if num_clusters == "auto" or (num_clusters is None and dataset.num_classes == 0):
            return cls("auto", checked_range(num_clusters_range, len(dataset)), features)
        if num_clusters_range is not None:
            k = num_clusters if num_clusters is not None else f"unset (the number of classes of {source(dataset)})"
            raise ValueError(
                f"data.num_clusters_range: only read with data.num_clusters auto, but data.num_clusters is {k}; "
                "set --data.num_clusters auto to search it"
            )
        return cls(None if num_clusters is None else int(num_clusters), None, features)  # a plain int, not the
        # annotation's type (``NonNegativeInt``), which checkpoints' weights-only loading refuses

    @property
    def needs_search(self) -> bool:
        """K is ``auto`` and not chosen yet."""
        return self.requested == "auto" and self.chosen is None

    def value(self, num_classes: int) -> int:
        """K: the requested one, the number of classes, or the one the search chose."""
        if self.requested != "auto":
            return self.requested or num_classes
        if self.chosen is None:
            raise RuntimeError("data.num_clusters: auto is not chosen yet (ClusterCount.resolve; `icon fit` does)")
        return self.chosen

    def resolve(self, k: int, search: dict | None = None) -> None:
        """``auto``'s K, chosen by a search (``search``: its record; None: taken from a checkpoint)."""
        self.chosen, self.search = int(k), search
