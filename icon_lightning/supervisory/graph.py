"""k-nearest-neighbour graph neighbourhood → I-Con clustering, MI clustering, normalized cuts."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional import cosine_similarity, normalize_rows
from icon_lightning.rows import Rows
from icon_lightning.supervisory.base import Supervisory, target_dtype


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
            table = anchors.neighbours[:, : self.k]
            return (table.unsqueeze(-1) == candidates.index.view(1, 1, -1)).any(1)
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
                reverse = candidates.neighbours[:, : self.k].unsqueeze(-1) == anchors.index.view(1, 1, -1)
                adj = adj | reverse.any(1).T
            elif adj.shape[0] == adj.shape[1]:
                adj = adj | adj.T
            else:
                raise ValueError("symmetric: needs candidates.neighbours or a square batch")
        return normalize_rows(adj.to(target_dtype(anchors)), valid)
