"""SCAN and TEMI as objectives of the same harness: linear heads on frozen features, neighbours from the k-NN table.

Both are trained by ``IConModule`` exactly like the I-Con recipes (same heads, optimiser, batches and label-free
head selection), so the comparison isolates the loss. p (which candidates are an anchor's neighbours) is a
``Supervisory``, usually ``KNNGraph`` over the DataModule's table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional import beta_pmi, check_alpha, check_positive, entropy, scan_consistency
from icon_lightning.loss import LossOutput, Objective, Pairs, anchors_with_positive
from icon_lightning.supervisory import Supervisory
from icon_lightning.supervisory.base import target_dtype


def _positive_mean(per_anchor: Tensor, p: Tensor) -> Tensor:
    return per_anchor[anchors_with_positive(p)].mean()


class SCANLoss(Objective):
    """SCAN (Van Gansbeke et al., ECCV 2020): −mean_i Σ_j p_ij log⟨φ_i, φ_j⟩ − w · H(mean_j φ_j).

    φ = softmax(z / temperature). The paper samples one neighbour per anchor from the top-20; here p is
    uniform over the anchor's top-k neighbours present among the candidates (the expectation of that
    sample). The entropy is of the mean assignment over the candidates: the global batch under DDP.
    entropy_weight: w (5 in the paper). SCAN's second stage (self-labelling) is not part of this loss.
    In I-Con's terms the consistency term is the cross-entropy of the k-NN p against the unnormalised
    cluster affinity ⟨φ_i, φ_j⟩; the entropy term stands in for the normalisation that q would add.
    """

    shares_target = True

    def __init__(self, p: Supervisory, entropy_weight: float = 5.0, temperature: float = 1.0) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight: expected ≥ 0, got {entropy_weight}")
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
            spread = entropy(log_c.exp().mean(0))
        terms = {"consistency": consistency, "entropy": spread}
        return LossOutput(loss=consistency - self.entropy_weight * spread, terms=terms)


class TEMILoss(Objective):
    """TEMI (Adaloglou et al., BMVC 2023): −mean_i Σ_j p_ij w_ij β-PMI(student_i, teacher_j).

    β-PMI_ij = log Σ_c (s_ic t_jc)^β / π_c with s = softmax(z / student_temperature) of the anchors,
    t = softmax(z / teacher_temperature) of the candidates, which should be an EMA teacher's outputs
    (``IConModule(ema_momentum=0.996, teacher_candidates=True)``), and π an EMA (``prior_momentum``, 0.9)
    of the teacher's mean assignment over the candidates, one per head. ``weighted``: w_ij = ⟨t_i, t_j⟩,
    the teacher's agreement on the pair (TEMI's weighted MI); otherwise w = 1 (plain β-PMI).
    TEMI samples a neighbour per image and symmetrises the pair; here p is the (symmetric) k-NN graph over
    the batch, so both directions of a pair appear. The paper's heads are MLPs; here they are the same
    linear heads as every other method in the harness. Both temperatures default to 0.1: a sharper teacher
    (0.04, DINO's) merged clusters of well-separated blobs in ``tests/baselines``.
    """

    shares_target = True

    def __init__(
        self,
        p: Supervisory,
        beta: float = 0.6,
        prior_momentum: float = 0.9,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.1,
        weighted: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < beta <= 1:
            raise ValueError(f"beta: expected a value in (0, 1], got {beta}")
        check_alpha("prior_momentum", prior_momentum)
        check_positive("student_temperature", student_temperature)
        check_positive("teacher_temperature", teacher_temperature)
        self.p = p
        self.beta = float(beta)
        self.prior_momentum = float(prior_momentum)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.weighted = weighted
        self.register_buffer("prior", torch.empty(0, 0))  # (H, K), grown on first use, checkpointed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "prior")
        if saved is not None:
            self.prior = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _prior(self, head: int, like: Tensor) -> Tensor:
        num_clusters = like.shape[1]
        if self.prior.shape[0] <= head or self.prior.shape[1] != num_clusters:
            grown = like.new_full((head + 1, num_clusters), 1.0 / num_clusters)
            if self.prior.shape[1] == num_clusters:
                grown[: self.prior.shape[0]] = self.prior
            self.prior = grown
        return self.prior[head]

    def compute(self, pairs: Pairs) -> LossOutput:
        if pairs.square:
            raise ValueError("candidates: TEMI needs the teacher's outputs as candidates (teacher_candidates=True)")
        anchors, candidates, p = pairs.anchors, pairs.candidates, pairs.p
        dtype = target_dtype(anchors)  # float32 or wider, also under autocast
        with torch.autocast(anchors.z.device.type, enabled=False):
            log_s = torch.log_softmax(anchors.z.to(dtype) / self.student_temperature, -1)
            with torch.no_grad():
                log_t = torch.log_softmax(candidates.z.to(dtype) / self.teacher_temperature, -1)
                prior = self._prior(pairs.head, log_t)
                if self.training:
                    prior.mul_(self.prior_momentum).add_((1 - self.prior_momentum) * log_t.exp().mean(0))
                weight = torch.ones_like(p)
                if self.weighted:
                    start = pairs.self_offset or 0
                    weight = log_t[start : start + len(anchors)].exp() @ log_t.exp().T
            pmi = beta_pmi(log_s, log_t, prior.log(), self.beta)
            pairs = p * weight
            per_anchor = -torch.where(pairs > 0, pairs * pmi, torch.zeros_like(pmi)).sum(1)
            loss = _positive_mean(per_anchor, p)
        return LossOutput(loss=loss)
