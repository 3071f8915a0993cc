"""`RunCheckpoint`: the run's ``checkpoints/last.ckpt``, every N optimizer steps and at the end of training,
published atomically so that a kill mid-write never leaves a half checkpoint under that name, with the random
generators' states, so that a resumed fit continues as the unbroken one would."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
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

    def state_dict(self) -> dict:
        """ModelCheckpoint's state and the global random generators' (torch, CUDA, numpy, Python) at the save. The
        training loader's position is Lightning's to keep (``AnchorLoader.state_dict``, in the fit loop's state)."""
        rng = _collect_rng_states(include_cuda=True)
        kind, keys, *rest = rng["numpy"]  # tensors and plain values: checkpoints are read with weights_only=True
        rng["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), *rest)
        return {**super().state_dict(), "rng": rng}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self._rng_to_restore = state.pop("rng", None)  # None: a checkpoint from before they were kept
        super().load_state_dict(state)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Every checkpoint of the fit: one saved between two epochs (a SIGTERM after an epoch's last step, which
        Lightning raises once the epoch is counted done) still holds the finished epoch's batch counts, which a
        resumed Lightning counts into the next epoch (cutting it to one batch); they are zeroed, as the next epoch's
        start does."""
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if not fit or "epoch_loop.batch_progress" not in fit:
            return
        epochs, batches = fit["epoch_progress"]["total"], fit["epoch_loop.batch_progress"]
        if epochs["completed"] == epochs["ready"] and batches["current"]["ready"]:
            batches["current"] = dict.fromkeys(batches["current"], 0)
            batches["is_last_batch"] = False

    def on_train_start(self, trainer, pl_module) -> None:
        """The generators as they were at the save, now that setup and the checkpoint's restoring (which draw from
        them) are done: the first resumed step draws what the unbroken run's drew."""
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is not None:
            if len(states.get("torch.cuda", [])) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
                states = {k: v for k, v in states.items() if k != "torch.cuda"}  # resumed on other devices
            if "numpy" in states:
                kind, keys, *rest = states["numpy"]
                states = {**states, "numpy": (kind, keys.numpy().astype(np.uint32), *rest)}
            _set_rng_states(states)

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
