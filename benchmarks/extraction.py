"""Feature-extraction speed: the project's pipeline (tar → decode → transform → backbone → cache) against a
bare ``model(x)`` loop over the same, already decoded batches, in one run.

    python -m benchmarks.extraction --tar ../shared/data/cifar10/cifar10_jpeg_test.tar --split test
        → benchmarks/results/extraction_<device>.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from icon_lightning.data.backbones import EfficientNetLite0, FrozenBackbone, TimmBackbone
from icon_lightning.data.datasets import TarImageFolder
from icon_lightning.data.feature_store import FeatureStore, ViewDataset, cached_features
from icon_lightning.data.transforms import eval_transform

DEFAULT_BACKBONE = "efficientnet_lite0"


def backbone_for(name: str) -> FrozenBackbone:
    """The project's EfficientNet-Lite0 (its installed weights) for ``efficientnet_lite0`` (or its class name,
    ``EfficientNetLite0``); any other timm name with random weights, which measures throughput only."""
    if name.lower().replace("_", "") == "efficientnetlite0":
        return EfficientNetLite0()
    return TimmBackbone(name, pretrained=False)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tar", default="../shared/data/cifar10/cifar10_jpeg_test.tar")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="efficientnet_lite0, or a timm name run with random weights (throughput only)",
    )
    parser.add_argument("--out", default=None, help="the JSON to write (default: benchmarks/results/extraction_*)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = eval_transform(args.image_size)
    data = TarImageFolder(args.tar, split=args.split)
    if args.limit:
        data.labels, data._members = data.labels[: args.limit], data._members[: args.limit]
    backbone = backbone_for(args.backbone).to(device)
    n = len(data)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        cached_features(
            FeatureStore(cache),
            backbone,
            data,
            transform,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            progress=False,
        )
        pipeline_s = time.perf_counter() - start

    source = ViewDataset(data, transform)
    batches = [
        torch.stack([source[i][0] for i in range(s, min(s + args.batch_size, n))]) for s in range(0, n, args.batch_size)
    ]
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        start = time.perf_counter()
        for x in batches:
            backbone(x.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        bare_s = time.perf_counter() - start
    row = {
        "images": n,
        "pipeline_s": pipeline_s,
        "bare_s": bare_s,
        "pipeline_images_per_s": n / pipeline_s,
        "bare_images_per_s": n / bare_s,
        "ratio_to_bare": pipeline_s / bare_s,
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    }
    print(
        f"pipeline {n / pipeline_s:7.1f} img/s  bare model(x) {n / bare_s:7.1f} img/s  ratio {pipeline_s / bare_s:.2f}"
    )
    row["backbone"] = args.backbone
    lite0 = isinstance(backbone, EfficientNetLite0)
    suffix = "" if lite0 else "_" + args.backbone.split(".")[0]
    suffix += f"_workers{args.num_workers}" if args.num_workers else ""
    return write_result(f"extraction_{device}{suffix}.json", row, args.out)


if __name__ == "__main__":
    main()
