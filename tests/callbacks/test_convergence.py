"""`Convergence`: plateau detection, LR drops, the step budget and the verdict, on losses whose course is known."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from icon_lightning.callbacks import Convergence
from icon_lightning.callbacks.convergence import auto_step_budget, teacher_settling_steps
from tests.conftest import EndProcessGroup


class Scripted(L.LightningModule):
    """training_step returns loss_at(step): a loss whose course the test decides (the parameter only carries a grad)."""

    def __init__(self, loss_at, lr: float = 0.1) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.loss_at, self.lr = loss_at, lr

    def training_step(self, batch, batch_idx):
        return self.w * 0 + self.loss_at(self.global_step)

    def train_dataloader(self):
        return DataLoader(range(4), batch_size=1)  # 4 steps an epoch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(loss_at, callback: Convergence, max_epochs: int = -1, **hparams) -> tuple[L.Trainer, Scripted]:
    module = Scripted(loss_at)
    module.hparams.update(hparams)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module)
    return trainer, module


def test_auto_budget_is_epochs_in_steps_clamped():
    assert auto_step_budget(1) == 1000  # full batch on a small set: the floor
    assert auto_step_budget(313) == 30 * 313  # ImageNet at 4096 anchors: the paper's 30 epochs
    assert auto_step_budget(10_000) == 20_000  # the ceiling
    assert auto_step_budget(50, budget_epochs=10, budget_min_steps=100, budget_max_steps=400) == 400


def test_flat_loss_drops_the_lr_then_stops_converged():
    # A constant loss is a plateau at every window: drop, drop, stop. Windows of 10 steps; the first plateau can
    # only be seen at the second window (step 20) and min_steps is 0, so: drop at 20, drop at 30, stop at 40.
    callback = Convergence(window=10, tol=1e-3, lr_drops=2, lr_gamma=0.5, min_steps=0, max_steps=500)
    trainer, module = fit(lambda step: 1.0, callback)
    assert callback.converged and trainer.global_step == 40
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert callback.report()["lr_drops"] == 2 and "plateaued at step 40" in callback.reason


def test_min_steps_defers_the_plateau():
    callback = Convergence(window=10, lr_drops=0, min_steps=55, max_steps=500)
    trainer, _ = fit(lambda step: 1.0, callback)
    assert callback.converged and trainer.global_step == 60  # the first window end at or past step 55


def test_an_ema_teacher_defers_the_plateau_until_it_has_settled():
    # A loss against an EMA teacher (hparams.ema_momentum m) counts a plateau only once m^t ≤ e^-3: at m = 0.9 from
    # step 29 (0.9^28 > e^-3 ≥ 0.9^29), so a flat loss stops at the first window end past it (30), not at 20.
    assert 0.9**29 <= math.exp(-3) < 0.9**28 and teacher_settling_steps(0.9) == 29
    assert 0.996**749 <= math.exp(-3) < 0.996**748 and teacher_settling_steps(0.996) == 749
    assert teacher_settling_steps(None) == 0
    callback = Convergence(window=10, lr_drops=0, min_steps=0, max_steps=500)
    trainer, _ = fit(lambda step: 1.0, callback, ema_momentum=0.9)
    assert callback.converged and trainer.global_step == 30 and callback.report()["plateau_from_step"] == 29
    callback = Convergence(window=10, lr_drops=0, min_steps=0, max_steps=500)
    trainer, _ = fit(lambda step: 1.0, callback, ema_momentum=None)  # no teacher: min_steps alone
    assert trainer.global_step == 20 and callback.report()["plateau_from_step"] == 0


def test_a_falling_loss_runs_to_the_budget_and_says_it_did_not_converge():
    callback = Convergence(window=10, tol=1e-3, min_steps=0, max_steps=70)
    with pytest.warns(UserWarning, match="did not converge: reached the step budget"):
        trainer, _ = fit(lambda step: math.exp(-0.01 * step), callback)  # ~10 % better every window
    assert trainer.global_step == 70 and not callback.converged
    report = callback.report()
    assert report["step_budget"] == 70 and report["last_relative_improvement"] == pytest.approx(
        1 - math.exp(-0.1), rel=1e-3
    )


def test_improvement_is_measured_between_consecutive_windows():
    # The loss falls by 5 % a window until step 100, then stays: the plateau is seen at the window after it.
    def loss(step: int) -> float:
        return 0.95 ** min(step // 10, 10)

    callback = Convergence(window=10, tol=1e-2, lr_drops=0, min_steps=0, max_steps=1000)
    trainer, _ = fit(loss, callback)
    assert callback.converged and trainer.global_step == 120  # windows [100, 110) and [110, 120) are equal


def test_auto_budget_uses_the_batches_an_epoch():
    callback = Convergence(window=5, max_steps="auto", budget_epochs=3, budget_min_steps=8, budget_max_steps=100)
    with pytest.warns(UserWarning, match="did not converge"):
        trainer, _ = fit(lambda step: 1.0 / (1 + step), callback)  # always > tol better: only the cap stops it
    assert callback.cap == 12 and trainer.global_step == 12  # 3 epochs x 4 batches


def test_max_epochs_ending_first_is_not_convergence():
    callback = Convergence(window=5, max_steps=None)
    with pytest.warns(UserWarning, match="max_epochs / max_steps / interrupt"):
        trainer, _ = fit(lambda step: 1.0 / (1 + step), callback, max_epochs=2)
    assert trainer.global_step == 8 and not callback.converged


def test_without_stopping_on_plateau_it_only_judges():
    # The paper's protocol: fixed length and LR; the verdict still comes from the last two windows.
    callback = Convergence(window=4, tol=1e-3, min_steps=0, max_steps=None, stop_on_plateau=False)
    trainer, _ = fit(lambda step: 1.0, callback, max_epochs=5)
    assert trainer.global_step == 20 and callback.converged
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1  # never touched


def test_state_round_trips_for_resumed_runs():
    callback = Convergence(window=10, lr_drops=2, min_steps=0, max_steps=500)
    fit(lambda step: 1.0, callback)
    restored = Convergence()
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window"),
        ({"tol": float("nan")}, "tol"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": "forever"}, "max_steps"),
        ({"budget_min_steps": 10, "budget_max_steps": 5}, "budget_max_steps"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Convergence(**kwargs)


def _rank_dependent_loss(step: int) -> float:
    # rank 0 is flat from the start; rank 1 falls 10 % a window of 10 steps until step 60, then is flat.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return 1.0 if rank == 0 else 0.9 ** (min(step, 60) // 10)


class _RankLoss(Scripted):
    def __init__(self) -> None:
        super().__init__(_rank_dependent_loss)


class _Record(L.Callback):
    def __init__(self, folder: str, convergence: Convergence) -> None:
        self.folder, self.convergence = folder, convergence

    def on_fit_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        record = {
            "step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            **self.convergence.report(),
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_processes_agree_on_the_plateau_from_the_mean_loss(tmp_path):
    # Each process sees its own loss. Judged alone, rank 0 (flat) would drop the LR at step 20 and stop at 30;
    # the window means are averaged over processes, so both see the mean fall until step 60. (It failed before
    # the fix: `strategy.reduce(x, "mean")` passed "mean" as the process group and raised under DDP.)
    import json

    convergence = Convergence(window=10, tol=1e-3, lr_drops=1, lr_gamma=0.5, min_steps=0, max_steps=500)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=-1,
        callbacks=[convergence, _Record(str(tmp_path), convergence), EndProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(_RankLoss())
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]
    # mean windows fall > 1e-3 until [60, 70) vs [70, 80): LR drop at 80; the next window [80, 90) is flat: stop at 90
    assert records[0]["step"] == 90 and records[0]["converged"] and records[0]["lr_drops"] == 1
    assert records[0]["lr"] == pytest.approx(0.05)


class Scheduled(Scripted):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)}


def _fit_scheduled(callback: Convergence) -> tuple[L.Trainer, Scripted]:
    module = Scheduled(lambda step: 1.0)
    trainer = L.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    trainer.fit(module)
    return trainer, module


def test_a_scheduler_and_plateau_halving_never_both_own_the_lr():
    with pytest.raises(ValueError, match=r"convergence.lr_drops: 2 plateau halvings .* model.scheduler \(StepLR\)"):
        _fit_scheduled(Convergence(window=10, min_steps=0, max_steps=50))
    # lr_drops 0: the scheduler owns the LR (StepLR: ×0.5 every 5 epochs of 4 steps), the callback only stops
    trainer, _ = _fit_scheduled(Convergence(window=10, lr_drops=0, min_steps=0, max_steps=500))
    assert trainer.global_step == 20 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    # stop_on_plateau off: the Trainer's length and the scheduler's LR, the verdict still recorded
    callback = Convergence(window=10, min_steps=0, max_steps=12, stop_on_plateau=False)
    trainer, _ = _fit_scheduled(callback)
    assert trainer.global_step == 12 and callback.report()["lr_drops"] == 0
