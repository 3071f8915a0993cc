"""The judge: a label-free score of a candidate partition, to choose between candidates (heads of other starts,
other K) without labels and without the I-Con loss's balance prior.

The rule, fixed before any table was made (issue 32): the **cosine silhouette** of the candidate's hard assignment
in the frozen feature space as the heads see it (centred by the fit's mean, L2-normalised), on a seeded subsample of
at most ``SAMPLE`` rows; higher is better. Why this rule:

- It reads the space the supervision lives in (the k-NN graph is built there), not the heads' own output, so a head
  cannot score itself well by its own confidence.
- It carries no balance prior: each row compares its mean distance to its own cluster with that to the nearest other
  cluster, whatever the clusters' sizes, so a partition that follows a long tail is not penalised for its small
  clusters (the I-Con loss with the shared cluster likelihood is not: its mean over anchors holds log N − H(π)).
- It is defined for every K ≥ 2, so the same rule can compare partitions of different K.
- It is a standard internal index with an independent implementation (scikit-learn's ``silhouette_score``).

Its known bias (towards compact, convex clusters and, across K, often towards few clusters) is the price of a rule
with no parameter to tune. A partition with fewer than two clusters in the subsample scores -1 (the index's
minimum). The subsample is ``SAMPLE`` rows drawn without replacement by ``numpy.random.default_rng(seed)``, the
same rows for every candidate of a run, so candidates are compared on equal terms (an approximation of the full
index: the whole (N, N) distance matrix is not formed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLE = 4096  # rows the silhouette is computed on: (S, S) cosine distances, about 0.1 s at S = 4,096 and D = 1,280


def judge_rows(n: int, sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """The sorted rows (of ``n``) every candidate of a run is judged on: all of them up to ``sample``, else a
    seeded draw without replacement."""
    if n <= sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def silhouette(features: np.ndarray, assignment: np.ndarray, rows: np.ndarray | None = None) -> float:
    """The cosine silhouette of ``assignment`` (N,) on ``features`` (N, D) at ``rows`` (default all): the mean
    over rows of (b − a) / max(a, b), a the mean cosine distance to the row's own cluster (others in it), b the
    smallest mean distance to another cluster; a row alone in its cluster scores 0 (scikit-learn's convention);
    fewer than two clusters score -1."""
    from sklearn.metrics import silhouette_score

    features, assignment = np.asarray(features), np.asarray(assignment)
    if features.ndim != 2 or assignment.shape != (len(features),):
        raise ValueError(
            f"assignment: expected shape ({len(features)},) for features of shape {features.shape}, got "
            f"{assignment.shape}"
        )
    if rows is not None:
        features, assignment = features[rows], assignment[rows]
    if len(np.unique(assignment)) < 2 or len(np.unique(assignment)) >= len(assignment):
        return -1.0
    return float(silhouette_score(features.astype(np.float64), assignment, metric="cosine"))


class Judge:
    """The judge of one run's candidates: the rows (``judge_rows``) and their (S, S) cosine distances, computed
    once, so each candidate costs one (S, S) @ (S, K) product (``score``); the same numbers as ``silhouette`` (to
    float32 rounding of the distances). ``features`` (N, D) are the prepared features the heads see."""

    def __init__(self, features, sample: int = SAMPLE, seed: int = 0) -> None:
        import torch

        x = np.asarray(features)  # no copy of all N rows: only the judged ones are taken, in float64
        self.rows = torch.as_tensor(judge_rows(len(x), sample, seed))
        self.features = torch.as_tensor(x[self.rows.numpy()], dtype=torch.float64)
        unit = torch.nn.functional.normalize(self.features, dim=1)
        self.distances = (1 - unit @ unit.T).clamp_(0, 2).fill_diagonal_(0).float()  # scikit-learn's cosine

    def score(self, assignment) -> float:
        """The cosine silhouette of ``assignment`` of the judged rows (S,) (e.g. a head's argmax on
        ``features``): higher is better; fewer than two clusters, or every row alone, score -1."""
        import torch

        a = torch.as_tensor(assignment, dtype=torch.long).flatten()
        if a.shape != (len(self.rows),):
            raise ValueError(
                f"assignment: expected shape ({len(self.rows)},) for the judged rows, got {tuple(a.shape)}"
            )
        used, a = torch.unique(a, return_inverse=True)
        if not 2 <= len(used) < len(a):
            return -1.0
        onehot = torch.nn.functional.one_hot(a, len(used)).float()
        sums, counts = (self.distances @ onehot).double(), onehot.sum(0).double()  # (S, C) distance sums, (C,)
        own = counts[a]
        inside = sums.gather(1, a[:, None]).squeeze(1) / (own - 1).clamp(min=1)
        between = (sums / counts).scatter(1, a[:, None], torch.inf).min(1).values
        s = (between - inside) / torch.maximum(inside, between)
        return float(torch.where(own > 1, s.nan_to_num(0.0), 0.0).mean())  # a row alone in its cluster scores 0


def judge(features: np.ndarray, candidates: Sequence[np.ndarray], sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """(C,) judge scores of C candidate assignments of the same rows (higher is better), all on one subsample."""
    rows = judge_rows(len(features), sample, seed)
    return np.array([silhouette(features, c, rows) for c in candidates], dtype=np.float64)


def choose(scores: Sequence[float], losses: Sequence[float] | None = None) -> int:
    """The candidate the judge picks: the highest score; among equal scores the lowest training loss (given), else
    the first."""
    scores = np.asarray(scores, dtype=np.float64)
    best = np.flatnonzero(scores == scores.max())
    if losses is not None and len(best) > 1:
        return int(best[np.argmin(np.asarray(losses, dtype=np.float64)[best])])
    return int(best[0])
