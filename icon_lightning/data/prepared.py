"""``PreparedData``: everything a clustering DataModule's ``setup`` builds, as one object handed to the loaders,
and ``prepare``, which builds it: the clean train features, their k-NN table (+ walk pool), the cached views, the
anchors' draw and the evaluation items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from icon_lightning.data.collate import EvalDataset
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.neighbours import NeighbourIndex, label_agreement
from icon_lightning.data.prepare import FeaturePrep
from icon_lightning.data.sampling import AnchorDataset


@dataclass(frozen=True)
class PreparedData:
    """Everything ``setup`` builds, handed on as one object: the clean train ``features`` (N, D) and ``labels``
    (N,; -1 unlabelled), the k-NN ``table`` (N, k) and ``degree`` (N,), the cached ``views`` (N, P, D; None unless
    views are cached), the ``anchors``' draw, the train items for evaluation (``train_eval``) and the items
    validation scores (``val``: the val split, or the train items again), and the k-NN label agreement (a
    diagnostic; None without labels)."""

    features: Tensor
    labels: Tensor
    table: Tensor
    degree: Tensor
    views: Tensor | np.ndarray | None
    anchors: AnchorDataset
    train_eval: EvalDataset
    val: EvalDataset
    knn_agreement: float | None = None


def prepare(
    prep: FeaturePrep,
    dataset: IndexedDataset,
    val_dataset: IndexedDataset | None,
    *,
    width: int,
    walk_steps: int,
    backend: str,
    views: str,
    view_pool: int,
    views_in_memory: bool,
    num_views: int,
    num_neighbours: int,
    seed: int,
) -> PreparedData:
    """The DataModule's ``PreparedData``: its clean features through ``prep``, a k-NN table of ``width``
    (``NeighbourIndex``, in the feature store's folder), the cached views when ``views`` is ``cached``, and the
    anchors' draw (``AnchorDataset``) of ``num_views`` views and ``num_neighbours`` sampled neighbours."""
    raw = np.asarray(prep.raw(dataset, "clean"), dtype=np.float32)
    mean = raw.mean(0, keepdims=True)
    clean = prep.prepared(raw, mean)
    table = NeighbourIndex.build(clean, width, walk_steps, prep.store.root, backend)
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    agreement = None
    if (labels >= 0).all():
        agreement = label_agreement(table.table.numpy(), dataset.labels)  # diagnostic only
        rank_zero_info(
            f"{table.table.shape[1]}-NN label agreement of the train features: {agreement:.3f} "
            "(diagnostic; labels never train)"
        )
    cached = views == "cached"
    view_features = prep.views(dataset, view_pool, mean, views_in_memory) if cached else None
    draw = AnchorDataset(len(clean), table.pool, num_views, view_pool if cached else 0, num_neighbours, seed)
    features = torch.from_numpy(clean)
    train_eval = EvalDataset(features, labels, table.table, table.degree)
    val = train_eval
    if val_dataset is not None:
        val_x = prep.prepared(prep.raw(val_dataset, "clean"), mean)
        val = EvalDataset(torch.from_numpy(val_x), torch.as_tensor(val_dataset.labels), None, None)
    return PreparedData(features, labels, table.table, table.degree, view_features, draw, train_eval, val, agreement)
