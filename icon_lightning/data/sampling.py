"""Which rows a step trains on: the anchors a process draws, their views and sampled neighbours, reproducibly
from (seed, epoch, index) in any worker."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from icon_lightning.data.datasets import IndexedDataset


class AnchorSampler(DistributedSampler):
    """A DistributedSampler (so Lightning does not wrap it) yielding ``(epoch, index)``: sampling that
    depends on the epoch is then reproducible in any worker. One replica when not distributed.

    ``resume_at(epoch, start)``: the next pass is that epoch's order from its ``start``-th anchor of this process on
    (a run resumed mid-epoch), and the passes after it the following epochs, whatever numbers the trainer's
    ``set_epoch`` gives them from then on (Lightning can count an epoch more or less after a resume). ``len`` stays
    a whole epoch's; ``pass_epoch``, ``pass_start``: the epoch and first anchor of the pass under way."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.offset = 0  # this sampler's epochs minus the trainer's, fixed by the first pass after ``resume_at``
        self.resume: tuple[int, int] | None = None
        self.pass_epoch, self.pass_start = self.epoch, 0

    def resume_at(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start: expected 0 to {self.num_samples} anchors of this process, got {start}")
        self.resume = (epoch, start)

    def __iter__(self):
        # a generator: the pass begins at its first item, after the trainer's set_epoch for it
        start = 0
        if self.resume is not None:
            (epoch, start), self.resume = self.resume, None
            self.offset = epoch - self.epoch
        requested = self.epoch
        self.epoch += self.offset  # DistributedSampler orders by ``self.epoch``
        try:
            order = super().__iter__()
        finally:
            epoch, self.epoch = self.epoch, requested
        self.pass_epoch, self.pass_start = epoch, start
        for i in itertools.islice(order, start, None):
            yield epoch, i


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class AnchorDataset(Dataset):
    """Item (epoch, i) → which rows anchor i contributes: its V view ids and S sampled neighbours."""

    def __init__(
        self, num_items: int, pool: np.ndarray, num_views: int, view_pool: int, num_neighbours: int, seed: int
    ) -> None:
        self.num_items, self.pool = num_items, pool
        self.num_views, self.view_pool, self.num_neighbours, self.seed = num_views, view_pool, num_neighbours, seed
        self._no_views, self._no_neighbours = np.full(num_views, -1), pool[:0, :0].reshape(0)  # shared, read-only
        self._no_views.flags.writeable = False

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.view_pool <= 0 and self.num_neighbours == 0:  # nothing to draw (full-batch, clean features)
            return i, self._no_views, self._no_neighbours
        rng = item_rng(self.seed, epoch, i)
        if self.view_pool > 0:
            views = rng.choice(self.view_pool, self.num_views, replace=self.num_views > self.view_pool)
        else:
            views = np.full(self.num_views, -1)
        candidates = self.pool[i]
        picked = rng.choice(len(candidates), self.num_neighbours, replace=self.num_neighbours > len(candidates))
        return i, views, candidates[picked]


class OnlineViews(Dataset):
    """Item (epoch, i) → images: V fresh augmentations of anchor i and one of each of its S sampled neighbours.

    The exact recipe of the paper: the backbone runs on augmented images every step (in the LightningModule).
    """

    def __init__(self, dataset: IndexedDataset, transform, anchors: AnchorDataset) -> None:
        self.dataset, self.transform, self.anchors = dataset, transform, anchors

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        _, _, nbrs = self.anchors[key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(item_rng(self.anchors.seed, epoch, i).integers(2**31)))
            views = [self.transform(self.dataset.load(i)) for _ in range(self.anchors.num_views)]
            nbr_images = [self.transform(self.dataset.load(int(j))) for j in nbrs]
        return i, torch.stack(views), torch.as_tensor(nbrs), torch.stack(nbr_images)
