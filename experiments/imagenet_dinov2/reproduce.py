"""`make reproduce-imagenet`: the paper's ImageNet-1K protocol end to end, beside the paper's Table 2.

    python -m experiments.imagenet_dinov2.reproduce --root $IMAGENET_ROOT --model s14   # s14 | b14 | l14

1. Preflight (cheap, before Lightning is imported): ImageNet at ``--root`` with ``train/`` and ``val/`` in the
   ImageFolder layout and the same classes, CUDA GPUs, faiss with GPU support, the DINOv2 weights (``--checkpoint``
   or the Hugging Face cache / hub). Every problem is listed, one line each, and the exit status is 2.
2. ``icon fit --config experiments/imagenet_dinov2/config.yaml`` in this process (``cli_main``): features and 4
   augmented views cached once, k-NN on FAISS, 30 epochs of Adam 1e-3, α = 0.6 on p and q, global batch 4096
   split over all visible GPUs (DDP; Lightning re-launches this script once per extra GPU).
3. On rank 0: Hungarian accuracy of the label-free selected head on the val features, and FAISS k-means on the
   same cached DINOv2 features (fitted on train, assigned on val). A table beside the paper's Table 2 is
   printed and written to ``<run dir>/reproduce_<model>.json``.

Flags shrink everything (epochs, batch, devices, image size, ...) for smoke runs; any ``--trainer.*``,
``--model.*``, ``--data.*`` argument is passed to ``icon fit`` as is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

from icon_lightning.io import IMAGE_SUFFIXES  # light: no torch or Lightning before the preflight

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
PREFLIGHT_FAILED = 2

# --model → (timm name, the paper's name).
MODELS = {
    "s14": ("vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14"),
    "b14": ("vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14"),
    "l14": ("vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14"),
}
# The paper's Table 2 (ImageNet-1K val, Hungarian accuracy, as fractions).
PAPER_TABLE2 = {
    "s14": {"icon": 0.5852, "kmeans": 0.5184},
    "b14": {"icon": 0.6503, "kmeans": 0.5226},
    "l14": {"icon": 0.6801, "kmeans": 0.5336},
}
PASSTHROUGH = ("--trainer.", "--model.", "--data.", "--seed_everything")


def is_rank_zero() -> bool:
    """True outside DDP children (Lightning sets LOCAL_RANK / NODE_RANK in the processes it launches)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.imagenet_dinov2.reproduce",
        description="The paper's ImageNet-1K / DINOv2 protocol beside its Table 2 (I-Con and k-means).",
        epilog="Any --trainer.*, --model.*, --data.* or --seed_everything argument is passed to `icon fit` as is.",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("IMAGENET_ROOT", ""),
        help="ImageNet-1K folder with train/<class>/*.JPEG and val/<class>/*.JPEG (default: $IMAGENET_ROOT)",
    )
    parser.add_argument("--model", type=str.lower, choices=sorted(MODELS), default="s14", help="DINOv2 backbone")
    parser.add_argument(
        "--checkpoint",
        default=os.environ.get("DINOV2_CHECKPOINT") or None,
        help="local DINOv2 state dict (.pth / .safetensors) instead of the Hugging Face hub "
        "(default: $DINOV2_CHECKPOINT)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=4096, help="anchors per step over all processes")
    parser.add_argument("--alpha", type=float, default=0.6, help="debiasing α on both p and q (the paper: 0.6)")
    parser.add_argument(
        "--accelerator", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPUs when any are visible"
    )
    parser.add_argument("--devices", type=int, default=-1, help="processes; -1: every visible GPU (1 on CPU)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run without CUDA GPUs / faiss-gpu (smoke runs and tests only)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (config: 224)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers per process (config: 16)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (config: .cache/icon_lightning)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/imagenet_dinov2/<model>)")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="Trainer.limit_train_batches")
    parser.add_argument("--logger", choices=("wandb", "csv"), default="wandb", help="wandb: offline without login")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything and the k-means seed")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random backbone weights, no download (pipeline tests only: the numbers mean nothing)",
    )
    parser.add_argument("--kmeans-fit", choices=("train", "val"), default="train", help="features k-means fits")
    parser.add_argument("--kmeans-niter", type=int, default=100, help="Lloyd iterations")
    parser.add_argument("--kmeans-nredo", type=int, default=1, help="restarts (FAISS nredo: the n_init)")
    parser.add_argument(
        "--kmeans-max-points-per-centroid",
        type=int,
        default=None,
        help="fit on a random K × this many points (FAISS's own default is 256); default: every point",
    )
    parser.add_argument("--dry-run", action="store_true", help="preflight, print the `icon fit` command, stop")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith(PASSTHROUGH)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (only {', '.join(PASSTHROUGH)}* pass through)")
    return args, rest


