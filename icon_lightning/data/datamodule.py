"""`ClusteringDataModule`: cached frozen features, a k-NN table, and batches of anchors with their augmented
views and sampled neighbours (I-Con §4: each image with 2 augmentations and 2 nearest neighbours).

It composes small parts: ``FeaturePrep`` (extraction, cache, normalisation), ``NeighbourIndex`` (k-NN table,
degrees, walk pool), ``AnchorDataset``/``AnchorSampler``/``OnlineViews`` (which rows a step draws) and the
collators (``FeatureCollate``, ``OnlineCollate``, ``EvalDataset``). ``setup`` builds one ``PreparedData`` (features,
table, views, anchors, evaluation items; ``prepared``) and ``Loaders`` serves every DataLoader from it. The
constructor is the flat ``--data.*`` config; ``settings.ClusteringData``, assembled from it, owns those parts and
does each hook's work (``data``)."""

from __future__ import annotations

from operator import attrgetter
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.settings import checked_data
from icon_lightning.settings import NonNegativeInt, PositiveInt


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
        is a candidate. They are drawn from the item's k-NN table row, and the item itself when the objective's p
        asks (``data_needs()["neighbours_include_self"]``: SCAN's release).
    batch_size: anchors per step and process; ``auto``: the whole dataset when it fits the paper's 4,096
        anchors (full batch: p and the loss are exact), else 128 anchors per cluster (at most 4,096; the rule is
        ``loaders.auto_anchors``), split evenly between processes.
    k: width of the k-NN table; None → the widest ``KNNGraph`` of the model's objective (at least 3, the paper's),
        so k is set once, in the recipe. walk_steps: sample neighbours among endpoints of 1..walk_steps-step walks
        on the table (the count ``Propagated(steps=…)`` uses).
    normalize: centre by the train mean, then L2-normalise the cached features.
    extract_precision: bf16 autocast (default) or fp32 for extraction on CUDA; the CPU always runs fp32.
    num_clusters: K for the model (linked by the CLI); None → the number of classes (the usual protocol), or
        ``auto`` for data without labels; ``auto``: `icon fit` chooses K with the judge (``models.choose_k``)
        over ``num_clusters_range`` [lo, hi] (None: 2 to min(50, N // 20); ``data.num_clusters``), through the
        declared part ``data.clusters`` (``num_clusters.ClusterCount``: ``needs_search``, ``range``,
        ``features()``, ``resolve``, ``search``, the search's record).
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
        num_clusters: NonNegativeInt | Literal["auto"] | None = None,
        num_clusters_range: tuple[int, int] | None = None,
        evaluate_train: bool = True,
        views_in_memory: bool = False,
    ) -> None:
        super().__init__()
        self.data = checked_data(ClusteringDataModule.__init__, locals())

    # ------------------------------------------------------------------ facts the CLI links into the model
    num_samples = property(attrgetter("data.num_samples"))
    num_classes = property(attrgetter("data.dataset.num_classes"))
    num_clusters = property(attrgetter("data.num_clusters"), doc="K: data.num_clusters, else the number of classes")
    online_backbone = property(attrgetter("data.online_backbone"), doc="The backbone the model must run itself")
    feature_dim = property(attrgetter("data.feature_dim"))
    # ------------------------------------------------------------------ the settings and parts users read
    dataset = property(attrgetter("data.dataset"))
    views = property(attrgetter("data.fit.views"))
    backbone = property(attrgetter("data.backbone"), doc="The frozen feature extractor (Identity for features)")
    prep = property(attrgetter("data.prep"), doc="FeaturePrep: extraction, the feature cache, normalisation")
    preparation = property(attrgetter("data.preparation"), doc="What setup built, and the fit's FitPreparation")
    prepared = property(attrgetter("data.preparation.items"), doc="What setup built (features, table, views, …)")
    train_features = property(attrgetter("data.preparation.items.features"), doc="(N, D) clean train features")
    train_labels = property(attrgetter("data.preparation.items.labels"), doc="(N,) train labels; -1 unlabelled")
    # for the attached Trainer's processes: anchors a step on each (``batch_size``, or what ``auto`` resolves to),
    # and whether every item is an anchor of every step (one step an epoch)
    anchors_per_step = property(lambda self: self.data.anchors_per_step(self.trainer))
    full_batch = property(lambda self: self.data.full_batch(self.trainer))

    # ------------------------------------------------------------------ Lightning's hooks: ``data`` does the work
    def prepare_data(self) -> None:
        self.data.prepare_data(self.trainer)

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage, self.trainer)

    def state_dict(self) -> dict:
        """The fit's ``FitPreparation`` (mean, normalize, D, K): Lightning saves it into every checkpoint."""
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state, self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self.data.train_loader(self.trainer)

    def val_dataloader(self) -> list[DataLoader]:
        return self.data.val_loaders()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_loader()

    def predict_dataloader(self) -> DataLoader:
        """Cluster assignments are predicted for the dataset's items, prepared as the checkpoint's fit prepared its
        own (any number of rows)."""
        return self.data.predict_loader()
