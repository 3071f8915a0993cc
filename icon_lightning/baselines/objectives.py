"""SCAN and TEMI as objectives of the same harness: linear heads on frozen features, neighbours from the k-NN table.

Both are trained by ``IConModule`` exactly like the I-Con recipes (same heads, optimiser, batches and label-free
head selection), so the comparison isolates the loss. p (which candidates are an anchor's neighbours) is a
``Supervisory``, usually ``KNNGraph`` over the DataModule's table.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from icon_lightning.functional import check_alpha, check_positive, entropy, scan_consistency, weighted_beta_pmi
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.loss import LossOutput, Objective, Pairs, anchors_with_positive
from icon_lightning.settings import PositiveFloat, UnitFraction, check_arguments
from icon_lightning.supervisory import Supervisory
from icon_lightning.supervisory.base import target_dtype


def _positive_mean(per_anchor: Tensor, p: Tensor) -> Tensor:
    return per_anchor[anchors_with_positive(p)].mean()


class SCANLoss(Objective):
    """SCAN (Van Gansbeke et al., ECCV 2020): −mean_i Σ_j p_ij log⟨φ_i, φ_j⟩ − w · H(mean_i φ_i).

    φ = softmax(z / temperature). The paper samples one neighbour per anchor from the top-20; here p is
    uniform over the anchor's top-k neighbours present among the candidates (the expectation of that
    sample). entropy_over: ``anchors`` (the released code, ``losses.py``'s ``SCANLoss``: the mean assignment of
    this process's B anchors, without their sampled neighbours) or ``candidates`` (every row the anchors are
    compared with: 2B in a square batch of anchors and sampled neighbours, the global batch under DDP).
    entropy_weight: w (5 in the paper). SCAN's second stage (self-labelling) is not part of this loss.
    entropy_floor: None (default) takes H of the mean assignment as it is; a number clamps its entries from below
    first, as the release does (``losses.py`` ``entropy``: ``torch.clamp(x, min=EPS)``, EPS = 1e-8), which keeps the
    gradient finite (zero below the floor) when a cluster's mean probability underflows to 0 (0 · log 0 has an
    infinite derivative).
    In I-Con's terms the consistency term is the cross-entropy of the k-NN p against the unnormalised
    cluster affinity ⟨φ_i, φ_j⟩; the entropy term stands in for the normalisation that q would add.
    """

    shares_target = True

    def __init__(
        self,
        p: Supervisory,
        entropy_weight: float = 5.0,
        temperature: float = 1.0,
        entropy_over: Literal["anchors", "candidates"] = "anchors",
        entropy_floor: float | None = None,
    ) -> None:
        super().__init__()
        if entropy_floor is not None and not 0 < entropy_floor < 1:
            raise ValueError(f"entropy_floor: expected a number in (0, 1) or None, got {entropy_floor}")
        self.entropy_floor = entropy_floor
        check_positive("temperature", temperature)
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight: expected ≥ 0, got {entropy_weight}")
        if entropy_over not in ("anchors", "candidates"):
            raise ValueError(f"entropy_over: expected 'anchors' or 'candidates', got {entropy_over!r}")
        self.entropy_over = entropy_over
        self.p = p
        self.entropy_weight = float(entropy_weight)
        self.temperature = float(temperature)

    def compute(self, pairs: Pairs) -> LossOutput:
        anchors, candidates, p = pairs.anchors, pairs.candidates, pairs.p
        dtype = target_dtype(anchors)  # float32 or wider, also under autocast
        with torch.autocast(anchors.z.device.type, enabled=False):
            log_a = torch.log_softmax(anchors.z.to(dtype) / self.temperature, -1)
            log_c = torch.log_softmax(candidates.z.to(dtype) / self.temperature, -1)
            consistency = _positive_mean(scan_consistency(log_a, log_c, p), p)
            mean = self.spread_rows(anchors, log_a, log_c).exp().mean(0)
            spread = entropy(mean if self.entropy_floor is None else mean.clamp_min(self.entropy_floor))
        terms = {"consistency": consistency, "entropy": spread}
        return LossOutput(loss=consistency - self.entropy_weight * spread, terms=terms)

    def spread_rows(self, anchors, log_a: Tensor, log_c: Tensor) -> Tensor:
        """The log-assignments the entropy term averages: the anchor rows (``view`` ≥ 0; a batch's sampled
        neighbours have view −1; all rows where none is marked), or every candidate."""
        if self.entropy_over == "candidates":
            return log_c
        marked = None if anchors.view is None else anchors.view >= 0
        return log_a if marked is None or not bool(marked.any()) else log_a[marked]


def _check_teacher_candidates(pairs: Pairs) -> None:
    if pairs.square:
        raise ValueError("candidates: TEMI needs the teacher's outputs as candidates (teacher_candidates=True)")


@torch.no_grad()
def teacher_agreement(pairs: Pairs, temperature: float) -> Tensor:
    """(B, M) ⟨t_i, t_j⟩ with t = softmax(candidates.z / temperature): a teacher's agreement on each pair."""
    _check_teacher_candidates(pairs)
    dtype = target_dtype(pairs.anchors)
    with torch.autocast(pairs.anchors.z.device.type, enabled=False):
        t = torch.softmax(pairs.candidates.z.to(dtype) / temperature, -1)
        start = pairs.self_offset or 0
        return t[start : start + len(pairs.anchors)] @ t.T


