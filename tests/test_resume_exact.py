"""Exact resume in mini-batches (issue 31): a fit stopped by SIGTERM and resumed with ``--ckpt_path`` trains on the
batches, and draws the random numbers, an unbroken fit would, so both end with the same head weights, head losses
and labels, bit for bit. Before, a run resumed mid-epoch (Lightning's plain DataLoader is not resumable) started the
epoch's order over: it trained on batches it had seen and skipped the rest (a tester's 6,000 rows: head loss
1.6464264 against 1.6464238, weights off by 0.031, a label changed)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from sklearn.datasets import make_blobs
from torch.utils.data import Dataset

from icon_lightning.cli import assemble, features_command
from icon_lightning.data.loaders import AnchorLoader
from icon_lightning.data.sampling import AnchorSampler

ROWS, CLUSTERS, STEPS = 5000, 3, 24  # above 4,096 rows: 3 × 128 anchors a step, 13 steps an epoch


class SigtermAt(Callback):
    """SIGTERM to this process after optimizer step ``step`` (Lightning stops between steps and saves ``last.ckpt``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class Batches(Callback):
    """The anchors of every training step: (global step, epoch, the batch's dataset indices)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, trainer.current_epoch, batch.index.tolist()))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    x, y = make_blobs(ROWS, n_features=4, centers=CLUSTERS, random_state=0)
    path = tmp_path_factory.mktemp("blobs") / "blobs.npz"
    np.savez(path, features=x.astype(np.float32), labels=y)
    return path


def _args(blobs: Path, root: Path, *extra: str) -> list[str]:
    return [
        *features_command(blobs),
        f"--data.num_clusters={CLUSTERS}",
        "--model.num_heads=2",
        f"--trainer.max_steps={STEPS}",
        f"--data.cache_dir={blobs.parent / 'cache'}",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        *extra,
    ]


def _fit(argv: list[str], *callbacks: Callback):
    run = assemble(argv)
    run.trainer.callbacks.extend(callbacks)
    run.execute()
    return run


def _outcome(run):
    record = json.loads((run.run_dir / "metrics.json").read_text())
    heads = {name: w.detach().clone() for name, w in run.model.heads.state_dict().items()}
    return heads, record["head_losses"], run.model.assign(run.datamodule.train_features).numpy(), record["steps"]


@pytest.fixture(scope="module")
def unbroken(blobs, tmp_path_factory):
    seen = Batches()
    run = _fit(_args(blobs, tmp_path_factory.mktemp("unbroken")), seen)
    assert not run.datamodule.full_batch and run.trainer.num_training_batches == 13  # mini-batches
    return _outcome(run), seen.seen


@pytest.mark.parametrize("stop", [7, 13], ids=["mid-epoch", "after-an-epochs-last-step"])
def test_a_sigterm_and_resume_equals_the_unbroken_fit(blobs, tmp_path, unbroken, stop):
    """SIGTERM after step 7 (mid-epoch) or 13 (an epoch's last step), resumed to step 24 (into the second epoch):
    every head weight ``torch.equal``, the same head losses and labels, and step for step the same anchors."""
    (heads, losses, labels, steps), batches = unbroken
    stopped = Batches()
    with pytest.raises(SystemExit) as end:
        _fit(_args(blobs, tmp_path), SigtermAt(stop), stopped)
    assert end.value.code == 143
    (record,) = tmp_path.glob("**/metrics.json")
    resume_from = json.loads(record.read_text())["resume_from"]
    assert torch.load(resume_from, weights_only=True)["global_step"] == stop
    resumed = Batches()
    run = _fit(_args(blobs, tmp_path, f"--ckpt_path={resume_from}"), resumed)
    assert [b for _, _, b in stopped.seen + resumed.seen] == [b for _, _, b in batches]  # the anchors of each step
    heads_r, losses_r, labels_r, steps_r = _outcome(run)
    assert steps_r == steps == STEPS
    assert heads.keys() == heads_r.keys() and all(torch.equal(heads[k], heads_r[k]) for k in heads)
    assert losses_r == losses
    np.testing.assert_array_equal(labels_r, labels)


class Draws(Callback):
    """Draws from the global generators (torch, numpy, Python) at every step, as dropout or a random augmentation
    in a step would."""

    def __init__(self) -> None:
        self.drawn: list[tuple[float, float, float]] = []

    def on_train_batch_start(self, *args) -> None:
        self.drawn.append((torch.rand(()).item(), np.random.rand(), random.random()))


def test_a_resumed_fit_draws_the_random_numbers_of_the_unbroken_one(blobs, tmp_path):
    """The global generators at the first resumed step are those the unbroken fit has there (their states at the
    save, restored), not the fresh ones of the resumed process."""
    unbroken, stopped, resumed = Draws(), Draws(), Draws()
    _fit(_args(blobs, tmp_path / "unbroken", "--trainer.max_steps=8"), unbroken)
    with pytest.raises(SystemExit):
        _fit(_args(blobs, tmp_path / "stopped", "--trainer.max_steps=8"), SigtermAt(5), stopped)
    (record,) = (tmp_path / "stopped").glob("**/metrics.json")
    resume_from = json.loads(record.read_text())["resume_from"]
    _fit(_args(blobs, tmp_path / "stopped", "--trainer.max_steps=8", f"--ckpt_path={resume_from}"), resumed)
    assert len(unbroken.drawn) == 8 and stopped.drawn == unbroken.drawn[:5]
    assert resumed.drawn == unbroken.drawn[5:]


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return key  # (epoch, index)


def _loader(n: int, batch: int, replicas: int = 1, rank: int = 0) -> AnchorLoader:
    sampler = AnchorSampler(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=3)
    return AnchorLoader(_Items(n), batch_size=batch, sampler=sampler, drop_last=True, collate_fn=list)


def _epoch(loader: AnchorLoader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    return list(loader)


def test_a_loaded_loader_gives_the_rest_of_the_epoch_then_whole_epochs():
    """Against an unbroken loader: state after 4 of epoch 1's 6 batches → its last 2, then epoch 2 whole; a state
    at an epoch's end → the next epoch; a trainer numbering the epochs one more after the resume changes nothing."""
    unbroken = _loader(50, 8)
    whole = {e: _epoch(unbroken, e) for e in range(3)}
    assert len(whole[1]) == 6 and whole[1] != whole[2] and all(b[0][0] == e for e, bs in whole.items() for b in bs)
    stopped = _loader(50, 8)
    _epoch(stopped, 0)
    stopped.sampler.set_epoch(1)
    taken = list(itertools.islice(stopped, 4))
    assert taken == whole[1][:4] and stopped.state_dict()["batches"] == 4
    for shift in (0, 1):
        resumed = _loader(50, 8)
        resumed.load_state_dict(stopped.state_dict())
        assert resumed.state_dict() == stopped.state_dict()  # saved again before a step: the same place
        assert _epoch(resumed, 1 + shift) == whole[1][4:] and _epoch(resumed, 2 + shift) == whole[2]
        assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches"] == 6
    at_end = _loader(50, 8)
    at_end.load_state_dict({"epoch": 1, "batches": 6, "anchors_per_batch": 8})
    assert _epoch(at_end, 1) == whole[2]


def test_a_loader_per_process_resumes_its_own_share():
    """Two processes: each resumes its own order of the epoch at the batch it had reached."""
    for rank in (0, 1):
        whole = _epoch(_loader(64, 4, replicas=2, rank=rank), 0)
        resumed = _loader(64, 4, replicas=2, rank=rank)
        resumed.load_state_dict({"epoch": 0, "batches": 3, "anchors_per_batch": 8})
        assert _epoch(resumed, 0) == whole[3:]