# ---------------------------------------------------------------------------------------------- preflight
def _classes(split_dir: Path) -> tuple[list[str], list[str]]:
    """(class folders, class folders without a single image) of an ImageFolder split."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    empty = []
    for name in classes:
        with os.scandir(split_dir / name) as entries:
            if not any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in entries):
                empty.append(name)
    return classes, empty


def check_imagenet(root: str) -> list[str]:
    """Problems with the ImageNet folder: root set and present, train/ and val/ ImageFolders with equal classes."""
    fix = "run `make reproduce-imagenet IMAGENET_ROOT=/path/to/imagenet` (a folder holding train/ and val/)"
    if not root:
        return [f"IMAGENET_ROOT is not set: {fix}"]
    path = Path(root).expanduser()
    if not path.is_dir():
        return [f"IMAGENET_ROOT={root}: no such directory: {fix}"]
    problems, found = [], {}
    for split in ("train", "val"):
        split_dir = path / split
        if not split_dir.is_dir():
            problems.append(
                f"{split_dir}: missing; expected the ImageNet {split} split as {split}/<class>/<image>.JPEG"
            )
            continue
        classes, empty = _classes(split_dir)
        if not classes:
            loose = sum(1 for e in os.scandir(split_dir) if e.name.lower().endswith(IMAGE_SUFFIXES))
            hint = (
                f"it holds {loose} images but no class folders: sort them into {split}/<wnid>/ "
                "(e.g. with the usual valprep.sh)"
                if loose
                else "it is empty"
            )
            problems.append(f"{split_dir}: no class folders ({hint}); expected {split}/<class>/<image>.JPEG")
            continue
        if empty:
            shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
            problems.append(f"{split_dir}: {len(empty)} of {len(classes)} class folders hold no image ({shown})")
        found[split] = classes
    if len(found) == 2 and found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        problems.append(
            f"{path}: train/ has {len(found['train'])} classes and val/ {len(found['val'])}; the class folders must "
            f"match (only in train: {only_train[:3]}, only in val: {only_val[:3]})"
        )
    return problems


def check_gpus(accelerator: str, devices: int, allow_cpu: bool) -> tuple[list[str], int]:
    """(problems, number of visible CUDA GPUs)."""
    import torch

    n = torch.cuda.device_count()
    if accelerator == "cpu":
        return [], n
    if n == 0 and (accelerator == "gpu" or not allow_cpu):
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return [
            f"no CUDA GPU visible: torch.cuda.device_count() == 0 (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={visible}): run on a GPU machine, or pass --allow-cpu for a CPU smoke run"
        ], n
    if n > 0 and devices > n:
        return [f"--devices {devices}: only {n} CUDA GPUs are visible"], n
    return [], n


def check_faiss(need_gpu: bool) -> list[str]:
    """faiss importable, and with GPU support unless CPU runs are allowed."""
    try:
        import faiss
    except ImportError:
        return ["faiss is not installed: run `make install GPU=1` (faiss-gpu; `make install` gives faiss-cpu)"]
    if not need_gpu:
        return []
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus > 0:
        return []
    if hasattr(faiss, "StandardGpuResources"):
        return [f"faiss {faiss.__version__} is a GPU build but sees no GPU (faiss.get_num_gpus() == 0)"]
    return [
        f"faiss {faiss.__version__} has no GPU support (faiss.get_num_gpus() == 0: faiss-cpu is installed): "
        "reinstall with `make install GPU=1`"
    ]


def check_weights(name: str, checkpoint: str | None, random_weights: bool) -> list[str]:
    """The DINOv2 weights: a --checkpoint file, or timm's weights in the Hugging Face cache or on a reachable hub
    (the test TimmBackbone itself applies before it would download)."""
    if random_weights:
        return []
    if checkpoint:
        if Path(checkpoint).expanduser().is_file():
            return []
        return [f"--checkpoint {checkpoint}: no such file (expected the {name} state dict, .pth or .safetensors)"]
    from icon_lightning.data.backbones import _hub_cached, hub_reachable

    if _hub_cached(name) or hub_reachable():
        return []
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0") else ""
    return [
        f"DINOv2 weights for {name} are not in the Hugging Face cache and the hub is unreachable{offline}: run "
        "once with network access to fill the cache, or pass --checkpoint /path/to/weights.(pth|safetensors) "
        "(with make: DINOV2_CHECKPOINT=/path/to/weights)"
    ]


def preflight(args: argparse.Namespace) -> tuple[list[str], int]:
    """(every problem found, number of visible CUDA GPUs). Nothing heavy runs before the data checks."""
    problems = check_imagenet(args.root)
    gpu_problems, n_gpus = check_gpus(args.accelerator, args.devices, args.allow_cpu)
    problems += gpu_problems
    problems += check_faiss(need_gpu=args.accelerator != "cpu" and not args.allow_cpu)
    problems += check_weights(MODELS[args.model][0], args.checkpoint, args.random_weights)
    return problems, n_gpus


# ---------------------------------------------------------------------------------------------- the plan
def plan(args: argparse.Namespace, n_gpus: int) -> dict:
    """Resolved run settings: accelerator, processes, per-process batch, output folder."""
    on_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and n_gpus > 0)
    processes = (n_gpus if args.devices == -1 else args.devices) if on_gpu else max(args.devices, 1)
    per_process = args.global_batch // processes
    if per_process < 1:
        raise SystemExit(f"--global-batch {args.global_batch}: fewer anchors than the {processes} processes")
    return {
        "accelerator": "gpu" if on_gpu else "cpu",
        "processes": processes,
        "per_process_batch": per_process,
        "global_batch": per_process * processes,
        "strategy": "ddp" if processes > 1 else "auto",
        "precision": "bf16-mixed" if on_gpu else "32-true",
        "output_dir": Path(args.output_dir or Path("runs") / "imagenet_dinov2" / args.model),
    }


def icon_fit_args(args: argparse.Namespace, run: dict, passthrough: list[str]) -> list[str]:
    """The `icon fit` arguments of this run (the config pins every other number of the protocol)."""
    root = Path(args.root).expanduser()
    name = MODELS[args.model][0]
    out = str(run["output_dir"])
    words = [
        "fit",
        "--config",
        str(CONFIG),
        f"--seed_everything={args.seed}",
        f"--data.dataset.init_args.root={root / 'train'}",
        f"--data.val_dataset.init_args.root={root / 'val'}",
        f"--data.backbone.init_args.name={name}",
        f"--data.batch_size={run['per_process_batch']}",
        f"--model.loss.init_args.p.init_args.alpha={args.alpha}",
        f"--model.loss.init_args.q.init_args.alpha={args.alpha}",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.accelerator={run['accelerator']}",
        f"--trainer.devices={run['processes']}",
        f"--trainer.strategy={run['strategy']}",
        f"--trainer.precision={run['precision']}",
        f"--trainer.default_root_dir={out}",
    ]
    if args.checkpoint:
        words.append(f"--data.backbone.init_args.checkpoint_path={Path(args.checkpoint).expanduser()}")
    if args.random_weights:
        words.append("--data.backbone.init_args.pretrained=false")
    if args.image_size is not None:
        words += [f"--data.image_size={args.image_size}", f"--data.backbone.init_args.image_size={args.image_size}"]
    if args.num_workers is not None:
        words.append(f"--data.num_workers={args.num_workers}")
    if args.cache_dir is not None:
        words.append(f"--data.cache_dir={args.cache_dir}")
    if args.limit_train_batches is not None:
        limit = args.limit_train_batches
        words.append(f"--trainer.limit_train_batches={int(limit) if limit > 1 else limit}")
    if args.logger == "csv":
        words += [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={out}",
            f"--trainer.logger.name=imagenet_dinov2_{args.model}",
        ]
    else:
        words += [
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name=imagenet_dinov2_{args.model}",
        ]
    return words + passthrough


# ---------------------------------------------------------------------------------------------- evaluation
def icon_clusters(model, features, device, chunk: int = 65536):
    """(N,) argmax cluster of the label-free selected head on (N, D) cached features."""
    import torch

    model = model.to(device).eval()
    with torch.no_grad():
        parts = [model.assign(features[i : i + chunk].to(device).float()).cpu() for i in range(0, len(features), chunk)]
    return torch.cat(parts)


def kmeans_clusters(fit_features, features, k: int, args: argparse.Namespace, use_gpu: bool) -> tuple:
    """FAISS k-means (``FaissKMeans``) fitted on ``fit_features`` (N_fit, D) → ((N,) nearest centroid of each row of
    ``features``, points fitted on, max_points_per_centroid used)."""
    from icon_lightning.classical import FaissKMeans

    n = len(fit_features)
    per_centroid = args.kmeans_max_points_per_centroid or -(-n // k)  # None: FAISS subsamples nothing
    kmeans = FaissKMeans(
        k, args.kmeans_nredo, args.kmeans_niter, args.seed, use_gpu=use_gpu, max_points_per_centroid=per_centroid
    ).fit(fit_features)
    return kmeans.predict(features), min(n, k * per_centroid), per_centroid


def table_text(result: dict) -> str:
    model = result["model"]
    rows = [("I-Con", result["icon"]["hungarian_acc"], result["paper_table2"]["icon"])]
    rows.append(("k-means", result["kmeans"]["hungarian_acc"], result["paper_table2"]["kmeans"]))
    lines = [
        f"ImageNet-1K val, {MODELS[model][1]}: Hungarian accuracy (%)",
        f"{'method':<8}  {'this run':>8}  {'paper (Table 2)':>15}",
    ]
    lines += [f"{name:<8}  {100 * ours:>8.2f}  {100 * paper:>15.2f}" for name, ours, paper in rows]
    return "\n".join(lines)


def score_icon(trainer, model, data, run: dict) -> tuple[dict, float]:
    """The selected head's scores on the validation features (and the last in-fit validation's accuracy)."""
    import torch

    from icon_lightning.metrics import score_assignments

    device = torch.device("cuda", torch.cuda.current_device()) if run["accelerator"] == "gpu" else torch.device("cpu")
    val_features, val_labels = data.prepared.val.features, data.prepared.val.labels
    started = time.time()
    icon = score_assignments(
        icon_clusters(model, val_features, device), val_labels, model.hparams.num_clusters, data.num_classes
    )
    report = model.head_report()  # the selected head's number, the live heads and their losses
    icon.update(selected_head=report["selected_head"], heads=report["heads"], head_losses=report["head_losses"])
    last_val = trainer.callback_metrics.get("val/hungarian_acc/best")
    icon["last_validation_hungarian_acc"] = None if last_val is None else float(last_val)
    return icon, time.time() - started


def score_kmeans(data, args: argparse.Namespace, run: dict) -> tuple[dict, float]:
    """FAISS k-means of the same cached features, scored on the validation split."""
    from icon_lightning.data.neighbours import faiss_gpus
    from icon_lightning.metrics import score_assignments

    started = time.time()
    val_features, val_labels = data.prepared.val.features, data.prepared.val.labels
    use_gpu = run["accelerator"] == "gpu" and faiss_gpus() > 0
    fit_features = data.train_features if args.kmeans_fit == "train" else val_features
    clusters, fitted_on, per_centroid = kmeans_clusters(
        fit_features.numpy(), val_features.numpy(), data.num_classes, args, use_gpu
    )
    kmeans = score_assignments(clusters, val_labels, data.num_classes, data.num_classes)
    kmeans.update(
        {
            "fit_on": args.kmeans_fit,
            "fit_points": int(fitted_on),
            "k": int(data.num_classes),
            "niter": args.kmeans_niter,
            "n_init": args.kmeans_nredo,
            "max_points_per_centroid": int(per_centroid),
            "seed": args.seed,
            "faiss_gpu": bool(use_gpu),
            "features": "the cached clean features the heads train on (centred by the train mean, L2-normalised)",
        }
    )
    return kmeans, time.time() - started


def reproduce(args: argparse.Namespace, passthrough: list[str], n_gpus: int) -> dict | None:
    """Fit in this process, then (rank 0) score I-Con and k-means; returns the result (None on other ranks)."""
    from icon_lightning.cli import cli_main
    from icon_lightning.io import atomic_write_json

    run = plan(args, n_gpus)
    started = time.time()
    with warnings.catch_warnings():
        # sys.argv holds this script's flags on purpose: Lightning's DDP launcher re-runs it once per extra GPU.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = cli_main(icon_fit_args(args, run, passthrough))
    fit_s = time.time() - started
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if not trainer.is_global_zero:
        return None

    icon, eval_s = score_icon(trainer, model, data, run)
    kmeans, kmeans_s = score_kmeans(data, args, run)

    run_dir = Path(cli.run_dir)  # this fit's own folder (icon_lightning.runs)
    result = {
        "model": args.model,
        "backbone": MODELS[args.model][0],
        "weights": data.backbone.weights,
        "random_weights": bool(args.random_weights),
        "units": "fractions in [0, 1]",
        "icon": icon,
        "kmeans": kmeans,
        "paper_table2": PAPER_TABLE2[args.model],
        "table": {
            "I-Con": {"this_run": icon["hungarian_acc"], "paper": PAPER_TABLE2[args.model]["icon"]},
            "k-means": {"this_run": kmeans["hungarian_acc"], "paper": PAPER_TABLE2[args.model]["kmeans"]},
        },
        "train_items": int(data.num_samples),
        "val_items": int(len(data.prepared.val.labels)),
        "classes": int(data.num_classes),
        "epochs": args.epochs,
        "alpha": args.alpha,
        "accelerator": run["accelerator"],
        "processes": run["processes"],
        "per_process_batch": run["per_process_batch"],
        "global_batch": run["global_batch"],
        "wall_time_s": {"fit": round(fit_s, 2), "icon_eval": round(eval_s, 2), "kmeans": round(kmeans_s, 2)},
        "metrics_json": str(run_dir / "metrics.json"),
        "icon_fit_args": icon_fit_args(args, run, passthrough),
    }
    path = run_dir / f"reproduce_{args.model}.json"
    atomic_write_json(path, result)
    print("\n" + table_text(result))
    if args.random_weights:
        print("(random backbone weights: a pipeline check, not a reproduction)")
    print(f"reproduce_{args.model}.json: {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    problems, n_gpus = preflight(args)
    if problems:
        print(
            f"reproduce-imagenet: cannot start ({len(problems)} problem{'s' * (len(problems) > 1)}):", file=sys.stderr
        )
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return PREFLIGHT_FAILED
    run = plan(args, n_gpus)
    if is_rank_zero():
        print(
            f"reproduce-imagenet: {MODELS[args.model][1]}, {run['processes']} × {run['accelerator']}, "
            f"batch {run['per_process_batch']} per process (global {run['global_batch']}), "
            f"{args.epochs} epochs, α = {args.alpha}"
        )
        print("  icon " + shlex.join(icon_fit_args(args, run, passthrough)))
    if args.dry_run:
        return 0
    reproduce(args, passthrough, n_gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
