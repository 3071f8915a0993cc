"""TURTLE (Gadetsky, Jiang & Brbić, ICML 2024, "Let Go of Your Labels with Unsupervised Transfer") on one
representation space, as an objective of the same harness: the cluster heads are TURTLE's linear task encoders.

For task encoder θ (a head: labels τ_θ(x) = softmax(θ x)), each step (the released ``run_turtle.py``):

1. the inner learner, a linear classifier w (D → K), takes ``inner_steps`` Adam steps (``inner_lr``) on the
   cross-entropy of w x against the detached labels τ_θ(x) of the batch, from a fresh ``nn.Linear``
   (``warm_start`` false, the released default: cold start) or from where it ended the step before;
2. the outer loss is the inner learner's cross-entropy with its predictions detached, minus ``gamma`` times the
   entropy of the batch's mean label:  mean_i CE(softmax(w x_i), τ_θ(x_i)) − γ · H(mean_i τ_θ(x_i)).

Only θ receives gradients from the outer loss. The task encoder is the module's head: weight-normalised as released
with ``model.head_norm: weight`` (configs/peers/turtle.yaml, the release's protocol), plain linear in the ablation
configs/peers/turtle_common.yaml. One representation space is used (the release's default averages τ over two).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icon_lightning.functional import entropy
from icon_lightning.loss import LossOutput, Objective, Pairs
from icon_lightning.rows import Rows
from icon_lightning.settings import NonNegativeFloat, PositiveFloat, PositiveInt, check_arguments
from icon_lightning.supervisory.base import target_dtype


class TURTLELoss(Objective):
    """TURTLE's outer loss per head (module doc). gamma: γ (10); inner_steps: M (10); inner_lr: the inner Adam's
    LR (1e-3); warm_start: keep each head's inner learner across steps (its weights and Adam state are not
    checkpointed: a resumed run starts them fresh). The rows' ``features`` are the representation x."""

    def __init__(
        self,
        gamma: NonNegativeFloat = 10.0,
        inner_steps: PositiveInt = 10,
        inner_lr: PositiveFloat = 1e-3,
        warm_start: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(TURTLELoss.__init__, locals())
        self.gamma, self.inner_steps = float(gamma), int(inner_steps)
        self.inner_lr, self.warm_start = float(inner_lr), warm_start
        self._inner: dict[int, tuple[nn.Linear, torch.optim.Optimizer]] = {}

    def inner_learner(self, head: int, dim: int, classes: int, like: Tensor) -> tuple[nn.Linear, torch.optim.Optimizer]:
        """Head ``head``'s classifier and its Adam: new each step (cold start) or kept (``warm_start``)."""
        kept = self._inner.get(head)
        if self.warm_start and kept is not None and kept[0].weight.shape == (classes, dim):
            return kept
        learner = nn.Linear(dim, classes).to(device=like.device, dtype=like.dtype)
        made = (learner, torch.optim.Adam(learner.parameters(), lr=self.inner_lr, betas=(0.9, 0.999)))
        self._inner[head] = made
        return made

    def head_loss(self, anchors: Rows, head: int = 0) -> LossOutput:
        if anchors.features is None:
            raise ValueError("features: TURTLE trains its inner classifier on the rows' features; got none")
        dtype = target_dtype(anchors)
        with torch.autocast(anchors.z.device.type, enabled=False):
            x = anchors.features.detach().to(dtype)
            labels = torch.softmax(anchors.z.to(dtype), -1)
            learner, optimizer = self.inner_learner(head, x.shape[1], labels.shape[1], x)
            target = labels.detach()
            with torch.enable_grad():
                for _ in range(self.inner_steps):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(learner(x), target).backward()
                    optimizer.step()
            with torch.no_grad():
                log_pred = torch.log_softmax(learner(x), -1)
            prediction_error = -(labels * log_pred).sum(1).mean()
            spread = entropy(labels.mean(0))
        terms = {"prediction_error": prediction_error, "entropy": spread}
        return LossOutput(loss=prediction_error - self.gamma * spread, terms=terms)

    def forward(self, anchors: Rows, candidates=None, p=None, self_offset=None, head: int = 0) -> LossOutput:
        return self.head_loss(anchors, head)

    def forward_heads(self, anchors: list[Rows], candidates=None, p=None, self_offset=None, first_head: int = 0):
        """Each head against its own inner learner; candidates and p are not used (TURTLE has no pairs)."""
        return [self.head_loss(a, first_head + h) for h, a in enumerate(anchors)]

    def compute(self, pairs: Pairs) -> LossOutput:
        return self.head_loss(pairs.anchors, pairs.head)
