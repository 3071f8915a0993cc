"""SCAN and TEMI objectives against losses written out term by term (numpy, float64), and against the formulas
of the authors' released code (their defaults)."""

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


# ------------------------------------------------------------------ the authors' released formulas, written out
def released_scan(anchors: np.ndarray, neighbors: np.ndarray, entropy_weight: float) -> float:
    """SCAN's released ``SCANLoss.forward(anchors, neighbors)`` (losses/losses.py): BCE of ⟨φ(a_b), φ(n_b)⟩
    against 1, minus w · the entropy of the mean of the B anchors' assignments."""
    a, n = softmax(anchors), softmax(neighbors)
    similarity = (a * n).sum(1)
    consistency = -np.log(similarity).mean()
    mean = a.mean(0)
    return consistency - entropy_weight * -(mean * np.log(mean)).sum()


def scan_square_batch(b: int = 6, k: int = 5, seed: int = 0):
    """A square batch as the DataModule builds it: B anchors (view 0) then their sampled neighbours (view −1);
    anchor b's one table neighbour is neighbour row b, and the neighbour rows' table rows point outside the batch
    (they are candidates only, as in the released code)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2 * b, k)) * 2
    index = np.arange(2 * b)
    table = np.concatenate([index[b:, None], 100 + index[:b, None]])  # outside: ids ≥ 100
    view = np.concatenate([np.zeros(b, int), -np.ones(b, int)])
    rows_ = Rows(
        z=torch.tensor(z, dtype=torch.float64),
        index=torch.as_tensor(index),
        neighbours=torch.as_tensor(table),
        view=torch.as_tensor(view),
    )
    return rows_, z[:b], z[b:]


def test_scan_defaults_to_the_released_entropy_over_the_anchors():
    batch, anchors, neighbours = scan_square_batch()
    out = SCANLoss(KNNGraph(k=1), entropy_weight=5.0)(batch)
    assert out.loss.item() == pytest.approx(released_scan(anchors, neighbours, 5.0), rel=1e-12)
    # the other form stays available by name: the entropy of all 2B rows' mean assignment
    wide = SCANLoss(KNNGraph(k=1), entropy_weight=5.0, entropy_over="candidates")(batch)
    mean = softmax(np.concatenate([anchors, neighbours])).mean(0)
    consistency = -np.log((softmax(anchors) * softmax(neighbours)).sum(1)).mean()
    assert wide.loss.item() == pytest.approx(consistency + 5.0 * (mean * np.log(mean)).sum(), rel=1e-12)
    assert abs(wide.loss.item() - out.loss.item()) > 1e-6  # the two forms differ on this batch


def released_temi(student: list, teacher: list, prior: np.ndarray, beta: float, momentum: float, temps) -> list:
    """TEMI's released multi-head loss on one (image, neighbour) pair batch (losses/multihead_losses.py,
    ``MultiHeadWeightProbBase.forward`` with ``TEMI.weight = sim_weight``): every head's prior π^h is updated
    first, the weight is the teacher agreement ⟨t^h(x_b), t^h(n_b)⟩ averaged over the heads, and head h's loss is
    the weighted −β-PMI of each student view against the other teacher view, averaged."""
    s_temp, t_temp = temps
    probs = [(softmax(s[0] / s_temp), softmax(s[1] / s_temp)) for s in student]
    teach = [(softmax(t[0] / t_temp), softmax(t[1] / t_temp)) for t in teacher]
    prior = prior.copy()
    for h, (t0, t1) in enumerate(teach):
        prior[h] = momentum * prior[h] + (1 - momentum) * np.concatenate([t0, t1]).mean(0)
    weight = np.mean([(t0 * t1).sum(1) for t0, t1 in teach], axis=0)
    losses = []
    for h, ((s0, s1), (t0, t1)) in enumerate(zip(probs, teach)):
        pmi = [np.log(((s * t) ** beta / prior[h]).sum(1)) for s, t in ((s1, t0), (s0, t1))]
        losses.append(np.mean([(weight * -pmi[0]).mean(), (weight * -pmi[1]).mean()]))
    return losses


def test_temi_defaults_to_the_released_head_weight_averaged_over_heads():
    """A batch of B images and their B neighbours (rows 0..B-1 and B..2B-1, each the other's table neighbour):
    our symmetric pair p gives, for each head, the mean of the two directions of the released loss."""
    rng = np.random.default_rng(3)
    b, k, heads = 5, 4, 3
    index = np.arange(2 * b)
    table = np.concatenate([index[b:], index[:b]])[:, None]
    student = [rng.normal(size=(2 * b, k)) for _ in range(heads)]
    teacher = [s + rng.normal(size=s.shape) * 0.5 for s in student]
    objective = TEMILoss(KNNGraph(k=1), beta=0.6, prior_momentum=0.9).double()

    def as_rows(z):
        return Rows(
            z=torch.tensor(z, dtype=torch.float64), index=torch.as_tensor(index), neighbours=torch.as_tensor(table)
        )

    outs = objective.forward_heads([as_rows(z) for z in student], [as_rows(z) for z in teacher], None, 0)
    prior = np.full((heads, k), 1 / k)
    split = [(z[:b], z[b:]) for z in student], [(z[:b], z[b:]) for z in teacher]
    expected = released_temi(*split, prior, 0.6, 0.9, (0.1, 0.1))
    np.testing.assert_allclose([o.loss.item() for o in outs], expected, rtol=1e-10)
    # the other form by name: each head weighted by its own agreement, which differs here
    own = TEMILoss(KNNGraph(k=1), beta=0.6, prior_momentum=0.9, head_weight="own").double()
    own_losses = [
        o.loss.item() for o in own.forward_heads([as_rows(z) for z in student], [as_rows(z) for z in teacher], None, 0)
    ]
    assert max(abs(a - e) for a, e in zip(own_losses, expected)) > 1e-4
