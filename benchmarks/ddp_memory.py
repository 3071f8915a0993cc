"""Memory of the cached views under DDP: 2 gloo processes set up `ClusteringDataModule` on a synthetic
200,000 × 384 set with 5 cached views, touch every view row (as a long run does), and report each process's
memory from /proc: RSS, PSS (shared pages split between the processes that map them), private (USS) and peak RSS.

    python -m benchmarks.ddp_memory [--n 200000 --d 384 --views 5]   → benchmarks/results/ddp_memory_cpu.json

Two settings in the same run: ``views_in_memory=True`` (what every process did before: its own float32 stack of
the prepared views) and the default (one float16 memory map per node, shared). The raw cached arrays and the k-NN
table are synthetic files written before the processes start, so no backbone or k-NN search runs here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import write_result


def memory_mb() -> dict:
    """This process's RSS, PSS, private (USS) and peak RSS in MiB, from /proc/self."""
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0])  # kB
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kb = {
        "rss": rollup["Rss"],
        "pss": rollup["Pss"],
        "private": rollup["Private_Clean"] + rollup["Private_Dirty"],
        "peak_rss": int(status["VmHWM"].split()[0]),
    }
    return {k: round(v / 1024, 1) for k, v in kb.items()}


def synthetic_module(folder: Path, n: int, d: int, views: int, in_memory: bool):
    """A ClusteringDataModule whose cached arrays are the synthetic files in ``folder``."""
    from icon_lightning.data.backbones import FrozenBackbone
    from icon_lightning.data.datamodule import ClusteringDataModule
    from icon_lightning.data.datasets import FeaturesArray

    labels = np.arange(n) % 10
    dataset = FeaturesArray(np.zeros((n, 1), dtype=np.float32), labels)  # N items; their features are the files
    backbone = FrozenBackbone(torch.nn.Identity(), d, "synthetic", "none")
    module = ClusteringDataModule(
        dataset,
        backbone=backbone,
        views="cached",
        view_pool=views,
        cache_dir=str(folder / "cache"),
        k=3,
        views_in_memory=in_memory,
        evaluate_train=False,
    )
    module.prep.raw = lambda dataset, view: np.load(folder / f"{view}.npy", mmap_mode="r")  # the cache is the files
    return module


def worker(rank: int, world: int, port: int, folder: str, n: int, d: int, views: int, in_memory: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    start = memory_mb()
    module = synthetic_module(Path(folder), n, d, views, in_memory)
    module.setup("fit")
    for v in range(views):  # every view row read once, as over a long run
        for s in range(0, n, 65536):
            module.prepared.views[v, s : s + 65536].float().sum()
    dist.barrier()
    result = {"rank": rank, "before_setup": start, "after_setup_and_reads": memory_mb()}
    (Path(folder) / f"rank{rank}_{int(in_memory)}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def write_inputs(folder: Path, n: int, d: int, views: int) -> None:
    from icon_lightning.data.neighbours import NeighbourTable, centred_unit_rows

    rng = np.random.default_rng(0)
    for view in ["clean", *[f"aug{v}" for v in range(views)]]:
        out = np.lib.format.open_memmap(folder / f"{view}.npy", mode="w+", dtype=np.float32, shape=(n, d))
        for s in range(0, n, 65536):
            out[s : s + 65536] = rng.standard_normal((min(65536, n - s), d), dtype=np.float32)
        out.flush()
        del out
    raw = np.load(folder / "clean.npy")
    clean = centred_unit_rows(raw, raw.mean(0, keepdims=True))
    (folder / "cache").mkdir()
    table = folder / "cache" / f"{NeighbourTable.fingerprint(clean)}.knn3.npz"
    indices = (np.arange(n)[:, None] + np.arange(1, 4)[None, :]) % n  # any valid table: no search is timed
    np.savez(
        table,
        indices=indices,
        similarities=np.ones((n, 3), np.float32),
        fingerprint=np.array(NeighbourTable.fingerprint(clean)),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/ddp_memory_cpu.json)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.n, args.d, args.views)
        for in_memory in (True, False):
            mp.spawn(worker, args=(2, free_port(), tmp, args.n, args.d, args.views, in_memory), nprocs=2)
            for rank in range(2):
                result = json.loads((folder / f"rank{rank}_{int(in_memory)}.json").read_text())
                setting = "float32 copy per process (before)" if in_memory else "shared float16 map (now)"
                rows.append({"views": setting, **result})
                m = result["after_setup_and_reads"]
                print(
                    f"{setting:36s} rank {rank}: RSS {m['rss']:8.1f} MiB  PSS {m['pss']:8.1f}  "
                    f"private {m['private']:8.1f}  peak RSS {m['peak_rss']:8.1f}"
                )
    view_mb = args.n * args.d * args.views * 4 / 2**20
    write_result(
        "ddp_memory_cpu.json",
        {"n": args.n, "d": args.d, "views": args.views, "float32_views_mib": round(view_mb, 1), "rows": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
