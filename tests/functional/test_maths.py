"""The functional layer against independent references: scipy, scikit-learn, brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from icon_lightning import functional as fn


def test_log_matmul_exp_matches_logsumexp_including_underflow():
    torch.manual_seed(0)
    a = torch.randn(7, 5, dtype=torch.float32) * 3
    b = torch.randn(6, 5, dtype=torch.float32) * 3
    a[0] = torch.tensor([0.0, -500.0, -500.0, -500.0, -500.0])  # the sum underflows in float32
    b[0] = torch.tensor([-500.0, 0.0, -500.0, -500.0, -500.0])
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = fn.log_matmul_exp(a, b)
    ref = torch.logsumexp(a.unsqueeze(1) + b.unsqueeze(0), -1)
    torch.testing.assert_close(out, ref)
    assert out[0, 0].item() == pytest.approx(-500.0 + np.log(2.0))  # e^-500 + e^-500, not -inf
    g_out = torch.autograd.grad(out.sum(), (a, b))
    g_ref = torch.autograd.grad(ref.sum(), (a, b))
    for x, y in zip(g_out, g_ref):
        torch.testing.assert_close(x, y)


def test_log_matmul_exp_repairs_many_underflows_in_bounded_blocks(monkeypatch):
    """Very sharp heads: most pairs underflow; the exact repair runs block by block and stays exact."""
    import icon_lightning.functional.cluster as cluster

    monkeypatch.setattr(cluster, "REPAIR_ELEMENTS", 12)  # 3 pairs of K = 4 per block: many blocks
    torch.manual_seed(1)
    a = (torch.randn(9, 4) * 200).requires_grad_(True)
    b = (torch.randn(8, 4) * 200).requires_grad_(True)
    out = fn.log_matmul_exp(a, b)
    ref = torch.logsumexp(a.unsqueeze(1) + b.unsqueeze(0), -1)
    shifted = (a - a.amax(-1, keepdim=True)).exp() @ (b - b.amax(-1, keepdim=True)).exp().T
    assert int((shifted <= torch.finfo(torch.float32).tiny).sum()) > 6  # the repair path really runs
    torch.testing.assert_close(out, ref)
    for x, y in zip(torch.autograd.grad(out.sum(), (a, b)), torch.autograd.grad(ref.sum(), (a, b))):
        torch.testing.assert_close(x, y)


def test_cluster_affinity_rows_sum_to_one_before_masking():
    log_phi = torch.log_softmax(torch.randn(9, 4, dtype=torch.float64), -1)
    q = fn.log_cluster_affinity(log_phi, log_phi).exp()
    torch.testing.assert_close(q.sum(1), torch.ones(9, dtype=torch.float64))


def test_kl_matches_scipy_and_ignores_zero_p():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    log_q = torch.tensor(
        [[np.log(0.25), np.log(0.75), -np.inf], [np.log(0.1), np.log(0.6), np.log(0.3)]],
        dtype=torch.float64,
        requires_grad=True,
    )
    kl, ce = fn.kl_divergence(p, log_q)
    q = log_q.detach().exp().numpy()
    for i in range(2):
        assert kl[i].item() == pytest.approx(entropy(p[i].numpy(), q[i]), rel=1e-12)
        assert ce[i].item() == pytest.approx(entropy(p[i].numpy(), q[i]) + entropy(p[i].numpy()), rel=1e-12)
    (grad,) = torch.autograd.grad(kl.sum(), log_q)
    assert torch.isfinite(grad).all() and grad[0, 2] == 0


def test_masked_log_softmax_empty_row_stays_minus_inf():
    scores = torch.randn(3, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1] = False
    out = fn.masked_log_softmax(scores, valid)
    assert torch.isneginf(out[1]).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out[0].exp().sum(), torch.tensor(1.0))


def test_self_pairs_valid_with_offset():
    valid = fn.self_pairs_valid(3, 9, offset=3)  # rank 1 of 3 with B = 3
    assert [(i, j) for i, j in zip(*torch.nonzero(~valid, as_tuple=True))] == [(0, 3), (1, 4), (2, 5)]


def test_debias_linear_and_log_space_agree():
    valid = fn.self_pairs_valid(5, 5)
    p = fn.normalize_rows(torch.rand(5, 5, dtype=torch.float64), valid)
    for alpha in (0.0, 0.3, 0.8):
        lin = fn.debias(p, alpha, valid)
        torch.testing.assert_close(lin.sum(1), torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(lin[valid], ((1 - alpha) * p + alpha / 4)[valid])
        log = fn.log_debias(p.log().masked_fill(~valid, float("-inf")), alpha, valid)
        torch.testing.assert_close(log.exp(), lin)


def test_propagation_matches_dense_powers():
    torch.manual_seed(0)
    n = 12
    adj = (torch.rand(n, n) < 0.2).double()
    adj.fill_diagonal_(0)
    adj[adj.sum(1) == 0, 0] = 1
    adj[0, 0] = 0
    adj[0, 1] = 1
    valid = fn.self_pairs_valid(n, n)
    p = fn.normalize_rows(adj, valid)
    pn = p.numpy()
    for steps in (1, 2, 3):
        total = sum(np.linalg.matrix_power(pn, t) for t in range(1, steps + 1))
        np.fill_diagonal(total, 0)
        torch.testing.assert_close(
            fn.propagate(p, steps, False, valid), torch.from_numpy(total / total.sum(1, keepdims=True))
        )
        support = (total > 0).astype(float)
        torch.testing.assert_close(
            fn.propagate(p, steps, True, valid), torch.from_numpy(support / support.sum(1, keepdims=True))
        )


def test_perplexity_search_matches_scikit_learn():
    from sklearn.manifold._utils import _binary_search_perplexity

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5))
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    n = len(x)
    neighbours_sq = np.stack([np.delete(sq[i], i) for i in range(n)]).astype(np.float32)
    ref = _binary_search_perplexity(neighbours_sq, 20.0, 0)  # (N, N-1) conditional P, self removed
    sq_t = torch.from_numpy(sq)
    valid = fn.self_pairs_valid(n, n)
    sigma = fn.sigma_for_perplexity(sq_t, 20.0, valid)
    p = fn.masked_log_softmax(fn.gaussian_log_affinity(sq_t, sigma), valid).exp().numpy()
    ours = np.stack([np.delete(p[i], i) for i in range(n)])
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    perplexity = np.exp(-np.sum(np.where(ours > 0, ours * np.log(np.where(ours > 0, ours, 1)), 0), 1))
    np.testing.assert_allclose(perplexity, 20.0, rtol=1e-6)


def brute_force_accuracy(pred: np.ndarray, target: np.ndarray, k: int, c: int) -> float:
    best = 0
    for image in itertools.permutations(range(max(k, c)), k):  # injective cluster -> class maps
        mapped = np.array([image[p] for p in pred])
        best = max(best, int((mapped == target).sum()))
    return best / len(pred)


@pytest.mark.parametrize("k,c", [(3, 3), (4, 4), (5, 5), (5, 3), (3, 5)])
def test_hungarian_accuracy_matches_brute_force(k, c):
    rng = np.random.default_rng(k * 10 + c)
    for _ in range(5):
        pred = rng.integers(0, k, 60)
        target = rng.integers(0, c, 60)
        conf = fn.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k, c)
        acc, mapping = fn.hungarian_accuracy(conf)
        assert acc == pytest.approx(brute_force_accuracy(pred, target, k, c))
        assert (mapping >= 0).sum() == min(k, c)


@pytest.mark.parametrize("alpha", [0.2, 0.6, 0.9])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_debiased_cluster_affinity_in_probability_space_equals_the_log_space_path(alpha, masked, weighted):
    torch.manual_seed(0)
    b, m, k = 9, 14, 4  # rectangular: anchors are rows 3..11 of the candidates
    logits_a = (torch.randn(b, k, dtype=torch.float64) * 4).requires_grad_(True)
    logits_c = (torch.randn(m, k, dtype=torch.float64) * 4).requires_grad_(True)
    valid = fn.self_pairs_valid(b, m, 3) if masked else None
    log_w = torch.rand(m, dtype=torch.float64).add(0.5).log() if weighted else None

    def both():
        la, lc = torch.log_softmax(logits_a, -1), torch.log_softmax(logits_c, -1)
        ref = fn.log_debias(fn.masked_log_softmax(fn.log_cluster_affinity(la, lc, log_w), valid), alpha, valid)
        return fn.log_debiased_cluster_affinity(la, lc, alpha, valid, log_w), ref

    out, ref = both()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if masked:
        assert torch.isneginf(out[~valid]).all()
    weights = torch.rand(b, m, dtype=torch.float64)  # a generic downstream use of every finite entry
    keep = torch.isfinite(ref)
    g_out = torch.autograd.grad((out[keep] * weights[keep]).sum(), (logits_a, logits_c))
    out, ref = both()
    g_ref = torch.autograd.grad((ref[keep] * weights[keep]).sum(), (logits_a, logits_c))
    for x, y in zip(g_out, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_debiased_cluster_affinity_hands_back_to_log_space_when_a_row_would_lose_precision():
    log_phi = torch.log_softmax(torch.tensor([[0.0, -200.0], [-200.0, 0.0], [-200.0, 0.0]]), -1)
    valid = fn.self_pairs_valid(3, 3)
    # Anchor 0 is alone in cluster 0: its affinities to the others are ~e^-200, below float32's range.
    assert fn.log_debiased_cluster_affinity(log_phi, log_phi, 0.5, valid) is None
    assert fn.log_debiased_cluster_affinity(log_phi, log_phi, 0.0, valid) is None  # α = 0: no floor
    from icon_lightning.learned import Debiased, UniformCluster
    from icon_lightning.rows import Rows

    rows = Rows(z=log_phi, index=torch.arange(3))
    out = Debiased(UniformCluster(), alpha=0.5)(rows, rows, valid)
    ref = fn.log_debias(UniformCluster()(rows, rows, valid), 0.5, valid)
    torch.testing.assert_close(out, ref)
    assert torch.isfinite(out[valid]).all()


def test_weighted_log_dot_is_the_dense_sum_over_positive_pairs_value_and_gradient():
    """SCAN's and TEMI's pair sums are computed on the pairs with weight > 0 only; they equal the dense
    Σ_j w_ij log Σ_c exp(a_ic + b_jc) (brute force in float64, every pair), value and gradients."""
    from icon_lightning.functional.cluster import weighted_log_dot

    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()
    b = torch.randn(11, 5, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()
    w = torch.rand(7, 11, generator=g, dtype=torch.float64) * (torch.rand(7, 11, generator=g) < 0.3)
    w[3] = 0  # an anchor without a positive pair counts 0
    dense = (a[:, None, :] + b[None, :, :]).logsumexp(-1)  # (B, M, K) brute force
    reference = (w * dense).sum(1)
    got = weighted_log_dot(w, a, b)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(reference.sum(), (a, b))
    gb = torch.autograd.grad(got.sum(), (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert got[3] == 0


def test_table_adjacency_matches_the_brute_force_comparison():
    """KNNGraph's (B, M) mask from the k-NN table, by sorted matching: every candidate column whose dataset index
    is in the anchor's row (repeated candidates all marked, −1 padding matches nothing), as the (B, k, M)
    comparison it replaced."""
    from icon_lightning.supervisory.graph import table_adjacency

    g = torch.Generator().manual_seed(1)
    table = torch.randint(-1, 30, (9, 4), generator=g)
    index = torch.randint(0, 30, (25,), generator=g)  # duplicates among the candidates
    brute = (table.unsqueeze(-1) == index.view(1, 1, -1)).any(1)
    assert torch.equal(table_adjacency(table, index), brute)
