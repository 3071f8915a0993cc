"""The periodic table: every recipe in configs/recipes reproduces its reference loss on random tensors.

References are written independently of the library: numpy/scipy formulas, F.cross_entropy, brute-force
perplexity search. float64, relative error ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.spatial.distance import cdist
from scipy.special import logsumexp, softmax

from icon_lightning.functional import kl_divergence
from icon_lightning.recipes import load_recipe, recipe_names
from icon_lightning.rows import Rows
from tests.conftest import RECIPE_KIND, make_problem, to_np

RTOL = 1e-5


def random_z(kind: str, seed: int = 1) -> tuple:
    problem = make_problem(kind)
    z = torch.randn(len(problem.x), problem.out_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return problem, z


def row_kl(p: np.ndarray, q: np.ndarray) -> float:
    """mean over rows of Σ_j p log(p/q), 0 where p = 0."""
    mask = p > 0
    out = np.zeros_like(p)
    out[mask] = p[mask] * np.log(p[mask] / q[mask])
    return float(out.sum(1).mean())


def off_diag_normalise(w: np.ndarray) -> np.ndarray:
    w = w.copy()
    np.fill_diagonal(w, 0.0)
    return w / w.sum(1, keepdims=True)


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def nt_xent(z: np.ndarray, b: int, temperature: float) -> float:
    """NT-Xent (SimCLR) written directly with F.cross_entropy, self masked."""
    zt = torch.from_numpy(unit(z))
    logits = zt @ zt.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * b) + b) % (2 * b)
    return float(F.cross_entropy(logits, target))


def kernel_nt_xent(log_k: np.ndarray, b: int) -> float:
    """−log(K_i+ / Σ_{j≠i} K_ij) from a (2B, 2B) log-kernel, via scipy's logsumexp."""
    log_k = log_k.copy()
    np.fill_diagonal(log_k, -np.inf)
    pos = log_k[np.arange(2 * b), (np.arange(2 * b) + b) % (2 * b)]
    return float(np.mean(logsumexp(log_k, axis=1) - pos))


def cluster_q(logits: np.ndarray, degree: np.ndarray | None = None) -> np.ndarray:
    """q(j|i) ∝ Σ_c φ_ic w_j φ_jc / Σ_k w_k φ_kc, zero diagonal, rows renormalised (numpy)."""
    phi = softmax(logits, axis=1)
    w = np.ones(len(phi)) if degree is None else degree
    wphi = w[:, None] * phi
    q = phi @ (wphi / wphi.sum(0)).T
    return off_diag_normalise(q)


def test_every_recipe_has_a_reference():
    assert set(recipe_names()) == set(RECIPE_KIND), "add the new recipe to RECIPE_KIND and pin it here"
    pinned = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    missing = [n for n in recipe_names() if n not in pinned]
    assert not missing, f"recipes without a reference test: {missing}"


def test_infonce():
    problem, z = random_z("views")
    out = load_recipe("infonce")(*problem.rows(z))
    ref = nt_xent(to_np(z), problem.facts["B"], 0.5)
    assert out.loss.item() == pytest.approx(ref, rel=RTOL)
    assert out.cross_entropy.item() == pytest.approx(ref, rel=RTOL)  # one positive: H(p) = 0


def test_supcon():
    problem, z = random_z("labels")
    out = load_recipe("supcon")(*problem.rows(z))
    label = problem.facts["label"].numpy()
    s = unit(to_np(z)) @ unit(to_np(z)).T / 0.1
    losses, log_pos = [], []
    for i in range(len(label)):  # Khosla et al. L_out, term by term
        others = [a for a in range(len(label)) if a != i]
        positives = [p for p in others if label[p] == label[i]]
        denom = logsumexp(s[i, others])
        losses.append(-np.mean([s[i, p] - denom for p in positives]))
        log_pos.append(np.log(len(positives)))
    assert out.cross_entropy.item() == pytest.approx(np.mean(losses), rel=RTOL)
    assert out.kl.item() == pytest.approx(np.mean(losses) - np.mean(log_pos), rel=RTOL)


def test_cmc_clip():
    problem, z = random_z("cross_view")
    anchors, candidates = problem.rows(z)
    out = load_recipe("cmc_clip")(anchors, candidates)
    b = problem.facts["B"]
    logits = torch.from_numpy(unit(to_np(z[:b])) @ unit(to_np(z[b:])).T / 0.07)
    assert out.loss.item() == pytest.approx(float(F.cross_entropy(logits, torch.arange(b))), rel=RTOL)


