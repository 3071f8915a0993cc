"""Sparse supervisory neighbourhoods: p = S + u_i/M_i, a sparse part plus a per-row uniform mass.

A graph p (k-NN, walks, augmentations, labels) has few non-zeros per row; debiasing adds the same mass to
every valid candidate. ``SparseTarget`` keeps both parts apart, so a loss can use p's structure instead of a
dense (B, M) matrix. Masking is by ``self_col``: (B,) the column of each anchor's self pair, or -1 (the only
mask a loss applies; ``self_pairs_valid`` builds the same one densely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def self_columns(num_anchors: int, num_candidates: int, offset: int | None, device=None) -> Tensor:
    """(B,) column of anchor i's self pair (offset + i), or -1 where there is none (``offset=None``)."""
    if offset is None:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=device)
    cols = torch.arange(num_anchors, device=device) + offset
    return torch.where(cols < num_candidates, cols, torch.full_like(cols, -1))


def valid_counts(self_col: Tensor, num_candidates: int) -> Tensor:
    """(B,) M_i: the number of valid candidates of each anchor."""
    return num_candidates - (self_col >= 0).long()


@dataclass(frozen=True)
class SparseTarget:
    """p(j|i) = values at (rows, cols) + uniform_i / M_i on every valid candidate j.

    rows, cols: (nnz,) long, unique pairs sorted by row then column, never a self pair.
    values: (nnz,) positive. uniform: (B,) non-negative. Row i sums to Σ values + uniform_i: 1, or 0 for an
    anchor without a positive. self_col: (B,) see the module docstring. num_candidates: M.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    uniform: Tensor
    self_col: Tensor
    num_candidates: int

    def __len__(self) -> int:
        return len(self.uniform)

    @property
    def num_valid(self) -> Tensor:
        return valid_counts(self.self_col, self.num_candidates)

    def row_mass(self) -> Tensor:
        """(B,) Σ_j p(j|i)."""
        return self.uniform + torch.zeros_like(self.uniform).index_add_(0, self.rows, self.values)

    def detach(self) -> SparseTarget:
        return SparseTarget(
            self.rows, self.cols, self.values.detach(), self.uniform.detach(), self.self_col, self.num_candidates
        )

    def row_slice(self, start: int, stop: int) -> SparseTarget:
        """Rows start..stop-1 (e.g. the local anchors of one DDP process), each keeping its self column."""
        keep = (self.rows >= start) & (self.rows < stop)
        return SparseTarget(
            self.rows[keep] - start,
            self.cols[keep],
            self.values[keep],
            self.uniform[start:stop],
            self.self_col[start:stop],
            self.num_candidates,
        )

    def to_dense(self) -> Tensor:
        """(B, M) p, zero on self pairs (the dense reference)."""
        b, m = len(self), self.num_candidates
        p = torch.zeros(b, m, dtype=self.values.dtype, device=self.values.device)
        p[self.rows, self.cols] = self.values
        valid = torch.ones(b, m, dtype=torch.bool, device=p.device)
        has_self = self.self_col >= 0
        valid[torch.arange(b, device=p.device)[has_self], self.self_col[has_self]] = False
        return p + valid.to(p.dtype) * (self.uniform / self.num_valid.clamp_min(1).to(p.dtype)).unsqueeze(1)


def match_pairs(query_row: Tensor, query_key: Tensor, candidate_key: Tensor) -> tuple[Tensor, Tensor]:
    """All (row, j) with candidate_key[j] == query_key, for each query (row, key); (n,) each, any order.

    query_row, query_key: (Q,) the row each query belongs to and the key it looks for.
    candidate_key: (M,) e.g. dataset indices or labels of the candidates.
    Sort + binary search: O((Q + M) log M + pairs), never a (Q, M) comparison.
    """
    sorted_key, order = torch.sort(candidate_key)
    lo = torch.searchsorted(sorted_key, query_key, right=False)
    hi = torch.searchsorted(sorted_key, query_key, right=True)
    count = hi - lo
    rows = torch.repeat_interleave(query_row, count)
    first = torch.repeat_interleave(lo, count)
    starts = torch.cumsum(count, 0) - count
    within = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(starts, count)
    return rows, order[first + within]


def table_edges(table: Tensor, candidate_index: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the edges i → j where candidate j's dataset index is in row i of ``table`` (B, k)."""
    by = torch.arange(len(table), device=table.device).repeat_interleave(table.shape[1])
    return match_pairs(by, table.reshape(-1), candidate_index)


