"""K without labels: the range ``--data.num_clusters auto`` searches (``models.choose_k`` does the search).

The default range, stated before any result was looked at (issue 32): K from 2 to min(``RANGE_MAX``, N //
``ROWS_PER_CLUSTER``) (at least 2), i.e. at most 50 clusters and at least 20 rows a cluster on average.
``--data.num_clusters_range [lo, hi]`` overrides it; the search clusters the judge's subsample rows (at most
``judge.SAMPLE``), so hi stays below their number."""

from __future__ import annotations

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


def requested_clusters(num_clusters, num_clusters_range, n: int, labelled: bool, where: str):
    """(K asked for, the range searched): an int K (None range), None for the number of classes (labelled data),
    or ``"auto"`` (asked for, or unset without labels) with its checked range. A range without ``auto`` is one
    line naming ``data.num_clusters_range`` (``where``: the data, for messages)."""
    if num_clusters == "auto" or (num_clusters is None and not labelled):
        return "auto", checked_range(num_clusters_range, n)
    if num_clusters_range is not None:
        k = num_clusters if num_clusters is not None else f"unset (the number of classes of {where})"
        raise ValueError(
            f"data.num_clusters_range: only read with data.num_clusters auto, but data.num_clusters is {k}; "
            "set --data.num_clusters auto to search it"
        )
    return num_clusters, None