def test_cross_entropy():
    problem, z = random_z("prototypes")
    out = load_recipe("cross_entropy")(*problem.rows(z))
    logits = z @ problem.facts["prototypes"].T
    assert out.loss.item() == pytest.approx(float(F.cross_entropy(logits, problem.facts["label"])), rel=RTOL)


def test_sne():
    problem, z = random_z("features")
    out = load_recipe("sne")(*problem.rows(z))
    x = to_np(problem.x)
    p = off_diag_normalise(np.exp(-cdist(x, x, "sqeuclidean") / (2 * 1.0**2)))
    q = off_diag_normalise(np.exp(-cdist(to_np(z), to_np(z), "sqeuclidean")))
    assert out.loss.item() == pytest.approx(row_kl(p, q), rel=RTOL)


def perplexity_rows(sqdist: np.ndarray, perplexity: float) -> np.ndarray:
    """Conditional t-SNE affinities, each row's β found by scipy's brentq (independent of the library)."""
    n = len(sqdist)
    p = np.zeros_like(sqdist)
    for i in range(n):
        d = np.delete(sqdist[i], i)
        d = d - d.min()

        def entropy_gap(log_beta, d=d):
            w = softmax(-d * np.exp(log_beta))
            return -np.sum(w[w > 0] * np.log(w[w > 0])) - np.log(perplexity)

        beta = np.exp(brentq(entropy_gap, -30, 30, xtol=1e-14))
        p[i, np.arange(n) != i] = softmax(-d * beta)
    return p


def test_tsne():
    problem, z = random_z("features")
    out = load_recipe("tsne")(*problem.rows(z))
    x = to_np(problem.x)
    p_cond = perplexity_rows(cdist(x, x, "sqeuclidean"), 30.0)
    p = off_diag_normalise((p_cond + p_cond.T) / 2)
    q = off_diag_normalise(1.0 / (1.0 + cdist(to_np(z), to_np(z), "sqeuclidean")))
    assert out.loss.item() == pytest.approx(row_kl(p, q), rel=RTOL)


def test_kmeans():
    """The recipe's forward KL, and Theorem 6's identity with KL(q ‖ p) across two assignments."""
    problem, z = random_z("features")
    loss = load_recipe("kmeans")
    x = to_np(problem.x)
    sigma = 0.5
    sqdist = cdist(x, x, "sqeuclidean")
    p = off_diag_normalise(np.exp(-sqdist / (2 * sigma**2)))
    assert loss(*problem.rows(z)).loss.item() == pytest.approx(row_kl(p, cluster_q(to_np(z))), rel=RTOL)

    def reverse_kl_total(logits):  # Σ_i KL(q_i ‖ p_i) with the library's p and q
        anchors, _ = problem.rows(logits)
        valid = ~torch.eye(len(logits), dtype=torch.bool)
        log_q = loss.q(anchors, anchors, valid)
        log_p = torch.log(loss.p(anchors, anchors, valid)).masked_fill(~valid, float("-inf"))
        return float(kl_divergence(log_q.exp(), log_p)[0].sum())

    def prob_kmeans_minus_entropy(logits):  # L_prob-kmeans / 2σ² − Σ_i H(q_i), numpy
        q = cluster_q(to_np(logits))
        entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0))
        return np.sum(q * sqdist) / (2 * sigma**2) - entropy

    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    lhs = reverse_kl_total(z) - reverse_kl_total(other)
    rhs = prob_kmeans_minus_entropy(z) - prob_kmeans_minus_entropy(other)
    assert lhs == pytest.approx(rhs, rel=RTOL)


def graph_adjacency(table: np.ndarray, n: int, k: int) -> np.ndarray:
    a = np.zeros((n, n))
    for i in range(n):
        a[i, table[i, :k]] = 1.0
    return a


def test_mi_clustering():
    problem, z = random_z("graph")
    out = load_recipe("mi_clustering")(*problem.rows(z))
    a = graph_adjacency(problem.facts["table"].numpy(), len(z), 3)
    assert out.loss.item() == pytest.approx(row_kl(a / a.sum(1, keepdims=True), cluster_q(to_np(z))), rel=RTOL)


def test_normalized_cuts():
    problem, z = random_z("graph")
    anchors, _ = problem.rows(z)
    out = load_recipe("normalized_cuts")(anchors)
    a = graph_adjacency(problem.facts["table"].numpy(), len(z), 10)
    w = np.maximum(a, a.T)
    degree = w.sum(1)
    p = w / degree[:, None]
    assert out.loss.item() == pytest.approx(row_kl(p, cluster_q(to_np(z), degree)), rel=RTOL)


