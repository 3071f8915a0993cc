"""Feature preparation: extract once through the frozen backbone into the feature store, then centre by the train
mean and L2-normalise (the clean features, the cached augmented views and the validation features alike)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.feature_store import FeatureStore, cached_features, shared_views
from icon_lightning.data.neighbours import centred_unit_rows
from icon_lightning.data.transforms import augment_transform, eval_transform
from icon_lightning.distributed import rank_zero_first


class FeaturePrep:
    """Cached features of a dataset's views: ``clean`` (eval transform) and ``aug0..aug{P-1}`` (augmented).

    images: the datasets hold images (a backbone extracts them); otherwise items are feature vectors.
    normalize: centre by the train mean, then L2-normalise; otherwise features are used as extracted.
    """

    def __init__(
        self,
        store: FeatureStore,
        backbone: FrozenBackbone,
        images: bool,
        image_size: int = 224,
        grayscale_to_rgb: bool = False,
        normalize: bool = True,
        **extract,
    ) -> None:
        self.store, self.backbone, self.normalize, self.extract = store, backbone, normalize, extract
        norm = backbone.normalization  # the (mean, std) the backbone's weights were trained with
        self.eval_tf = eval_transform(image_size, *norm, grayscale_to_rgb=grayscale_to_rgb) if images else None
        self.augment_tf = augment_transform(image_size, *norm, grayscale_to_rgb=grayscale_to_rgb) if images else None

    def raw(self, dataset: IndexedDataset, view: str, distributed: bool = True) -> np.ndarray:
        """(N, D) features of ``view``, extracted once and then read from the store (memory-mapped);
        ``distributed=False`` where only this process runs (``prepare_data``)."""
        transform = self.eval_tf if view == "clean" else self.augment_tf
        return cached_features(
            self.store, self.backbone, dataset, transform, view=view, distributed=distributed, **self.extract
        )

    def extract_all(
        self, dataset: IndexedDataset, view_pool: int, val_dataset: IndexedDataset | None, distributed: bool = True
    ) -> None:
        """Every view the run reads, in the store; ``distributed``: every rank runs this (each extracts a shard)."""
        self.raw(dataset, "clean", distributed)
        for v in range(view_pool):
            self.raw(dataset, f"aug{v}", distributed)
        if val_dataset is not None:
            self.raw(val_dataset, "clean", distributed)

    def prepared(self, features: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        """(N, D) float32: centred by ``mean`` (None: their own mean) and unit rows, or a writable copy as given."""
        if not self.normalize:
            return np.array(features, dtype=np.float32)  # a writable copy of the read-only cache
        return centred_unit_rows(features, mean)

    def views(self, dataset: IndexedDataset, view_pool: int, mean: np.ndarray, in_memory: bool) -> torch.Tensor:
        """(P, N, D) prepared cached views: one float16 memory map shared by the node's processes (rank 0 writes
        it; the others wait, then map it), or with ``in_memory`` a float32 copy in each process."""
        raws = [self.raw(dataset, f"aug{v}") for v in range(view_pool)]
        if in_memory:
            return torch.stack([torch.from_numpy(self.prepared(raw, mean)) for raw in raws])
        mean = mean if self.normalize else None
        views = rank_zero_first(lambda: shared_views(self.store.root, raws, mean))  # the others then open the map
        with warnings.catch_warnings():  # read-only on purpose: batches copy the rows they gather
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(views)
