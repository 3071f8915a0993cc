"""Behaviour every recipe shares: stochastic p and q, finite gradients in extreme regimes, trainability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icon_lightning import learned
from icon_lightning.functional import self_pairs_valid
from icon_lightning.loss import IConLoss, Objective
from icon_lightning.recipes import load_recipe, recipe_names
from icon_lightning.rows import Rows
from icon_lightning.supervisory import Augmentation
from tests.conftest import RECIPE_KIND, make_problem


def icon_terms(loss: Objective) -> list[IConLoss]:
    """The (p, q) pairs inside a recipe's objective (several for a weighted sum, none for SC-InfoNCE)."""
    return [m for m in loss.modules() if isinstance(m, IConLoss)]


def pairs(problem, z):
    anchors, candidates = problem.rows(z)
    if candidates is None:
        return anchors, anchors, self_pairs_valid(len(anchors), len(anchors))
    return anchors, candidates, None


@pytest.mark.parametrize("name", recipe_names())
def test_p_and_q_are_row_stochastic_with_zero_diagonal(name):
    problem = make_problem(RECIPE_KIND[name])
    z = torch.randn(len(problem.x), problem.out_dim, dtype=torch.float64)
    anchors, candidates, valid = pairs(problem, z)
    for term in icon_terms(load_recipe(name)):
        p = term.p(anchors, candidates, valid)
        q = term.q(anchors, candidates, valid).exp()
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(len(p), dtype=p.dtype))
        torch.testing.assert_close(q.sum(1), torch.ones(len(q), dtype=q.dtype))
        if valid is not None:
            assert (p[~valid] == 0).all() and (q[~valid] == 0).all()


@pytest.mark.parametrize("name", recipe_names())
def test_loss_falls_over_20_adam_steps(name):
    torch.manual_seed(0)
    problem = make_problem(RECIPE_KIND[name], dtype=torch.float32)
    model = torch.nn.Linear(problem.x.shape[1], problem.out_dim)
    loss_fn = load_recipe(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(21):
        out = loss_fn(*problem.rows(model(problem.x)))
        values.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert values[-1] < values[0] - 1e-3, f"{name}: {values[0]:.4f} -> {values[-1]:.4f}"


KERNELS_AT_SMALL_TEMPERATURE = {
    "gaussian_cosine": learned.Gaussian("cosine", 0.01),
    "gaussian_sqeuclidean": learned.Gaussian("sqeuclidean", 0.01),
    "gaussian_dot": learned.Gaussian("dot", 0.01),
    "student_t": learned.StudentT(1.0),
    "laplacian": learned.ExponentialKernel(1.0, 0.01),
    "gamma_half": learned.ExponentialKernel(0.5, 0.01),
    "gaussian_exp": learned.ExponentialKernel(2.0, 0.01),
    "unnormalised_laplacian": learned.ExponentialKernel(1.0, 0.01, normalize=False),
    "simple_sum": learned.KernelMixture([learned.ExponentialKernel(1.0, 0.01), learned.ExponentialKernel(2.0, 0.01)]),
    "cluster": learned.UniformCluster(temperature=0.01),
    "debiased_cluster": learned.Debiased(learned.UniformCluster(temperature=0.01), 0.6),
}


@pytest.mark.parametrize("name", sorted(KERNELS_AT_SMALL_TEMPERATURE))
def test_gradients_finite_at_small_temperature_and_large_inputs(name):
    """τ = 0.01, inputs of scale 1e4, with a duplicated row (zero distance off the diagonal), float32."""
    torch.manual_seed(0)
    z = torch.randn(16, 6) * 1e4
    z[8] = z[0]  # duplicate item: ‖z_i − z_j‖ = 0 where the pair is valid
    z.requires_grad_(True)
    index = torch.arange(8).repeat(2)
    out = IConLoss(Augmentation(), KERNELS_AT_SMALL_TEMPERATURE[name])(Rows(z=z, index=index))
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_kl_is_zero_when_q_matches_p():
    """A q equal to p gives KL = 0 while the cross-entropy is H(p) > 0."""
    problem = make_problem("labels")
    anchors, _ = problem.rows(torch.randn(20, 8, dtype=torch.float64))
    loss = IConLoss(Augmentation(), learned.Gaussian())
    valid = self_pairs_valid(20, 20)
    p = load_recipe("supcon").p(anchors, anchors, valid)

    class Exact(learned.Learned):
        def log_kernel(self, a, c):
            return torch.log(p)

    loss.p, loss.q = load_recipe("supcon").p, Exact()
    out = loss(anchors)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-12)
    assert out.cross_entropy.item() > 1.0


def test_mixture_of_augmentations_and_knn_is_the_average_of_its_parts():
    """p = ½ Augmentation + ½ KNNGraph (augmentations ∪ k-NN), against numpy; an anchor whose k-NN are
    absent from the batch keeps its augmentation row."""
    from icon_lightning.supervisory import KNNGraph, Mixture

    b = 6
    index = torch.arange(b).repeat(2)
    table = torch.tensor([[(i + 1) % b, (i + 2) % b] for i in range(b)])
    table[0] = torch.tensor([100, 101])  # neighbours outside the batch
    rows = Rows(z=torch.randn(2 * b, 3, dtype=torch.float64), index=index, neighbours=table[index])
    valid = self_pairs_valid(2 * b, 2 * b)
    p = Mixture([Augmentation(), KNNGraph(k=2)])(rows, rows, valid).numpy()
    aug = (index[:, None] == index[None]).double().numpy() * valid.numpy()
    knn = np.zeros((2 * b, 2 * b))
    for i in range(2 * b):
        for j in range(2 * b):
            knn[i, j] = float(int(index[j]) in table[index[i]].tolist()) * valid[i, j].item()
    aug /= aug.sum(1, keepdims=True)
    has_knn = knn.sum(1) > 0
    knn[has_knn] /= knn[has_knn].sum(1, keepdims=True)
    expected = np.where(has_knn[:, None], (aug + knn) / 2, aug)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(p.sum(1), 1.0)
