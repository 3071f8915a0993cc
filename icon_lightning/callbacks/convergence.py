"""`Convergence`: train in optimizer steps until the training loss stops falling, within a budget that scales with N.

The paper's schedule (30 epochs of 4096 anchors) means about 9,400 steps on ImageNet and about 90 on a 4,000-item
dataset, where it ends far from converged. This callback makes the step, not the epoch, the unit:

- every ``window`` steps it compares the mean training loss of the window with that of the window before; a
  relative improvement below ``tol`` is a plateau;
- on a plateau the LR is multiplied by ``lr_gamma``, at most ``lr_drops`` times; the next plateau ends the run
  (converged), as long as ``min_steps`` have run;
- ``max_steps`` caps the run: ``"auto"`` is ``budget_epochs`` passes over the data in steps, clamped to
  [``budget_min_steps``, ``budget_max_steps``] (1,000 full-batch steps on a small set, the paper's 30 epochs on
  ImageNet); None leaves the cap to the Trainer's ``max_epochs`` / ``max_steps``;
- with an EMA teacher (the module's ``hparams.ema_momentum`` m, e.g. TEMI's), the loss is measured against a
  target that moves: a plateau counts only once the teacher keeps at most e^-3 (5 %) of its start, m^t ≤ e^-3,
  i.e. after ``teacher_settling_steps(m)`` steps (749 for m = 0.996). Before that the student has merely caught
  up with a teacher still near its initialisation (TEMI on digits stopped there, at 150–200 steps, in one
  cluster or a few).

A run that ends without a plateau (the cap, ``max_epochs``, an interrupt) has not converged: the callback warns in
the log and ``icon`` writes ``converged: false`` with the reason into ``metrics.json``. With ``stop_on_plateau``
off (the ImageNet protocol) the LR and the length are the Trainer's and the module's, and the verdict is still
computed from the last two windows. A ``model.scheduler`` and the plateau halving never both set the LR: with a
scheduler, ``lr_drops`` must be 0 (the callback then only stops) or ``stop_on_plateau`` off, else the fit ends in
one line before the first step. Labels play no part. The loss watched is the lowest head's (``IConModule``
reports one per head), so dropping the worse heads (``IConModule.keep_heads``) does not read as progress.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from icon_lightning.settings import NonNegativeFloat, NonNegativeInt, PositiveInt, UnitFraction, check_arguments


def auto_step_budget(
    steps_per_epoch: int, budget_epochs: int = 30, budget_min_steps: int = 1000, budget_max_steps: int = 20000
) -> int:
    """``budget_epochs`` passes over the data in optimizer steps, clamped to [min, max]."""
    return int(min(max(budget_epochs * max(1, steps_per_epoch), budget_min_steps), budget_max_steps))


def step_cap(max_steps, batches_per_epoch, budget: tuple[int, int, int]) -> int | None:
    """The run's cap in optimizer steps: ``auto_step_budget`` for ``"auto"`` (an iterable loader's inf counts as
    one batch a pass), ``max_steps`` itself, or None (the Trainer's)."""
    if max_steps == "auto":
        steps = batches_per_epoch if isinstance(batches_per_epoch, int) and batches_per_epoch > 0 else 1
        return auto_step_budget(steps, *budget)
    return None if max_steps is None else int(max_steps)


TEACHER_TIME_CONSTANTS = 3.0  # an EMA teacher has settled when it keeps e^-3 (5 %) of its start


def teacher_settling_steps(momentum: float | None) -> int:
    """The steps t after which an EMA teacher of momentum m keeps at most e^-3 of its start (m^t ≤ e^-3); 0
    without a teacher."""
    if momentum is None:
        return 0
    return math.ceil(TEACHER_TIME_CONSTANTS / -math.log(float(momentum)))


def check_convergence(tol, budget) -> None:
    """One-line errors for what ``Convergence``'s annotations do not say (a setting's own limits are its
    annotation: ``settings.check_arguments``); ``budget`` is (epochs, min steps, max steps)."""
    if not math.isfinite(tol):
        raise ValueError(f"tol: expected a finite number ≥ 0, got {tol}")
    if budget[2] < budget[1]:
        raise ValueError(f"budget_max_steps: expected ≥ budget_min_steps ({budget[1]}), got {budget[2]}")


def check_lr_owner(convergence, schedulers) -> None:
    """One owner of the LR: the plateau halving (``lr_drops`` > 0 with ``stop_on_plateau``) and a scheduler would
    both set it, so that combination is a one-line error; ``lr_drops: 0`` leaves the LR to the scheduler (the
    callback still stops at a plateau), ``stop_on_plateau: false`` leaves it and the length to the Trainer."""
    if schedulers and convergence.stop_on_plateau and convergence.lr_drops > 0:
        names = ", ".join(type(c.scheduler).__name__ for c in schedulers)
        raise ValueError(
            f"convergence.lr_drops: {convergence.lr_drops} plateau halvings of the LR and model.scheduler ({names}) "
            "would both set the LR; set convergence.lr_drops 0 (the scheduler owns it) or remove model.scheduler"
        )


def watched_loss(outputs):
    """The training loss a step's ``outputs`` report: the lowest head's when the module reports ``head_losses`` (one
    per head; pruning the worse heads leaves it unchanged), else the loss it minimises."""
    if isinstance(outputs, dict):
        heads = outputs.get("head_losses")
        return heads.min() if heads is not None and heads.numel() else outputs.get("loss")
    return outputs


class Windows:
    """Mean training loss over windows of ``window`` steps, and the relative improvement of the last window on
    the one before (a plateau: below ``tol``). Pure bookkeeping, checkpointed by the callback."""

    def __init__(self, window: int, tol: float) -> None:
        self.window, self.tol = window, float(tol)
        self.means: list[float] = []
        self.sum, self.count = 0.0, 0
        self.last_improvement: float | None = None

    def add(self, loss: float) -> float | None:
        """Adds one step's loss; returns the window's mean when the window is full (then starts the next)."""
        self.sum, self.count = self.sum + loss, self.count + 1
        return self.sum / self.count if self.count >= self.window else None

    def close(self, mean: float) -> bool | None:
        """Records a full window's (process-averaged) ``mean``; whether it is a plateau (None: the first window)."""
        self.sum, self.count = 0.0, 0
        self.means.append(mean)
        if len(self.means) < 2:
            return None
        before = self.means[-2]
        self.last_improvement = (before - mean) / max(abs(before), 1e-12)
        return self.last_improvement < self.tol

    def state_dict(self) -> dict:
        return {"window_means": list(self.means), "sum": self.sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.means = [float(v) for v in state["window_means"]]
        self.sum, self.count = float(state["sum"]), int(state["count"])


def resume(callback: Convergence, trainer: L.Trainer) -> None:
    """At the start of training: a new or unconverged run is "still running". A fit resumed from a converged run's
    checkpoint stops before its first step and says so, unless ``trainer.max_steps`` asks for more steps than the
    checkpoint's; then it trains on to exactly that step, the plateau rule off (the verdict is then the last two
    windows', as with ``stop_on_plateau: false``)."""
    step, wanted = trainer.global_step, trainer.max_steps
    if not callback.converged:
        callback.reason = "still running"
        return
    if not callback.stop_on_plateau:
        return
    if wanted is not None and wanted > step:
        callback.stop_on_plateau, callback.cap = False, None
        callback.reason = f"{callback.reason}; resumed at step {step} and trained on to trainer.max_steps={wanted}"
        rank_zero_info(f"Resuming a converged run at step {step}: training on to trainer.max_steps={wanted} as asked")
        return
    trainer.should_stop = True
    callback.reason = (
        f"resumed a converged run at step {step}: nothing trained (it had converged: {callback.reason}); "
        f"--trainer.max_steps N > {step} trains on"
    )
    rank_zero_info(f"Nothing to train: {callback.reason}")


class Convergence(Callback):
    """Plateau-based stopping and LR halving in optimizer steps; reports whether the run converged (module doc)."""

    def __init__(
        self,
        window: PositiveInt = 25,
        tol: NonNegativeFloat = 1e-3,
        lr_drops: NonNegativeInt = 2,
        lr_gamma: UnitFraction = 0.5,
        min_steps: NonNegativeInt = 100,
        max_steps: PositiveInt | Literal["auto"] | None = "auto",
        budget_epochs: PositiveInt = 30,
        budget_min_steps: PositiveInt = 1000,
        budget_max_steps: PositiveInt = 20000,
        stop_on_plateau: bool = True,
    ) -> None:
        check_arguments(Convergence.__init__, locals())
        budget = (budget_epochs, budget_min_steps, budget_max_steps)
        check_convergence(tol, budget)
        self.window, self.tol, self.lr_drops, self.lr_gamma = window, float(tol), lr_drops, float(lr_gamma)
        self.min_steps, self.max_steps = min_steps, max_steps
        self.stop_on_plateau, self.budget = stop_on_plateau, budget
        # floor: no plateau counts before it (min_steps, or later while an EMA teacher settles: on_train_start)
        self.windows, self.cap, self.drops, self.floor = Windows(window, tol), None, 0, min_steps
        self.converged, self.reason = False, "not started"

    def state_dict(self) -> dict:
        """The state a resumed run continues from."""
        return {"drops": self.drops, "converged": self.converged, "reason": self.reason, **self.windows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.converged, self.reason = int(state["drops"]), bool(state["converged"]), str(state["reason"])
        self.windows.load_state_dict(state)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_lr_owner(self, trainer.lr_scheduler_configs)
        self.cap = step_cap(self.max_steps, trainer.num_training_batches, self.budget)  # the loaders exist now
        self.floor = max(self.min_steps, teacher_settling_steps(getattr(pl_module, "hparams", {}).get("ema_momentum")))
        resume(self, trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = watched_loss(outputs)
        mean = None if loss is None else self.windows.add(float(loss.detach()))
        if mean is not None:
            # every process reaches this step together; they agree on the mean, so they agree on stopping
            mean = trainer.strategy.reduce(torch.tensor(mean, device=pl_module.device), reduce_op="mean")
            self._decide(trainer, float(mean), self.windows.close(float(mean)))
        if self.cap is not None and trainer.global_step >= self.cap and not trainer.should_stop:
            trainer.should_stop = True
            if not self.converged:
                self.reason = f"reached the step budget ({self.cap} steps) before the training loss plateaued"

    def _decide(self, trainer: L.Trainer, mean: float, plateau: bool | None) -> None:
        if plateau is None:
            return
        gain = self.windows.last_improvement
        if not self.stop_on_plateau:
            self.converged = plateau
            self.reason = f"last window improved the training loss by {gain:.2e} (tol {self.tol:.0e})"
            return
        if not plateau or trainer.global_step < self.floor:
            return
        if self.drops < self.lr_drops:
            self.drops += 1
            for group in (group for optimizer in trainer.optimizers for group in optimizer.param_groups):
                group["lr"] *= self.lr_gamma
            self.windows.means = [mean]  # compare the next window at the new LR with this one
            return
        self.converged, trainer.should_stop = True, True
        self.reason = (
            f"training loss plateaued at step {trainer.global_step} (relative improvement "
            f"{gain:.2e} < {self.tol:.0e} over {self.window} steps, after {self.drops} LR drops)"
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.converged:
            return
        if self.reason in ("still running", "not started"):
            self.reason = f"stopped at step {trainer.global_step} (max_epochs / max_steps / interrupt) before a plateau"
        rank_zero_warn(
            f"The run did not converge: {self.reason}. Train longer (convergence.max_steps) or raise the LR."
        )

    def report(self) -> dict:
        """What ``metrics.json`` records about convergence."""
        return {
            "converged": self.converged,
            "reason": self.reason,
            "lr_drops": self.drops,
            "step_budget": self.cap,
            "plateau_from_step": self.floor,
            "last_relative_improvement": self.windows.last_improvement,
        }
