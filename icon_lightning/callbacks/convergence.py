"""`Convergence`: train in optimizer steps until the training loss stops falling, within a budget that scales with N.

The paper's schedule (30 epochs of 4096 anchors) means about 9,400 steps on ImageNet and about 90 on a 4,000-item
dataset, where it ends far from converged. This callback makes the step, not the epoch, the unit:

- every ``window`` steps it compares the mean training loss of the window with that of the window before; a
  relative improvement below ``tol`` is a plateau;
- on a plateau the LR is multiplied by ``lr_gamma``, at most ``lr_drops`` times; the next plateau ends the run
  (converged), as long as ``min_steps`` have run;
- ``max_steps`` caps the run: ``"auto"`` is ``budget_epochs`` passes over the data in steps, clamped to
  [``budget_min_steps``, ``budget_max_steps``] (1,000 full-batch steps on a small set, the paper's 30 epochs on
  ImageNet); None leaves the cap to the Trainer's ``max_epochs`` / ``max_steps``.

A run that ends without a plateau (the cap, ``max_epochs``, an interrupt) has not converged: the callback warns in
the log and ``icon`` writes ``converged: false`` with the reason into ``metrics.json``. With ``stop_on_plateau``
off (the ImageNet protocol) the LR and the length are the Trainer's and the module's, and the verdict is still
computed from the last two windows. Labels play no part.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


def auto_step_budget(
    steps_per_epoch: int, budget_epochs: int = 30, budget_min_steps: int = 1000, budget_max_steps: int = 20000
) -> int:
    """``budget_epochs`` passes over the data in optimizer steps, clamped to [min, max]."""
    return int(min(max(budget_epochs * max(1, steps_per_epoch), budget_min_steps), budget_max_steps))


class Convergence(Callback):
    """Plateau-based stopping and LR halving in optimizer steps; reports whether the run converged (module doc)."""

    def __init__(
        self,
        window: int = 25,
        tol: float = 1e-3,
        lr_drops: int = 2,
        lr_gamma: float = 0.5,
        min_steps: int = 100,
        max_steps: int | Literal["auto"] | None = "auto",
        budget_epochs: int = 30,
        budget_min_steps: int = 1000,
        budget_max_steps: int = 20000,
        stop_on_plateau: bool = True,
    ) -> None:
        for name, value, low in (
            ("window", window, 1),
            ("lr_drops", lr_drops, 0),
            ("min_steps", min_steps, 0),
            ("budget_epochs", budget_epochs, 1),
            ("budget_min_steps", budget_min_steps, 1),
        ):
            if value < low:
                raise ValueError(f"{name}: expected at least {low}, got {value}")
        if budget_max_steps < budget_min_steps:
            raise ValueError(
                f"budget_max_steps: expected ≥ budget_min_steps ({budget_min_steps}), got {budget_max_steps}"
            )
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol: expected a finite number ≥ 0, got {tol}")
        if not 0 < lr_gamma <= 1:
            raise ValueError(f"lr_gamma: expected a value in (0, 1], got {lr_gamma}")
        if max_steps is not None and max_steps != "auto" and (isinstance(max_steps, str) or max_steps < 1):
            raise ValueError(f"max_steps: expected 'auto', None or an integer ≥ 1, got {max_steps!r}")
        self.window, self.tol, self.lr_drops, self.lr_gamma = window, float(tol), lr_drops, float(lr_gamma)
        self.min_steps, self.max_steps, self.stop_on_plateau = min_steps, max_steps, stop_on_plateau
        self.budget_epochs, self.budget_min_steps, self.budget_max_steps = (
            budget_epochs,
            budget_min_steps,
            budget_max_steps,
        )
        self._reset()

    def _reset(self) -> None:
        self.cap: int | None = None
        self.drops = 0
        self.converged = False
        self.reason = "not started"
        self.last_improvement: float | None = None
        self.window_means: list[float] = []
        self._sum, self._count = 0.0, 0

    # ------------------------------------------------------------------ the state a resumed run continues from
    def state_dict(self) -> dict:
        return {
            "drops": self.drops,
            "window_means": list(self.window_means),
            "sum": self._sum,
            "count": self._count,
            "converged": self.converged,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.window_means = int(state["drops"]), [float(v) for v in state["window_means"]]
        self._sum, self._count = float(state["sum"]), int(state["count"])
        self.converged, self.reason = bool(state["converged"]), str(state["reason"])

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.cap = None  # the loaders exist now: num_training_batches is known
        if self.max_steps == "auto":
            steps = trainer.num_training_batches
            steps = steps if isinstance(steps, int) and steps > 0 else 1  # inf for iterable loaders: one a pass
            self.cap = auto_step_budget(steps, self.budget_epochs, self.budget_min_steps, self.budget_max_steps)
        elif self.max_steps is not None:
            self.cap = int(self.max_steps)
        if not self.converged:
            self.reason = "still running"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._sum += float(loss.detach())
        self._count += 1
        if self._count >= self.window:
            # every process reaches this step together; they agree on the mean, so they agree on stopping
            mean = trainer.strategy.reduce(
                torch.tensor(self._sum / self._count, device=pl_module.device), reduce_op="mean"
            )
            self._window_done(trainer, float(mean))
        step = trainer.global_step
        if self.cap is not None and step >= self.cap and not trainer.should_stop:
            trainer.should_stop = True
            if not self.converged:
                self.reason = f"reached the step budget ({self.cap} steps) before the training loss plateaued"

    def _window_done(self, trainer: L.Trainer, mean: float) -> None:
        self._sum, self._count = 0.0, 0
        self.window_means.append(mean)
        if len(self.window_means) < 2:
            return
        before = self.window_means[-2]
        self.last_improvement = (before - mean) / max(abs(before), 1e-12)
        plateau = self.last_improvement < self.tol
        if not self.stop_on_plateau:
            self.converged = plateau
            self.reason = f"last window improved the training loss by {self.last_improvement:.2e} (tol {self.tol:.0e})"
            return
        if not plateau or trainer.global_step < self.min_steps:
            return
        if self.drops < self.lr_drops:
            self.drops += 1
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= self.lr_gamma
            self.window_means = [mean]  # compare the next window at the new LR with this one
            return
        self.converged = True
        self.reason = (
            f"training loss plateaued at step {trainer.global_step} (relative improvement "
            f"{self.last_improvement:.2e} < {self.tol:.0e} over {self.window} steps, after {self.drops} LR drops)"
        )
        trainer.should_stop = True

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
            "last_relative_improvement": self.last_improvement,
        }
