"""``PreparedData``: everything a clustering DataModule's ``setup`` builds, as one object handed to the loaders,
and ``prepare``, which builds it for a fit: the clean train features, their k-NN table (+ walk pool), the cached
views, the anchors' draw and the evaluation items. ``FitPreparation``: how the fit prepared its features (its
centring mean, ``normalize``, D, K), saved in its checkpoints, so that ``prepare_evaluation`` prepares any other data
(a new file, a single row) for validate, test and predict exactly as the fit prepared its own."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from icon_lightning.data.collate import EvalDataset
from icon_lightning.data.datasets import IndexedDataset
from icon_lightning.data.neighbours import NeighbourIndex, NeighbourTable, centred_unit_rows, label_agreement
from icon_lightning.data.prepare import FeaturePrep
from icon_lightning.data.sampling import AnchorDataset


def source(dataset: IndexedDataset) -> str:
    """The data's name in messages: its path, or its class."""
    return str(getattr(dataset, "path", type(dataset).__name__))


def fitting(trainer) -> bool:
    """Whether the Trainer (None: none attached, as in a script that prepares data itself) is fitting."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return fn is None or fn == "fit"


def check_clusters(num_clusters: int, dataset: IndexedDataset, width: int | None = None) -> None:
    """A fit needs 2 ≤ K ≤ N and, with a k-NN table of ``width`` k, N ≥ k + 2: with N ≤ k + 1 every row's
    neighbours are all the other rows, p says nothing and every loss is 0 (validate, test and predict take any
    number of rows: K is the checkpoint's)."""
    if not 2 <= num_clusters <= len(dataset):
        raise ValueError(
            f"num_clusters: expected 2 ≤ K ≤ N = {len(dataset)} items (or null for the number of classes), "
            f"got {num_clusters}"
        )
    if width is not None and len(dataset) <= width + 1:
        raise ValueError(
            f"data: {source(dataset)} has {len(dataset)} rows; a fit with a "
            f"{width}-NN table needs at least {width + 2} (with N ≤ k + 1 every row's neighbours are all the others: "
            "nothing to learn)"
        )


@dataclass(frozen=True, eq=False)
class FitPreparation:
    """How a fit prepared its features, saved in its checkpoints as the DataModule's state (Lightning's
    ``LightningDataModule.state_dict``): ``mean`` (1, D) float32, the train mean it centred by (None without
    ``normalize``), ``normalize`` (centre, then unit rows), ``feature_dim`` D, ``num_clusters`` K and ``data`` (what it
    was fitted on, for messages). ``apply`` prepares other rows (any number, one included) alike."""

    mean: np.ndarray | None
    normalize: bool
    feature_dim: int
    num_clusters: int
    data: str

    def apply(self, raw: np.ndarray, where: object = "data") -> np.ndarray:
        """(N, D) float32 rows prepared as the fit's were: centred by its mean and L2-normalised, or as given; rows
        of another D are one line naming ``where``."""
        if raw.shape[1:] != (self.feature_dim,):
            raise ValueError(
                f"{where}: rows of {raw.shape[1] if raw.ndim == 2 else raw.shape[1:]} features, but the fit's data "
                f"({self.data}) has {self.feature_dim}; expected the same features"
            )
        if not self.normalize:
            return np.array(raw, dtype=np.float32)
        return centred_unit_rows(raw, self.mean)

    def state_dict(self) -> dict:
        """Tensors and plain values only (Lightning and the CLI read checkpoints with ``weights_only=True``)."""
        mean = None if self.mean is None else torch.from_numpy(np.asarray(self.mean, dtype=np.float32))
        return {"mean": mean, "normalize": self.normalize, "feature_dim": self.feature_dim,
                "num_clusters": self.num_clusters, "data": self.data}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> FitPreparation:
        mean = state["mean"]
        mean = None if mean is None else mean.cpu().numpy().astype(np.float32).reshape(1, -1)
        return cls(mean, bool(state["normalize"]), int(state["feature_dim"]), int(state["num_clusters"]), state["data"])

    def check(self, feature_dim: int, num_clusters: int | None, ckpt: object, data: str) -> FitPreparation:
        """This preparation, or one line naming the checkpoint and the data when they do not match."""
        check_fits(ckpt, self.data, data, self.feature_dim, feature_dim, self.num_clusters, num_clusters)
        return self


def check_fits(ckpt, fitted_on: str, data: str, fit_dim: int, dim: int, fit_k: int, k: int | None) -> None:
    """One line when a checkpoint (fitted on ``fitted_on``: ``fit_dim`` features, ``fit_k`` clusters) does not
    match the data (``dim`` features; ``k`` clusters asked for, None: any)."""
    if fit_dim != dim:
        raise ValueError(
            f"ckpt_path: {ckpt} was fitted on {fit_dim} features ({fitted_on}), but {data} has {dim} features"
        )
    if k is not None and fit_k != k:
        raise ValueError(
            f"ckpt_path: {ckpt} has K = {fit_k} clusters (fitted on {fitted_on}), but data.num_clusters is {k} for "
            f"{data}; leave data.num_clusters unset (null) to take the checkpoint's K"
        )


def check_checkpoint(checkpoint: dict, feature_dim: int, num_clusters: int, trainer) -> None:
    """Before a module's weights load (its ``on_load_checkpoint``): a ``checkpoint`` whose heads were built for
    other D or K than the module's (``feature_dim``, ``num_clusters``: linked from the data) is one line naming the
    checkpoint (``trainer.ckpt_path``) and the data (the trainer's DataModule's), not a ``state_dict`` size
    mismatch."""
    saved = checkpoint.get("hyper_parameters", {})
    if "feature_dim" not in saved or "num_clusters" not in saved:
        return
    state, dataset = checkpoint.get(STATE_KEY) or {}, getattr(getattr(trainer, "datamodule", None), "dataset", None)
    fitted_on = state.get("data", "its fit's data")
    data = source(dataset) if dataset is not None else "the data"
    ckpt = getattr(trainer, "ckpt_path", None) or "the checkpoint"
    if not state and dataset is not None and not fitting(trainer):
        rank_zero_warn(
            f"ckpt_path: {ckpt} holds no fit preparation (saved before it was kept): {data} is centred by its own "
            "mean, not the fit's, so its labels may differ from the fit's"
        )
    check_fits(ckpt, fitted_on, data, int(saved["feature_dim"]), feature_dim, int(saved["num_clusters"]), num_clusters)


STATE_KEY = "ClusteringDataModule"  # where Lightning saves the DataModule's state in a checkpoint (its class name)


def saved_preparation(ckpt: str | Path | dict | None) -> FitPreparation | None:
    """The ``FitPreparation`` a checkpoint (a file, or its loaded dict) holds (None: no file, or a checkpoint from
    before it was saved)."""
    if not isinstance(ckpt, dict) and (not ckpt or not Path(ckpt).is_file()):
        return None
    checkpoint = ckpt if isinstance(ckpt, dict) else torch.load(ckpt, map_location="cpu", weights_only=True)
    state = checkpoint.get(STATE_KEY)
    return FitPreparation.from_state(state) if state else None


@dataclass(frozen=True)
class PreparedData:
    """Everything ``setup`` builds, handed on as one object: the clean train ``features`` (N, D) and ``labels``
    (N,; -1 unlabelled), the k-NN ``table`` (N, k) and ``degree`` (N,), the cached ``views`` (N, P, D; None unless
    views are cached), the ``anchors``' draw, the train items for evaluation (``train_eval``) and the items
    validation scores (``val``: the val split, or the train items again), the k-NN label agreement (a
    diagnostic; None without labels) and the ``fitted`` preparation the features went through. Prepared for
    evaluation only (``prepare_evaluation``), there is no ``table``, ``degree``, ``views`` or ``anchors`` (None):
    nothing trains."""

    features: Tensor
    labels: Tensor
    table: Tensor | None
    degree: Tensor | None
    views: Tensor | np.ndarray | None
    anchors: AnchorDataset | None
    train_eval: EvalDataset
    val: EvalDataset
    knn_agreement: float | None = None
    fitted: FitPreparation | None = None


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
    neighbours_include_self: bool = False,
    num_clusters: int = 0,
    extract: bool = False,
) -> PreparedData:
    """The DataModule's ``PreparedData`` for a fit: its clean features through ``prep``, a k-NN table of ``width``
    (``NeighbourIndex``, in the feature store's folder), the cached views when ``views`` is ``cached``, the
    anchors' draw (``AnchorDataset``) of ``num_views`` views and ``num_neighbours`` sampled neighbours, and the
    ``FitPreparation`` (the train mean, ``prep.normalize``, D, ``num_clusters``) its checkpoints keep. ``extract``:
    every rank extracts its shard first (``distributed_extraction``), after K is checked."""
    check_clusters(num_clusters, dataset, width)
    if extract:
        prep.extract_all(dataset, view_pool if views == "cached" else 0, val_dataset)
    raw = np.asarray(prep.raw(dataset, "clean"), dtype=np.float32)
    mean = raw.mean(0, keepdims=True)
    check_spread(raw, mean, num_clusters, source(dataset))
    fitted = FitPreparation(
        mean if prep.normalize else None, prep.normalize, raw.shape[1], num_clusters, source(dataset)
    )
    clean = fitted.apply(raw)
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
    pool = np.concatenate([np.arange(len(clean))[:, None], table.pool], 1) if neighbours_include_self else table.pool
    draw = AnchorDataset(len(clean), pool, num_views, view_pool if cached else 0, num_neighbours, seed)
    features = torch.from_numpy(clean)
    train_eval = EvalDataset(features, labels, table.table, table.degree)
    val = train_eval
    if val_dataset is not None:
        val_x = fitted.apply(prep.raw(val_dataset, "clean"), f"data.val_dataset: {source(val_dataset)}")
        val = EvalDataset(torch.from_numpy(val_x), torch.as_tensor(val_dataset.labels), None, None)
    return PreparedData(
        features, labels, table.table, table.degree, view_features, draw, train_eval, val, agreement, fitted
    )


