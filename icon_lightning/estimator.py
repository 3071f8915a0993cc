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
import numbers
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from icon_lightning.cli import AssembledRun, assemble, features_command
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


K_AT_LEAST_2 = "sets n_clusters=1; I-Con's cluster likelihood needs K >= 2, so fit refuses it (n_clusters: expected …)"
EXPECTED_FAILED_CHECKS = {
    check: K_AT_LEAST_2
    for check in (
        "check_dont_overwrite_parameters",
        "check_fit2d_predict1d",
        "check_fit2d_1feature",
        "check_methods_subset_invariance",
    )
}
"""scikit-learn's ``check_estimator`` checks that ``HeadClusterer`` fails, each with its reason (pass it as
``check_estimator(..., expected_failed_checks=EXPECTED_FAILED_CHECKS)``): each forces ``n_clusters=1``."""


def one_line(error: BaseException) -> str:
    """``error``'s message on one line, without the array dumps scikit-learn appends (``array=[…]``)."""
    return " ".join(re.sub(r"array=\[.*?\]\.?", "", str(error), flags=re.DOTALL).split())


def checked_features(estimator: BaseEstimator, X, reset: bool) -> np.ndarray:
    """X as C-ordered float32 (N, D) features through scikit-learn's ``validate_data`` (``reset``: the fit's X,
    which sets ``n_features_in_`` and needs N ≥ 2; else its feature count is checked against it). Sparse or complex
    X, NaN, inf, a wrong shape: a ``ValueError`` / ``TypeError`` of one line naming X."""
    try:
        if sparse.issparse(X):
            raise TypeError(f"sparse input is not supported: expected a dense (N, D) array, got {type(X).__name__}")
        if np.iscomplexobj(X):
            raise ValueError("Complex data not supported: expected real (N, D) features, got complex values")
        return validate_data(estimator, X, reset=reset, dtype=np.float32, order="C", ensure_min_samples=1 + reset)
    except (TypeError, ValueError) as error:
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f"X: {one_line(error)}") from None


def assembled(argv: list[str]) -> AssembledRun:
    """``assemble(argv)``, where a config that does not parse raises ``ValueError`` with `icon`'s one line
    (``icon: error: …``) instead of the command's ``SystemExit(2)``; what the parse wrote to stderr is kept."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return assemble(argv)
    except SystemExit as end:
        lines = [line for line in said.getvalue().splitlines() if line.startswith("icon: error:")]
        raise ValueError(lines[-1] if lines else f"icon: error: exit status {end.code}") from None
    finally:
        sys.stderr.write(said.getvalue())


def executed(run: AssembledRun) -> AssembledRun:
    """``run.execute()``; a fit `icon` ends with ``SystemExit`` after writing its record (Ctrl-C: 130, SIGTERM:
    143) raises ``KeyboardInterrupt`` / ``RuntimeError`` instead, so a notebook's kernel goes on."""
    try:
        return run.execute()
    except SystemExit as end:
        stop = KeyboardInterrupt if end.code == 130 else RuntimeError
        raise stop(f"icon fit: interrupted (exit status {end.code}); its record is in {run.run_dir}") from None


