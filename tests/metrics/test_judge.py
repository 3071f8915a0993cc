"""The judge (``metrics/judge.py``): the cosine silhouette against a brute-force float64 formula, its invariances,
and the rows it judges on."""

from __future__ import annotations

import numpy as np
import pytest

from icon_lightning.metrics.judge import SAMPLE, choose, judge, judge_rows, silhouette


def brute_force_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Rousseeuw's silhouette with cosine distance, written out in float64, one row at a time."""
    x = x.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    values = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            values.append(0.0)  # a row alone in its cluster
            continue
        a = dist[i, own & (np.arange(len(x)) != i)].mean()
        b = min(dist[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        values.append((b - a) / max(a, b))
    return float(np.mean(values))


def blobs(n=300, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    labels = rng.integers(k, size=n)
    return centres[labels] + rng.normal(size=(n, d)), labels


def test_the_silhouette_is_rousseeuws_with_cosine_distance():
    x, labels = blobs()
    labels[0] = 9  # a singleton cluster: scored 0
    assert silhouette(x, labels) == pytest.approx(brute_force_silhouette(x, labels), abs=1e-10)


def test_renaming_clusters_changes_nothing_and_a_better_partition_scores_higher():
    x, labels = blobs()
    renamed = (labels + 3) % 4 * 10
    assert silhouette(x, renamed) == pytest.approx(silhouette(x, labels), abs=1e-12)
    shuffled = np.random.default_rng(1).permutation(labels)
    assert silhouette(x, labels) > 0.3 > silhouette(x, shuffled)


def test_degenerate_partitions_score_the_minimum():
    x, _ = blobs(n=50)
    assert silhouette(x, np.zeros(50, dtype=int)) == -1.0
    assert silhouette(x, np.arange(50)) == -1.0
    with pytest.raises(ValueError, match=r"^assignment: expected shape \(50,\)"):
        silhouette(x, np.zeros(49, dtype=int))


def test_every_candidate_is_judged_on_the_same_seeded_rows():
    rows = judge_rows(10_000, seed=3)
    assert (
        len(rows) == SAMPLE
        and np.array_equal(rows, np.unique(rows))
        and np.array_equal(rows, judge_rows(10_000, seed=3))
    )
    assert not np.array_equal(rows, judge_rows(10_000, seed=4))
    assert np.array_equal(judge_rows(100), np.arange(100))
    x, labels = blobs(n=600)
    scores = judge(x, [labels, np.random.default_rng(0).permutation(labels)], sample=200, seed=5)
    rows = judge_rows(600, 200, 5)
    assert scores[0] == pytest.approx(brute_force_silhouette(x[rows], labels[rows]), abs=1e-10)


def test_choose_takes_the_highest_score_then_the_lowest_loss():
    assert choose([0.1, 0.3, 0.2]) == 1
    assert choose([0.3, 0.1, 0.3], losses=[2.0, 0.5, 1.0]) == 2
    assert choose([0.3, 0.3]) == 0


def test_the_cached_judge_scores_as_the_silhouette_on_its_rows():
    """``Judge`` (distances computed once, one product a candidate) against scikit-learn's silhouette on the same
    seeded rows, for good, random, unbalanced partitions and singleton clusters."""
    from sklearn.datasets import make_blobs
    from sklearn.metrics import silhouette_score

    from icon_lightning.metrics.judge import Judge

    rng = np.random.default_rng(3)
    x, labels = make_blobs(n_samples=600, n_features=8, centers=5, random_state=1)
    judge_ = Judge(x, sample=256, seed=4)
    rows = judge_rows(600, 256, 4)
    assert np.array_equal(judge_.rows.numpy(), rows)
    partitions = [
        labels,
        rng.integers(0, 3, 600),
        (labels > 0).astype(int),
        np.where(np.arange(600) == rows[0], 9, labels),
    ]
    for assignment in partitions:
        expected = silhouette_score(x[rows], assignment[rows], metric="cosine")
        assert judge_.score(assignment[rows]) == pytest.approx(expected, abs=1e-5)
    assert judge_.score(np.zeros(256, dtype=int)) == -1.0
    with pytest.raises(ValueError, match="assignment: expected shape"):
        judge_.score(labels)
