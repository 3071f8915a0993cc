"""`AnchorBatches`: the loaders of a clustering DataModule: anchor batches for training (full batch when the data
fit the paper's 4,096 anchors a step, else 128 anchors per cluster), evaluation batches of every item for
validation, test and predict."""

from __future__ import annotations

import math

import lightning as L
from torch.utils.data import DataLoader

from icon_lightning.data.collate import EvalDataset, FeatureCollate, OnlineCollate
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


class AnchorBatches(L.LightningDataModule):
    """Loaders over what the subclass's ``setup`` prepared: ``anchors`` (an ``AnchorDataset``), ``train_features``,
    ``view_features``, ``train_labels``, ``table``, ``degree``, ``val_data`` and ``train_eval_data``; settings
    ``batch_size``, ``val_batch_size``, ``num_workers``, ``seed``, ``views``, ``evaluate_train``, ``num_clusters``."""

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    @property
    def anchors_per_step(self) -> int:
        """Anchors a step on each process: ``batch_size``, or what ``auto`` resolves to."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return math.ceil(auto_anchors(self.num_samples, self.num_clusters) / self._world()[0])

    @property
    def full_batch(self) -> bool:
        """Every item is an anchor of every step (one step an epoch)."""
        return self.anchors_per_step * self._world()[0] >= self.num_samples

    def train_dataloader(self) -> DataLoader:
        if self.views == "online":
            data = OnlineViews(self.dataset, self.prep.augment_tf, self.anchors)
            collate = OnlineCollate(self.train_labels, self.table, self.degree)
        else:
            data = self.anchors
            collate = FeatureCollate(
                self.train_features, self.view_features, self.train_labels, self.table, self.degree
            )
        world, rank = self._world()
        # One batch per epoch (full-batch training): the order of its rows changes nothing, so keep it fixed
        # and the batch is the same every step (IConModule then reuses p).
        shuffle = not self.full_batch
        sampler = AnchorSampler(range(self.num_samples), num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            data,
            batch_size=self.anchors_per_step,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=not self.full_batch,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, data: EvalDataset) -> DataLoader:
        return DataLoader(data, batch_size=self.val_batch_size, collate_fn=data.collate, num_workers=0, shuffle=False)

    def val_dataloader(self) -> list[DataLoader]:
        """[val split, train split]: the module logs them as ``val/...`` and ``train/...``."""
        loaders = [self._eval_loader(self.val_data)]
        if self.evaluate_train:
            loaders.append(self._eval_loader(self.train_eval_data))
        return loaders

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_data)

    def predict_dataloader(self) -> DataLoader:
        """Cluster assignments are predicted for the training items (the dataset being clustered)."""
        return self._eval_loader(self.train_eval_data)
