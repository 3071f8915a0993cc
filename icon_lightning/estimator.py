"""``HeadClusterer``: ``icon fit`` as a scikit-learn estimator, for I-Con's recipes and the peers' (SCAN, TEMI).

``fit(X)`` is README's first command on X, built by the one builder (``icon_lightning.cli.assemble``): X is written
once, content-addressed, as a features file under ``cache_dir``, and the run is ``icon fit --config <config>
--data.dataset FeaturesFile --data.dataset.path <file> --data.views clean`` plus the estimator's settings (seed,
cluster count, cache, device; no logger, no checkpoints, the run's folder in a temporary directory) and then
``overrides``, the CLI's own ``--key=value`` words. So a benchmark row, this estimator and a user's ``icon fit``
on the same file and seed are one computation. An ablation or a peer's protocol is a recipe or an override, never
Python that rebuilds the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin

from icon_lightning.classical.kmeans import _as_features
from icon_lightning.cli import assemble, features_command
from icon_lightning.data.neighbours import centred_unit_rows
from icon_lightning.io import atomic_write


def features_file(x: np.ndarray, folder: Path) -> Path:
    """``x`` as ``folder/<sha256 of its bytes>.npz`` (written once, atomically; later fits of the same array reuse
    the file, so its feature cache and k-NN table are found again)."""
    digest = hashlib.sha256(np.ascontiguousarray(x).view(np.uint8)).hexdigest()[:24]
    path = folder / f"{digest}-{x.shape[0]}x{x.shape[1]}.npz"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, features=x), binary=True)
    return path


def quiet(on: bool = True) -> contextlib.AbstractContextManager:
    """A run without its printed output, progress bars, Lightning's info lines and the did-not-converge warning
    (the estimator records it in ``converged_``)."""
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", "The run did not converge")
    lightning_log = logging.getLogger("lightning.pytorch")
    stack.callback(lightning_log.setLevel, lightning_log.level)
    lightning_log.setLevel(logging.WARNING)
    return stack


@dataclass(repr=False, eq=False)
class HeadClusterer(ClusterMixin, BaseEstimator):
    """``icon fit`` with ``config`` (a recipe name or YAML path) and ``overrides`` on (N, D) features (module doc).

    Every default is ``icon fit``'s: the features are centred and L2-normalised, full batch up to 4,096 anchors
    (else 128 per cluster), 10 heads pruned by training loss to one, Adam 1e-2 halved on training-loss plateaus
    until the third (``Convergence``). ``random_state`` seeds the run (``seed_everything``) and the DataModule's
    sampling (``data.seed``); ``n_clusters`` is ``data.num_clusters``. ``run_root``: where the run's folder goes
    (None: a temporary directory, removed after ``fit``). ``verbose``: show the run's output.
    Attributes: labels_ (N,), selected_head_ (a position among the surviving heads), head_ids_ (their numbers),
    head_losses_, converged_, steps_, record_ (the run's ``metrics.json``), mean_ (the centring mean, None
    without normalisation), module_ (the ``IConModule``, on the CPU).
    """

    config: str = "icon_clustering"
    overrides: Sequence[str] = field(default_factory=tuple)
    n_clusters: int = 10
    random_state: int = 0
    accelerator: str = "cpu"
    cache_dir: str = ".cache/icon_lightning"
    run_root: str | None = None
    verbose: bool = False

    def command(self, path: Path, root: str) -> list[str]:
        """The `icon` words of the fit on the features file ``path`` (the run's folder under ``root``)."""
        return [
            *features_command(path, self.config),
            f"--seed_everything={self.random_state}",
            f"--data.seed={self.random_state}",
            f"--data.num_clusters={self.n_clusters}",
            f"--data.cache_dir={self.cache_dir}",
            f"--trainer.accelerator={self.accelerator}",
            "--trainer.devices=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            *self.overrides,
        ]

    def fit(self, X, y=None) -> HeadClusterer:
        """Cluster X (labels, if given, are ignored: nothing here reads them)."""
        x = _as_features(X)
        path = features_file(x, Path(self.cache_dir) / "estimator")
        with tempfile.TemporaryDirectory(prefix="icon-estimator-") as tmp, quiet(not self.verbose):
            run = assemble(self.command(path, self.run_root or tmp)).execute()
        model, data = run.model.cpu().eval(), run.datamodule
        self.record_, self.module_ = run.record, model
        self.mean_ = x.mean(0, keepdims=True) if data.prep.normalize else None
        self.selected_head_ = int(model.selected_head)
        self.head_losses_ = model.head_losses.cpu().numpy()
        self.head_ids_ = model.head_ids.cpu().numpy()
        convergence = run.record["convergence"] or {}
        self.converged_, self.steps_ = bool(convergence.get("converged")), int(run.record["steps"])
        self.labels_ = model.assign(data.train_features.float()).numpy().astype(np.int64)
        return self

    def _prepared(self, X) -> torch.Tensor:
        x = _as_features(X)
        if x.shape[1] != self.module_.hparams.feature_dim:
            raise ValueError(f"X: expected {self.module_.hparams.feature_dim} features, got {x.shape[1]}")
        return torch.from_numpy(x if self.mean_ is None else centred_unit_rows(x, self.mean_))

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """(N, K) probabilities of the selected head, X prepared as the fit's features were (the fit's mean)."""
        return self.module_.selected(self._prepared(X)).softmax(-1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1).astype(np.int64)
