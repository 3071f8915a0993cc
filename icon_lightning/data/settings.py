"""The DataModule's settings, checked and assembled into its parts (``assemble_data``).

``ClusteringDataModule``'s constructor is the flat, typed ``--data.*`` config users type; what it does is
``ClusteringData``'s: the datasets, the backbone, ``FeaturePrep`` (extraction, cache, normalisation), the fit's
settings (``FitSettings``), ``Loaders`` and the ``Preparation`` (what ``setup`` built; the fit's ``FitPreparation``).
Each of the DataModule's hooks is one of its methods, given the Trainer it runs under (None: none attached)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import numpy as np
from torch.utils.data import DataLoader

from icon_lightning.data.backbones import FrozenBackbone, Identity
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.feature_store import FeatureStore
from icon_lightning.data.loaders import Loaders
from icon_lightning.data.num_clusters import ClusterCount, search_features
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
from icon_lightning.settings import check_arguments

DEFAULT_K = 3  # the paper's k-NN


def check_settings(dataset: IndexedDataset, backbone, views: str, num_clusters, num_views: int | None) -> int:
    """One-line errors for the DataModule's settings that depend on the data or on each other (a setting's own
    limits are its annotation: ``settings.check_arguments``, and `icon` at parse time). K ≤ N is a fit's limit
    (``prepared.check_clusters``, checked when fitting): validate, test and predict take any number of rows. K
    unset without labels is ``auto`` (``num_clusters.ClusterCount``).
    Returns V, the views per anchor (``num_views``, or its default)."""
    if isinstance(num_clusters, int) and num_clusters < 2:
        check_clusters(num_clusters, dataset)
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


def world(trainer) -> tuple[int, int]:
    """(processes, this process's rank) of ``trainer``; (1, 0) when none is attached."""
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def needed_width(trainer) -> int:
    """The widest ``KNNGraph`` the attached model's objective reads, as the model declares it
    (``data_needs()["knn_width"]``); 0 without a model that declares it."""
    model = getattr(trainer, "lightning_module", None)
    return int(model.data_needs().get("knn_width", 0)) if hasattr(model, "data_needs") else 0


def model_needs(trainer) -> dict:
    """What the attached model's objective asks of the data (``data_needs()``); {} without a model that says. Its p
    may declare (``SampledNeighbours``, the peers' released positive): ``sampled_neighbours``, the anchors' sampled
    rows are its positives (kept in full-batch training too), and ``neighbours_include_self``, they are drawn from
    the item itself as well as its k-NN table row."""
    model = getattr(trainer, "lightning_module", None)
    return model.data_needs() if hasattr(model, "data_needs") else {}


@dataclass(frozen=True)
class FitSettings:
    """The settings a fit's preparation reads (``prepare``): its views, the k-NN table, the anchors' draw, and
    whether every process extracts its shard (``distributed_extraction``)."""

    views: str
    view_pool: int
    num_views: int
    num_neighbours: int
    k: int | None
    walk_steps: int
    knn_backend: str
    seed: int
    distributed_extraction: bool
    views_in_memory: bool

    def extraction(self, width: int) -> tuple[int, str, int]:
        """What ``prepare_data`` extracts for a fit: the k-NN table's width and backend, and the cached views."""
        return width, self.knn_backend, self.view_pool * (self.views == "cached")

    def prepare(
        self, prep: FeaturePrep, dataset, val_dataset, width: int, sampled: int, num_clusters: int, self_too=False
    ) -> PreparedData:
        """The fit's ``PreparedData`` (``prepared.prepare``): a table of ``width``, ``sampled`` neighbours an anchor
        (drawn from the item too: ``self_too``)."""
        return prepare(
            prep,
            dataset,
            val_dataset,
            width=width,
            walk_steps=self.walk_steps,
            backend=self.knn_backend,
            views=self.views,
            view_pool=self.view_pool,
            views_in_memory=self.views_in_memory,
            num_views=self.num_views,
            num_neighbours=sampled,
            neighbours_include_self=self_too,
            seed=self.seed,
            num_clusters=num_clusters,
            extract=self.distributed_extraction,
        )


class ClusteringData:
    """What ``ClusteringDataModule`` does, without Lightning: its facts (N, classes, K, D, the backbone the model
    runs itself), its preparation (``prepare_data``, ``setup``, the checkpointed ``FitPreparation``) and its
    loaders (``Loaders`` over the ``Preparation``'s items), each given the Trainer the hook runs under."""

    def __init__(self, dataset, val_dataset, backbone, prep: FeaturePrep, fit: FitSettings, loaders: Loaders, clusters):
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.backbone = backbone  # Identity when the items already are feature vectors
        self.prep = prep
        self.fit = fit
        self.loaders = loaders
        self.clusters: ClusterCount = clusters  # data.num_clusters (None: the number of classes; auto: searched)
        # what ``setup`` builds, and the fit's preparation (this fit's or a checkpoint's)
        self.preparation = Preparation(partial(prepare_evaluation, prep, dataset, val_dataset))

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def num_clusters(self) -> int:
        return self.clusters.value(self.dataset.num_classes)

    @property
    def online_backbone(self) -> FrozenBackbone | None:
        """The backbone the model must run itself: only when views are augmented online."""
        return self.backbone if self.fit.views == "online" else None

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim or int(np.prod(self.dataset[0][0].shape))

    def table_width(self, trainer) -> int:
        """k of the k-NN table: ``k``, or the widest ``KNNGraph`` the attached model's objective reads (at least 3)."""
        return knn_width(self.fit.k, needed_width(trainer))

    def prepare_data(self, trainer) -> None:
        # a fit reads its k-NN table (width, backend) and cached views; validate, test and predict the clean features
        fit = fitting(trainer) and self.fit.extraction(self.table_width(trainer))
        if not self.fit.distributed_extraction:  # Lightning runs this on one process per node, the others waiting
            extract_for(self.prep, self.dataset, self.val_dataset, self.num_clusters, fit or None)

    def setup(self, stage: str | None, trainer) -> None:
        """A fit prepares everything (``prepare``); validate, test and predict prepare their items when a loader
        first asks, after Lightning restored a checkpoint's preparation (``load_state_dict`` runs after ``setup``)."""
        if stage not in (None, "fit"):
            return self.preparation.evaluate()
        needs, sampled = model_needs(trainer), self.fit.num_neighbours
        if not needs.get("sampled_neighbours", False):  # full batch: every neighbour is a candidate already
            sampled = self.loaders.sampled_neighbours(sampled, *self.batching(trainer))
        data, self_too = (self.prep, self.dataset, self.val_dataset), bool(needs.get("neighbours_include_self"))
        self.preparation.fitted_by(
            self.fit.prepare(*data, self.table_width(trainer), sampled, self.num_clusters, self_too)
        )

    def state_dict(self) -> dict:
        """The fit's ``FitPreparation`` (mean, normalize, D, K): Lightning saves it into every checkpoint."""
        return self.preparation.state_dict()

    def load_state_dict(self, state: dict, trainer) -> None:
        """A checkpoint's ``FitPreparation``: this data is prepared as its fit's was, or one line if it cannot be."""
        self.preparation.load_state_dict(state, self.feature_dim, self.num_clusters, trainer, source(self.dataset))

    def batching(self, trainer) -> tuple[int, int, int]:
        """(N, K, processes): what the anchors a step depend on."""
        return self.num_samples, self.num_clusters, world(trainer)[0]

    def anchors_per_step(self, trainer) -> int:
        """Anchors a step on each process: ``batch_size``, or what ``auto`` resolves to."""
        return self.loaders.anchors_per_step(*self.batching(trainer))

    def full_batch(self, trainer) -> bool:
        """Every item is an anchor of every step (one step an epoch)."""
        return self.loaders.full_batch(*self.batching(trainer))

    def train_loader(self, trainer) -> DataLoader:
        online = (self.dataset, self.prep.augment_tf) if self.fit.views == "online" else None
        return self.loaders.train(self.preparation.items, self.num_clusters, *world(trainer), online=online)

    def val_loaders(self) -> list[DataLoader]:
        return self.loaders.validation(self.preparation.items)

    def test_loader(self) -> DataLoader:
        return self.loaders.evaluation(self.preparation.items.val)

    def predict_loader(self) -> DataLoader:
        return self.loaders.evaluation(self.preparation.items.train_eval)


def assemble_data(settings: dict) -> ClusteringData:
    """``ClusteringDataModule``'s constructor arguments (``settings``, by name; their annotations already checked)
    checked against the data and each other (``check_settings``) and assembled into its parts."""
    s = SimpleNamespace(**settings)
    num_views = check_settings(s.dataset, s.backbone, s.views, s.num_clusters, s.num_views)
    backbone = s.backbone if s.backbone is not None else Identity()
    prep = FeaturePrep(
        FeatureStore(s.cache_dir),
        backbone,
        s.backbone is not None,
        s.image_size,
        s.grayscale_to_rgb,
        s.normalize,
        seed=s.seed,
        batch_size=s.extract_batch_size,
        num_workers=s.num_workers,
        precision=s.extract_precision,
    )
    fit = FitSettings(
        views=s.views,
        view_pool=s.view_pool,
        num_views=num_views,
        num_neighbours=s.num_neighbours,
        k=s.k,
        walk_steps=s.walk_steps,
        knn_backend=s.knn_backend,
        seed=s.seed,
        distributed_extraction=s.distributed_extraction,
        views_in_memory=s.views_in_memory,
    )
    loaders = Loaders(s.batch_size, s.val_batch_size, s.num_workers, s.seed, s.evaluate_train)
    clusters = ClusterCount.of(
        s.num_clusters, s.num_clusters_range, s.dataset, partial(search_features, prep, s.dataset)
    )
    return ClusteringData(s.dataset, s.val_dataset, backbone, prep, fit, loaders, clusters)


def checked_data(init, arguments: dict) -> ClusteringData:
    """The parts of a DataModule whose constructor ``init`` got ``arguments`` (its ``locals()``): each setting's
    own limits checked first (its annotation: ``settings.check_arguments``), then ``assemble_data``."""
    check_arguments(init, arguments)
    return assemble_data(arguments)