def prepare_evaluation(
    prep: FeaturePrep,
    dataset: IndexedDataset,
    val_dataset: IndexedDataset | None,
    fitted: FitPreparation | None,
    reuse: PreparedData | None = None,
    num_clusters: int = 0,
) -> PreparedData:
    """The items validate, test and predict read, prepared as ``fitted`` (a checkpoint's ``FitPreparation``; None:
    an untrained model, their own train mean) prepared its fit's: any number of rows, one included, with no k-NN
    table (evaluation reads none). ``reuse``: what this DataModule prepared last, kept when ``fitted`` prepared it
    (the validation that follows a fit in the same process keeps the fit's items, table included)."""
    if reuse is not None and fitted is not None and reuse.fitted is fitted:
        return reuse
    raw = np.asarray(prep.raw(dataset, "clean"), dtype=np.float32)
    if fitted is None:
        mean = raw.mean(0, keepdims=True) if prep.normalize else None
        fitted = FitPreparation(mean, prep.normalize, raw.shape[1], num_clusters, source(dataset))
    features = torch.from_numpy(fitted.apply(raw))
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    train_eval = val = EvalDataset(features, labels, None, None)
    if val_dataset is not None:
        val_x = fitted.apply(prep.raw(val_dataset, "clean"), f"data.val_dataset: {source(val_dataset)}")
        val = EvalDataset(torch.from_numpy(val_x), torch.as_tensor(val_dataset.labels, dtype=torch.long), None, None)
    return PreparedData(features, labels, None, None, None, None, train_eval, val, None, fitted)


