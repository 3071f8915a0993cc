"""Feature-extraction speed: the project's pipeline (tar → decode → transform → backbone → cache) against a
bare forward loop over the same, already decoded batches, in one run, with the process's user and system CPU
time and minor page faults for each.

    python -m benchmarks.extraction --tar ../shared/data/cifar10/cifar10_jpeg_test.tar --split test
        → benchmarks/results/extraction_<device>.json
    python -m benchmarks.extraction --compare --limit 1000
        → benchmarks/results/extraction_cpu_tuning.json: the CPU path before (``cpu_tuning=False``: the loader's
          batches of 256 as they come) and after (micro-batches, glibc keeping freed memory, channels_last) at 128
          and 224 px, each in a fresh process (the allocator settings are process-wide), alternated
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from icon_lightning.data.backbones import EfficientNetLite0, FrozenBackbone, TimmBackbone
from icon_lightning.data.cpu_forward import forward_in_micro_batches, micro_batch_size, reuse_freed_memory
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


class Usage:
    """Wall, user and system seconds and minor page faults of this process over a ``with`` block."""

    def __enter__(self):
        self._usage, self._start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - self._start
        self.row = {
            "s": wall,
            "user_s": end.ru_utime - self._usage.ru_utime,
            "sys_s": end.ru_stime - self._usage.ru_stime,
            "minor_faults": end.ru_minflt - self._usage.ru_minflt,
        }


def bare_forward(backbone, batches: list[torch.Tensor], device: str, cpu_tuning: bool) -> None:
    """The backbone alone over decoded batches, the way ``extract`` runs it (micro-batches on a tuned CPU)."""
    tuned = cpu_tuning and device == "cpu"
    if tuned:
        backbone = backbone.to(memory_format=torch.channels_last)
    micro = micro_batch_size(backbone, batches[0][:1]) if tuned else None
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        with reuse_freed_memory() if tuned else contextlib.nullcontext():
            for x in batches:
                x = x.to(device)
                forward_in_micro_batches(backbone, x, micro) if tuned else backbone(x)
        if device == "cuda":
            torch.cuda.synchronize()


def parse(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--cpu-tuning", choices=["on", "off"], default="on", help="extract(cpu_tuning=...)")
    parser.add_argument("--compare", action="store_true", help="before/after the CPU tuning at 128 and 224 px")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="with --compare")
    parser.add_argument("--out", default=None, help="the JSON to write (default: benchmarks/results/extraction_*)")
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> Path:
    """One fresh process per (size, setting), before and after alternated; each row is that process's JSON."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for tuning in ("off", "on"):
                out = Path(folder) / f"{size}_{tuning}.json"
                command = [sys.executable, "-m", "benchmarks.extraction", "--tar", args.tar, "--split", args.split]
                command += ["--image-size", str(size), "--batch-size", str(args.batch_size), "--cpu-tuning", tuning]
                command += ["--num-workers", str(args.num_workers), "--backbone", args.backbone, "--out", str(out)]
                command += ["--limit", str(args.limit)] if args.limit else []
                subprocess.run(command, check=True)
                row = json.loads(out.read_text())
                row.pop("machine", None)
                rows.append(row)
    by = {(r["image_size"], r["cpu_tuning"]): r for r in rows}
    speedup = {
        str(size): by[size, "on"]["pipeline_images_per_s"] / by[size, "off"]["pipeline_images_per_s"]
        for size in args.sizes
    }
    for row in rows:
        print(
            f"{row['image_size']:4d} px  cpu_tuning {row['cpu_tuning']:3s}  {row['pipeline_images_per_s']:6.1f} img/s"
            f"  user {row['pipeline_user_s']:6.1f} s  sys {row['pipeline_sys_s']:6.1f} s"
        )
    return write_result("extraction_cpu_tuning.json", {"runs": rows, "speedup": speedup}, args.out)


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    if args.compare:
        return compare(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuning = args.cpu_tuning == "on"
    transform = eval_transform(args.image_size)
    data = TarImageFolder(args.tar, split=args.split)
    if args.limit:
        data.labels, data._members = data.labels[: args.limit], data._members[: args.limit]
    backbone = backbone_for(args.backbone).to(device)
    n = len(data)

    with tempfile.TemporaryDirectory() as cache, Usage() as pipeline:
        cached_features(
            FeatureStore(cache),
            backbone,
            data,
            transform,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            progress=False,
            cpu_tuning=tuning,
        )

    source = ViewDataset(data, transform)
    batches = [
        torch.stack([source[i][0] for i in range(s, min(s + args.batch_size, n))]) for s in range(0, n, args.batch_size)
    ]
    with Usage() as bare:
        bare_forward(backbone, batches, device, tuning)
    pipeline_s, bare_s = pipeline.row["s"], bare.row["s"]
    row = {
        "images": n,
        "pipeline_s": pipeline_s,
        "bare_s": bare_s,
        "pipeline_images_per_s": n / pipeline_s,
        "bare_images_per_s": n / bare_s,
        "ratio_to_bare": pipeline_s / bare_s,
        **{f"pipeline_{k}": v for k, v in pipeline.row.items() if k != "s"},
        **{f"bare_{k}": v for k, v in bare.row.items() if k != "s"},
        "cpu_tuning": args.cpu_tuning,
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
    suffix += "_untuned" if not tuning and device == "cpu" else ""
    return write_result(f"extraction_{device}{suffix}.json", row, args.out)


if __name__ == "__main__":
    main()
