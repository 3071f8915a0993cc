"""`RunCheckpoint`: the run's ``checkpoints/last.ckpt``, every N optimizer steps and at the end of training,
published atomically so that a kill mid-write never leaves a half checkpoint under that name."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from icon_lightning.io import publishing

CHECKPOINT_EVERY_STEPS = 10


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` in ``<run dir>/checkpoints`` (the trainer's ``default_root_dir``, whatever the logger),
    rewritten every ``every_n_train_steps`` optimizer steps, whatever an epoch or the validation interval is, and
    when training ends. Only the newest is kept: ``--ckpt_path last`` resumes from it."""

    def __init__(self, every_n_train_steps: int = CHECKPOINT_EVERY_STEPS, **kwargs) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps: expected a positive number of steps, got {every_n_train_steps}")
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("save_top_k", 0)
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        """The final model, whatever step training stopped at (Lightning saves here only if nothing was saved)."""
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM (a preemption, a sweep agent's kill) saves the step reached: Lightning raises it between
        steps, on every process together, so the state is whole. Ctrl-C and errors can strike inside a step; their
        ``last.ckpt`` stays the last whole one (the record names its step)."""
        if isinstance(exception, SIGTERMException) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def saved_step(trainer) -> int | None:
        """The optimizer step of the run's newest ``last.ckpt`` (None: none saved)."""
        steps = [c._last_global_step_saved for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)]
        return steps[0] if steps and steps[0] > 0 else None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        with publishing(filepath, publish=trainer.is_global_zero) as tmp:  # rank 0 writes; every rank takes part
            super()._save_checkpoint(trainer, str(tmp))
        self._last_checkpoint_saved = filepath
