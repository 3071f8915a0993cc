"""The peers' released training schedules as callbacks of a fixed-length fit (``trainer.max_epochs``, the
``Convergence`` callback only recording): DINO's per-step learning rate, a linear warm-up over epochs then a cosine
decay (``WarmupCosineLR``, TEMI's ``utils.cosine_scheduler``), and DINO's frozen last layer in the first epochs
(``FreezeLastLayer``, TEMI's ``utils.cancel_gradients_last_layer``).

Both count in epochs as the releases do, whatever N: a ``torch.optim.lr_scheduler`` stepped per step would need the
steps an epoch takes, which the config cannot know.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from icon_lightning.settings import NonNegativeInt, check_arguments

BASE_LR = "peer_base_lr"  # the optimizer's configured LR, kept in its param group (so in its checkpointed state)


def warmup_cosine_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, final: float) -> float:
    """The LR of optimizer step ``step`` (from 0) over the base LR: ``numpy.linspace(0, 1, W)[step]`` during the
    W = ``warmup_epochs`` · ``steps_per_epoch`` warm-up steps, then ``final + (1 − final) (1 + cos(π i / D)) / 2``
    at the i-th of the D remaining steps of ``epochs`` (TEMI's ``utils.cosine_scheduler``, base 1, end ``final``);
    after the last step, ``final`` (a run shorter than its warm-up ends inside it)."""
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if step < warmup:
        return step / (warmup - 1) if warmup > 1 else 1.0  # linspace's endpoints: 0 at the first step, 1 at the last
    decay = total - warmup
    if step >= total or decay <= 0:
        return final
    return final + 0.5 * (1.0 - final) * (1.0 + math.cos(math.pi * (step - warmup) / decay))


class WarmupCosineLR(Callback):
    """Sets every param group's LR before each optimizer step to its configured LR × ``warmup_cosine_factor`` of
    the step, the epochs being the Trainer's ``max_epochs`` and the steps an epoch its training batches.
    final_lr_factor: the end value over the base (TEMI's ``min_lr / lr``; 1: constant after the warm-up)."""

    def __init__(self, warmup_epochs: NonNegativeInt = 20, final_lr_factor: float = 1.0) -> None:
        check_arguments(WarmupCosineLR.__init__, locals())
        if not 0 <= final_lr_factor or not math.isfinite(final_lr_factor):
            raise ValueError(f"final_lr_factor: expected a finite number ≥ 0, got {final_lr_factor}")
        self.warmup_epochs, self.final_lr_factor = warmup_epochs, float(final_lr_factor)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError("trainer.max_epochs: WarmupCosineLR needs a fixed number of epochs (≥ 1)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        factor = warmup_cosine_factor(
            trainer.global_step,
            int(trainer.num_training_batches),
            int(trainer.max_epochs),
            self.warmup_epochs,
            self.final_lr_factor,
        )
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault(BASE_LR, group["lr"]) * factor


class FreezeLastLayer(Callback):
    """Holds the heads' last layer (``heads.last_layer_parameters()``, e.g. ``DINOHeads``'s weight-normalised
    layer) still during the first ``epochs`` epochs: its gradients are dropped before each optimizer step there,
    so the optimizer skips it (no update, no weight decay), as TEMI's ``cancel_gradients_last_layer``."""

    def __init__(self, epochs: NonNegativeInt = 1) -> None:
        check_arguments(FreezeLastLayer.__init__, locals())
        self.epochs = epochs

    def on_train_start(self, trainer, pl_module) -> None:
        if not hasattr(pl_module.heads, "last_layer_parameters"):
            raise ValueError("trainer.callbacks: FreezeLastLayer needs heads with a last layer (head_bottleneck_dim)")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.current_epoch < self.epochs:
            for parameter in pl_module.heads.last_layer_parameters():
                parameter.grad = None
