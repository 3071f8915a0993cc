"""SCAN and TEMI objectives against losses written out term by term (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icon_lightning.baselines import SCANLoss, TEMILoss
from icon_lightning.rows import Rows
from icon_lightning.supervisory import KNNGraph


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def knn_p(table: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """p_ij uniform over the in-batch candidates j ≠ i that are among i's first k table neighbours."""
    n = len(index)
    adj = np.array([[j != i and index[j] in table[i, :k] for j in range(n)] for i in range(n)], dtype=float)
    sums = adj.sum(1, keepdims=True)
    return np.divide(adj, sums, out=np.zeros_like(adj), where=sums > 0)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    n, k_table, clusters = 12, 4, 5
    table = np.stack([rng.choice(np.delete(np.arange(n), i), k_table, replace=False) for i in range(n)])
    z = rng.normal(size=(n, clusters)) * 2
    return n, table, z


def rows(z: np.ndarray, table: np.ndarray) -> Rows:
    return Rows(z=torch.tensor(z, dtype=torch.float64), index=torch.arange(len(z)), neighbours=torch.as_tensor(table))


def test_scan_matches_its_formula(batch):
    n, table, z = batch
    out = SCANLoss(KNNGraph(k=3), entropy_weight=5.0)(rows(z, table))
    phi = softmax(z)
    p = knn_p(table, np.arange(n), 3)
    consistency = -(p * np.log(phi @ phi.T)).sum(1)
    mean = phi.mean(0)
    expected = consistency[p.sum(1) > 0].mean() + 5.0 * (mean * np.log(mean)).sum()
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    # its parts under SCAN's names, not as the I-Con KL's cross-entropy
    assert out.cross_entropy is None and out.kl is None
    assert out.terms["consistency"].item() == pytest.approx(consistency[p.sum(1) > 0].mean(), rel=1e-10)
    assert out.terms["entropy"].item() == pytest.approx(-(mean * np.log(mean)).sum(), rel=1e-10)


@pytest.mark.parametrize("weighted", [True, False])
def test_temi_matches_its_formula_and_updates_one_prior_per_head(batch, weighted):
    n, table, z = batch
    teacher = z + np.random.default_rng(1).normal(size=z.shape) * 0.3
    objective = TEMILoss(KNNGraph(k=3), beta=0.6, prior_momentum=0.9, weighted=weighted).double()
    out = objective(rows(z, table), rows(teacher, table), self_offset=0, head=1).loss.item()

    s, t = softmax(z / 0.1), softmax(teacher / 0.1)
    prior = 0.9 * np.full(z.shape[1], 1 / z.shape[1]) + 0.1 * t.mean(0)  # the EMA is updated first
    pmi = np.log(((s[:, None, :] * t[None, :, :]) ** 0.6 / prior).sum(-1))
    w = t @ t.T if weighted else np.ones((n, n))
    p = knn_p(table, np.arange(n), 3)
    expected = -(p * w * pmi).sum(1)[p.sum(1) > 0].mean()
    assert out == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(objective.prior[1].numpy(), prior, rtol=1e-12)
    np.testing.assert_allclose(objective.prior[0].numpy(), 1 / z.shape[1])  # head 0 untouched

    restored = TEMILoss(KNNGraph(k=3)).double()
    restored.load_state_dict(objective.state_dict())  # the prior is checkpointed, whatever its shape
    torch.testing.assert_close(restored.prior, objective.prior)


def test_temi_prior_frozen_in_eval(batch):
    n, table, z = batch
    objective = TEMILoss(KNNGraph(k=3)).double().eval()
    objective(rows(z, table), rows(z, table), self_offset=0)
    np.testing.assert_allclose(objective.prior[0].numpy(), 1 / z.shape[1])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TEMILoss(KNNGraph(3), beta=1.5), "beta"),
        (lambda: TEMILoss(KNNGraph(3), prior_momentum=1.0), "prior_momentum"),
        (lambda: TEMILoss(KNNGraph(3), teacher_temperature=0), "teacher_temperature"),
        (lambda: SCANLoss(KNNGraph(3), entropy_weight=-1), "entropy_weight"),
        (lambda: SCANLoss(KNNGraph(3), temperature=0), "temperature"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_temi_needs_teacher_candidates(batch):
    n, table, z = batch
    with pytest.raises(ValueError, match="teacher"):
        TEMILoss(KNNGraph(k=3))(rows(z, table))
