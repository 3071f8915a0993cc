"""A p that reads the model's output ("same cluster as the teacher"): declared by the objective, rebuilt by the
module every step and for every head from the teacher's current output, never cached; and trainable."""

from __future__ import annotations

import json

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score

from icon_lightning.estimator import HeadClusterer
from icon_lightning.learned import Debiased as DebiasedQ
from icon_lightning.learned import UniformCluster
from icon_lightning.loss import IConLoss
from icon_lightning.models import IConModule
from icon_lightning.models.module import EndOfStep
from icon_lightning.recipes import load_recipe
from icon_lightning.rows import Rows
from icon_lightning.supervisory import Debiased, KNNGraph, Mixture, SameCluster
from tests.models.test_ddp import global_batch

TEACHER_LOSS = {  # teacher_loss() as a config, for the one builder
    "class_path": "icon_lightning.loss.IConLoss",
    "init_args": {
        "p": {
            "class_path": "icon_lightning.supervisory.Debiased",
            "init_args": {
                "alpha": 0.2,
                "base": {
                    "class_path": "icon_lightning.supervisory.Mixture",
                    "init_args": {
                        "components": [
                            {"class_path": "icon_lightning.supervisory.KNNGraph", "init_args": {"k": 3}},
                            {"class_path": "icon_lightning.supervisory.SameCluster"},
                        ]
                    },
                },
            },
        },
        "q": {
            "class_path": "icon_lightning.learned.Debiased",
            "init_args": {"alpha": 0.2, "base": {"class_path": "icon_lightning.learned.UniformCluster"}},
        },
    },
}


def teacher_loss() -> IConLoss:
    p = Debiased(Mixture([KNNGraph(k=3), SameCluster()]), alpha=0.2)
    return IConLoss(p, DebiasedQ(UniformCluster(), alpha=0.2))


def brute_same_cluster(z: torch.Tensor) -> torch.Tensor:
    """p_ij = 1[argmax z_i = argmax z_j] / #{j ≠ i with that cluster}, zero on the diagonal, by loops."""
    c = z.argmax(-1).tolist()
    p = torch.zeros(len(c), len(c), dtype=torch.float64)
    for i in range(len(c)):
        mates = [j for j in range(len(c)) if j != i and c[j] == c[i]]
        for j in mates:
            p[i, j] = 1.0 / len(mates)
    return p


def test_same_cluster_p_against_brute_force_dense_and_sparse():
    z = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = Rows(z=z, index=torch.arange(40))
    expected = brute_same_cluster(z)
    loss = IConLoss(SameCluster(), UniformCluster(), sparse=True)
    torch.testing.assert_close(loss.target(rows).to_dense(), expected)
    torch.testing.assert_close(IConLoss(SameCluster(), UniformCluster(), sparse=False).target(rows), expected)


def test_forward_heads_builds_an_output_reading_p_from_each_heads_own_rows():
    g = torch.Generator().manual_seed(1)
    rows = [Rows(z=torch.randn(30, 4, generator=g, dtype=torch.float64), index=torch.arange(30)) for _ in range(3)]
    loss = IConLoss(Debiased(SameCluster(), alpha=0.2), DebiasedQ(UniformCluster(), alpha=0.2))
    together = torch.stack([out.loss for out in loss.forward_heads(rows)])
    torch.testing.assert_close(together, torch.stack([loss(r).loss for r in rows]))
    shared = loss.forward_heads(rows, p=loss.target(rows[0]))  # what head 0's p alone would give
    assert not torch.allclose(together, torch.stack([out.loss for out in shared]))


def test_objectives_declare_whether_p_reads_the_output():
    assert SameCluster().reads_output and Debiased(Mixture([KNNGraph(), SameCluster()])).reads_output
    assert teacher_loss().target_reads_output
    for recipe in ("icon_clustering", "normalized_cuts", "kmeans", "infonce"):
        assert not load_recipe(recipe).target_reads_output, recipe


def test_module_builds_p_from_each_teacher_head_every_step_even_in_full_batch(monkeypatch):
    batch = global_batch()
    torch.manual_seed(0)
    model = IConModule(
        teacher_loss(), feature_dim=6, num_clusters=4, num_heads=2, num_samples=len(batch), ema_momentum=0.5
    )
    seen = []
    target = model.loss.target
    monkeypatch.setattr(
        model.loss, "target", lambda rows, *a, **kw: seen.append(rows.z.clone()) or target(rows, *a, **kw)
    )
    for step in range(2):  # the same full batch twice: a p of the rows alone would be reused
        teacher_z = model.bank.teacher_output(batch.inputs)
        losses = model.objective(batch, model(batch.inputs), teacher_z)
        assert torch.isfinite(losses).all()
        assert len(seen) == 2 * (step + 1)  # one p per head, every step
        for h in range(2):
            torch.testing.assert_close(seen[2 * step + h], teacher_z[:, h].detach())  # the teacher's head h
        losses.sum().backward()
        with torch.no_grad():  # the student moves, then the teacher follows it
            model.heads.weight.add_(torch.randn_like(model.heads.weight))
        EndOfStep().on_train_batch_end(None, model)
    assert not torch.equal(seen[0].argmax(-1), seen[2].argmax(-1))  # the teacher's clusters changed: p did too


def test_a_p_built_from_the_teachers_clusters_trains(tmp_path, monkeypatch):
    digits = load_digits()
    x = digits.data - digits.data.mean(0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    calls = []
    loss = teacher_loss()
    target = type(loss).target
    monkeypatch.setattr(
        type(loss), "target", lambda self, rows, *a, **kw: calls.append(1) or target(self, rows, *a, **kw)
    )
    overrides = [f"--model.loss={json.dumps(TEACHER_LOSS)}", "--model.num_heads=2", "--model.keep_heads=null"]
    overrides += ["--model.ema_momentum=0.9", "--convergence.max_steps=40", "--convergence.min_steps=0"]
    est = HeadClusterer(overrides=overrides, n_clusters=10, cache_dir=str(tmp_path))
    est.fit(x)
    assert est.steps_ == 40 and len(calls) == 2 * 40  # p rebuilt for both (unpruned) heads every step
    # the module's teacher reaches Convergence: no plateau counts before 0.9^t ≤ e^-3 (step 29)
    assert est.record_["convergence"]["plateau_from_step"] == 29
    assert np.isfinite(est.head_losses_).all()
    nmi = normalized_mutual_info_score(digits.target, est.labels_)
    assert nmi > 0.5, nmi  # a working clusterer on digits (k-means alone: ~0.7); labels only score
