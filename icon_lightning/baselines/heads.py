"""``HeadClusterer``: any objective of the harness (I-Con recipes, SCAN, TEMI) as a scikit-learn estimator.

``fit`` is a real Lightning run: the features become a ``ClusteringDataModule`` (k-NN table, walks, sampled
neighbours, cached under ``cache_dir``) and ``IConModule`` trains H linear heads with the objective; the head
with the lowest training loss is kept (label-free). ``predict`` applies that head to new features.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from torch.optim.lr_scheduler import StepLR

from icon_lightning.callbacks import Convergence, SelfLabel
from icon_lightning.classical.kmeans import _as_features
from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.data.datasets import FeaturesArray
from icon_lightning.loss import Objective
from icon_lightning.models.module import DEFAULT_KEEP_HEADS, DEFAULT_PRUNE_EVERY, IConModule


@dataclass(repr=False, eq=False)
class HeadClusterer(ClusterMixin, BaseEstimator):
    """Train ``num_heads`` cluster heads on (N, D) features with ``loss``; keep the lowest-loss head.

    The defaults are ``icon fit``'s: full batch up to 4,096 anchors (else 4,096 anchors a step, each with
    ``num_neighbours`` sampled neighbours), Adam at ``lr``, and the ``Convergence`` callback: the LR halves on
    training-loss plateaus and the run stops at the third, within a step budget that scales with N (``max_steps``
    'auto'). k / walk_steps: the DataModule's k-NN table width (None: the objective's widest KNNGraph) and walk
    length of the neighbour pool.
    head_init / head_hidden_dim / keep_heads / prune_every: see ``IConModule`` (heads started from k-means; MLP
    heads; the heads pruned by training loss until ``keep_heads`` remain).
    self_label: None, or ``"selected"`` / ``"consensus"``: the ``SelfLabel`` stage after the fit (confident,
    class-balanced pseudo-labels of the selected head, or of a consensus of heads, train the selected head).
    ema_momentum / teacher_candidates: an EMA teacher whose outputs are the candidates (TEMI).
    Features are used as given (centre/normalise first).
    Attributes: labels_ (N,), selected_head_ (a position among the surviving heads), head_ids_ (their numbers),
    head_losses_ (one per surviving head), converged_, steps_, module_ (the ``IConModule``).
    """

    loss: Objective
    n_clusters: int = 10
    num_heads: int = 10
    keep_heads: int | None = DEFAULT_KEEP_HEADS
    prune_every: int = DEFAULT_PRUNE_EVERY
    head_init: list[str] | None = None
    head_hidden_dim: int | None = None
    self_label: str | None = None
    k: int | None = None
    walk_steps: int = 1
    num_neighbours: int = 1
    batch_size: int | str = "auto"
    lr: float = 1e-2
    max_steps: int | str | None = "auto"
    max_epochs: int = -1
    lr_step_size: int | None = None
    lr_gamma: float = 0.5
    ema_momentum: float | None = None
    teacher_candidates: bool = False
    random_state: int = 0
    accelerator: str = "auto"
    cache_dir: str = ".cache/icon_lightning"

    def fit(self, X, y=None) -> HeadClusterer:
        x = _as_features(X)
        if self.self_label not in (None, "selected", "consensus"):
            raise ValueError(f"self_label: expected None, 'selected' or 'consensus', got {self.self_label!r}")
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        L.seed_everything(self.random_state, verbose=False)
        module = self._module(x)
        # a fixed LR schedule is the caller's; without one, Convergence halves the LR on plateaus
        convergence = Convergence(max_steps=self.max_steps, lr_drops=2 if self.lr_step_size is None else 0)
        callbacks = [convergence] + ([SelfLabel(consensus=self.self_label == "consensus")] if self.self_label else [])
        trainer = L.Trainer(
            accelerator=self.accelerator,
            devices=1,
            max_epochs=self.max_epochs,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The run did not converge")  # recorded in converged_ instead
            trainer.fit(module, datamodule=self._data(x))
        self.module_ = module.cpu().eval()
        self.selected_head_ = int(module.selected_head)
        self.head_losses_ = module.head_losses.cpu().numpy()
        self.head_ids_ = module.head_ids.cpu().numpy()
        self.converged_, self.steps_ = convergence.converged, trainer.global_step
        self.labels_ = self.predict(x)
        return self

    def _data(self, x: np.ndarray) -> ClusteringDataModule:
        return ClusteringDataModule(
            FeaturesArray(x),
            views="clean",
            num_views=1,
            num_neighbours=self.num_neighbours,
            k=self.k,
            walk_steps=self.walk_steps,
            normalize=False,
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,
            seed=self.random_state,
            evaluate_train=False,
        )

    def _module(self, x: np.ndarray) -> IConModule:
        step = self.lr_step_size
        return IConModule(
            loss=copy.deepcopy(self.loss),
            feature_dim=x.shape[1],
            num_clusters=self.n_clusters,
            num_samples=len(x),
            num_heads=self.num_heads,
            keep_heads=self.keep_heads,
            prune_every=self.prune_every,
            head_init=self.head_init,
            head_hidden_dim=self.head_hidden_dim,
            optimizer=functools.partial(torch.optim.Adam, lr=self.lr),
            scheduler=None if step is None else functools.partial(StepLR, step_size=step, gamma=self.lr_gamma),
            ema_momentum=self.ema_momentum,
            teacher_candidates=self.teacher_candidates,
        )

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        x = torch.from_numpy(_as_features(X))
        if x.shape[1] != self.module_.hparams.feature_dim:
            raise ValueError(f"X: expected {self.module_.hparams.feature_dim} features, got {x.shape[1]}")
        return self.module_(x)[:, self.selected_head_].softmax(-1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1).astype(np.int64)
