"""ClusterAssignmentWriter under DDP: the shards of every process are merged and written once, by rank 0."""

from __future__ import annotations

import csv
import errno
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icon_lightning.callbacks import ClusterAssignmentWriter


def shard(index: list[int], clusters: list[int]) -> list[dict]:
    probs = torch.nn.functional.one_hot(torch.tensor(clusters), 3).float() * 0.5 + 0.1
    return [{"index": torch.tensor(index), "cluster": torch.tensor(clusters), "probs": probs}]


def test_shards_are_gathered_deduplicated_and_written_by_rank_zero(tmp_path, monkeypatch):
    # Rank 0 predicted items 0, 2, 4; rank 1 items 1, 3 and 0 again (DistributedSampler pads the last shard).
    shards = [shard([0, 2, 4], [2, 1, 0]), shard([1, 3, 0], [0, 2, 2])]

    gathered = [
        tuple(torch.cat([b[k] for b in batches]).numpy() for k in ("index", "cluster"))
        + (torch.cat([b["probs"].max(-1).values for b in batches]).numpy(),)
        for batches in shards
    ]  # what all_gather_object hands every rank: each rank's (index, cluster, confidence)

    def all_gather_object(parts, local):
        parts[:] = gathered

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    for rank in (1, 0):  # rank 1 writes nothing
        out = tmp_path / f"rank{rank}"
        trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, log_dir=None, default_root_dir=str(out))
        ClusterAssignmentWriter().write_on_epoch_end(trainer, None, shards[rank], None)
    assert not (tmp_path / "rank1").exists()
    assert np.load(tmp_path / "rank0" / "predictions.npy").tolist() == [2, 0, 1, 2, 0]
    rows = list(csv.DictReader(open(tmp_path / "rank0" / "predictions.csv")))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(float(r["confidence"]) == 0.6 for r in rows)


def test_a_full_disk_names_the_predictions_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """ENOSPC while writing predictions used to surface without a path, leaving a temporary file behind."""

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, log_dir=None, default_root_dir=str(tmp_path))
    with pytest.raises(OSError, match=r"predictions\.npy: could not write: no space left on the device"):
        ClusterAssignmentWriter().write_on_epoch_end(trainer, None, shard([0, 1], [1, 2]), None)
    assert list(tmp_path.iterdir()) == []