def _grown_prior(prior: Tensor, head: int, like: Tensor) -> Tensor:
    """``prior`` (H, K) with a uniform row for each head up to ``head``; all rows uniform if K changed."""
    num_clusters = like.shape[1]
    if prior.shape[0] > head and prior.shape[1] == num_clusters:
        return prior
    grown = like.new_full((head + 1, num_clusters), 1.0 / num_clusters)
    if prior.shape[1] == num_clusters:
        grown[: prior.shape[0]] = prior
    return grown


class TEMILoss(Objective):
    """TEMI (Adaloglou et al., BMVC 2023): −mean_i Σ_j p_ij w_ij β-PMI(student_i, teacher_j).

    β-PMI_ij = log Σ_c (s_ic t_jc)^β / π_c with s = softmax(z / student_temperature) of the anchors,
    t = softmax(z / teacher_temperature) of the candidates, which should be an EMA teacher's outputs
    (``IConModule(ema_momentum=0.996, teacher_candidates=True)``), and π an EMA (``prior_momentum``, 0.9)
    of the teacher's mean assignment over the candidates, one per head. ``weighted``: w_ij = ⟨t_i, t_j⟩,
    the teacher's agreement on the pair (TEMI's weighted MI); otherwise w = 1 (plain β-PMI).
    TEMI samples a neighbour per image and symmetrises the pair; here p is the (symmetric) k-NN graph over
    the batch, so both directions of a pair appear. head_weight: with several heads, ``mean`` (the released code,
    ``losses/multihead_losses.py``'s ``compute_weight``) weights every head's pairs by the teacher agreement
    averaged over the heads, ⟨t^h_i, t^h_j⟩ averaged over h; ``own`` weights head h by its own agreement.
    The paper's heads are MLPs; here they are the same
    linear heads as every other method in the harness. Both temperatures default to 0.1: a sharper teacher
    (0.04, DINO's) merged clusters of well-separated blobs in ``tests/baselines``.
    """

    shares_target = True

    def __init__(
        self,
        p: Supervisory,
        beta: UnitFraction = 0.6,
        prior_momentum: float = 0.9,
        student_temperature: PositiveFloat = 0.1,
        teacher_temperature: PositiveFloat = 0.1,
        weighted: bool = True,
        head_weight: Literal["mean", "own"] = "mean",
    ) -> None:
        super().__init__()
        check_arguments(TEMILoss.__init__, locals())
        check_alpha("prior_momentum", prior_momentum)
        self.p, self.head_weight, self.weighted = p, head_weight, weighted
        self.beta = float(beta)
        self.prior_momentum = float(prior_momentum)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.register_buffer("prior", torch.empty(0, 0))  # (H, K), grown on first use, checkpointed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "prior")
        if saved is not None:
            self.prior = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _prior(self, head: int, like: Tensor) -> Tensor:
        self.prior = _grown_prior(self.prior, head, like)
        return self.prior[head]

    def forward_heads(self, anchors, candidates=None, p=None, self_offset=None, first_head: int = 0):
        """Every head at once when the teacher agreement is averaged over the heads (``head_weight='mean'``)."""
        if not self.weighted or self.head_weight == "own" or len(anchors) == 1:
            return super().forward_heads(anchors, candidates, p, self_offset, first_head)
        if p is None:
            p = self.target(anchors[0], None if candidates is None else candidates[0], self_offset)
        p = p.to_dense() if isinstance(p, SparseTarget) else p
        per_head = [
            self.pair_up(a, None if candidates is None else candidates[h], p, self_offset, first_head + h)
            for h, a in enumerate(anchors)
        ]
        weight = torch.stack([self.agreement(pairs) for pairs in per_head]).mean(0)
        return [self.weighted_pmi(pairs, weight) for pairs in per_head]

    def agreement(self, pairs: Pairs) -> Tensor:
        """(B, M) ⟨t_i, t_j⟩: the teacher's agreement on each anchor-candidate pair of one head."""
        return teacher_agreement(pairs, self.teacher_temperature)

    def compute(self, pairs: Pairs) -> LossOutput:
        return self.weighted_pmi(pairs, self.agreement(pairs) if self.weighted else None)

    def weighted_pmi(self, pairs: Pairs, weight: Tensor | None) -> LossOutput:
        """−mean_i Σ_j p_ij w_ij β-PMI_ij of one head (``weight`` None: w = 1), updating its prior π."""
        _check_teacher_candidates(pairs)
        anchors, candidates, p = pairs.anchors, pairs.candidates, pairs.p
        dtype = target_dtype(anchors)  # float32 or wider, also under autocast
        with torch.autocast(anchors.z.device.type, enabled=False):
            log_s = torch.log_softmax(anchors.z.to(dtype) / self.student_temperature, -1)
            with torch.no_grad():
                log_t = torch.log_softmax(candidates.z.to(dtype) / self.teacher_temperature, -1)
                prior = self._prior(pairs.head, log_t)
                if self.training:
                    prior.mul_(self.prior_momentum).add_((1 - self.prior_momentum) * log_t.exp().mean(0))
            weighted = p if weight is None else p * weight.to(p.dtype)
            per_anchor = -weighted_beta_pmi(weighted, log_s, log_t, prior.log(), self.beta)
            loss = _positive_mean(per_anchor, p)
        return LossOutput(loss=loss)
