"""`ClusteringDataModule`: cached frozen features, a k-NN table, and batches of anchors with their augmented
views and sampled neighbours (I-Con §4: each image with 2 augmentations and 2 nearest neighbours)."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from icon_lightning.data.backbones import FrozenBackbone, Identity
from icon_lightning.data.batch import ANCHOR, NEIGHBOUR, ClusteringBatch
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.feature_store import FeatureStore, cached_features, shared_views
from icon_lightning.data.neighbours import (
    NeighbourTable,
    centred_unit_rows,
    label_agreement,
    symmetric_degree,
    walks,
)
from icon_lightning.data.transforms import augment_transform, eval_transform

FULL_BATCH_MAX = 4096  # the paper's anchors a step; ``batch_size='auto'`` trains full-batch up to this size


class AnchorSampler(DistributedSampler):
    """A DistributedSampler (so Lightning does not wrap it) yielding ``(epoch, index)``: sampling that
    depends on the epoch is then reproducible in any worker. One replica when not distributed."""

    def __iter__(self):
        for i in super().__iter__():
            yield self.epoch, i


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class AnchorDataset(Dataset):
    """Item (epoch, i) → which rows anchor i contributes: its V view ids and S sampled neighbours."""

    def __init__(
        self, num_items: int, pool: np.ndarray, num_views: int, view_pool: int, num_neighbours: int, seed: int
    ) -> None:
        self.num_items, self.pool = num_items, pool
        self.num_views, self.view_pool, self.num_neighbours, self.seed = num_views, view_pool, num_neighbours, seed

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.view_pool <= 0 and self.num_neighbours == 0:  # nothing to draw (full-batch, clean features)
            return i, np.full(self.num_views, -1), self.pool[i][:0]
        rng = item_rng(self.seed, epoch, i)
        if self.view_pool > 0:
            views = rng.choice(self.view_pool, self.num_views, replace=self.num_views > self.view_pool)
        else:
            views = np.full(self.num_views, -1)
        candidates = self.pool[i]
        picked = rng.choice(len(candidates), self.num_neighbours, replace=self.num_neighbours > len(candidates))
        return i, views, candidates[picked]


class RowFacts:
    """Dataset-level facts gathered for every row of a batch: labels, k-NN table rows, graph degrees."""

    def __init__(self, labels: torch.Tensor, table: torch.Tensor, degree: torch.Tensor) -> None:
        self.labels, self.table, self.degree = labels, table, degree

    def batch(
        self, inputs: torch.Tensor, anchors: torch.Tensor, anchor_views: torch.Tensor, nbrs: torch.Tensor
    ) -> ClusteringBatch:
        """Rows [V views of the B anchors (view-major), then their B × S neighbours (neighbour-major)].

        anchors: (B,) dataset indices; anchor_views: (V·B,) view ids; nbrs: (B, S) dataset indices.
        """
        b, s = nbrs.shape
        v = len(anchor_views) // b
        position = torch.arange(b)
        index = torch.cat([anchors.repeat(v), nbrs.T.reshape(-1)])
        return ClusteringBatch(
            inputs=inputs,
            index=index,
            view=torch.cat([anchor_views, torch.full((b * s,), -1, dtype=torch.long)]),
            source=torch.cat([torch.full((b * v,), ANCHOR), torch.full((b * s,), NEIGHBOUR)]).long(),
            anchor=torch.cat([position.repeat(v), position.repeat(s)]),
            label=self.labels[index],
            neighbours=self.table[index],
            degree=self.degree[index],
        )


class FeatureCollate(RowFacts):
    """Gathers cached features for a list of AnchorDataset items into one ClusteringBatch."""

    def __init__(
        self,
        clean: torch.Tensor,
        views: torch.Tensor | None,
        labels: torch.Tensor,
        table: torch.Tensor,
        degree: torch.Tensor,
    ) -> None:
        super().__init__(labels, table, degree)
        self.clean, self.views = clean, views

    def __call__(self, items) -> ClusteringBatch:
        anchors = torch.as_tensor(np.array([i for i, _, _ in items]), dtype=torch.long)
        view_ids = torch.as_tensor(np.stack([v for _, v, _ in items]), dtype=torch.long)  # (B, V)
        nbrs = torch.as_tensor(np.stack([n for _, _, n in items]), dtype=torch.long)  # (B, S)
        b, v = view_ids.shape
        anchor_index = anchors.repeat(v)  # view-major: rows [view 0 of all anchors, view 1 of all, ...]
        anchor_views = view_ids.T.reshape(-1)
        if self.views is None or (anchor_views < 0).all():
            anchor_inputs = self.clean[anchor_index]
            anchor_views = torch.arange(v).repeat_interleave(b)  # clean mode: the view's position 0..V-1
        else:
            anchor_inputs = self.views[anchor_views, anchor_index].float()  # float16 rows of the shared map
        inputs = torch.cat([anchor_inputs, self.clean[nbrs.T.reshape(-1)]])
        return self.batch(inputs, anchors, anchor_views, nbrs)


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


class OnlineCollate(RowFacts):
    """Stacks OnlineViews items (images) into one ClusteringBatch."""

    def __call__(self, items) -> ClusteringBatch:
        anchors = torch.as_tensor([i for i, _, _, _ in items], dtype=torch.long)
        views = torch.stack([v for _, v, _, _ in items])  # (B, V, 3, H, W)
        nbrs = torch.stack([n for _, _, n, _ in items])  # (B, S)
        nbr_images = torch.stack([x for _, _, _, x in items])  # (B, S, 3, H, W)
        b, v = views.shape[:2]
        inputs = torch.cat([views.transpose(0, 1).flatten(0, 1), nbr_images.transpose(0, 1).flatten(0, 1)])
        return self.batch(inputs, anchors, torch.arange(v).repeat_interleave(b), nbrs)


class EvalDataset(Dataset):
    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, table: torch.Tensor | None, degree: torch.Tensor | None
    ) -> None:
        self.features, self.labels, self.table, self.degree = features, labels, table, degree

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> ClusteringBatch:
        index = torch.as_tensor(items, dtype=torch.long)
        n = len(index)
        table = self.table[index] if self.table is not None else torch.zeros(n, 0, dtype=torch.long)
        degree = self.degree[index] if self.degree is not None else torch.ones(n)
        return ClusteringBatch(
            inputs=self.features[index],
            index=index,
            view=torch.full((n,), -1),
            source=torch.zeros(n, dtype=torch.long),
            anchor=torch.arange(n),
            label=self.labels[index],
            neighbours=table,
            degree=degree,
        )


class ClusteringDataModule(L.LightningDataModule):
    """Frozen features, cached once; k-NN table (+ walks); batches of anchors with views and neighbours.

    dataset / val_dataset: ``IndexedDataset``s (val: scored only; None → validate on the train items).
    backbone: frozen feature extractor; None when the dataset items already are feature vectors.
    views: ``cached`` (``view_pool`` augmented views per image extracted once; V drawn per epoch),
        ``online`` (images augmented every step; the module runs the backbone: the paper's exact recipe),
        or ``clean`` (no augmentation: every view is the clean feature; for feature/tabular data).
    num_views: V views per anchor; None → 2 augmented views (the paper), or 1 with ``views='clean'``, whose views
        would all be the same clean feature.
    num_neighbours: S neighbours sampled per anchor; none in full-batch training, where every neighbour already
        is a candidate.
    batch_size: anchors per step and process; ``auto``: the whole dataset when it fits the paper's 4,096
        anchors (full batch: p and the loss are exact), else 4,096 anchors, split evenly between processes.
    k: width of the k-NN table. walk_steps: sample neighbours among endpoints of 1..s-step walks.
    normalize: centre by the train mean, then L2-normalise the cached features.
    extract_precision: bf16 autocast (default) or fp32 for extraction on CUDA; the CPU always runs fp32.
    num_clusters: K for the model (linked by the CLI); None → the number of classes (the usual protocol).
    evaluate_train: validation also scores the train split (a second validation dataloader).
    views_in_memory: keep the prepared cached views as a float32 copy in each process; by default they are one
        float16 memory map in the cache folder, shared by every process of a node (README "Memory at scale").
    distributed_extraction: extract in ``setup`` on every rank (each its shard) instead of on rank 0 in
        ``prepare_data``.
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        val_dataset: IndexedDataset | None = None,
        backbone: FrozenBackbone | None = None,
        cache_dir: str = ".cache/icon_lightning",
        image_size: int = 224,
        grayscale_to_rgb: bool = False,
        views: Literal["cached", "online", "clean"] = "cached",
        view_pool: int = 4,
        num_views: int | None = None,
        num_neighbours: int = 2,
        k: int = 3,
        walk_steps: int = 1,
        knn_backend: Literal["auto", "faiss", "torch"] = "auto",
        normalize: bool = True,
        batch_size: int | Literal["auto"] = "auto",
        val_batch_size: int = 1024,
        num_workers: int = 0,
        extract_batch_size: int = 256,
        seed: int = 0,
        distributed_extraction: bool = False,
        extract_precision: Literal["bf16", "fp32"] = "bf16",
        num_clusters: int | None = None,
        evaluate_train: bool = True,
        views_in_memory: bool = False,
    ) -> None:
        super().__init__()
        num_views = (1 if views == "clean" else 2) if num_views is None else num_views
        for name, value, low in (
            ("num_views", num_views, 1),
            ("num_neighbours", num_neighbours, 0),
            ("k", k, 1),
            ("walk_steps", walk_steps, 1),
            ("batch_size", 1 if batch_size == "auto" else batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("extract_batch_size", extract_batch_size, 1),
        ):
            if value < low:
                raise ValueError(f"{name}: expected at least {low}, got {value}")
        if num_clusters is not None and not 2 <= num_clusters <= len(dataset):
            raise ValueError(
                f"num_clusters: expected 2 ≤ K ≤ N = {len(dataset)} items (or null for the number of classes), "
                f"got {num_clusters}"
            )
        if views not in ("cached", "online", "clean"):
            raise ValueError(f"views: expected 'cached', 'online' or 'clean', got {views!r}")
        if views == "cached" and view_pool < 1:
            raise ValueError(f"view_pool: expected at least 1 cached view, got {view_pool}")
        if views != "clean" and backbone is None:
            raise ValueError(f"views: {views!r} augments images and needs a backbone; use views='clean' for features")
        self.dataset, self.val_dataset = dataset, val_dataset
        self.backbone = backbone if backbone is not None else Identity()
        self.store = FeatureStore(cache_dir)
        self.views, self.view_pool, self.num_views, self.num_neighbours = views, view_pool, num_views, num_neighbours
        self.k, self.walk_steps, self.knn_backend, self.normalize = k, walk_steps, knn_backend, normalize
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.extract_batch_size, self.seed, self.distributed_extraction = (
            extract_batch_size,
            seed,
            distributed_extraction,
        )
        kind = backbone is not None
        self.eval_tf = eval_transform(image_size, grayscale_to_rgb=grayscale_to_rgb) if kind else None
        self.augment_tf = augment_transform(image_size, grayscale_to_rgb=grayscale_to_rgb) if kind else None
        self.extract_precision = extract_precision
        self._num_clusters = num_clusters
        self.evaluate_train = evaluate_train
        self.views_in_memory = views_in_memory
        self.knn_agreement: float | None = None

    # ------------------------------------------------------------------ facts the CLI links into the model
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def num_clusters(self) -> int:
        return self._num_clusters or self.num_classes

    @property
    def online_backbone(self) -> FrozenBackbone | None:
        """The backbone the model must run itself: only when views are augmented online."""
        return self.backbone if self.views == "online" else None

    @property
    def feature_dim(self) -> int:
        if self.backbone.feature_dim:
            return self.backbone.feature_dim
        return int(np.prod(self.dataset[0][0].shape))

    # ------------------------------------------------------------------ extraction and caching
    def _features(self, dataset: IndexedDataset, view: str) -> np.ndarray:
        transform = self.eval_tf if view == "clean" else self.augment_tf
        return cached_features(
            self.store,
            self.backbone,
            dataset,
            transform,
            view=view,
            seed=self.seed,
            batch_size=self.extract_batch_size,
            num_workers=self.num_workers,
            precision=self.extract_precision,
        )

    def _extract_all(self) -> None:
        self._features(self.dataset, "clean")
        if self.views == "cached":
            for v in range(self.view_pool):
                self._features(self.dataset, f"aug{v}")
        if self.val_dataset is not None:
            self._features(self.val_dataset, "clean")

    def prepare_data(self) -> None:
        if not self.distributed_extraction:
            self._extract_all()
            clean = self._prepared(self._features(self.dataset, "clean"))
            NeighbourTable.in_folder(clean, self.k, self.store.root, self.knn_backend)

    def _prepared(self, features: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        if not self.normalize:
            return np.array(features, dtype=np.float32)  # a writable copy of the read-only cache
        return centred_unit_rows(features, mean)

    def setup(self, stage: str | None = None) -> None:
        if self.distributed_extraction:
            self._extract_all()
        raw = np.asarray(self._features(self.dataset, "clean"), dtype=np.float32)
        mean = raw.mean(0, keepdims=True)
        clean = self._prepared(raw, mean)
        fingerprint = NeighbourTable.fingerprint(clean)  # a hash of every byte: once for both calls below
        table = None
        if self.distributed_extraction and dist.is_available() and dist.is_initialized():
            if dist.get_rank() == 0:  # one process builds the k-NN table; the others load the file it wrote
                table = NeighbourTable.in_folder(clean, self.k, self.store.root, self.knn_backend, fingerprint)
            dist.barrier()
        if table is None:
            table = NeighbourTable.in_folder(clean, self.k, self.store.root, self.knn_backend, fingerprint)
        labels = torch.as_tensor(self.dataset.labels, dtype=torch.long)
        if (labels >= 0).all():
            self.knn_agreement = label_agreement(table.indices, self.dataset.labels)  # diagnostic only
            rank_zero_info(
                f"{self.k}-NN label agreement of the train features: {self.knn_agreement:.3f} "
                "(diagnostic; labels never train)"
            )
        self.table = torch.as_tensor(table.indices)
        self.degree = torch.from_numpy(symmetric_degree(table.indices))
        self.train_features = torch.from_numpy(clean)
        self.train_labels = labels
        self.view_features = self._view_features(mean) if self.views == "cached" else None
        pool = walks(table.indices, self.walk_steps)
        neighbours = 0 if self.full_batch else self.num_neighbours
        if neighbours != self.num_neighbours:
            rank_zero_info(
                f"full batch ({self.num_samples} anchors a step): every neighbour is a candidate already, so no "
                f"sampled neighbours (num_neighbours {self.num_neighbours} → 0)"
            )
        self.anchors = AnchorDataset(
            len(clean),
            pool,
            self.num_views,
            self.view_pool if self.views == "cached" else 0,
            neighbours,
            self.seed,
        )
        if self.val_dataset is not None:
            val = self._prepared(self._features(self.val_dataset, "clean"), mean)
            self.val_data = EvalDataset(torch.from_numpy(val), torch.as_tensor(self.val_dataset.labels), None, None)
        else:
            self.val_data = EvalDataset(self.train_features, labels, self.table, self.degree)
        self.train_eval_data = EvalDataset(self.train_features, labels, self.table, self.degree)

    def _view_features(self, mean: np.ndarray) -> torch.Tensor:
        """(P, N, D) prepared cached views: one float16 memory map shared by the node's processes (rank 0 writes
        it; the others wait, then map it), or with ``views_in_memory`` a float32 copy in each process."""
        raws = [self._features(self.dataset, f"aug{v}") for v in range(self.view_pool)]
        if self.views_in_memory:
            return torch.stack([torch.from_numpy(self._prepared(raw, mean)) for raw in raws])
        mean = mean if self.normalize else None
        distributed = dist.is_available() and dist.is_initialized()
        views = shared_views(self.store.root, raws, mean) if not distributed or dist.get_rank() == 0 else None
        if distributed:
            dist.barrier()  # rank 0 has written the map; the others now only open it
        views = views if views is not None else shared_views(self.store.root, raws, mean)
        with warnings.catch_warnings():  # read-only on purpose: batches copy the rows they gather
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(views)

    # ------------------------------------------------------------------ batches
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    @property
    def anchors_per_step(self) -> int:
        """Anchors a step on each process: ``batch_size``, or what ``auto`` resolves to."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return math.ceil(min(self.num_samples, FULL_BATCH_MAX) / self._world()[0])

    @property
    def full_batch(self) -> bool:
        """Every item is an anchor of every step (one step an epoch)."""
        return self.anchors_per_step * self._world()[0] >= self.num_samples

    # ------------------------------------------------------------------ loaders
    def _sampler(self, shuffle: bool) -> AnchorSampler:
        world, rank = self._world()
        # One batch per epoch (full-batch training): the order of its rows changes nothing, so keep it fixed
        # and the batch is the same every step (IConModule then reuses p).
        shuffle = shuffle and not self.full_batch
        return AnchorSampler(range(self.num_samples), num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        if self.views == "online":
            data = OnlineViews(self.dataset, self.augment_tf, self.anchors)
            collate = OnlineCollate(self.train_labels, self.table, self.degree)
        else:
            data = self.anchors
            collate = FeatureCollate(
                self.train_features, self.view_features, self.train_labels, self.table, self.degree
            )
        return DataLoader(
            data,
            batch_size=self.anchors_per_step,
            sampler=self._sampler(shuffle=True),
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
