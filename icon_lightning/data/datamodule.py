"""`ClusteringDataModule`: cached frozen features, a k-NN table, and batches of anchors with their augmented
views and sampled neighbours (I-Con §4: each image with 2 augmentations and 2 nearest neighbours).

It composes small parts: ``FeaturePrep`` (extraction, cache, normalisation), ``NeighbourIndex`` (k-NN table,
degrees, walk pool), ``AnchorDataset``/``AnchorSampler``/``OnlineViews`` (which rows a step draws) and the
collators (``FeatureCollate``, ``OnlineCollate``, ``EvalDataset``). ``setup`` builds one ``PreparedData`` (features,
table, views, anchors, evaluation items; ``prepared``) and ``Loaders`` serves every DataLoader from it."""

from __future__ import annotations

from functools import partial
from typing import Literal

import lightning as L
import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader

from icon_lightning.data.backbones import FrozenBackbone, Identity
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.feature_store import FeatureStore
from icon_lightning.data.loaders import Loaders
from icon_lightning.data.prepare import FeaturePrep
from icon_lightning.data.prepared import (
    Preparation,
    PreparedData,
    check_clusters,
    extract_for,
    fitting,
    prepare,
    prepare_evaluation,
    source,
)
from icon_lightning.settings import NonNegativeInt, PositiveInt, check_arguments

DEFAULT_K = 3  # the paper's k-NN


def check_settings(dataset: IndexedDataset, backbone, views: str, num_clusters, num_views: int | None) -> int:
    """One-line errors for the DataModule's settings that depend on the data or on each other (a setting's own
    limits are its annotation: ``settings.check_arguments``, and `icon` at parse time). K ≤ N is a fit's limit
    (``prepared.check_clusters``, checked when fitting): validate, test and predict take any number of rows.
    Returns V, the views per anchor (``num_views``, or its default)."""
    if num_clusters is not None and num_clusters < 2:
        check_clusters(num_clusters, dataset)
    if num_clusters is None and dataset.num_classes == 0:
        raise ValueError(
            f"data.num_clusters: {getattr(dataset, 'path', type(dataset).__name__)} has no labels, so the number of "
            "clusters cannot be taken from them: pass --data.num_clusters K (the number of clusters to find)"
        )
    if views != "clean" and backbone is None:
        raise ValueError(f"views: {views!r} augments images and needs a backbone; use views='clean' for features")
    return (1 if views == "clean" else 2) if num_views is None else num_views


