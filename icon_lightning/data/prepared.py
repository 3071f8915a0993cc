"""``PreparedData``: everything a clustering DataModule's ``setup`` builds, as one object handed to the loaders,
and ``prepare``, which builds it: the clean train features, their k-NN table (+ walk pool), the cached views, the
anchors' draw and the evaluation items."""

from __future__ import annotations

import warnings
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


SPREAD_TOL = 1e-4  # centred spread below this fraction of the features' own size counts as none


def check_spread(raw: np.ndarray, mean: np.ndarray, num_clusters: int, where: object) -> None:
    """Features that cannot be split: every row the same (up to ``SPREAD_TOL`` of their size) is an error; a spread
    over fewer directions than ``num_clusters`` is a warning (clusters must then separate within those directions).
    Judged on at most 4,096 evenly spaced rows through a random projection to ``num_clusters`` dimensions, whose
    rank is min(rank, K) almost surely."""
    sample = raw[:: max(1, len(raw) // 4096)].astype(np.float64)
    dims = max(num_clusters, 1)
    projection = np.random.default_rng(0).standard_normal((raw.shape[1], dims))
    size = np.linalg.norm(sample @ projection, 2)
    spread = np.linalg.svd((sample - mean) @ projection, compute_uv=False)
    rank = int((spread > SPREAD_TOL * size).sum()) if size > 0 else 0
    if rank == 0:
        raise ValueError(
            f"{where}: 'features' are constant (every row the same, up to {SPREAD_TOL:g} of their size): "
            "nothing to cluster"
        )
    if rank < num_clusters:
        warnings.warn(
            f"{where}: 'features' vary along only {rank} direction(s), fewer than num_clusters={num_clusters}: "
            "the clusters must separate within them",
            stacklevel=2,
        )


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
    num_clusters: int = 0,
) -> PreparedData:
    """The DataModule's ``PreparedData``: its clean features through ``prep``, a k-NN table of ``width``
    (``NeighbourIndex``, in the feature store's folder), the cached views when ``views`` is ``cached``, and the
    anchors' draw (``AnchorDataset``) of ``num_views`` views and ``num_neighbours`` sampled neighbours."""
    raw = np.asarray(prep.raw(dataset, "clean"), dtype=np.float32)
    mean = raw.mean(0, keepdims=True)
    check_spread(raw, mean, num_clusters, getattr(dataset, "path", type(dataset).__name__))
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