def test_icon_clustering():
    problem, z = random_z("graph")
    out = load_recipe("icon_clustering")(*problem.rows(z))
    n, alpha = len(z), 0.6
    a = graph_adjacency(problem.facts["table"].numpy(), n, 3)
    p1 = a / a.sum(1, keepdims=True)
    p = off_diag_normalise(p1 + p1 @ p1)  # k-NN plus one-step walks
    off = 1.0 - np.eye(n)
    p = (1 - alpha) * p + alpha * off / (n - 1)
    q = (1 - alpha) * cluster_q(to_np(z)) + alpha * off / (n - 1)
    assert out.loss.item() == pytest.approx(row_kl(p, q), rel=RTOL)


def exp_log_kernel(z: np.ndarray, gamma: float, temperature: float) -> np.ndarray:
    return -((cdist(z, z, "sqeuclidean") + 1e-12) ** (gamma / 2)) / temperature


def test_kernel_infonce_laplacian():
    problem, z = random_z("views")
    out = load_recipe("kernel_infonce_laplacian")(*problem.rows(z))
    ref = kernel_nt_xent(exp_log_kernel(unit(to_np(z)), 1.0, 0.5), problem.facts["B"])
    assert out.loss.item() == pytest.approx(ref, rel=RTOL)


def test_kernel_infonce_gaussian_is_nt_xent_at_half_temperature():
    from icon_lightning import learned, supervisory
    from icon_lightning.loss import IConLoss

    problem, z = random_z("views")
    for tau in (0.1, 0.5, 1.0):
        out = IConLoss(supervisory.Augmentation(), learned.ExponentialKernel(gamma=2.0, temperature=tau))
        ref = nt_xent(to_np(z), problem.facts["B"], tau / 2)
        assert out(*problem.rows(z)).loss.item() == pytest.approx(ref, rel=RTOL)


def test_kernel_infonce_exact_at_small_temperature():
    """τ = 0.01 in float32 matches the float64 log-space reference (the released code's +1e-6 does not)."""
    from icon_lightning import learned, supervisory
    from icon_lightning.loss import IConLoss

    problem, z = random_z("views")
    b = problem.facts["B"]
    ref = kernel_nt_xent(exp_log_kernel(unit(to_np(z)), 1.0, 0.01), b)
    loss = IConLoss(supervisory.Augmentation(), learned.ExponentialKernel(gamma=1.0, temperature=0.01))
    anchors, _ = problem.rows(z.float())
    assert loss(anchors).loss.item() == pytest.approx(ref, rel=1e-5)
    k = np.exp(exp_log_kernel(unit(to_np(z)), 1.0, 0.01))
    np.fill_diagonal(k, 0)
    linear = np.mean(-np.log(k[np.arange(2 * b), (np.arange(2 * b) + b) % (2 * b)] + 1e-6) + np.log(k.sum(1) + 1e-6))
    assert abs(linear - ref) > 1.0  # the linear-space +1e-6 form is far off; ours is not


def test_kernel_infonce_simple_sum():
    problem, z = random_z("views")
    out = load_recipe("kernel_infonce_simple_sum")(*problem.rows(z))
    u = unit(to_np(z))
    log_k = np.logaddexp(exp_log_kernel(u, 1.0, 0.5), exp_log_kernel(u, 2.0, 0.5))
    assert out.loss.item() == pytest.approx(kernel_nt_xent(log_k, problem.facts["B"]), rel=RTOL)


def test_kernel_infonce_concat_sum():
    problem, z = random_z("views")
    out = load_recipe("kernel_infonce_concat_sum")(*problem.rows(z))
    u = unit(to_np(z))  # normalised jointly, then split
    half = u.shape[1] // 2
    log_k = np.logaddexp(exp_log_kernel(u[:, :half], 1.0, 0.5), exp_log_kernel(u[:, half:], 2.0, 0.5))
    assert out.loss.item() == pytest.approx(kernel_nt_xent(log_k, problem.facts["B"]), rel=RTOL)


def test_kernel_infonce_code_sum():
    problem, z = random_z("views")
    out = load_recipe("kernel_infonce_code_sum")(*problem.rows(z))
    u, b = unit(to_np(z)), problem.facts["B"]
    ref = 0.5 * kernel_nt_xent(exp_log_kernel(u, 1.0, 0.5), b) + 0.5 * kernel_nt_xent(exp_log_kernel(u, 2.0, 0.5), b)
    assert out.loss.item() == pytest.approx(ref, rel=RTOL)


