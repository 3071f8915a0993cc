"""Pictures of a clustering run, written as PNGs into the run directory and sent to the logger (W&B).

A plot that fails warns with its traceback and the run goes on; ``strict=True`` re-raises instead (tests).
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.functional.matching import hungarian_accuracy


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: torch.Tensor, path: Path) -> Path:
    """Confusion matrix with clusters reordered by their Hungarian match (matched pairs on the diagonal)."""
    plt = _figure()
    _, mapping = hungarian_accuracy(confusion)
    order = np.argsort(np.where(mapping.numpy() >= 0, mapping.numpy(), len(mapping) + np.arange(len(mapping))))
    counts = confusion.numpy()[order]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(counts, cmap="Blues")
    ax.set_xlabel("class")
    ax.set_ylabel("cluster (matched order)")
    ax.set_yticks(range(len(order)), [str(o) for o in order])
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def plot_cluster_sizes(sizes: torch.Tensor, path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(sizes)), sizes.numpy())
    ax.axhline(float(sizes.sum()) / len(sizes), color="k", ls="--", lw=1, label="uniform")
    ax.set_xlabel("cluster")
    ax.set_ylabel("items")
    ax.legend()
    return _save(plt, fig, path)


def plot_embedding(features: np.ndarray, clusters: np.ndarray, path: Path) -> Path:
    """2-D PCA of the features, coloured by predicted cluster."""
    from sklearn.decomposition import PCA

    plt = _figure()
    xy = PCA(2, random_state=0).fit_transform(features)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(xy[:, 0], xy[:, 1], c=clusters, cmap="tab20", s=4)
    ax.set_title("features (PCA), coloured by cluster")
    return _save(plt, fig, path)


def plot_neighbourhoods(p: np.ndarray, q: np.ndarray, path: Path) -> Path:
    """For a few anchors, p(j|i) and q(j|i) over candidates sorted by p (how well q matches the target)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(p), figsize=(3 * len(p), 2.8), squeeze=False)
    for ax, p_i, q_i in zip(axes[0], p, q):
        order = np.argsort(-p_i)[:40]
        ax.plot(np.where(p_i[order] > 0, p_i[order], np.nan), "o-", ms=3, label="p")
        ax.plot(np.where(q_i[order] > 0, q_i[order], np.nan), "s-", ms=3, label="q")
        ax.set_xlabel("candidates, by p")
        ax.set_yscale("log")  # q spreads over all candidates: compare on a log scale
    axes[0][0].legend()
    return _save(plt, fig, path)


def plot_alpha_sweep(rows: list[dict], path: Path, metric: str = "val/hungarian_acc/best") -> Path:
    """Accuracy against α for α on p only, on q only and on both (mean ± std over seeds)."""
    plt = _figure()
    p_key = "model.loss.init_args.p.init_args.alpha"
    q_key = "model.loss.init_args.q.init_args.alpha"
    lines = {"p only": lambda a, b: b == 0, "q only": lambda a, b: a == 0, "both": lambda a, b: a == b}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, keep in lines.items():
        points: dict[float, list[float]] = {}
        for r in rows:
            a, b = float(r[p_key]), float(r[q_key])
            if keep(a, b) and metric in r:
                points.setdefault(a if name != "q only" else b, []).append(r[metric])
        xs = sorted(points)
        means = [np.mean(points[x]) for x in xs]
        stds = [np.std(points[x]) for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("debias α")
    ax.set_ylabel(metric)
    ax.legend()
    return _save(plt, fig, path)


class ClusteringPlots(Callback):
    """After each validation: confusion matrix, cluster sizes, a 2-D embedding and p-vs-q neighbourhoods.

    PNGs go to ``<output_dir>/plots/<name>_epoch<E>.png`` (`icon` sets the run's folder; otherwise the logger's
    folder) and, with a W&B logger, to the run as images.
    """

    def __init__(
        self, max_points: int = 2000, anchors: int = 4, strict: bool = False, output_dir: str | None = None
    ) -> None:
        self.max_points, self.anchors, self.strict, self.output_dir = max_points, anchors, strict, output_dir
        self.written: list[Path] = []

    def _guard(self, name: str, fn) -> Path | None:
        try:
            return fn()
        except Exception:
            if self.strict:
                raise
            warnings.warn(f"plot {name!r} failed and was skipped:\n{traceback.format_exc()}", stacklevel=2)
            return None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir) / "plots"  # log_dir: every rank
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        epoch = trainer.current_epoch
        paths = []
        last = pl_module.last_scores("val")
        if last is not None:
            confusion, sizes = last
            paths.append(
                self._guard("confusion", lambda: plot_confusion(confusion, out / f"confusion_epoch{epoch}.png"))
            )
            paths.append(
                self._guard("cluster_sizes", lambda: plot_cluster_sizes(sizes, out / f"cluster_sizes_epoch{epoch}.png"))
            )
        datamodule = trainer.datamodule
        if isinstance(datamodule, ClusteringDataModule):  # its declared ``prepared`` items
            paths.append(self._guard("embedding", lambda: self._embedding(pl_module, datamodule, out, epoch)))
            paths.append(self._guard("neighbourhoods", lambda: self._neighbourhoods(pl_module, datamodule, out, epoch)))
        paths = [p for p in paths if p is not None]
        self.written += paths
        log_image = getattr(trainer.logger, "log_image", None)
        if log_image is not None and paths:
            self._guard(
                "logger",
                lambda: [
                    log_image(key=f"plots/{p.stem.rsplit('_epoch', 1)[0]}", images=[str(p)], step=trainer.global_step)
                    for p in paths
                ],
            )

    @torch.no_grad()
    def _embedding(self, pl_module, datamodule, out: Path, epoch: int) -> Path:
        feats = datamodule.prepared.val.features[: self.max_points].to(pl_module.device)
        clusters = pl_module.assign(feats).cpu().numpy()
        return plot_embedding(feats.float().cpu().numpy(), clusters, out / f"embedding_epoch{epoch}.png")

    def _neighbourhoods(self, pl_module, datamodule, out: Path, epoch: int) -> Path | None:
        if datamodule.prepared.anchors is None:  # prepared for evaluation only (validate, test): no train batch
            return None
        batch = next(iter(datamodule.train_dataloader())).to(pl_module.device)
        pq = pl_module.neighbourhoods(batch, self.anchors)
        if pq is None:
            return None
        p, q = (x.float().cpu().numpy() for x in pq)
        return plot_neighbourhoods(p, q, out / f"neighbourhoods_epoch{epoch}.png")