def topk_edges(anchors: Tensor, candidates: Tensor, self_col: Tensor, k: int, block: int = 1 << 22) -> tuple:
    """(rows, cols) of each anchor's k most cosine-similar candidates (self pairs at ``self_col`` excluded),
    computed in row blocks of about ``block`` similarities, never the whole (B, M) matrix."""
    from icon_lightning.functional.distances import cosine_similarity

    step, tops = max(1, block // len(candidates)), []
    for start in range(0, len(anchors), step):
        stop = min(len(anchors), start + step)
        sim = cosine_similarity(anchors[start:stop], candidates)
        local = (self_col[start:stop] >= 0).nonzero().squeeze(1)
        sim[local, self_col[start:stop][local]] = float("-inf")
        tops.append(sim.topk(k, dim=1).indices)
    top = torch.cat(tops)
    return torch.arange(len(anchors), device=top.device).repeat_interleave(k), top.reshape(-1)


def unique_valid_pairs(
    rows: Tensor, cols: Tensor, self_col: Tensor | None, num_candidates: int, values: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge duplicate (row, col) pairs (values summed; 1 each when ``values`` is None, then 1 per pair:
    an edge present once or twice is one edge) and drop self pairs (none when ``self_col`` is None).
    Sorted by row, then column."""
    if self_col is not None:
        keep = cols != self_col[rows]
        rows, cols = rows[keep], cols[keep]
        values = None if values is None else values[keep]
    key = rows * num_candidates + cols
    unique, inverse = torch.unique(key, sorted=True, return_inverse=True)
    if values is None:
        merged = torch.ones(len(unique), dtype=torch.get_default_dtype(), device=rows.device)
    else:
        merged = torch.zeros(len(unique), dtype=values.dtype, device=rows.device).index_add_(0, inverse, values)
    return unique // num_candidates, unique % num_candidates, merged


def normalized_target(
    rows: Tensor, cols: Tensor, weights: Tensor, self_col: Tensor, num_candidates: int, dtype: torch.dtype
) -> SparseTarget:
    """Row-normalise unique, valid weighted pairs into a ``SparseTarget`` (rows without pairs stay 0)."""
    b = len(self_col)
    weights = weights.to(dtype)
    total = torch.zeros(b, dtype=dtype, device=weights.device).index_add_(0, rows, weights)
    values = weights / total[rows]
    return SparseTarget(
        rows, cols, values, torch.zeros(b, dtype=dtype, device=weights.device), self_col, num_candidates
    )


def sparse_debias(p: SparseTarget, alpha: float) -> SparseTarget:
    """p~ = (1−α) p + α/M_i over the valid candidates; rows without mass stay 0 (``debias``'s rule)."""
    if alpha == 0.0:
        return p
    has_mass = p.row_mass() > 0
    uniform = torch.where(has_mass, (1.0 - alpha) * p.uniform + alpha, p.uniform)
    return SparseTarget(p.rows, p.cols, (1.0 - alpha) * p.values, uniform, p.self_col, p.num_candidates)


def sparse_mixture(parts: list[SparseTarget], weights: list[float]) -> SparseTarget:
    """Σ_k w'_ik p_k with w' the weights renormalised per row over the parts that have mass there
    (``supervisory.Mixture``'s rule)."""
    first = parts[0]
    mass = torch.stack([part.row_mass() > 0 for part in parts])  # (C, B)
    w = torch.tensor(weights, dtype=first.values.dtype, device=first.values.device).unsqueeze(1) * mass
    total = w.sum(0)
    w = w / torch.where(total > 0, total, torch.ones_like(total))  # (C, B)
    rows = torch.cat([part.rows for part in parts])
    cols = torch.cat([part.cols for part in parts])
    values = torch.cat([part.values * w[c, part.rows] for c, part in enumerate(parts)])
    rows, cols, values = unique_valid_pairs(rows, cols, first.self_col, first.num_candidates, values)
    uniform = (w * torch.stack([part.uniform for part in parts])).sum(0)
    nonzero = values > 0
    return SparseTarget(rows[nonzero], cols[nonzero], values[nonzero], uniform, first.self_col, first.num_candidates)


def sparse_matmul(
    a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], num_cols: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, values) of A @ B for A, B given as (rows, cols, values) with unique pairs: every edge
    i → j of A joined with B's edges j → l, merged. O(nnz(A) · max row nnz(B)), no dense matrix."""
    a_rows, a_cols, a_values = a
    b_rows, b_cols, b_values = b
    edge, joined = match_pairs(torch.arange(len(a_rows), device=a_rows.device), a_cols, b_rows)
    return unique_valid_pairs(a_rows[edge], b_cols[joined], None, num_cols, a_values[edge] * b_values[joined])


def sparse_propagate(p: SparseTarget, steps: int, uniform: bool = False) -> SparseTarget | None:
    """``propagate`` on a square sparse p: P̃ ∝ P + P² + … + P^s (or uniform over its support), self pairs
    dropped, rows renormalised. Each step is a sparse product (nnz grows at most k-fold a step). None when p
    has a uniform part (its powers are dense)."""
    if bool((p.uniform > 0).any()):
        return None
    b = len(p)
    if p.num_candidates != b:
        raise ValueError(f"steps: propagation needs candidates == anchors, got p of shape {(b, p.num_candidates)}")
    matrix = (p.rows, p.cols, p.values)
    power, parts = matrix, [matrix]
    for _ in range(steps - 1):
        power = sparse_matmul(matrix, power, b)
        parts.append(power)
    rows, cols, values = (torch.cat(x) for x in zip(*parts))
    rows, cols, values = unique_valid_pairs(rows, cols, p.self_col, b, values)
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    if uniform:
        values = torch.ones_like(values)
    return normalized_target(rows, cols, values, p.self_col, b, p.values.dtype)
