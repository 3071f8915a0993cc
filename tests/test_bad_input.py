"""Bad input gives a ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentError

from icon_lightning import learned, supervisory
from icon_lightning.loss import IConLoss, SCInfoNCE
from icon_lightning.recipes import load_recipe
from icon_lightning.rows import Rows


def rows(n=8, d=4, **kw):
    return Rows(z=torch.randn(n, d), index=torch.arange(n), **kw)


def test_shape_mismatch_names_the_field():
    with pytest.raises(ValueError, match="index"):
        Rows(z=torch.randn(4, 3), index=torch.arange(5))
    with pytest.raises(ValueError, match="z"):
        Rows(z=torch.randn(4), index=torch.arange(4))
    with pytest.raises(ValueError, match="features"):
        Rows(z=torch.randn(4, 3), index=torch.arange(4), features=torch.randn(5, 2))
    loss = IConLoss(supervisory.Augmentation(), learned.Gaussian())
    with pytest.raises(ValueError, match="candidates.z"):
        loss(rows(d=4), rows(d=5))
    with pytest.raises(ValueError, match="^p:"):
        loss(rows(), p=torch.ones(3, 3))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"^p\.alpha \(supervisory\.Debiased"):  # which side's α is wrong
        supervisory.Debiased(supervisory.Augmentation(), alpha)
    with pytest.raises(ValueError, match=r"^q\.alpha \(learned\.Debiased"):
        learned.Debiased(learned.UniformCluster(), alpha)


def test_non_finite_input():
    z = torch.randn(4, 3)
    z[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z: expected finite"):
        Rows(z=z, index=torch.arange(4))
    features = torch.randn(4, 3)
    features[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features: expected finite"):
        Rows(z=torch.randn(4, 3), index=torch.arange(4), features=features)


def test_k_not_below_number_of_candidates():
    r = rows(n=8, features=torch.randn(8, 5))
    loss = IConLoss(supervisory.KNNGraph(k=7), learned.UniformCluster())  # 7 valid candidates per anchor
    with pytest.raises(ValueError, match="^k:"):
        loss(r)
    table = rows(n=8, neighbours=torch.zeros(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^k:"):
        IConLoss(supervisory.KNNGraph(k=3), learned.UniformCluster())(table)
    with pytest.raises(ValueError, match="^k:"):
        supervisory.KNNGraph(k=0)


def test_other_hyper_parameters_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        learned.Gaussian("cosine", 0.0)
    with pytest.raises(ValueError, match="metric"):
        learned.Gaussian("manhattan")
    with pytest.raises(ValueError, match="gamma"):
        learned.ExponentialKernel(gamma=3.0)
    with pytest.raises(ValueError, match="perplexity"):
        IConLoss(supervisory.Gaussian(perplexity=30.0), learned.StudentT())(rows(n=10, features=torch.randn(10, 3)))
    with pytest.raises(ValueError, match="walks"):
        supervisory.Propagated(supervisory.KNNGraph(), walks=-1)
    with pytest.raises(ValueError, match="features"):
        IConLoss(supervisory.Gaussian(), learned.Gaussian())(rows())
    with pytest.raises(ValueError, match="degree"):
        IConLoss(supervisory.Augmentation(), learned.UniformCluster(degree_weighted=True))(rows())
    with pytest.raises(ValueError, match="candidates"):
        SCInfoNCE()(rows(), Rows(z=torch.randn(8, 4), index=torch.arange(8) // 2))  # two positives a row


def test_no_positive_anywhere_is_an_error_not_a_nan():
    loss = IConLoss(supervisory.Augmentation(), learned.Gaussian())
    with pytest.raises(ValueError, match="no anchor has a positive"):
        loss(rows())  # every index distinct: no other view of any item


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe: no file"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  loss:\n    class_path: icon_lightning.loss.IConLoss\n    init_args:\n"
        "      p: {class_path: icon_lightning.supervisory.Augmentation}\n"
        "      q: {class_path: icon_lightning.learned.Gaussian, init_args: {temprature: 0.1}}\n"
    )
    with pytest.raises(ArgumentError, match="temprature"):
        load_recipe(bad)