def sc_reference(s: np.ndarray, alpha: float, beta: float) -> float:
    b = len(s)
    total = []
    for i in range(b):
        neg = [s[i, j] for j in range(b) if j != i]
        total.append(-alpha * s[i, i] + logsumexp(neg) + beta / (b - 1) * sum(neg))
    return float(np.mean(total))


def test_sc_infonce():
    problem, z = random_z("cross_view")
    anchors, candidates = problem.rows(z)
    out = load_recipe("sc_infonce")(anchors, candidates)
    b = problem.facts["B"]
    s = unit(to_np(z[:b])) @ unit(to_np(z[b:])).T / 0.15
    assert out.loss.item() == pytest.approx(sc_reference(s, 1.0, -0.2), rel=RTOL)


def test_sc_infonce_at_alpha_one_beta_zero_is_dcl():
    from icon_lightning.loss import SCInfoNCE

    problem, z = random_z("cross_view")
    b = problem.facts["B"]
    s = torch.from_numpy(unit(to_np(z[:b])) @ unit(to_np(z[b:])).T / 0.15)
    # Decoupled contrastive loss (Yeh et al.): the positive is removed from the denominator.
    dcl = -torch.diagonal(s) + torch.logsumexp(s.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf")), 1)
    out = SCInfoNCE(alpha=1.0, beta=0.0, temperature=0.15)(*problem.rows(z))
    assert out.loss.item() == pytest.approx(float(dcl.mean()), rel=RTOL)


@pytest.mark.parametrize("alpha,beta", [(1.0, -0.2), (0.5, 0.2), (0.1, 0.5)])
def test_sc_infonce_logit_gradient(alpha, beta):
    """∂ℓ_i/∂s_ii = −α and Σ_j ∂ℓ_i/∂s_ij = 1 − α + β for every anchor."""
    from icon_lightning.functional import sc_infonce

    s = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    positive = torch.eye(9, dtype=torch.bool)
    grads = torch.stack([torch.autograd.grad(sc_infonce(s, positive, alpha, beta)[i], s)[0][i] for i in range(9)])
    torch.testing.assert_close(torch.diagonal(grads), torch.full((9,), -alpha, dtype=torch.float64))
    torch.testing.assert_close(grads.sum(1), torch.full((9,), 1 - alpha + beta, dtype=torch.float64))


def test_sc_infonce_is_a_debiased_kl_when_beta_is_alpha_minus_one():
    """At β = α − 1: ∇ℓ_i = ∇KL(p~_i ‖ softmax(s_i)) / (1 − q_i+), ε_i = (1 − α)(1 − q_i+)."""
    from icon_lightning.functional import sc_infonce

    alpha, b = 0.4, 7
    s = torch.randn(b, b, dtype=torch.float64, requires_grad=True)
    positive = torch.eye(b, dtype=torch.bool)
    grad_sc = torch.autograd.grad(sc_infonce(s, positive, alpha, alpha - 1).sum(), s)[0]
    q = torch.softmax(s, 1).detach()
    q_pos = torch.diagonal(q)
    eps = (1 - alpha) * (1 - q_pos)
    target = (eps / (b - 1)).unsqueeze(1).expand(b, b).clone()
    target[positive] = 1 - eps
    kl = kl_divergence(target, torch.log_softmax(s, 1))[0].sum()
    grad_kl = torch.autograd.grad(kl, s)[0] / (1 - q_pos).unsqueeze(1)
    torch.testing.assert_close(grad_sc, grad_kl)


def test_cross_entropy_with_sqeuclidean_prototypes_is_a_biased_linear_layer(float64):
    """Gaussian q on prototypes = softmax(2⟨z, w_c⟩ − ‖w_c‖²): I-Con's reading of a linear classifier."""
    from icon_lightning import learned, supervisory
    from icon_lightning.loss import IConLoss

    problem, z = random_z("prototypes")
    w = problem.facts["prototypes"]
    out = IConLoss(supervisory.SameLabel(), learned.Gaussian("sqeuclidean", 1.0))(*problem.rows(z))
    logits = 2 * z @ w.T - (w * w).sum(1)
    assert out.loss.item() == pytest.approx(float(F.cross_entropy(logits, problem.facts["label"])), rel=RTOL)


def test_rows_can_be_concatenated_into_views():
    z = torch.randn(6, 3)
    a = Rows(z=z[:3], index=torch.arange(3), view=torch.zeros(3, dtype=torch.long))
    b = Rows(z=z[3:], index=torch.arange(3), view=torch.ones(3, dtype=torch.long))
    both = Rows.cat([a, b])
    assert torch.equal(both.z, z) and both.index.tolist() == [0, 1, 2, 0, 1, 2] and both.label is None
