"""TURTLE's outer loss against the released training step written out by hand (torch, float64), and the peer
config fitted end to end on separated blobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from torch import nn

from icon_lightning.baselines import TURTLELoss
from icon_lightning.estimator import HeadClusterer
from icon_lightning.recipes import CONFIG_DIR
from icon_lightning.rows import Rows

GAMMA, STEPS, LR = 10.0, 10, 1e-3


def released_step(x, z, learner=None, optimizer=None):
    """One step of the released ``run_turtle.py`` for one space: M Adam steps of the inner classifier on the
    detached labels, then CE(inner predictions detached, labels) − γ · H(mean label)."""
    labels = torch.softmax(z, -1)
    if learner is None:
        learner = nn.Linear(x.shape[1], z.shape[1]).double()
        optimizer = torch.optim.Adam(learner.parameters(), lr=LR, betas=(0.9, 0.999))
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(learner(x), labels.detach()).backward()
        optimizer.step()
    prediction_error = F.cross_entropy(learner(x).detach(), labels)
    loss = prediction_error - GAMMA * torch.special.entr(labels.mean(0)).sum()
    return loss, learner, optimizer


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    z = (3 * torch.randn(40, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    return x, z


@pytest.mark.parametrize("warm_start", [False, True])
def test_loss_and_gradient_match_the_released_step(warm_start):
    ours = TURTLELoss(GAMMA, STEPS, LR, warm_start=warm_start)
    learner = optimizer = None
    for step in range(3):  # a warm start carries the inner learner and its Adam state from step to step
        x, z = batch(step)
        z_ref = z.detach().clone().requires_grad_()
        torch.manual_seed(step)  # the fresh inner learner's initialisation
        out = ours(Rows(z=z, index=torch.arange(len(z)), features=x))
        torch.manual_seed(step)
        ref, learner, optimizer = released_step(x, z_ref, *((learner, optimizer) if warm_start else ()))
        out.loss.backward()
        ref.backward()
        torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.terms["entropy"], torch.special.entr(torch.softmax(z, -1).mean(0)).sum())


def test_the_inner_learner_is_fresh_each_step_unless_warm_started():
    x, z = batch(0)
    rows = Rows(z=z.detach(), index=torch.arange(len(z)), features=x)
    cold, warm = TURTLELoss(), TURTLELoss(warm_start=True)
    for loss in (cold, warm):
        loss(rows)
    first = cold._inner[0][0], warm._inner[0][0]
    for loss in (cold, warm):
        loss(rows)
    assert cold._inner[0][0] is not first[0] and warm._inner[0][0] is first[1]


def test_bad_settings_and_missing_features_are_named():
    with pytest.raises(ValueError, match="inner_steps: expected at least 1, got 0$"):
        TURTLELoss(inner_steps=0)
    with pytest.raises(ValueError, match="gamma: expected a number ≥ 0, got -1"):
        TURTLELoss(gamma=-1)
    with pytest.raises(ValueError, match="features: TURTLE trains its inner classifier"):
        TURTLELoss()(Rows(z=torch.zeros(4, 3), index=torch.arange(4)))


# Measured on these blobs with the default Convergence (the common protocol, configs/peers/turtle_common.yaml; the
# released protocol, 6,000 fixed steps, is tests/test_turtle_released.py's), seeds 0-2: the released cold start stops
# on a training-loss plateau after 150-250 steps at ARI 0.63-0.81; a warm start reaches 1.0 in 1,000 steps. The config
# keeps the released default; nothing here is chosen by the labels, the thresholds only bound what is measured.
@pytest.mark.parametrize("warm_start, least_ari", [(False, 0.5), (True, 0.9)])
def test_the_peer_config_separates_blobs(tmp_path, warm_start, least_ari):
    x, y = make_blobs(n_samples=300, centers=4, n_features=8, cluster_std=1.0, random_state=0)
    overrides = ["--seed_everything=1", f"--model.loss.init_args.warm_start={str(warm_start).lower()}"]
    est = HeadClusterer(CONFIG_DIR / "peers" / "turtle_common.yaml", overrides, n_clusters=4, cache_dir=str(tmp_path))
    est.fit(x.astype(np.float32))
    assert adjusted_rand_score(y, est.labels_) > least_ari
    assert len(np.unique(est.labels_)) == 4  # the entropy term keeps every cluster in use