class HeadClusterer(ClusterMixin, BaseEstimator):
    """``icon fit`` with ``config`` (a recipe name or YAML path) and ``overrides`` on (N, D) features (module doc).

    Every default is ``icon fit``'s: the features are centred and L2-normalised, full batch up to 4,096 anchors
    (else 128 per cluster), 10 heads (the k-means and spectral starts kept, the random heads halved by training
    loss to one, the judge choosing among the three), Adam 1e-2 halved on training-loss plateaus until the third
    (``Convergence``). ``n_clusters`` is ``data.num_clusters`` (an integer, 2 ≤ K ≤ N, or ``"auto"``:
    the judge chooses K, ``models.choose_k``; ``n_clusters_`` is the fit's K, ``record_["num_clusters_search"]``
    what the search tried).
    ``random_state`` gives the run's seed (``seed_everything`` and the DataModule's sampling, ``data.seed``) as in
    scikit-learn: an int is the seed itself; a ``numpy.random.RandomState`` gives one drawn seed per fit; None a
    fresh seed each fit (so two fits differ; ``seed_`` says which seed a fit used). ``run_root``: where the run's
    folder goes (None: a temporary directory, removed after ``fit``). ``verbose``: show the run's output.
    X is checked (dense, real, finite, N ≥ 2) before anything is written to ``cache_dir``; every refusal, a wrong
    override included, is an exception with one line (an override `icon` does not parse: ``icon: error: …``).
    Attributes: labels_ (N,), n_features_in_ (D), seed_, selected_head_ (the selected head's number),
    head_ids_ (their numbers), head_losses_, converged_, steps_, record_ (the run's ``metrics.json``), mean_ (the
    centring mean, None without normalisation), preparation_ (the fit's ``FitPreparation``: mean, normalisation, D,
    K), module_ (the ``IConModule``, on the CPU).
    """

    def __init__(
        self,
        config: str | Path = "icon_clustering",
        overrides: Sequence[str] = (),
        n_clusters: int | str = 10,
        random_state=0,
        accelerator: str = "cpu",
        cache_dir: str = ".cache/icon_lightning",
        run_root: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.config, self.overrides, self.n_clusters, self.random_state = config, overrides, n_clusters, random_state
        self.accelerator, self.cache_dir, self.run_root, self.verbose = accelerator, cache_dir, run_root, verbose

    def command(self, path: Path, root: str, n_clusters: int | str, seed: int) -> list[str]:
        """The `icon` words of the fit on the features file ``path`` (the run's folder under ``root``)."""
        return [
            *features_command(path, self.config),
            f"--seed_everything={seed}",
            f"--data.seed={seed}",
            f"--data.num_clusters={n_clusters}",
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
        x = checked_features(self, X, reset=True)
        n_clusters, seed = checked_settings(self, len(x))
        path = features_file(x, Path(self.cache_dir) / "estimator")
        with tempfile.TemporaryDirectory(prefix="icon-estimator-") as tmp, quiet(not self.verbose):
            run = executed(assembled(self.command(path, self.run_root or tmp, n_clusters, seed)))
        model, data = run.model.cpu().eval(), run.datamodule
        self.record_, self.module_, self.seed_ = run.record, model, seed
        self.n_clusters_ = int(data.num_clusters)  # n_clusters, or what ``auto`` chose
        self.preparation_ = data.preparation.fitted  # the fit's own: what `icon predict` applies from a checkpoint
        self.mean_ = self.preparation_.mean
        self.head_ids_ = np.array(run.record["heads"], dtype=np.int64)
        self.head_losses_ = np.array(run.record["head_losses"], dtype=np.float32)
        self.selected_head_ = int(run.record["selected_head"])  # a head's number, as everywhere
        convergence = run.record["convergence"] or {}
        self.converged_, self.steps_ = bool(convergence.get("converged")), int(run.record["steps"])
        self.labels_ = model.assign(data.train_features.float()).numpy().astype(np.int64)
        return self

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """(N, K) probabilities of the selected head, X prepared as the fit's features were (``preparation_``, the
        fit's mean: the computation `icon predict` makes with the fit's checkpoint)."""
        check_is_fitted(self)
        x = self.preparation_.apply(checked_features(self, X, reset=False), "X")
        return self.module_.selected(torch.from_numpy(x)).softmax(-1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1).astype(np.int64)


def checked_settings(estimator: HeadClusterer, n: int) -> tuple[int | str, int]:
    """(K, the run's seed) from ``estimator``'s ``n_clusters`` and ``random_state`` (one draw), checked (with its
    ``overrides``) for ``n`` samples before anything is written."""
    k = estimator.n_clusters
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 2 <= k <= n):
        raise ValueError(
            f"n_clusters: expected an integer with 2 ≤ n_clusters ≤ N = {n} (X's samples) or 'auto', got {k!r}"
        )
    if isinstance(estimator.overrides, str) or not all(isinstance(word, str) for word in estimator.overrides):
        raise ValueError(f"overrides: expected a list of `icon fit` words (--key=value), got {estimator.overrides!r}")
    try:
        rng = check_random_state(estimator.random_state)
    except ValueError:
        expected = "None, an int in [0, 2**32 - 1] or a numpy.random.RandomState"
        raise ValueError(f"random_state: expected {expected}, got {estimator.random_state!r}") from None
    k = k if k == "auto" else int(k)
    if isinstance(estimator.random_state, numbers.Integral):
        return k, int(estimator.random_state)
    return k, int(rng.randint(np.iinfo(np.int32).max))
