"""k-nearest-neighbour graph neighbourhood → I-Con clustering, MI clustering, normalized cuts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icon_lightning.functional import cosine_similarity, normalize_rows
from icon_lightning.functional.sparse import (
    SparseTarget,
    normalized_target,
    table_edges,
    topk_edges,
    unique_valid_pairs,
)
from icon_lightning.rows import Rows
from icon_lightning.supervisory.base import Supervisory, target_dtype


def table_adjacency(table: Tensor, candidate_index: Tensor) -> Tensor:
    """(B, M) bool: candidate j's dataset index is in row i of ``table`` (B, k), by sorted matching
    (``table_edges``), not a (B, k, M) comparison."""
    rows, cols = table_edges(table, candidate_index)
    adj = torch.zeros(len(table), len(candidate_index), dtype=torch.bool, device=table.device)
    return adj.index_put_((rows, cols), torch.ones_like(rows, dtype=torch.bool))


class KNNGraph(Supervisory):
    """Uniform over each anchor's k nearest neighbours found among the candidates.

    Neighbours come from the dataset-level k-NN table when the rows carry it (``anchors.neighbours``,
    a (B, k_table) row of dataset indices per anchor, matched against ``candidates.index``); otherwise
    from the k most cosine-similar candidates in the batch, using ``features``.

    k: neighbours per anchor (k ≤ k_table; k < number of valid candidates in-batch).
    symmetric: use w_ij = 1[j ∈ N(i) or i ∈ N(j)], so p(j|i) = w_ij / d_i with the degree d_i of the
        symmetrised graph: the random-walk neighbourhood of normalized cuts.
    """

    def __init__(self, k: int = 3, symmetric: bool = False) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k: expected at least 1 neighbour, got {k}")
        self.k = k
        self.symmetric = symmetric

    @torch.no_grad()
    def adjacency(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        """(B, M) bool: candidate j is one of anchor i's k nearest neighbours."""
        if anchors.neighbours is not None:
            if self.k > anchors.neighbours.shape[1]:
                raise ValueError(f"k: the neighbour table has {anchors.neighbours.shape[1]} columns, got k={self.k}")
            return table_adjacency(anchors.neighbours[:, : self.k], candidates.index)
        if anchors.features is None or candidates.features is None:
            raise ValueError("neighbours: KNNGraph needs anchors.neighbours (a k-NN table) or features")
        sim = cosine_similarity(anchors.features, candidates.features)
        if valid is not None:
            sim = sim.masked_fill(~valid, float("-inf"))
        available = sim.shape[1] if valid is None else int(valid.sum(1).min())
        if self.k >= available:
            raise ValueError(f"k: expected fewer than the {available} valid candidates, got k={self.k}")
        top = sim.topk(self.k, dim=1).indices
        adj = torch.zeros_like(sim, dtype=torch.bool)
        return adj.scatter_(1, top, True)

    @torch.no_grad()
    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        adj = self.adjacency(anchors, candidates, valid)
        if self.symmetric:
            if candidates.neighbours is not None:
                adj = adj | table_adjacency(candidates.neighbours[:, : self.k], anchors.index).T
            elif adj.shape[0] == adj.shape[1]:
                adj = adj | adj.T
            else:
                raise ValueError("symmetric: needs candidates.neighbours or a square batch")
        return normalize_rows(adj.to(target_dtype(anchors)), valid)

    @torch.no_grad()
    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget:
        """The same p from the table by sorted matching (no (B, k, M) compare), or from in-batch top-k in row
        blocks of the similarity matrix."""
        b, m = len(anchors), len(candidates)
        rows, cols = self._edges(anchors, candidates, self_col)
        if self.symmetric:
            if candidates.neighbours is not None:
                back_cols, back_rows = table_edges(candidates.neighbours[:, : self.k], anchors.index)
            elif b == m:
                back_rows, back_cols = cols, rows
            else:
                raise ValueError("symmetric: needs candidates.neighbours or a square batch")
            rows, cols = torch.cat([rows, back_rows]), torch.cat([cols, back_cols])
        rows, cols, weights = unique_valid_pairs(rows, cols, self_col, m)
        return normalized_target(rows, cols, weights, self_col, m, target_dtype(anchors))

    def _edges(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the directed k-NN edges i → j (duplicates possible)."""
        if anchors.neighbours is not None:
            if self.k > anchors.neighbours.shape[1]:
                raise ValueError(f"k: the neighbour table has {anchors.neighbours.shape[1]} columns, got k={self.k}")
            return table_edges(anchors.neighbours[:, : self.k], candidates.index)
        if anchors.features is None or candidates.features is None:
            raise ValueError("neighbours: KNNGraph needs anchors.neighbours (a k-NN table) or features")
        available = len(candidates) - int(bool((self_col >= 0).any()))
        if self.k >= available:
            raise ValueError(f"k: expected fewer than the {available} valid candidates, got k={self.k}")
        return topk_edges(anchors.features, candidates.features, self_col, self.k)


def table_width(module: nn.Module | None) -> int:
    """The widest k that any ``KNNGraph`` inside ``module`` (an objective) reads from the k-NN table; 0 for none.
    The DataModule sizes its table by it, so k is set once, where p is defined."""
    graphs = [] if module is None else [m.k for m in module.modules() if isinstance(m, KNNGraph)]
    return max(graphs, default=0)