def knn_width(k: int | None, needed: int) -> int:
    """k of the k-NN table: ``k``, or ``needed`` (the widest ``KNNGraph`` the objective reads; at least 3); a ``k``
    below what the objective reads is one line."""
    if k is not None and k < needed:
        raise ValueError(
            f"k: the objective's KNNGraph reads {needed} neighbours of each k-NN table row, but data.k is {k}; "
            "leave k unset (null) to size the table from the objective"
        )
    return k if k is not None else max(DEFAULT_K, needed)


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
        anchors (full batch: p and the loss are exact), else 128 anchors per cluster (at most 4,096; the rule is
        ``loaders.auto_anchors``), split evenly between processes.
    k: width of the k-NN table; None → the widest ``KNNGraph`` of the model's objective (at least 3, the paper's),
        so k is set once, in the recipe. walk_steps: sample neighbours among endpoints of 1..walk_steps-step walks
        on the table (the count ``Propagated(steps=…)`` uses).
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
        image_size: PositiveInt = 224,
        grayscale_to_rgb: bool = False,
        views: Literal["cached", "online", "clean"] = "cached",
        view_pool: PositiveInt = 4,
        num_views: PositiveInt | None = None,
        num_neighbours: NonNegativeInt = 2,
        k: PositiveInt | None = None,
        walk_steps: PositiveInt = 1,
        knn_backend: Literal["auto", "faiss", "torch"] = "auto",
        normalize: bool = True,
        batch_size: PositiveInt | Literal["auto"] = "auto",
        val_batch_size: PositiveInt = 1024,
        num_workers: NonNegativeInt = 0,
        extract_batch_size: PositiveInt = 256,
        seed: int = 0,
        distributed_extraction: bool = False,
        extract_precision: Literal["bf16", "fp32"] = "bf16",
        num_clusters: int | None = None,
        evaluate_train: bool = True,
        views_in_memory: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(ClusteringDataModule.__init__, locals())
        num_views = check_settings(dataset, backbone, views, num_clusters, num_views)
        self.dataset, self.val_dataset, self.views, self.view_pool = dataset, val_dataset, views, view_pool
        self.backbone = backbone if backbone is not None else Identity()
        self.prep = FeaturePrep(
            FeatureStore(cache_dir), self.backbone, backbone is not None, image_size, grayscale_to_rgb, normalize,
            seed=seed, batch_size=extract_batch_size, num_workers=num_workers, precision=extract_precision,
        )  # fmt: skip
        self.num_views, self.num_neighbours, self.k, self.walk_steps = num_views, num_neighbours, k, walk_steps
        self.knn_backend, self.seed, self.distributed_extraction = knn_backend, seed, distributed_extraction
        self._num_clusters, self.views_in_memory = num_clusters, views_in_memory
        self.loaders = Loaders(batch_size, val_batch_size, num_workers, seed, evaluate_train)
        # what ``setup`` builds, and the fit's preparation (this fit's or a checkpoint's)
        self.preparation = Preparation(partial(prepare_evaluation, self.prep, dataset, val_dataset))

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
        return self.backbone.feature_dim or int(np.prod(self.dataset[0][0].shape))

    @property
    def table_width(self) -> int:
        """k of the k-NN table: ``k``, or the widest ``KNNGraph`` the attached model's objective reads, as the model
        declares it (``data_needs()["knn_width"]``; at least 3)."""
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return knn_width(self.k, int(model.data_needs().get("knn_width", 0)) if hasattr(model, "data_needs") else 0)

    # ------------------------------------------------------------------ preparation
    def prepare_data(self) -> None:
        # a fit reads its k-NN table (width, backend) and cached views; validate, test and predict the clean features
        fit = fitting(self.trainer) and (self.table_width, self.knn_backend, self.view_pool * (self.views == "cached"))
        if not self.distributed_extraction:  # Lightning runs this on one process per node, the others waiting
            extract_for(self.prep, self.dataset, self.val_dataset, self.num_clusters, fit or None)

    def setup(self, stage: str | None = None) -> None:
        """A fit prepares everything (``prepare``); validate, test and predict prepare their items when a loader
        first asks, after Lightning restored a checkpoint's preparation (``load_state_dict`` runs after ``setup``)."""
        if stage not in (None, "fit"):
            return self.preparation.evaluate()
        sampled = self.loaders.sampled_neighbours(
            self.num_neighbours, self.num_samples, self.num_clusters, self._world()[0]
        )
        self.preparation.fitted_by(prepare(
            self.prep, self.dataset, self.val_dataset, width=self.table_width, walk_steps=self.walk_steps,
            backend=self.knn_backend, views=self.views, view_pool=self.view_pool, views_in_memory=self.views_in_memory,
            num_views=self.num_views, num_neighbours=sampled, seed=self.seed, num_clusters=self.num_clusters,
            extract=self.distributed_extraction,
        ))  # fmt: skip

    def state_dict(self) -> dict:
        """The fit's ``FitPreparation`` (mean, normalize, D, K): Lightning saves it into every checkpoint."""
        return self.preparation.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's ``FitPreparation``: this data is prepared as its fit's was, or one line if it cannot be."""
        self.preparation.load_state_dict(state, self.feature_dim, self.num_clusters, self.trainer, source(self.dataset))

    @property
    def prepared(self) -> PreparedData:
        """What ``setup`` built (features, k-NN table, views, anchors, evaluation items): one object."""
        return self.preparation.items

    @property
    def train_features(self) -> Tensor:
        """(N, D) clean train features, as the heads see them: what head starts and second stages cluster."""
        return self.prepared.features

    @property
    def train_labels(self) -> Tensor:
        return self.prepared.labels

    # ------------------------------------------------------------------ loaders (``Loaders`` over ``prepared``)
    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    @property
    def anchors_per_step(self) -> int:
        """Anchors a step on each process: ``batch_size``, or what ``auto`` resolves to."""
        return self.loaders.anchors_per_step(self.num_samples, self.num_clusters, self._world()[0])

    @property
    def full_batch(self) -> bool:
        """Every item is an anchor of every step (one step an epoch)."""
        return self.loaders.full_batch(self.num_samples, self.num_clusters, self._world()[0])

    def train_dataloader(self) -> DataLoader:
        online = (self.dataset, self.prep.augment_tf) if self.views == "online" else None
        return self.loaders.train(self.prepared, self.num_clusters, *self._world(), online=online)

    def val_dataloader(self) -> list[DataLoader]:
        return self.loaders.validation(self.prepared)

    def test_dataloader(self) -> DataLoader:
        return self.loaders.evaluation(self.prepared.val)

    def predict_dataloader(self) -> DataLoader:
        """Cluster assignments are predicted for the dataset's items, prepared as the checkpoint's fit prepared its
        own (any number of rows)."""
        return self.loaders.evaluation(self.prepared.train_eval)