def extract_for(
    prep: FeaturePrep, dataset: IndexedDataset, val_dataset, num_clusters: int, fit: tuple[int, str, int] | None
) -> None:
    """``prepare_data`` on one process. For a fit (``fit``: the k-NN table's width and backend, and the cached views
    a fit reads): its K checked, then every view it reads and its k-NN table (in the feature store's folder); for
    validate, test and predict (``fit`` None) the clean features only (no views, no table)."""
    if fit is None:
        return prep.extract_all(dataset, 0, val_dataset, False)
    width, backend, view_pool = fit
    check_clusters(num_clusters, dataset, width)
    prep.extract_all(dataset, view_pool, val_dataset, False)
    NeighbourTable.in_folder(prep.prepared(prep.raw(dataset, "clean")), width, prep.store.root, backend)


class Preparation:
    """What a DataModule prepared (``items``, a ``PreparedData``) and the ``fitted`` preparation (this process's fit
    or a checkpoint's), with one owner. A fit's items come from ``prepare`` (``fitted_by``); evaluation items are
    built by ``evaluate(build)`` only when first asked for, because Lightning restores a checkpoint's state
    (``load_state_dict``) after ``setup``. ``state_dict`` is what Lightning saves into checkpoints."""

    def __init__(self, evaluation: Callable[..., PreparedData]) -> None:
        self._items: PreparedData | Callable[[], PreparedData] | None = None
        self.fitted: FitPreparation | None = None
        self.evaluation = evaluation  # (fitted, last items) → evaluation items: ``prepare_evaluation`` of the data

    def fitted_by(self, items: PreparedData) -> None:
        self._items, self.fitted = items, items.fitted

    def evaluate(self) -> None:
        """Evaluation items, built on first use by ``evaluation(fitted, last items)`` (the fitted preparation then
        known: a checkpoint's, this process's fit's, or None)."""
        last = self._items if isinstance(self._items, PreparedData) else None
        self._items = lambda: self.evaluation(self.fitted, last)

    @property
    def items(self) -> PreparedData:
        if callable(self._items):
            self._items = self._items()
        if self._items is None:
            raise RuntimeError("ClusteringDataModule: nothing prepared yet; call setup() first (the Trainer does)")
        return self._items

    def state_dict(self) -> dict:
        return self.fitted.state_dict() if self.fitted is not None else {}

    def load_state_dict(self, state: dict, feature_dim: int, num_clusters: int | None, trainer, data: str) -> None:
        """A checkpoint's ``FitPreparation`` (the checkpoint: ``trainer.ckpt_path``) for data of ``feature_dim`` and
        ``num_clusters``; one line naming the checkpoint and ``data`` when they do not match."""
        ckpt = getattr(trainer, "ckpt_path", None)
        saved = FitPreparation.from_state(state).check(feature_dim, num_clusters, ckpt, data)
        if not (fitting(trainer) and self.fitted is not None):  # a resumed fit keeps what its features went through
            self.fitted = saved
