"""KL(p ‖ q~) for a sparse p and the shared cluster likelihood q, exactly, without a (B, M) matrix.

q(j|i) = s_ij / T_i with s_ij = Σ_c φ_ic ψ_jc, ψ_jc = w_j φ_jc / n_c, n_c = Σ_j w_j φ_jc over all M
candidates, and T_i = Σ_{j valid} s_ij = Σ_c φ_ic (n_c − [self] w_s φ_sc) / n_c: O(K) per row.
q~ = (1−α) q + α/M_i. With p = S + u_i/M_i (``SparseTarget``):

    −Σ_j p_ij log q~_ij = −Σ_{j∈S} S_ij log q~_ij − (u_i/M_i) Σ_{j valid} log q~_ij

The first sum costs O(nnz·K); the second, the only dense one, is taken in row blocks by
``weighted_log_affine`` (a matmul, a log and a reciprocal per block, the gradients formed in the same pass),
so memory stays O(block × M). Every function takes a leading head dimension H: all heads in one call.

The dense sum costs H·B·M·K. It is exact up to ``DENSE_EXACT_WORK`` = B·M·K per head, its cost at K = 10 on the data
module's largest batch. Above it (stochastic batches beyond K = 10, where B and M both grow with K: ∝ K³), it is
estimated without bias on a uniformly drawn block of rows × candidates of that cost (``dense_block``), so its cost no
longer grows with K; the pair terms and T_i stay exact.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from icon_lightning.functional.sparse import SparseTarget

# The uniform term of the loss is taken exactly up to this many rows × candidates × clusters per head: 4,096² × 10,
# the data module's largest full batch (``data.loaders.FULL_BATCH_MAX``; a test keeps them equal) at K = 10, which
# also covers its stochastic batches up to K = 10 (3 × 1,280 rows). Larger ones draw a block of this cost.
DENSE_EXACT_WORK = 4096 * 4096 * 10
CHUNK_ELEMENTS = 1 << 20  # (rows × M × H) or (pairs × K × H) elements per block: 4 MB in float32, near cache
PROBABILITY_SPACE_MIN = 1e-30  # as in functional.cluster: below this row total, take the dense log-space path


def _blocks(total: int, per_item: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


class _PairLogSumExp(torch.autograd.Function):
    """(H, P) log Σ_c exp(a[h, rows, c] + b[h, cols, c]) for P pairs, in blocks of pairs."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        h, _, k = a.shape
        out = a.new_empty(h, len(rows))
        for s, e in _blocks(len(rows), h * k):
            out[:, s:e] = torch.logsumexp(a[:, rows[s:e]] + b[:, cols[s:e]], -1)
        ctx.save_for_backward(a, b, rows, cols, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, rows, cols, out = ctx.saved_tensors
        h, _, k = a.shape
        grad_a = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        for s, e in _blocks(len(rows), h * k):
            r, c = rows[s:e], cols[s:e]
            w = torch.exp(a[:, r] + b[:, c] - out[:, s:e, None]) * grad[:, s:e, None]  # softmax over c × grad
            if grad_a is not None:
                grad_a.index_add_(1, r, w)
            if grad_b is not None:
                grad_b.index_add_(1, c, w)
        return grad_a, grad_b, None, None


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A (shape) CSR matrix of entries (rows, cols, values), rows sorted."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # torch's "CSR support is in beta": these two products are tested here
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _PairLogAffine(torch.autograd.Function):
    """(H, P) log(shift[rows] + Σ_c a[h, rows, c] b[h, cols, c]) for P pairs, a, b ≥ 0: the products by
    ``torch.sparse.sampled_addmm`` at the pairs (a CSR pattern), the gradients by CSR @ dense products."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, shift: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        shape = (a.shape[1], b.shape[1])
        order = torch.argsort(rows, stable=True)
        r, c = rows[order], cols[order]
        pattern = _csr(r, c, a.new_ones(len(r)), shape)
        products = [torch.sparse.sampled_addmm(pattern, a[h], b[h].T, beta=0.0).values() for h in range(len(a))]
        log_y = torch.log(torch.stack(products) + shift[r])  # (H, P) in row order
        ctx.save_for_backward(a, b, r, c, order, log_y)
        return log_y.new_empty(log_y.shape).index_copy_(1, order, log_y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, r, c, order, log_y = ctx.saved_tensors
        shape = (a.shape[1], b.shape[1])
        g = grad[:, order] * torch.exp(-log_y)  # ∂ log y / ∂y = 1 / y, in row order
        by_col = torch.argsort(c, stable=True)
        grad_a = torch.stack([_csr(r, c, g[h], shape) @ b[h] for h in range(len(a))])
        grad_b = torch.stack([_csr(c[by_col], r[by_col], g[h, by_col], shape[::-1]) @ a[h] for h in range(len(a))])
        return grad_a, grad_b, None, None, None


def pair_log_affine(a: Tensor, b: Tensor, shift: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(H, P) log(shift[rows] + (a bᵀ)[:, rows, cols]) for a (H, B, K), b (H, M, K) ≥ 0 and shift (B,) > 0, without
    the (B, M) matrix: memory O(H · P) beyond the inputs and their gradients."""
    return _PairLogAffine.apply(a, b, shift, rows, cols)


def pair_log_matmul_exp(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(H, P) ``log_matmul_exp(a, b)[:, rows, cols]`` for a (H, B, K), b (H, M, K), without the (B, M)
    matrix: exact in log space (no underflow), memory O(block × K) in forward and backward."""
    return _PairLogSumExp.apply(a, b, rows, cols)


class _WeightedLogAffine(torch.autograd.Function):
    """(H,) Σ_i w_i Σ_{j ≠ self_col[i]} log y_hij + Σ_pairs v log y_h,row,col with y = shift_i + a_h b_hᵀ,
    row block by row block.

    The output is one scalar per head, so its upstream gradient is one number per head: the gradients of a
    and b are formed in the same pass as the value (∂ log y / ∂y = 1/y, two products per block) and only
    scaled in backward. Nothing of size (B, M) is kept, and no block is computed twice.
    """

    @staticmethod
    def forward(ctx, a, b, shift, self_col, weight, pair_rows, pair_cols, pair_weight) -> Tensor:
        h, n, _ = a.shape
        m = b.shape[1]
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out = a.new_zeros(h)
        rows = min(n, max(1, CHUNK_ELEMENTS // (h * m)))
        value = a.new_empty(rows * h * m)  # one block buffer each, reused by every block
        inverse = a.new_empty(rows * h * m) if with_grad else None
        grad_a = torch.empty_like(a) if with_grad else None
        grad_bt = b.new_zeros(h, b.shape[2], m) if with_grad else None  # (H, K, M): aᵀ y streams y in its layout
        bt = b.transpose(1, 2)
        bounds = torch.searchsorted(pair_rows, torch.arange(0, n + rows, rows, device=a.device)).tolist()
        for block, (s, e) in enumerate(_blocks(n, h * m)):
            y = value[: h * (e - s) * m].view(h, e - s, m)
            torch.baddbmm(shift[s:e].view(1, -1, 1), a[:, s:e], bt, out=y)
            local = (self_col[s:e] >= 0).nonzero().squeeze(1)
            y[:, local, self_col[s:e][local]] = 1.0  # log 1 = 0, and no gradient: the self pair is no candidate
            ps, pe = bounds[block], bounds[block + 1]
            pr, pc, pw = pair_rows[ps:pe] - s, pair_cols[ps:pe], pair_weight[ps:pe]
            at_pairs = y[:, pr, pc]  # (H, pairs in this block)
            w = weight[s:e].view(1, -1, 1)
            if with_grad:
                g = torch.reciprocal(y, out=inverse[: h * (e - s) * m].view(h, e - s, m)).mul_(w)
                g[:, local, self_col[s:e][local]] = 0.0
                g[:, pr, pc] += pw / at_pairs  # pairs are unique
                torch.bmm(g, b, out=grad_a[:, s:e])
                grad_bt.baddbmm_(a[:, s:e].transpose(1, 2), g)
            out += y.log_().sum(-1) @ weight[s:e] + torch.log(at_pairs) @ pw
        ctx.save_for_backward(grad_a, grad_bt)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_a, grad_bt = ctx.saved_tensors
        scale = grad.view(-1, 1, 1)
        return grad_a * scale, grad_bt.transpose(1, 2) * scale, None, None, None, None, None, None


def weighted_log_affine(
    a: Tensor,
    b: Tensor,
    shift: Tensor,
    self_col: Tensor,
    weight: Tensor,
    pair_rows: Tensor,
    pair_cols: Tensor,
    pair_weight: Tensor,
) -> Tensor:
    """(H,) Σ_i weight_i Σ_{j valid} log y_ij + Σ_p pair_weight_p log y_{pair_rows_p, pair_cols_p} with
    y_h = shift_i + a_h b_hᵀ, for a (H, B, K), b (H, M, K), shift (B,) > 0, pair_rows sorted.

    The (B, M) matrix exists one row block at a time (``CHUNK_ELEMENTS``), in one reused buffer; self pairs
    (``self_col``) are left out. Gradients are formed in the same pass (see ``_WeightedLogAffine``).
    """
    return _WeightedLogAffine.apply(a, b, shift, self_col, weight, pair_rows, pair_cols, pair_weight)


def dense_block(rows: int, cols: int, budget: int, device=None) -> tuple[Tensor, Tensor, float] | None:
    """None where rows × cols ≤ ``budget`` (the dense term is taken exactly). Else a block to estimate it on:
    (row indices, column indices, scale), r of ``rows`` and c of ``cols`` drawn uniformly without replacement, each
    kept in the proportion √(budget / (rows · cols)), and scale = (rows / r)(cols / c). The draws are independent,
    so scale × the block's sum is an unbiased estimate of the whole sum, in value and gradient. Torch's global
    generator draws them: a seeded run repeats."""
    if rows * cols <= budget:
        return None
    keep = math.sqrt(budget / (rows * cols))
    r, c = max(1, math.ceil(rows * keep)), max(1, math.ceil(cols * keep))
    pick_rows = torch.randperm(rows, device=device)[:r]
    pick_cols = torch.randperm(cols, device=device)[:c]
    return pick_rows, pick_cols, (rows / r) * (cols / c)


def sampled_log_affine(
    a: Tensor,
    b: Tensor,
    shift: Tensor,
    self_col: Tensor,
    weight: Tensor,
    pair_rows: Tensor,
    pair_cols: Tensor,
    pair_weight: Tensor,
    block: tuple[Tensor, Tensor, float],
) -> Tensor:
    """``weighted_log_affine`` with its dense sum estimated on ``block`` (``dense_block``: unbiased) and its pair sum
    exact (``pair_log_affine``: sparse products at the pairs only)."""
    pick_rows, pick_cols, scale = block
    position = torch.full((b.shape[1],), -1, dtype=torch.long, device=b.device)  # a candidate's column in the block
    position[pick_cols] = torch.arange(len(pick_cols), device=b.device)
    own = self_col[pick_rows]
    own = torch.where(own >= 0, position[own.clamp_min(0)], own)  # -1: the row's self pair is not in the block
    none = pair_rows[:0]
    dense = weighted_log_affine(
        a[:, pick_rows], b[:, pick_cols], shift[pick_rows], own, weight[pick_rows] * scale, none, none, pair_weight[:0]
    )
    at_pairs = pair_log_affine(a, b, shift, pair_rows, pair_cols)
    return dense + at_pairs @ pair_weight


def log_row_normaliser(log_phi_a: Tensor, log_wphi_c: Tensor, log_size: Tensor, self_col: Tensor) -> Tensor:
    """(H, B) log T_i = log Σ_c φ_ic (n_c − [self] w_s φ_sc) / n_c, the total affinity over valid candidates.

    n_c − w_s φ_sc is taken without cancellation: for the one candidate that holds most of cluster c it is
    the sum of all the others (a logsumexp without it); for any other candidate w_s φ_sc ≤ n_c / 2.
    """
    has_self = (self_col >= 0).view(1, -1, 1)
    s = self_col.clamp_min(0)
    top = log_wphi_c.argmax(1, keepdim=True)  # (H, 1, K)
    log_rest = torch.logsumexp(log_wphi_c.scatter(1, top, float("-inf")), 1, keepdim=True)  # (H, 1, K)
    ratio = (log_wphi_c[:, s] - log_size).clamp(max=math.log(0.5))  # (H, B, K); the clamp only binds at top
    log_others = torch.where(top == s.view(1, -1, 1), log_rest, log_size + torch.log1p(-torch.exp(ratio)))
    log_others = torch.where(has_self, log_others, log_size)
    return torch.logsumexp(log_phi_a + log_others - log_size, -1)


EXACT_BELOW = 0.25  # rows whose total affinity T_i is below this are recomputed without cancellation


def log_row_normaliser_fast(
    phi_a: Tensor, log_phi_a: Tensor, psi_c: Tensor, log_wphi_c: Tensor, log_size: Tensor, self_col: Tensor
) -> Tensor | None:
    """(H, B) log T_i, T_i = 1 − Σ_c φ_ic ψ_sc (ψ_jc = w_j φ_jc / n_c) in probability space: a few (B, K) passes.

    Where T_i < ``EXACT_BELOW`` the subtraction would cost digits, so those rows take the exact
    ``log_row_normaliser`` (log space also keeps their gradients in range: 1/T_i² would overflow float32).
    None when some T_i is below ``PROBABILITY_SPACE_MIN`` (the caller's dense path handles an anchor alone
    in a very sharp cluster).
    """
    b, m = phi_a.shape[1], psi_c.shape[1]
    if b == m and bool((self_col == torch.arange(b, device=self_col.device)).all()):
        own = psi_c  # square batch: each anchor is its own candidate row, no gather
    else:
        own = psi_c[:, self_col.clamp_min(0)] * (self_col >= 0).to(phi_a.dtype).view(1, -1, 1)
    own_total = (phi_a * own).sum(-1)  # Σ_c φ_ic w_s φ_sc / n_c
    log_total = torch.log1p(-own_total.clamp(max=1.0 - EXACT_BELOW))  # the clamp binds only on exact rows
    low = (own_total.detach() > 1.0 - EXACT_BELOW).any(0).nonzero().squeeze(1)
    if len(low):
        exact = log_row_normaliser(log_phi_a[:, low], log_wphi_c, log_size, self_col[low])
        log_total = log_total.index_put((torch.arange(len(log_total), device=low.device).view(-1, 1), low), exact)
    if float(log_total.detach().min()) < math.log(PROBABILITY_SPACE_MIN):
        return None
    return log_total


def target_entropy(p: SparseTarget) -> Tensor:
    """(B,) Σ_j p_ij log p_ij over the valid candidates (0 log 0 = 0)."""
    m = p.num_valid.to(p.values.dtype).clamp_min(1)
    floor = p.uniform / m  # every valid candidate's uniform share
    on_pairs = p.values + floor[p.rows]
    total = torch.zeros_like(p.uniform).index_add_(0, p.rows, on_pairs * torch.log(on_pairs))
    nnz = torch.zeros_like(p.uniform).index_add_(0, p.rows, torch.ones_like(p.values))
    off_pairs = torch.where(floor > 0, (m - nnz) * floor * torch.log(torch.where(floor > 0, floor, 1.0)), 0.0)
    return total + off_pairs


def sparse_cluster_kl(
    p: SparseTarget,
    log_phi_a: Tensor,
    log_phi_c: Tensor,
    alpha: float,
    log_weight_c: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """(H,) mean over anchors with a positive of KL(p ‖ q~), and of the cross-entropy, for the (debiased)
    shared cluster likelihood q~ against a sparse p: the values ``IConLoss`` minimises and logs.

    log_phi_a: (H, B, K), log_phi_c: (H, M, K) log cluster probabilities; log_weight_c: optional (M,) log
    degrees (normalized cuts). alpha: q's debiasing (0: plain q). Equal to the dense path to rounding up to
    ``DENSE_EXACT_WORK`` rows × candidates × K; above, the uniform term is an unbiased estimate (``dense_block``).
    Returns None, for the caller's dense path, where this one would lose precision: p with a uniform part
    against a plain q (α = 0: log q is not bounded below), or an anchor whose total affinity is below
    ``PROBABILITY_SPACE_MIN`` (alone in a very sharp cluster).
    """
    dtype = log_phi_a.dtype
    log_wphi_c = log_phi_c if log_weight_c is None else log_phi_c + log_weight_c.view(1, -1, 1)
    needs_dense = bool((p.uniform > 0).any())
    if needs_dense and alpha == 0.0:
        return None
    has_positive = p.row_mass() > 0
    count = max(1, int(has_positive.sum()))  # no anchor with a positive: IConLoss raises after this call
    m = p.num_valid.to(dtype).clamp_min(1)
    values = p.values.to(dtype)
    if needs_dense:  # one blocked pass over the rows with mass gives every log q~_ij, pairs included
        rows = has_positive.nonzero().squeeze(1)
        every = len(rows) == len(p)
        log_phi_rows = log_phi_a if every else log_phi_a[:, rows]  # no (H, B, K) copy when every row has mass
        log_size = torch.logsumexp(log_wphi_c, 1, keepdim=True)  # (H, 1, K) log n_c, exact for empty clusters
        psi_c = torch.exp(log_wphi_c - log_size)  # ψ_jc = w_j φ_jc / n_c
        phi_a = torch.exp(log_phi_rows)
        log_total = log_row_normaliser_fast(phi_a, log_phi_rows, psi_c, log_wphi_c, log_size, p.self_col[rows])
        if log_total is None:
            return None
        position = torch.cumsum(has_positive.long(), 0) - 1
        terms = (
            phi_a * torch.exp(math.log1p(-alpha) - log_total).unsqueeze(-1),  # (1−α) φ_ic / T_i
            psi_c,
            alpha / m[rows],
            p.self_col[rows],
            -(p.uniform.to(dtype) / m)[rows] / count,
            position[p.rows],
            p.cols,
            -values / count,
        )  # −Σ_j p~_ij log q~_ij, averaged over anchors: q~_ij = (1−α) s_ij / T_i + α/M_i
        block = dense_block(len(rows), psi_c.shape[1], DENSE_EXACT_WORK // psi_c.shape[2], psi_c.device)
        cross_entropy = weighted_log_affine(*terms) if block is None else sampled_log_affine(*terms, block)
    else:
        log_size = torch.logsumexp(log_wphi_c, 1, keepdim=True)  # (H, 1, K)
        log_total = log_row_normaliser(log_phi_a, log_wphi_c, log_size, p.self_col)  # (H, B)
        log_q = pair_log_matmul_exp(log_phi_a, log_wphi_c - log_size, p.rows, p.cols) - log_total[:, p.rows]
        if alpha > 0.0:
            log_q = torch.logaddexp(log_q + math.log1p(-alpha), math.log(alpha) - torch.log(m[p.rows]))
        cross_entropy = -(log_q @ values) / count  # rows without a positive have no pairs
    entropy = target_entropy(p).to(dtype)[has_positive].mean()
    return entropy + cross_entropy, cross_entropy
