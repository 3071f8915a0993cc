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
        self.window = window
        self.tol = float(tol)
        self.means: list[float] = []
        self.sum = 0.0
        self.count = 0
        self.last_improvement: float | None = None

    def add(self, loss: float) -> float | None:
        """Adds one step's loss; returns the window's mean when the window is full (then starts the next)."""
        self.sum += loss
        self.count += 1
        return self.sum / self.count if self.count >= self.window else None

    def close(self, mean: float) -> bool | None:
        """Records a full window's (process-averaged) ``mean``; whether it is a plateau (None: the first window)."""
        self.sum = 0.0
        self.count = 0
        self.means.append(mean)
        if len(self.means) < 2:
            return None
        before = self.means[-2]
        self.last_improvement = (before - mean) / max(abs(before), 1e-12)
        return self.last_improvement < self.tol

    def restart(self, mean: float) -> None:
        """The next window is compared with ``mean`` alone (after the LR changed)."""
        self.means = [mean]

    def judged(self) -> str:
        """The last window's improvement, as a verdict's reason."""
        return f"last window improved the training loss by {self.last_improvement:.2e} (tol {self.tol:.0e})"

    def plateaued(self) -> str:
        """The plateau the last window makes, in words."""
        return f"relative improvement {self.last_improvement:.2e} < {self.tol:.0e} over {self.window} steps"

    def state_dict(self) -> dict:
        return {"window_means": list(self.means), "sum": self.sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.means = [float(v) for v in state["window_means"]]
        self.sum = float(state["sum"])
        self.count = int(state["count"])


class LrDrops:
    """The plateau halvings of the LR: every param group's LR times ``lr_gamma``, at most ``lr_drops`` times."""

    def __init__(self, lr_drops: int, lr_gamma: float) -> None:
        self.allowed = lr_drops
        self.gamma = float(lr_gamma)
        self.taken = 0

    def check_sole_owner(self, schedulers) -> None:
        """The halving and a scheduler would both set the LR: one line (``lr_drops: 0`` leaves the LR to the
        scheduler, the callback still stops at a plateau; ``stop_on_plateau: false`` leaves it and the length to the
        Trainer)."""
        if schedulers and self.allowed > 0:
            names = ", ".join(type(c.scheduler).__name__ for c in schedulers)
            raise ValueError(
                f"convergence.lr_drops: {self.allowed} plateau halvings of the LR and model.scheduler ({names}) "
                "would both set the LR; set convergence.lr_drops 0 (the scheduler owns it) or remove model.scheduler"
            )

    def take(self, optimizers) -> bool:
        """Scales the LR of every param group of ``optimizers`` and returns True, or False when none is left."""
        if self.taken >= self.allowed:
            return False
        self.taken += 1
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            group["lr"] *= self.gamma
        return True


class Verdict:
    """Whether the run converged and why, from its closed windows: with ``stop_on_plateau`` a plateau from step
    ``floor`` on takes an LR drop (``LrDrops``) while one is left, and the next ends the run, converged; without it
    the last two windows only judge. No Lightning: ``Convergence`` applies its answers and checkpoints its state."""

    def __init__(self, windows: Windows, drops: LrDrops, min_steps: int, stop_on_plateau: bool) -> None:
        self.windows = windows
        self.drops = drops
        self.min_steps = min_steps
        self.floor = min_steps  # no plateau counts before it (min_steps, or later while an EMA teacher settles)
        self.stop_on_plateau = stop_on_plateau
        self.converged = False
        self.reason = "not started"

    def start(self, settling_steps: int, schedulers) -> None:
        """Training starts: no plateau counts before an EMA teacher has settled; one owner of the LR."""
        self.floor = max(self.min_steps, settling_steps)
        if self.stop_on_plateau:
            self.drops.check_sole_owner(schedulers)

    def add(self, loss: float) -> float | None:
        """One step's loss; the window's mean when it is full (``Windows.add``)."""
        return self.windows.add(loss)

    def close(self, mean: float, step: int, optimizers) -> bool:
        """Closes a full window of (process-averaged) loss ``mean`` at ``step``; True: converged, the run stops."""
        plateau = self.windows.close(mean)
        if plateau is None:
            return False
        if not self.stop_on_plateau:
            self.converged = plateau
            self.reason = self.windows.judged()
            return False
        if not plateau or step < self.floor:
            return False
        if self.drops.take(optimizers):
            self.windows.restart(mean)  # compare the next window at the new LR with this one
            return False
        self.converged = True
        self.reason = (
            f"training loss plateaued at step {step} ({self.windows.plateaued()}, after {self.drops.taken} LR drops)"
        )
        return True

    def budget_reached(self, cap: int) -> None:
        if not self.converged:
            self.reason = f"reached the step budget ({cap} steps) before the training loss plateaued"

    def end(self, step: int) -> bool:
        """The fit ended at ``step``: whether it converged (else the reason says how it stopped)."""
        if not self.converged and self.reason in ("still running", "not started"):
            self.reason = f"stopped at step {step} (max_epochs / max_steps / interrupt) before a plateau"
        return self.converged

    def state_dict(self) -> dict:
        """The state a resumed run continues from."""
        return {
            "drops": self.drops.taken,
            "converged": self.converged,
            "reason": self.reason,
            **self.windows.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.drops.taken = int(state["drops"])
        self.converged = bool(state["converged"])
        self.reason = str(state["reason"])
        self.windows.load_state_dict(state)

    def report(self, step_budget: int | None) -> dict:
        """What ``metrics.json`` records about convergence."""
        return {
            "converged": self.converged,
            "reason": self.reason,
            "lr_drops": self.drops.taken,
            "step_budget": step_budget,
            "plateau_from_step": self.floor,
            "last_relative_improvement": self.windows.last_improvement,
        }


def resume(verdict: Verdict, step: int, wanted: int | None) -> str:
    """At the start of training, at ``step``: a new or unconverged run is "still running" (returns ``"train"``). A
    fit resumed from a converged run's checkpoint stops before its first step and says so (``"stop"``), unless
    ``trainer.max_steps`` (``wanted``) asks for more steps than the checkpoint's; then it trains on to exactly that
    step (``"train on"``: no step budget), the plateau rule off (the verdict is then the last two windows', as with
    ``stop_on_plateau: false``)."""
    if not verdict.converged:
        verdict.reason = "still running"
        return "train"
    if not verdict.stop_on_plateau:
        return "train"
    if wanted is not None and wanted > step:
        verdict.stop_on_plateau = False
        verdict.reason = f"{verdict.reason}; resumed at step {step} and trained on to trainer.max_steps={wanted}"
        rank_zero_info(f"Resuming a converged run at step {step}: training on to trainer.max_steps={wanted} as asked")
        return "train on"
    verdict.reason = (
        f"resumed a converged run at step {step}: nothing trained (it had converged: {verdict.reason}); "
        f"--trainer.max_steps N > {step} trains on"
    )
    rank_zero_info(f"Nothing to train: {verdict.reason}")
    return "stop"


class Convergence(Callback):
    """Plateau-based stopping and LR halving in optimizer steps; reports whether the run converged (module doc).
    The verdict is ``Verdict``'s (over ``Windows`` and ``LrDrops``), the cap ``step_cap``'s: the hooks apply them."""

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
        self.verdict = Verdict(Windows(window, tol), LrDrops(lr_drops, lr_gamma), min_steps, stop_on_plateau)
        self.max_steps = max_steps
        self.budget = budget
        self.cap: int | None = None

    @property
    def converged(self) -> bool:
        return self.verdict.converged

    @property
    def reason(self) -> str:
        return self.verdict.reason

    def state_dict(self) -> dict:
        """The state a resumed run continues from."""
        return self.verdict.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.verdict.load_state_dict(state)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        momentum = getattr(pl_module, "hparams", {}).get("ema_momentum")
        self.verdict.start(teacher_settling_steps(momentum), trainer.lr_scheduler_configs)
        self.cap = step_cap(self.max_steps, trainer.num_training_batches, self.budget)  # the loaders exist now
        resumed = resume(self.verdict, trainer.global_step, trainer.max_steps)
        if resumed == "train on":
            self.cap = None
        if resumed == "stop":
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = watched_loss(outputs)
        mean = None if loss is None else self.verdict.add(float(loss.detach()))
        if mean is not None:
            # every process reaches this step together; they agree on the mean, so they agree on stopping
            mean = trainer.strategy.reduce(torch.tensor(mean, device=pl_module.device), reduce_op="mean")
            if self.verdict.close(float(mean), trainer.global_step, trainer.optimizers):
                trainer.should_stop = True
        if self.cap is not None and trainer.global_step >= self.cap and not trainer.should_stop:
            trainer.should_stop = True
            self.verdict.budget_reached(self.cap)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.verdict.end(trainer.global_step):
            rank_zero_warn(
                f"The run did not converge: {self.reason}. Train longer (convergence.max_steps) or raise the LR."
            )

    def report(self) -> dict:
        """What ``metrics.json`` records about convergence."""
        return self.verdict.report(step_budget=self.cap)
