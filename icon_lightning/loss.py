"""The I-Con equation: L = mean over anchors i of KL(p(.|i) ‖ q(.|i)), and the losses beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icon_lightning.divergence import KL
from icon_lightning.functional import check_positive, check_shape, sc_infonce, self_pairs_valid
from icon_lightning.functional.sparse import SparseTarget, self_columns
from icon_lightning.learned import Learned
from icon_lightning.rows import Rows
from icon_lightning.supervisory import Supervisory


@dataclass(frozen=True)
class LossOutput:
    """Scalars: ``loss`` is what is minimised; ``kl`` and ``cross_entropy`` are the I-Con KL's parts (only a KL
    objective fills them); ``terms`` are another objective's own parts, under their own names (SCAN's
    ``consistency`` and ``entropy``)."""

    loss: Tensor
    kl: Tensor | None = None
    cross_entropy: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)


def anchors_with_positive(p: Tensor) -> Tensor:
    """(B,) bool: anchors with some p mass among the candidates, the rows a loss averages over."""
    has_positive = p.sum(-1) > 0
    if not bool(has_positive.any()):
        raise ValueError("p: no anchor has a positive among the candidates; check the batch composition")
    return has_positive


@dataclass(frozen=True)
class Pairs:
    """One head's (B, M) pair matrix as an objective sees it.

    anchors: B rows. candidates: M rows, the anchors themselves when ``square`` (no candidates were given).
    valid: (B, M) bool, False at self pairs, or None (rectangular, no self pairs).
    self_offset: row of the candidates where the anchors start (0 when square), or None.
    p: the shared target of these pairs (dense or sparse), or None for objectives without a supervisory p.
    head: which of the model's heads the rows come from (for objectives that keep state per head).
    """

    anchors: Rows
    candidates: Rows
    valid: Tensor | None
    self_offset: int | None
    p: Tensor | SparseTarget | None
    head: int
    square: bool


def candidates_and_mask(
    anchors: Rows, candidates: Rows | None, self_offset: int | None = None
) -> tuple[Rows, Tensor | None]:
    """The candidates (the anchors themselves when None) and the (B, M) valid mask: self pairs masked in a square
    batch, or at (i, self_offset + i) when the anchors sit among the candidates; None for a rectangular batch."""
    if candidates is None:
        return anchors, self_pairs_valid(len(anchors), len(anchors), device=anchors.z.device)
    check_shape("candidates.z", candidates.z, 2, {1: anchors.z.shape[1]})
    if self_offset is None:
        return candidates, None
    if not 0 <= self_offset <= len(candidates) - len(anchors):
        raise ValueError(f"self_offset: expected 0..{len(candidates) - len(anchors)}, got {self_offset}")
    return candidates, self_pairs_valid(len(anchors), len(candidates), self_offset, device=anchors.z.device)


class Objective(nn.Module):
    """Anything the LightningModule can minimise: ``forward(anchors, candidates=None) -> LossOutput``.

    ``candidates=None`` means the anchors are their own candidates (a square batch, self pairs masked);
    otherwise the pair matrix is rectangular (cross-view, image-text, class prototypes) and unmasked, unless
    ``self_offset`` says the anchors sit among the candidates from that row on (the local rows of one DDP
    process inside the gathered global batch, or a teacher's outputs of the same rows): then the pairs
    (i, self_offset + i) are masked. ``head`` says which of the model's H heads the rows come from.

    A subclass implements ``compute(pairs)``. One whose p is a supervisory ``self.p`` sets ``shares_target``:
    its p is then built by ``target(...)``, once for all heads, and ``target_reads_output`` says whether that
    p reads the rows' z (then it must be rebuilt from the current output every step, never cached).
    """

    shares_target: ClassVar[bool] = False

    pairs = staticmethod(candidates_and_mask)

    @property
    def target_reads_output(self) -> bool:
        """p depends on the model's output (``Supervisory.reads_output``), not only on the rows' dataset facts."""
        return self.shares_target and self.p.reads_output

    def target(self, anchors: Rows, candidates: Rows | None = None, self_offset: int | None = None) -> Tensor:
        """(B, M) p for these rows; pass it back to ``forward`` to share it across heads."""
        if not self.shares_target:
            raise TypeError(f"{type(self).__name__} has no supervisory p to precompute")
        candidates, valid = self.pairs(anchors, candidates, self_offset)
        # p is a fixed target: computed outside autocast (full precision), and never differentiated.
        with torch.autocast(anchors.z.device.type, enabled=False):
            return self.p(anchors, candidates, valid).detach()

    def compute(self, pairs: Pairs) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self,
        anchors: Rows,
        candidates: Rows | None = None,
        p: Tensor | SparseTarget | None = None,
        self_offset: int | None = None,
        head: int = 0,
    ) -> LossOutput:
        """p: optional precomputed ``target(...)`` of these pairs; q always comes from the rows' z."""
        return self.forward_heads([anchors], None if candidates is None else [candidates], p, self_offset, head)[0]

    def forward_heads(
        self,
        anchors: list[Rows],
        candidates: list[Rows] | None = None,
        p: Tensor | SparseTarget | None = None,
        self_offset: int | None = None,
        first_head: int = 0,
    ) -> list[LossOutput]:
        """One ``LossOutput`` per head h for rows ``anchors[h]`` (and ``candidates[h]``), sharing one p: all heads
        at once where the objective can (``all_heads``), else head by head (``compute``). A p that reads the
        output and is not given is built from each head's own rows."""
        if p is None and self.target_reads_output and len(anchors) > 1:
            per_head = zip(anchors, candidates or [None] * len(anchors))
            return [self.forward(a, c, None, self_offset, first_head + h) for h, (a, c) in enumerate(per_head)]
        if p is None and self.shares_target:
            p = self.target(anchors[0], None if candidates is None else candidates[0], self_offset)
        together = self.all_heads(anchors, candidates, p)
        if together is not None:
            return together
        p = p.to_dense() if isinstance(p, SparseTarget) else p
        return [
            self.compute(self.pair_up(a, None if candidates is None else candidates[h], p, self_offset, first_head + h))
            for h, a in enumerate(anchors)
        ]

    def all_heads(
        self, anchors: list[Rows], candidates: list[Rows] | None, p: Tensor | SparseTarget | None
    ) -> list[LossOutput] | None:
        """Every head's loss in one pass, where the objective has such a path (IConLoss's sparse KL); None here."""
        return None

    def pair_up(
        self, anchors: Rows, candidates: Rows | None, p: Tensor | SparseTarget | None, self_offset: int | None, head=0
    ) -> Pairs:
        others, valid = self.pairs(anchors, candidates, self_offset)
        offset = 0 if candidates is None else self_offset
        return Pairs(anchors, others, valid, offset, p, head, candidates is None)


class IConLoss(Objective):
    """mean_i KL(p(.|i) ‖ q(.|i)) over anchors that have at least one positive among the candidates.

    sparse: where p has a sparse form (graph, augmentation and label neighbourhoods, their walks, mixtures and
    debiasing) and q the shared cluster likelihood, take the KL from p's non-zeros and O(K) row sums
    (``functional.sparse_cluster_kl``), never holding a (B, M) matrix: the same value and gradients as the
    dense path to rounding. False always takes the dense path, the reference.
    """

    shares_target = True

    def __init__(self, p: Supervisory, q: Learned, divergence: nn.Module | None = None, sparse: bool = True) -> None:
        super().__init__()
        self.p = p
        self.q = q
        self.divergence = divergence if divergence is not None else KL()
        self.sparse = sparse

    def target(
        self, anchors: Rows, candidates: Rows | None = None, self_offset: int | None = None
    ) -> Tensor | SparseTarget:
        """p for these rows: a ``SparseTarget`` where the sparse path may use it, else the dense (B, M) p."""
        if self.sparse and type(self.divergence) is KL:
            m = len(anchors) if candidates is None else len(candidates)
            self_col = self_columns(len(anchors), m, 0 if candidates is None else self_offset, anchors.z.device)
            if candidates is not None:
                check_shape("candidates.z", candidates.z, 2, {1: anchors.z.shape[1]})
            with torch.autocast(anchors.z.device.type, enabled=False):
                p = self.p.sparse(anchors, anchors if candidates is None else candidates, self_col)
            if p is not None:
                return p.detach()
        return super().target(anchors, candidates, self_offset)

    def all_heads(
        self, anchors: list[Rows], candidates: list[Rows] | None, p: Tensor | SparseTarget | None
    ) -> list[LossOutput] | None:
        """The sparse path: KL from p's non-zeros and q's O(K) row sums for all heads at once, where p is a
        ``SparseTarget`` and q has a sparse form; None sends the base class to the dense ``compute``."""
        if not isinstance(p, SparseTarget):
            return None
        m = len(anchors[0]) if candidates is None else len(candidates[0])
        if len(p) != len(anchors[0]) or p.num_candidates != m:
            raise ValueError(f"p: expected a target of shape {(len(anchors[0]), m)}, got {(len(p), p.num_candidates)}")
        out = self.q.sparse_kl(p, anchors, anchors if candidates is None else candidates)  # q's checks first
        anchors_with_positive(p.row_mass().unsqueeze(1))
        return None if out is None else [LossOutput(loss=kl, kl=kl, cross_entropy=ce) for kl, ce in zip(*out)]

    @torch.no_grad()
    def neighbourhoods(self, rows: Rows, n: int) -> tuple[Tensor, Tensor]:
        """Dense p(.|i) and q(.|i) of the first ``n`` anchors of a square batch of ``rows`` (self pairs masked):
        two (n, B) matrices, for plots."""
        p = self.target(rows)
        p = p.row_slice(0, n).to_dense() if isinstance(p, SparseTarget) else p[:n]
        candidates, valid = self.pairs(rows, None)
        return p, self.q(rows.first(n), candidates, valid[:n]).exp()

    def compute(self, pairs: Pairs) -> LossOutput:
        """The dense reference: log q over the valid pairs, the divergence per anchor, the mean over anchors."""
        check_shape("p", pairs.p, 2, {0: len(pairs.anchors), 1: len(pairs.candidates)})
        log_q = self.q(pairs.anchors, pairs.candidates, pairs.valid)
        per_anchor = self.divergence(pairs.p, log_q)
        has_positive = anchors_with_positive(pairs.p)
        kl = per_anchor.divergence[has_positive].mean()
        return LossOutput(loss=kl, kl=kl, cross_entropy=per_anchor.cross_entropy[has_positive].mean())


class WeightedSum(Objective):
    """Σ_k w_k · term_k, e.g. Kernel-InfoNCE as released by its authors: λ·I-Con(p, q_γ) + (1−λ)·I-Con(p, q_γ=2).

    A sum of KLs against different q is not one KL, so this lives beside ``IConLoss`` rather than inside q.
    """

    def __init__(self, terms: list[Objective], weights: list[float]) -> None:
        super().__init__()
        if len(terms) != len(weights) or not terms:
            raise ValueError(f"weights: expected one weight per term ({len(terms)}), got {weights}")
        self.terms = nn.ModuleList(terms)
        self.weights = list(weights)

    def compute(self, pairs: Pairs) -> LossOutput:
        given = None if pairs.square else pairs.candidates
        outs = [t(pairs.anchors, given, self_offset=None if pairs.square else pairs.self_offset) for t in self.terms]

        def total(name: str) -> Tensor | None:
            values = [getattr(o, name) for o in outs]
            return None if any(v is None for v in values) else sum(w * v for w, v in zip(self.weights, values))

        return LossOutput(loss=total("loss"), kl=total("kl"), cross_entropy=total("cross_entropy"))


class SCInfoNCE(Objective):
    """SC-InfoNCE (Cheng et al., 2025): ℓ_i = −α s_ii + log Σ_{j≠i} e^{s_ij} + β/(B−1) Σ_{j≠i} s_ij.

    Anchors are view 1, candidates view 2 (B × B), the positive of anchor i the candidate with the same
    ``index``; s_ij = cos(z1_i, z2_j) / T. At α = 1, β = 0 it is the decoupled InfoNCE (DCL).

    It is *not* a KL in general, so it is an ``Objective`` of its own rather than a (p, q) pair. When
    β = α − 1 its gradient is that of KL(p~ ‖ q) with q = softmax_j(s_ij) and a stop-gradient, debiased
    target p~ that puts 1 − ε_i on the positive and ε_i/(B−1) on each other candidate, with
    ε_i = (1 − α)(1 − q_i⁺), scaled by 1/(1 − q_i⁺):  ∇ℓ_i = ∇KL(p~_i ‖ q_i) / (1 − q_i⁺).
    Released configs (T = 0.15): CIFAR-10 α=1.0, β=−0.2; CIFAR-100 α=0.5, β=0.2; ImageNet-100 α=0.1, β=0.5.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, temperature: float = 0.15) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = check_positive("temperature", temperature)

    def logits(self, anchors: Rows, candidates: Rows) -> tuple[Tensor, Tensor]:
        """(B, B) s_ij and the bool (B, B) positive mask, one positive per row."""
        positive = anchors.index.unsqueeze(1) == candidates.index.unsqueeze(0)
        if positive.shape[0] != positive.shape[1] or not bool((positive.sum(1) == 1).all()):
            raise ValueError("candidates: SC-InfoNCE needs B × B views with exactly one positive (same index) per row")
        s = F.normalize(anchors.z, dim=-1) @ F.normalize(candidates.z, dim=-1).T / self.temperature
        return s, positive

    def compute(self, pairs: Pairs) -> LossOutput:
        if pairs.square:
            raise ValueError("candidates: SC-InfoNCE compares view 1 (anchors) with view 2 (candidates)")
        s, positive = self.logits(pairs.anchors, pairs.candidates)
        return LossOutput(loss=sc_infonce(s, positive, self.alpha, self.beta).mean())
