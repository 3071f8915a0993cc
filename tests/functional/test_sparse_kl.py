"""The sparse I-Con path against the dense one (the reference) and against brute force, in float64.

Every p that has a sparse form, composed with every cluster q that takes it, on square batches (self pairs
masked), rectangular teacher candidates (self pairs at an offset) and unmasked rectangular candidates: the
same loss, cross-entropy and gradients to 1e-9 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icon_lightning import learned, supervisory
from icon_lightning.functional import cluster_kl
from icon_lightning.functional.cluster_kl import log_row_normaliser, sparse_cluster_kl, weighted_log_affine
from icon_lightning.functional.sparse import SparseTarget, match_pairs, self_columns, sparse_matmul
from icon_lightning.loss import IConLoss
from icon_lightning.rows import Rows
from tests.conftest import knn_table_brute

B, K, D = 36, 5, 6

P_CASES = {
    "knn": lambda: supervisory.KNNGraph(k=3),
    "knn_symmetric": lambda: supervisory.KNNGraph(k=4, symmetric=True),
    "knn_walks_debiased": lambda: supervisory.Debiased(supervisory.Propagated(supervisory.KNNGraph(k=3), steps=2)),
    "knn_two_walks_uniform": lambda: supervisory.Propagated(supervisory.KNNGraph(k=2), steps=3, uniform=True),
    "augmentation_and_knn": lambda: supervisory.Debiased(
        supervisory.Mixture([supervisory.Augmentation(), supervisory.KNNGraph(k=3)], [1.0, 2.0]), alpha=0.3
    ),
    "same_label": lambda: supervisory.SameLabel(),
    "cross_view_debiased_twice": lambda: supervisory.Debiased(supervisory.Debiased(supervisory.CrossView(), 0.2), 0.5),
}
Q_CASES = {
    "plain": lambda: learned.UniformCluster(),
    "debiased": lambda: learned.Debiased(learned.UniformCluster(temperature=0.5), alpha=0.6),
    "degree_weighted_debiased": lambda: learned.Debiased(learned.UniformCluster(degree_weighted=True), alpha=0.2),
    "debiased_twice": lambda: learned.Debiased(learned.Debiased(learned.UniformCluster(), alpha=0.3), alpha=0.4),
}


def rows(z: torch.Tensor, index: torch.Tensor, x: torch.Tensor, seed: int = 0) -> Rows:
    """Rows of a batch with repeated items (two views of some), labels, a k-NN table and degrees."""
    g = torch.Generator().manual_seed(seed)
    table = knn_table_brute(x, 4)
    return Rows(
        z=z,
        index=index,
        view=torch.arange(len(z)) % 2,
        label=index % 4,
        features=x[index],
        neighbours=table[index],
        degree=torch.rand(len(z), generator=g, dtype=torch.float64) + 0.5,
    )


def problem(shape: str, seed: int = 0):
    """(anchors, candidates or None, self_offset) for a square, teacher (offset) or unmasked rectangular batch."""
    g = torch.Generator().manual_seed(seed)
    n_items = 24
    x = torch.randn(n_items, D, generator=g, dtype=torch.float64)
    index = torch.cat([torch.arange(n_items), torch.randperm(n_items, generator=g)[: B - n_items]])
    z = (2 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_(True)
    anchors = rows(z, index, x)
    if shape == "square":
        return anchors, None, None
    if shape == "teacher":  # a teacher's outputs of the same rows: self pairs at offset 0
        teacher = torch.randn(B, K, generator=g, dtype=torch.float64)
        return anchors, rows(teacher, index, x), 0
    other = torch.randperm(n_items, generator=g)[:20]  # candidates: other rows, nothing masked
    cz = torch.randn(len(other), K, generator=g, dtype=torch.float64, requires_grad=True)
    return anchors, rows(cz, other, x, seed=1), None


def loss_and_grads(loss: IConLoss, anchors: Rows, candidates: Rows | None, offset):
    out = loss(anchors, candidates, self_offset=offset)
    leaves = [anchors.z] + ([candidates.z] if candidates is not None and candidates.z.requires_grad else [])
    grads = torch.autograd.grad(out.loss, leaves)
    return out, grads


@pytest.mark.parametrize("shape", ["square", "teacher", "rectangular"])
@pytest.mark.parametrize("q_name", list(Q_CASES))
@pytest.mark.parametrize("p_name", list(P_CASES))
def test_sparse_path_equals_dense_path(p_name, q_name, shape):
    if shape == "rectangular" and p_name in ("knn_walks_debiased", "knn_two_walks_uniform", "knn_symmetric"):
        pytest.skip("walks and in-batch symmetrisation need a square batch")
    anchors, candidates, offset = problem(shape)
    p, q = P_CASES[p_name](), Q_CASES[q_name]()
    fast, dense = IConLoss(p, q), IConLoss(p, q, sparse=False)
    target = fast.target(anchors, candidates, offset)
    assert isinstance(target, SparseTarget)
    out_fast, grads_fast = loss_and_grads(fast, anchors, candidates, offset)
    out_dense, grads_dense = loss_and_grads(dense, anchors, candidates, offset)
    for name in ("loss", "cross_entropy"):
        torch.testing.assert_close(getattr(out_fast, name), getattr(out_dense, name), rtol=1e-9, atol=0)
    for gf, gd in zip(grads_fast, grads_dense):
        torch.testing.assert_close(gf, gd, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p_name", list(P_CASES))
def test_sparse_target_is_the_dense_p(p_name):
    anchors, _, _ = problem("square", seed=3)
    p = P_CASES[p_name]()
    loss = IConLoss(p, learned.UniformCluster(), sparse=False)
    dense = loss.target(anchors)
    sparse = p.sparse(anchors, anchors, self_columns(B, B, 0))
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-12, atol=1e-15)
    assert bool((sparse.values > 0).all()) and not bool((sparse.cols == sparse.self_col[sparse.rows]).any())
    key = sparse.rows * B + sparse.cols
    assert bool((key[1:] > key[:-1]).all())  # unique pairs, sorted by row then column


def test_many_heads_in_one_call_equal_each_head_alone():
    anchors, _, _ = problem("square", seed=4)
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    loss = IConLoss(P_CASES["knn_walks_debiased"](), Q_CASES["debiased"]())
    dense = IConLoss(P_CASES["knn_walks_debiased"](), Q_CASES["debiased"](), sparse=False)
    outs = loss.forward_heads([anchors.with_z(z) for z in zs], None, self_offset=None)
    grads = torch.autograd.grad(sum(o.loss for o in outs), zs)
    for z, out, grad in zip(zs, outs, grads):
        ref = dense(anchors.with_z(z))
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-9, atol=0)
        torch.testing.assert_close(grad, torch.autograd.grad(ref.loss, z)[0], rtol=1e-9, atol=1e-12)


def test_blocks_of_any_size_give_the_same_result(monkeypatch):
    """Tiny blocks: many row and pair blocks, ragged last ones, self pairs inside and across blocks."""
    anchors, candidates, offset = problem("teacher", seed=6)
    loss = IConLoss(P_CASES["augmentation_and_knn"](), Q_CASES["debiased"]())
    ref, ref_grads = loss_and_grads(loss, anchors, candidates, offset)
    monkeypatch.setattr(cluster_kl, "CHUNK_ELEMENTS", 7 * K)
    out, grads = loss_and_grads(loss, anchors, candidates, offset)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-12, atol=1e-15)


def test_weighted_log_affine_matches_brute_force():
    """Row weights on every valid pair plus weights on a sparse set of pairs, self pairs left out."""
    g = torch.Generator().manual_seed(7)
    a = torch.rand(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    self_col = torch.tensor([0, 3, -1, 10, 2, -1, 5, 6, 7])
    weight = torch.randn(9, generator=g, dtype=torch.float64)
    pair_rows, pair_cols = torch.tensor([0, 0, 2, 5, 5, 8]), torch.tensor([1, 4, 0, 0, 10, 3])
    pair_weight = torch.randn(6, generator=g, dtype=torch.float64)
    out = weighted_log_affine(a, b, shift, self_col, weight, pair_rows, pair_cols, pair_weight)
    y = torch.log(shift.view(1, -1, 1) + a @ b.transpose(1, 2))
    mask = torch.ones(9, 11, dtype=torch.bool)
    has = self_col >= 0
    mask[torch.arange(9)[has], self_col[has]] = False
    ref = (y * mask).sum(-1) @ weight + y[:, pair_rows, pair_cols] @ pair_weight
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)  # one number per head
    for x, r in zip(torch.autograd.grad(out @ upstream, (a, b)), torch.autograd.grad(ref @ upstream, (a, b))):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # no gradient wanted: the value alone
        value = weighted_log_affine(a, b, shift, self_col, weight, pair_rows, pair_cols, pair_weight)
        torch.testing.assert_close(value, ref.detach())


def test_row_normaliser_has_no_cancellation_when_one_item_holds_a_cluster():
    """An anchor almost alone in its cluster: T_i ≈ 1e-6. Subtracting its own share from the cluster size
    in float32 would lose every digit; the top-item rule keeps float32 within 1e-5 of the float64 truth."""
    torch.manual_seed(8)
    logits = torch.randn(50, 4, dtype=torch.float64)
    logits[0] = torch.tensor([30.0, 0.0, 0.0, 0.0])  # item 0 owns cluster 0
    logits[1:, 0] = -30.0  # nobody else is there
    log_phi = torch.log_softmax(logits, -1)
    phi = log_phi.exp()
    mask = ~torch.eye(50, dtype=torch.bool)
    truth = torch.log(((phi @ (phi / phi.sum(0)).T) * mask).sum(1))  # brute force, float64
    self_col = torch.arange(50)
    lp = log_phi.float().unsqueeze(0)
    out = log_row_normaliser(lp, lp, torch.logsumexp(lp, 1, keepdim=True), self_col)[0]
    assert truth[0] < np.log(1e-5)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)


def test_sparse_kl_hands_back_where_it_would_lose_precision():
    """α = 0 with a uniform part in p (log q unbounded below): None, and IConLoss takes the dense path."""
    anchors, _, _ = problem("square", seed=9)
    p = P_CASES["knn_walks_debiased"]()
    target = p.sparse(anchors, anchors, self_columns(B, B, 0))
    log_phi = torch.log_softmax(anchors.z, -1).unsqueeze(0)
    assert sparse_cluster_kl(target, log_phi, log_phi, alpha=0.0) is None
    fast, dense = IConLoss(p, learned.UniformCluster()), IConLoss(p, learned.UniformCluster(), sparse=False)
    torch.testing.assert_close(fast(anchors).loss, dense(anchors).loss, rtol=1e-12, atol=0)


def test_match_pairs_and_sparse_matmul_against_brute_force():
    g = torch.Generator().manual_seed(10)
    keys = torch.randint(0, 6, (15,), generator=g)
    query = torch.randint(0, 8, (9,), generator=g)
    rows, cols = match_pairs(torch.arange(9), query, keys)
    got = sorted(zip(rows.tolist(), cols.tolist()))
    assert got == [(i, j) for i in range(9) for j in range(15) if query[i] == keys[j]]
    a = (torch.rand(7, 7, generator=g) < 0.3).double() * torch.rand(7, 7, generator=g, dtype=torch.float64)
    r, c = a.nonzero(as_tuple=True)
    pr, pc, pv = sparse_matmul((r, c, a[r, c]), (r, c, a[r, c]), 7)
    product = torch.zeros(7, 7, dtype=torch.float64)
    product[pr, pc] = pv
    torch.testing.assert_close(product, a @ a, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_anchor_almost_alone_in_its_cluster_takes_the_exact_normaliser(dtype):
    """T_0 ≈ 1e-9 (< EXACT_BELOW): the row normaliser is recomputed without cancellation, so the loss and
    gradients match the dense float64 reference, in float64 to 1e-9 and in float32 to float32 rounding."""
    anchors, _, _ = problem("square", seed=11)
    logits = anchors.z.detach().clone()
    logits[0] = torch.tensor([25.0, 0.0, 0.0, 0.0, 0.0])
    logits[1:, 0] = -25.0
    loss = IConLoss(P_CASES["knn_walks_debiased"](), Q_CASES["debiased"]())
    dense = IConLoss(P_CASES["knn_walks_debiased"](), Q_CASES["debiased"](), sparse=False)
    z = logits.to(dtype).requires_grad_(True)
    z64 = logits.requires_grad_(True)
    out, ref = loss(anchors.with_z(z)), dense(anchors.with_z(z64))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=tol, atol=0)
    (g,), (g_ref,) = torch.autograd.grad(out.loss, z), torch.autograd.grad(ref.loss, z64)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * float(g_ref.abs().max()))


def test_a_cluster_nobody_uses_gives_no_nan_in_float32():
    """Every item's probability of cluster 0 underflows float32 (logit gap 120): n_0 is 0 in probability
    space. The sparse path takes cluster sizes in log space, so it matches the float64 dense path."""
    anchors, _, _ = problem("square", seed=12)
    logits = anchors.z.detach().clone()
    logits[:, 0] = -120.0
    loss = IConLoss(P_CASES["augmentation_and_knn"](), Q_CASES["degree_weighted_debiased"]())
    dense = IConLoss(P_CASES["augmentation_and_knn"](), Q_CASES["degree_weighted_debiased"](), sparse=False)
    z = logits.float().requires_grad_(True)
    z64 = logits.requires_grad_(True)
    out, ref = loss(anchors.with_z(z)), dense(anchors.with_z(z64))
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=0)
    (g,), (g_ref,) = torch.autograd.grad(out.loss, z), torch.autograd.grad(ref.loss, z64)
    assert bool(torch.isfinite(g).all())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the sampled uniform term above DENSE_EXACT_WORK
def test_exact_work_covers_every_batch_up_to_ten_clusters():
    """The sampled estimate never touches a full batch (``batch_size='auto'``) nor a stochastic batch up to K = 10:
    every result measured before it stays exact. Beyond, the drawn block costs what K = 10's largest batch costs."""
    from icon_lightning.data.loaders import ANCHORS_PER_CLUSTER, FULL_BATCH_MAX, auto_anchors

    work = cluster_kl.DENSE_EXACT_WORK
    assert work == FULL_BATCH_MAX**2 * 10
    rows_at_ten = 3 * auto_anchors(10**6, 10)  # anchors, their two sampled neighbours each: the rows of a step
    assert rows_at_ten == 3 * 10 * ANCHORS_PER_CLUSTER and rows_at_ten**2 * 10 <= work
    assert cluster_kl.dense_block(FULL_BATCH_MAX, FULL_BATCH_MAX, work // 10) is None
    rows_at_30 = 3 * auto_anchors(10**6, 30)
    picked_rows, picked_cols, _ = cluster_kl.dense_block(rows_at_30, rows_at_30, work // 30)
    assert len(picked_rows) * len(picked_cols) * 30 <= 1.01 * work


def _sampled_problem():
    anchors, candidates, offset = problem("teacher", seed=11)
    loss = IConLoss(P_CASES["augmentation_and_knn"](), Q_CASES["debiased"]())
    return loss, anchors, candidates, offset


def test_sampled_uniform_term_is_unbiased_in_value_and_gradient(monkeypatch):
    """Above the exact work the uniform term is drawn on a block of about DENSE_EXACT_WORK / K rows × candidates: over
    many draws the mean loss and gradient are the exact ones (float64, within 4 standard errors), while single draws
    differ (it is sampled); the block's rows × columns stay near the budget."""
    loss, anchors, candidates, offset = _sampled_problem()
    exact, exact_grads = loss_and_grads(loss, anchors, candidates, offset)
    budget = 100  # of B × M = 36 × 36: about 10 × 10 drawn
    monkeypatch.setattr(cluster_kl, "DENSE_EXACT_WORK", budget * K)
    sizes = []
    real = cluster_kl.weighted_log_affine

    def spy(a, b, *rest):
        sizes.append(a.shape[1] * b.shape[1])
        return real(a, b, *rest)

    monkeypatch.setattr(cluster_kl, "weighted_log_affine", spy)
    torch.manual_seed(12)
    draws = [loss_and_grads(loss, anchors, candidates, offset) for _ in range(1000)]
    values = torch.stack([out.loss.detach() for out, _ in draws])
    grads = torch.stack([g[0] for _, g in draws])
    assert max(sizes) <= 1.25 * budget and len(sizes) == len(draws)
    assert float(values.std()) > 1e-3 * float(exact.loss.detach().abs())  # really sampled
    error = float((values.mean() - exact.loss).abs())
    assert error <= 4 * float(values.std()) / len(values) ** 0.5
    grad_error = (grads.mean(0) - exact_grads[0]).norm()
    grad_se = (grads.var(0).sum() / len(grads)).sqrt()
    assert float(grad_error) <= 4 * float(grad_se)  # the sum over all entries of the squared errors ~ χ² at its mean
    assert float(exact_grads[0].norm()) > 20 * float(grad_se)  # the check can see a bias of 5 % of the gradient


def test_a_biased_block_would_be_caught(monkeypatch):
    """The unbiasedness test's power: dropping the block's scale (a biased estimate) moves the mean by far more than
    its 4 standard errors."""
    loss, anchors, candidates, offset = _sampled_problem()
    exact = loss(anchors, candidates, self_offset=offset).loss.detach()
    monkeypatch.setattr(cluster_kl, "DENSE_EXACT_WORK", 100 * K)
    real = cluster_kl.dense_block
    monkeypatch.setattr(cluster_kl, "dense_block", lambda *a: (lambda r: (r[0], r[1], 1.0))(real(*a)))
    torch.manual_seed(12)
    with torch.no_grad():
        values = torch.stack([loss(anchors, candidates, self_offset=offset).loss for _ in range(500)])
    assert float((values.mean() - exact).abs()) > 10 * float(values.std()) / len(values) ** 0.5


def test_sampled_block_keeps_the_pairs_and_self_pairs_exact(monkeypatch):
    """With the uniform weights zeroed, the sampled path is the pair sum alone, exactly, whatever the block; self
    pairs that fall in the block are left out (log 1): the block's sum equals brute force on its rows and columns."""
    g = torch.Generator().manual_seed(13)
    a = torch.rand(2, 9, 3, generator=g, dtype=torch.float64)
    b = torch.rand(2, 11, 3, generator=g, dtype=torch.float64)
    shift = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    self_col = torch.tensor([0, 3, -1, 10, 2, -1, 5, 6, 7])
    pair_rows, pair_cols = torch.tensor([0, 0, 2, 5, 5, 8]), torch.tensor([1, 4, 0, 0, 10, 3])
    pair_weight = torch.randn(6, generator=g, dtype=torch.float64)
    weight = torch.randn(9, generator=g, dtype=torch.float64)
    block = (torch.tensor([1, 3, 6, 8]), torch.tensor([3, 10, 5, 0, 9]), 2.5)
    zero = torch.zeros(9, dtype=torch.float64)
    args = (a, b, shift, self_col)
    pairs_only = cluster_kl.sampled_log_affine(*args, zero, pair_rows, pair_cols, pair_weight, block)
    y = torch.log(shift.view(1, -1, 1) + a @ b.transpose(1, 2))
    torch.testing.assert_close(pairs_only, y[:, pair_rows, pair_cols] @ pair_weight, rtol=1e-13, atol=0)
    none = pair_rows[:0]
    dense_only = cluster_kl.sampled_log_affine(*args, weight, none, none, pair_weight[:0], block)
    r, c = block[0], block[1]
    mask = (c.view(1, -1) != self_col[r].view(-1, 1)).to(y.dtype)  # rows 1, 3, 6 have their self column drawn
    ref = 2.5 * ((y[:, r][:, :, c] * mask).sum(-1) @ weight[r])
    torch.testing.assert_close(dense_only, ref, rtol=1e-13, atol=0)


def test_pair_log_affine_against_brute_force():
    """log(shift + a bᵀ) at the pairs (unsorted, one repeated), value and gradients."""
    g = torch.Generator().manual_seed(14)
    a = torch.rand(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    rows, cols = torch.tensor([5, 0, 0, 2, 8, 5, 8]), torch.tensor([0, 1, 4, 0, 3, 10, 3])
    upstream = torch.randn(2, 7, generator=g, dtype=torch.float64)
    ref = torch.log(shift.view(1, -1, 1) + a @ b.transpose(1, 2))[:, rows, cols]
    out = cluster_kl.pair_log_affine(a, b, shift, rows, cols)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    got = torch.autograd.grad((out * upstream).sum(), (a, b))
    for x, r in zip(got, torch.autograd.grad((ref * upstream).sum(), (a, b))):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-14)
