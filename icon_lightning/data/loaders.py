"""The loaders over what a clustering DataModule's ``setup`` prepared (``Loaders`` over a ``PreparedData``): anchor
batches for training (full batch when the data fit the paper's 4,096 anchors a step, else
128 anchors per cluster), evaluation batches of every item for validation, test and predict."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from icon_lightning.data.collate import EvalDataset, FeatureCollate, OnlineCollate
from icon_lightning.data.prepared import PreparedData
from icon_lightning.data.sampling import AnchorSampler, OnlineViews

FULL_BATCH_MAX = 4096  # the paper's anchors a step; ``batch_size='auto'`` trains full-batch up to this size
# Above it, ``auto`` takes this many anchors a step per cluster (at most FULL_BATCH_MAX): with each anchor's sampled
# neighbours about 3 × 128 = 384 rows of each cluster a step, so the batch's cluster masses, which normalise q, carry
# a relative standard error near 1/√384 ≈ 5 % whatever N is. K = 1,000 reaches the paper's 4,096 anchors.
ANCHORS_PER_CLUSTER = 128


def auto_anchors(num_samples: int, num_clusters: int) -> int:
    """Anchors a step (all processes together) for ``batch_size='auto'``: every item up to ``FULL_BATCH_MAX`` (full
    batch: p and the loss are exact), else ``ANCHORS_PER_CLUSTER`` per cluster, capped at ``FULL_BATCH_MAX``."""
    if num_samples <= FULL_BATCH_MAX:
        return num_samples
    return min(FULL_BATCH_MAX, ANCHORS_PER_CLUSTER * max(1, num_clusters), num_samples)


class AnchorLoader(DataLoader):
    """The training loader, resumable mid-epoch: ``state_dict`` says which epoch its pass is in and how many of its
    batches it has handed out; ``load_state_dict`` makes the next pass that epoch's remaining batches (its
    ``AnchorSampler`` skips the others), or the next epoch when none remain. Lightning keeps a loader with this pair
    in the checkpoint (with the fit loop's progress) and loads it before its first ``iter``, so a run resumed
    mid-epoch trains on the batches an unbroken run would. Lightning fetches no batch ahead from a loader with a
    length, so the batches handed out are the batches trained on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, AnchorSampler):
            raise TypeError(f"sampler: expected an AnchorSampler, got {type(self.sampler).__name__}")
        self._epoch, self._batches = self.sampler.epoch, 0

    def __iter__(self):  # a generator: the pass begins at its first batch, not at ``iter``
        batches = None
        for batch in super().__iter__():
            if batches is None:  # the sampler's pass has begun
                self._epoch, batches = self.sampler.pass_epoch, self.sampler.pass_start // self.batch_size
            batches += 1
            self._batches = batches
            yield batch

    def state_dict(self) -> dict:
        epoch, batches = self._epoch, self._batches
        if self.sampler.resume is not None:  # loaded, and no batch taken since
            epoch, batches = self.sampler.resume[0], self.sampler.resume[1] // self.batch_size
        anchors = self.batch_size * self.sampler.num_replicas  # a batch on every process
        return {"epoch": epoch, "batches": batches, "anchors_per_batch": anchors}

    def load_state_dict(self, state: dict) -> None:
        # the same anchors a step give the same batches; other ones (batch size, processes) restart the epoch at
        # the batch boundary nearest below the anchors already trained on
        anchors = self.batch_size * self.sampler.num_replicas
        epoch, batches = int(state["epoch"]), int(state["batches"]) * int(state["anchors_per_batch"]) // anchors
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.resume_at(epoch, batches * self.batch_size)


@dataclass(frozen=True)
class Loaders:
    """The DataLoaders over a ``PreparedData``. ``batch_size``: anchors a step and process, or ``auto``
    (``auto_anchors``, split between ``world`` processes); ``evaluate_train``: validation also scores the train
    items (a second loader, logged as ``train/…``)."""

    batch_size: int | str
    val_batch_size: int
    num_workers: int
    seed: int
    evaluate_train: bool

    def anchors_per_step(self, num_samples: int, num_clusters: int, world: int) -> int:
        """Anchors a step on each process: ``batch_size``, or what ``auto`` resolves to."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return math.ceil(auto_anchors(num_samples, num_clusters) / world)

    def full_batch(self, num_samples: int, num_clusters: int, world: int) -> bool:
        """Every item is an anchor of every step (one step an epoch)."""
        return self.anchors_per_step(num_samples, num_clusters, world) * world >= num_samples

    def sampled_neighbours(self, requested: int, num_samples: int, num_clusters: int, world: int = 1) -> int:
        """Sampled neighbours per anchor: ``requested``, or none in full-batch training, where every neighbour
        already is a candidate (said once)."""
        if not self.full_batch(num_samples, num_clusters, world):
            return requested
        if requested:
            rank_zero_info(
                f"full batch ({num_samples} anchors a step): every neighbour is a candidate already, so no "
                f"sampled neighbours (num_neighbours {requested} → 0)"
            )
        return 0

    def train(self, prepared: PreparedData, num_clusters: int, world: int, rank: int, online=None) -> DataLoader:
        """Anchor batches; ``online``: (image dataset, augmentation) when the module augments and embeds the
        images itself (``views='online'``), else the rows come from the prepared features and views."""
        n = len(prepared.features)
        if online is not None:
            data: Dataset = OnlineViews(online[0], online[1], prepared.anchors)
            collate = OnlineCollate(prepared.labels, prepared.table, prepared.degree)
        else:
            data = prepared.anchors
            collate = FeatureCollate(
                prepared.features, prepared.views, prepared.labels, prepared.table, prepared.degree
            )
        # One batch per epoch (full-batch training): the order of its rows changes nothing, so keep it fixed
        # and the batch is the same every step (IConModule then reuses p).
        full = self.full_batch(n, num_clusters, world)
        sampler = AnchorSampler(range(n), num_replicas=world, rank=rank, shuffle=not full, seed=self.seed)
        return AnchorLoader(
            data,
            batch_size=self.anchors_per_step(n, num_clusters, world),
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=not full,
            persistent_workers=self.num_workers > 0,
            # the workers' base seed from a generator of its own, not torch's global one: whether and where a run
            # was resumed then changes no draw of the global generator (every item seeds its own draws anyway)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def evaluation(self, data: EvalDataset) -> DataLoader:
        """Every item of ``data`` once, in order."""
        return DataLoader(data, batch_size=self.val_batch_size, collate_fn=data.collate, num_workers=0, shuffle=False)

    def validation(self, prepared: PreparedData) -> list[DataLoader]:
        """[val items, train items]: the module logs them as ``val/...`` and ``train/...``."""
        return [self.evaluation(prepared.val)] + ([self.evaluation(prepared.train_eval)] if self.evaluate_train else [])
