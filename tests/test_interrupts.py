"""Every end of a fit leaves a record: SIGTERM, Ctrl-C (SIGINT) and an exception inside training each write
``metrics.json`` (steps done, last training losses, ``convergence.converged: false`` with the reason, the checkpoint
to resume from), print NOT CONVERGED … (interrupted), and exit non-zero (143 / 130) or re-raise the error. Before,
SIGTERM exited 0 and neither signal left a ``metrics.json``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from icon_lightning.callbacks.checkpoint import RunCheckpoint
from icon_lightning.cli import assemble

ROOT = Path(__file__).resolve().parents[1]


class EndAt(Callback):
    """At optimizer step ``step``: send ``signal`` to this process, or raise ``error``."""

    def __init__(self, step: int, sig: int | None = None, error: Exception | None = None) -> None:
        self.step, self.sig, self.error = step, sig, error

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            if self.error is not None:
                raise self.error
            os.kill(os.getpid(), self.sig)


def _fit(tmp_path: Path, end: EndAt, steps: int = 60):
    run = assemble(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "recipes" / "icon_clustering.yaml"),
            "--data.dataset=icon_lightning.data.DigitsDataset",
            "--data.views=clean",
            "--model.num_heads=2",
            f"--convergence.max_steps={steps}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            f"--data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    run.trainer.callbacks.append(end)
    (saver,) = [c for c in run.trainer.callbacks if isinstance(c, RunCheckpoint)]
    saver._every_n_train_steps = 4  # a last.ckpt before the end (every 100 steps by default)
    return run


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)
    # Ctrl-C raises KeyboardInterrupt, as in a terminal: a process started in the background by a shell (nohup …
    # &) inherits SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C, for its own shutdown


@pytest.mark.parametrize(
    ("sig", "code", "name", "saved"), [(signal.SIGTERM, 143, "SIGTERM", 9), (signal.SIGINT, 130, "SIGINT", 8)]
)
def test_a_signal_during_a_fit_leaves_a_record_and_exits_non_zero(
    tmp_path, capsys, restore_sigint, sig, code, name, saved
):
    """SIGTERM arrives between steps (Lightning raises it after the step), so the step reached is saved; Ctrl-C can
    strike inside a step, so the record names the last whole checkpoint (of step 8) and its step."""
    run = _fit(tmp_path, EndAt(9, sig=sig))
    with pytest.raises(SystemExit) as end:
        run.execute()
    assert end.value.code == code
    record = json.loads((run.run_dir / "metrics.json").read_text())
    assert record["steps"] == 9 and record["convergence"]["converged"] is False
    assert record["convergence"]["interrupted"] == name
    assert record["convergence"]["reason"].startswith(f"interrupted by {name} at step 9; resume with --ckpt_path ")
    assert record["resume_from"] and Path(record["resume_from"]).is_file()
    assert torch.load(record["resume_from"], weights_only=False)["global_step"] == saved == record["resume_step"]
    assert record["convergence"]["reason"].endswith(f"(step {saved})")
    assert len(record["head_losses"]) == 2 and min(record["head_losses"]) > 0  # the last training losses (unpruned)
    assert "NOT CONVERGED after 9 steps (interrupted)" in capsys.readouterr().err
    assert not list(run.run_dir.glob("**/*.tmp*"))  # nothing half-written


def test_an_error_inside_training_records_the_error_and_propagates(tmp_path, capsys):
    """An exception used to be recorded as ``interrupted`` (a resumable signal)."""
    run = _fit(tmp_path, EndAt(3, error=RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run.execute()
    record = json.loads((run.run_dir / "metrics.json").read_text())
    assert record["steps"] == 3 and record["convergence"]["converged"] is False
    assert record["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert "interrupted" not in record["convergence"]
    assert record["convergence"]["reason"].startswith("failed at step 3: RuntimeError: CUDA error")
    assert len(record["head_losses"]) == 2 and min(record["head_losses"]) > 0  # measured: each step is an epoch
    assert "NOT CONVERGED after 3 steps (failed)" in capsys.readouterr().err


def test_an_error_before_any_loss_was_measured_records_no_losses(tmp_path):
    """An error in the first step used to record a 0.0 loss for every head and head 0 as selected."""
    run = _fit(tmp_path, EndAt(1, error=ValueError("model.optimizer.lr: expected a positive number, got -1")))
    with pytest.raises(ValueError):
        run.execute()
    record = json.loads((run.run_dir / "metrics.json").read_text())
    assert record["head_losses"] is None and record["selected_head"] is None
    assert record["error"].startswith("model.optimizer.lr: expected a positive number")
    assert record["resume_from"] is None and record["convergence"]["reason"].endswith("checkpoint (none saved)")


def test_the_last_steps_training_loss_is_in_the_record_when_the_fit_ends_between_validations(tmp_path):
    """`icon fit … --trainer.max_steps 20` ends between the 100-step validations: the final validation used to
    reset the logged metrics, so ``train/loss`` (a sweep's declared metric) was missing from ``metrics.json``."""
    from icon_lightning.entry import main

    recipe = str(ROOT / "configs" / "recipes" / "icon_clustering.yaml")
    data = ["--data.dataset=icon_lightning.data.DigitsDataset", "--data.views=clean", f"--data.cache_dir={tmp_path}"]
    main(["fit", "--config", recipe, *data, "--trainer.max_steps", "20", "--model.num_heads", "2",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger=false"])  # fmt: skip
    (path,) = (tmp_path / "runs").glob("**/metrics.json")
    record = json.loads(path.read_text())
    assert record["steps"] == 20 and record["metrics"]["train/loss"] > 0
    assert record["metrics"]["val/nmi"] > 0  # the final validation's metrics are there too


def test_a_checkpoint_that_could_not_be_written_is_never_named(tmp_path, monkeypatch):
    """On a full disk the record's ``resume_from`` and the printed advice named a ``last.ckpt`` that was never
    written (Lightning sets ``last_model_path`` before it saves)."""
    import errno

    def disk_full(self, trainer, filepath):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunCheckpoint, "_save_checkpoint", disk_full)
    run = _fit(tmp_path, EndAt(10**6))  # never fires: the first checkpoint (step 4) fails
    with pytest.raises(OSError, match="No space left"):
        run.execute()
    record = json.loads((run.run_dir / "metrics.json").read_text())
    assert not list(run.run_dir.glob("**/*.ckpt"))
    assert record["resume_from"] is None and record["last_checkpoint"] is None
    assert record["convergence"]["reason"].endswith("checkpoint (none saved)") and record["steps"] == 4
