"""Combinators on supervisory distributions: debiasing, propagation along walks, mixtures."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icon_lightning.functional import check_alpha, debias, propagate
from icon_lightning.functional.sparse import SparseTarget, sparse_debias, sparse_mixture, sparse_propagate
from icon_lightning.rows import Rows
from icon_lightning.supervisory.base import Supervisory


class Debiased(Supervisory):
    """p~ = (1−α) p + α/M over the valid candidates (I-Con's debiasing; α ∈ [0, 1))."""

    def __init__(self, base: Supervisory, alpha: float = 0.6) -> None:
        super().__init__()
        self.base = base
        self.alpha = check_alpha("p.alpha (supervisory.Debiased, the target's debiasing)", alpha)

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        return debias(self.base(anchors, candidates, valid), self.alpha, valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget | None:
        p = self.base.sparse(anchors, candidates, self_col)
        return None if p is None else sparse_debias(p, self.alpha)


class Propagated(Supervisory):
    """Neighbour propagation: P̃ ∝ P + P² + … + P^steps, or uniform over its support.

    steps: the longest walk on the in-batch graph, in steps (1 = the neighbours only, no propagation; 2 =
        neighbours and neighbours of neighbours: the paper's "1-step walks"). The same count as the DataModule's
        ``walk_steps``. Needs candidates == anchors (a square batch).
    uniform: p uniform over every item reachable in ≤ steps steps instead of walk-weighted.
    """

    def __init__(self, base: Supervisory, steps: int = 2, uniform: bool = False) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps: expected a walk of at least 1 step, got {steps}")
        self.base = base
        self.steps = steps
        self.uniform = uniform

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        p = self.base(anchors, candidates, valid)
        if p.shape[0] != p.shape[1]:
            raise ValueError(f"steps: propagation needs candidates == anchors, got p of shape {tuple(p.shape)}")
        return propagate(p, self.steps, self.uniform, valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget | None:
        p = self.base.sparse(anchors, candidates, self_col)
        return None if p is None else sparse_propagate(p, self.steps, self.uniform)


class Mixture(Supervisory):
    """Weighted average of several neighbourhoods, e.g. augmentations ∪ k-NN.

    Per row, components without mass (no positive among the candidates) are left out and the remaining
    weights renormalised, so every anchor with some positive keeps a probability row.
    """

    def __init__(self, components: list[Supervisory], weights: list[float] | None = None) -> None:
        super().__init__()
        if not components:
            raise ValueError("components: expected at least one supervisory distribution")
        weights = [1.0] * len(components) if weights is None else list(weights)
        if len(weights) != len(components) or any(w < 0 for w in weights):
            raise ValueError(f"weights: expected {len(components)} non-negative numbers, got {weights}")
        self.components = nn.ModuleList(components)
        self.weights = weights

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        ps = torch.stack([c(anchors, candidates, valid) for c in self.components])  # (C, B, M)
        w = torch.tensor(self.weights, dtype=ps.dtype, device=ps.device).view(-1, 1, 1)
        w = w * (ps.sum(-1, keepdim=True) > 0)
        total = w.sum(0)
        return (w * ps).sum(0) / torch.where(total > 0, total, torch.ones_like(total))

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget | None:
        parts = [c.sparse(anchors, candidates, self_col) for c in self.components]
        return None if any(part is None for part in parts) else sparse_mixture(parts, self.weights)
