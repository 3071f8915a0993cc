"""Clustering metrics against brute force and scikit-learn, and their reduction across 2 processes."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from icon_lightning.metrics import ClusteringMetrics, HungarianAccuracy
from tests.functional.test_maths import brute_force_accuracy


@pytest.mark.parametrize("k,c", [(4, 4), (5, 3), (3, 5)])
def test_against_brute_force_and_scikit_learn(k, c):
    rng = np.random.default_rng(k + 7 * c)
    target = rng.integers(0, c, 300)
    pred = np.where(rng.random(300) < 0.6, target % k, rng.integers(0, k, 300))
    metric = ClusteringMetrics(k, c)
    for chunk in np.array_split(np.arange(300), 4):  # updates accumulate
        metric.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    out = metric.compute()
    assert out["hungarian_acc"].item() == pytest.approx(brute_force_accuracy(pred, target, k, c), abs=1e-6)
    assert out["nmi"].item() == pytest.approx(skm.normalized_mutual_info_score(target, pred), abs=1e-6)
    assert out["ari"].item() == pytest.approx(skm.adjusted_rand_score(target, pred), abs=1e-6)
    assert out["ami"].item() == pytest.approx(skm.adjusted_mutual_info_score(target, pred), abs=1e-6)
    majority = sum(np.bincount(target[pred == j], minlength=c).max() for j in range(k) if (pred == j).any())
    assert out["over_clustering_acc"].item() == pytest.approx(majority / 300, abs=1e-6)


def test_bad_predictions_are_rejected():
    metric = HungarianAccuracy(3, 3)
    with pytest.raises(ValueError, match="preds"):
        metric.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    metric.update(torch.tensor([0, 1]), torch.tensor([-1, 1]))  # unlabelled rows are skipped
    assert metric.confusion.sum() == 1


def _ddp_metric(rank: int, world: int, port: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    metric = ClusteringMetrics(4, 4)
    shard = slice(rank * 100, (rank + 1) * 100)
    metric.update(torch.from_numpy(pred[shard]), torch.from_numpy(target[shard]))
    out = metric.compute()
    if rank == 0:
        queue.put({k: float(v) for k, v in out.items()})
    torch.distributed.destroy_process_group()


def test_two_process_reduction_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_ddp_metric, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    distributed = queue.get()
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    single = ClusteringMetrics(4, 4)
    single.update(torch.from_numpy(pred), torch.from_numpy(target))
    for key, value in single.compute().items():
        assert distributed[key] == pytest.approx(float(value), abs=1e-6)


def test_score_assignments_is_the_one_scorer_and_matches_scikit_learn():
    """demo.py, benchmarks/clustering.py and reproduce.py each had their own copy of this."""
    from scipy.optimize import linear_sum_assignment
    from sklearn import metrics as skm

    from icon_lightning.metrics import score_assignments

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    clusters = np.where(rng.random(300) < 0.7, (labels + 1) % 4, rng.integers(0, 4, 300))
    counts = np.zeros((4, 4))
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    got = score_assignments(clusters, labels, 4)
    assert got["hungarian_acc"] == pytest.approx(counts[rows, cols].sum() / 300)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, clusters))
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(labels, clusters))
    over = np.where(rng.random(300) < 0.5, labels, labels + 4)  # 8 clusters, each inside one class
    scored = score_assignments(over, labels, 8, 4)
    assert scored["over_clustering_acc"] == pytest.approx(1.0)  # majority mapping, under its own name
    counts = np.zeros((8, 4))
    np.add.at(counts, (over, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    assert scored["hungarian_acc"] == pytest.approx(counts[rows, cols].sum() / 300)  # still one-to-one
