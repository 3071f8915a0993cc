"""Wall time of a converged default fit, as a user runs it: README's first command through the ``icon`` CLI, one
process per run, on real feature sets of about 2k, 10k and 60k items.

    python -m benchmarks.fit --dataset digits --dataset cifar10_test --dataset fashion_mnist_train
        → benchmarks/results/fit_<dataset>.json
    python -m benchmarks.fit --dataset digits_lt10    → fit_digits_lt10.json (a long-tailed set, one subset per seed)
    python -m benchmarks.fit --table                  → the README table from those files

Settings (each is README's first command plus the overrides named here, nothing else):

- ``default``: the defaults (10 heads: k-means and spectral starts kept to the end, the 8 random heads halved by
  training loss to 1, the judge choosing among the 3; batch ``auto``);
- ``one_head``: ``--model.num_heads 1``;
- ``unpruned``: ``--model.keep_heads null`` (all 10 heads to the last step: the heads before pruning);
- ``batch_4096``: ``--data.batch_size 4096`` (the paper's ImageNet batch, the rule before ``auto`` sized it from K);
- ``before``: ``unpruned`` and ``batch_4096`` together, the defaults before issue 18;
- ``k30``: ``--data.num_clusters 30`` (K ≥ 20 on the same rows).

Each setting's seeds are followed by the reference: scikit-learn ``KMeans(K, n_init=10)`` on the same features file
at the same K, in a process of its own (``KMEANS``: imports and loading included, as the fit's process wall time),
and the table gives the fit's process wall time over it (issue 32's target: at most 10× on sets of 5,000 rows or
more).

Each row records steps, the convergence verdict, the process's wall time (imports and k-NN graph included) and the
fit's own (``wall_time_s`` of metrics.json), the peak resident memory of the process (``wait4``), and the selected
head's accuracy and NMI. Labels only score. Long-tailed sets (``<set>_lt10``, ``<set>_lt100`` of digits,
cifar10_test, mnist_test and fashion_mnist_test; ``benchmarks.common.long_tailed_subset``): each seed fits its own
subset of the set's features (``<set>_lt<r>_seed<s>.npz``), the same subset as ``benchmarks.clustering``'s for that
seed, recorded in its row (``subset``). Runs go one after another, under ``flock /tmp/icon-bench.lock`` in
``make bench-fit``: figures from overlapping heavy processes would be upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.common import LONG_TAILED_RATIOS, RESULTS, long_tailed_name, long_tailed_subset, write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist")
RECIPE = ROOT / "configs" / "recipes" / "icon_clustering.yaml"
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "one_head": ["--model.num_heads=1"],
    "unpruned": ["--model.keep_heads=null"],
    "batch_4096": ["--data.batch_size=4096"],
    "before": ["--model.keep_heads=null", "--data.batch_size=4096"],
    "k30": ["--data.num_clusters=30"],  # K ≥ 20 on the same rows: the uniform term's B·M cost (issue 32's target)
}
KMEANS = (  # the reference a fit's wall time is compared with: scikit-learn k-means, a process of its own
    "import sys, numpy as np; from sklearn.cluster import KMeans; d = np.load(sys.argv[1]); "
    "KMeans(int(sys.argv[2]), n_init=10, random_state=int(sys.argv[3])).fit(d['features'])"
)
DATASETS = {
    "digits": "scikit-learn digits, raw 8x8 pixels (1,797 x 64)",
    "cifar10_test": "CIFAR-10 test, EfficientNet-Lite0 features at 128 px (10,000 x 1,280, ../shared)",
    "fashion_mnist_train": "Fashion-MNIST train, raw 28x28 pixels / 255 (60,000 x 784, Debian's dataset-fashion-mnist)",
    "mnist_test": "MNIST test, Lite0 features at 64 px (10,000 x 1,280; benchmarks.clustering's)",
    "fashion_mnist_test": "Fashion-MNIST test, Lite0 features at 64 px (10,000 x 1,280; benchmarks.clustering's)",
}
LONG_TAILED_BASES = ("digits", "cifar10_test", "mnist_test", "fashion_mnist_test")
DATASETS |= {
    f"{base}_lt{r}": f"{DATASETS[base]}; long-tailed subset, imbalance ratio {r}, one per seed"
    for base in LONG_TAILED_BASES
    for r in LONG_TAILED_RATIOS
}


def first_command(path: Path) -> list[str]:
    """README's first command on the features file ``path``."""
    return [
        "fit",
        "--config",
        str(RECIPE),
        "--data.dataset",
        "icon_lightning.data.FeaturesFile",
        "--data.dataset.path",
        str(path),
        "--data.views",
        "clean",
    ]


def in_checkout(command: str) -> str:
    """``command`` with any checkout's path before ``configs/`` taken out: what a user types in the checkout."""
    return re.sub(r"\S*/(configs/)", r"\1", command)


COMMAND = in_checkout("icon " + " ".join(first_command(Path("<features.npz>"))))  # what every row ran


def features_file(name: str, cache: Path, seed: int = 0) -> tuple[Path, dict | None]:
    """The ``.npz`` (features, labels) of dataset ``name`` for ``seed``, written once into ``cache``, and for a
    long-tailed set the record of its subset (None for the others, whose file is the same for every seed)."""
    base, ratio = long_tailed_name(name)
    if ratio is None or name not in DATASETS:
        return full_features_file(name, cache), None
    data = np.load(full_features_file(base, cache))
    index, record = long_tailed_subset(data["labels"], ratio, seed)
    path = cache / f"{name}_seed{seed}.npz"
    if not path.is_file():
        _write_npz(path, data["features"][index], data["labels"][index])
    return path, record


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, features=x, labels=y)
    partial.replace(path)


def full_features_file(name: str, cache: Path) -> Path:
    """The ``.npz`` (features, labels) of the whole set ``name``, written once into ``cache``."""
    if name == "cifar10_test":
        path = SHARED / "features" / "cifar10_test_effnetlite0_r128.npz"
        if not path.is_file():
            raise FileNotFoundError(f"--dataset cifar10_test: expected {path} (../shared/data/features)")
        return path
    path = cache / f"{name}.npz"
    if path.is_file():
        return path
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float32), digits.target
    elif name == "fashion_mnist_train":
        from icon_lightning.data.datasets import IdxDataset

        data = IdxDataset(str(FASHION), prefix="train")
        x, y = (data.images.reshape(len(data.images), -1) / 255.0).astype(np.float32), data.labels
    elif name in ("mnist_test", "fashion_mnist_test"):  # the clustering benchmark's features, from its defaults
        from benchmarks.clustering import arguments, load_split

        split = load_split(name, arguments().parse_args([]))
        x, y = split.fit_x, split.score_y
    else:
        raise ValueError(f"--dataset: expected one of {sorted(DATASETS)}, got {name!r}")
    _write_npz(path, x, y)
    return path


def run_fit(args: list[str], run_dir: Path, env: dict | None = None) -> dict:
    """One ``icon`` process: its metrics.json with the process's wall time and peak RSS added."""
    icon = Path(sys.executable).with_name("icon")
    command = [str(icon), *args, f"--run_dir={run_dir}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {run_dir.parent / run_dir.name}.log")
    report = json.loads((run_dir / "metrics.json").read_text())
    metrics = report["metrics"]
    return {
        "steps": report["steps"],
        "converged": report["convergence"]["converged"],
        "reason": report["convergence"]["reason"],
        "step_budget": report["convergence"]["step_budget"],
        "process_wall_s": round(wall, 2),
        "fit_wall_s": report.get("wall_time_s"),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "selected_head": report["selected_head"],
        "train_loss": metrics.get(f"train/loss/head_{report['selected_head']}", metrics.get("train/loss")),
        "hungarian_acc": metrics.get("val/hungarian_acc/best"),
        "nmi": metrics.get("val/nmi"),
    }


def run_kmeans(path: Path, k: int, seed: int) -> float:
    """The wall time of one scikit-learn k-means process (``KMEANS``) on the features file ``path`` at K = ``k``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", KMEANS, str(path), str(k), str(seed)], check=True)
    return round(time.perf_counter() - start, 2)


def clusters_of(setting: str, path: Path) -> int:
    """K of a setting's runs: its ``--data.num_clusters``, else the file's number of classes (the CLI's rule)."""
    given = [a.split("=", 1)[1] for a in SETTINGS[setting] if a.startswith("--data.num_clusters=")]
    return int(given[0]) if given else len(np.unique(np.load(path)["labels"]))


def summarise(rows: list[dict]) -> dict:
    out = {"seeds": len(rows), "converged": sum(r["converged"] for r in rows)}
    keys = ("steps", "process_wall_s", "fit_wall_s", "peak_rss_mb", "hungarian_acc", "nmi", "train_loss")
    for key in (*keys, "kmeans_process_wall_s"):
        values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
        if len(values):
            out[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def bench(name: str, settings: list[str], seeds: list[int], work: Path, extra: list[str] | None = None) -> dict:
    per_setting = {}
    for setting in settings:
        rows = []
        for seed in seeds:
            path, subset = features_file(name, work / "data", seed)
            run_dir = work / "runs" / f"{name}-{setting}-seed{seed}"
            if run_dir.exists():
                raise FileExistsError(f"{run_dir}: exists; benchmark runs never reuse another run's folder")
            row = run_fit(
                [*first_command(path), *SETTINGS[setting], f"--seed_everything={seed}", *(extra or [])], run_dir
            )
            row["kmeans_process_wall_s"] = run_kmeans(path, clusters_of(setting, path), seed)
            rows.append({"seed": seed, **row, **({"subset": subset} if subset else {})})
            print(
                f"{name:20s} {setting:10s} seed {seed}: {row['steps']:5d} steps "
                f"{'converged' if row['converged'] else 'NOT CONVERGED'} {row['process_wall_s']:7.1f} s "
                f"{row['peak_rss_mb']:7.0f} MB acc {row['hungarian_acc']:.4f}; "
                f"k-means {row['kmeans_process_wall_s']} s",
                flush=True,
            )
        per_setting[setting] = {
            "args": SETTINGS[setting],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "runs": rows,
            "summary": summarise(rows),
        }
    return {
        "dataset": name,
        "source": DATASETS[name],
        "command": COMMAND,
        "settings": per_setting,
    }


def merged(result: dict, path: Path) -> dict:
    """``result`` with the settings of an earlier file for the same data that this run did not measure (a rerun of
    a setting replaces it): ``--setting unpruned`` adds a row to the table instead of dropping the others."""
    if not path.exists():
        return result
    earlier = json.loads(path.read_text())
    same = in_checkout(earlier.get("command", "")) == in_checkout(result["command"])
    if earlier.get("dataset") != result["dataset"] or not same:
        return result
    return {**result, "settings": {**earlier["settings"], **result["settings"]}}


def table(results: Path = RESULTS) -> str:
    """The README table: one line per dataset and setting, mean ± std over seeds."""
    lines = [
        "| set | setting | measured | seeds | converged | steps | wall (s, process) | × k-means | peak RSS (MB) "
        "| accuracy | NMI |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(summary: dict, key: str, digits: int) -> str:
        if key not in summary:
            return "–"
        m, s = summary[key]["mean"], summary[key]["std"]
        return f"{m:.{digits}f} ± {s:.{digits}f}" if summary["seeds"] > 1 else f"{m:.{digits}f}"

    def ratio(summary: dict) -> str:  # mean process wall time over the mean of scikit-learn k-means' processes
        if "kmeans_process_wall_s" not in summary:
            return "–"
        return f"{summary['process_wall_s']['mean'] / summary['kmeans_process_wall_s']['mean']:.1f}"

    for path in sorted(results.glob("fit_*.json")):
        data = json.loads(path.read_text())
        for setting, entry in data["settings"].items():
            s = entry["summary"]
            lines.append(
                f"| {data['dataset']} | {setting} | {entry['measured'][:10]} | {s['seeds']} | "
                f"{s['converged']}/{s['seeds']} | "
                f"{cell(s, 'steps', 0)} | {cell(s, 'process_wall_s', 1)} | {ratio(s)} | {cell(s, 'peak_rss_mb', 0)} | "
                f"{cell(s, 'hungarian_acc', 3)} | {cell(s, 'nmi', 3)} |"
            )
    return "\n".join(lines)


MARKERS = ("<!-- fit-table -->", "<!-- fit-table-end -->")
readme_block = partial(common.readme_block, markers=MARKERS)  # README's generated fit table
write_readme = partial(common.write_readme_block, markers=MARKERS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), action="append")
    parser.add_argument("--setting", choices=list(SETTINGS), action="append", help="default: default, one_head")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=None, help="runs and prepared .npz (default: a fresh folder in /tmp)")
    parser.add_argument("--out", default=None, help="folder for fit_<dataset>.json (default: benchmarks/results)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further icon fit arguments (tests)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--readme", action="store_true", help="with --table: write it into README.md")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.out) if args.out else RESULTS))
        if args.readme:
            write_readme(table(Path(args.out) if args.out else RESULTS))
        return
    work = Path(args.work) if args.work else Path(f"/tmp/icon-bench-fit-{os.getpid()}-{int(time.time())}")
    for name in args.dataset or ["digits"]:
        result = bench(name, args.setting or ["default", "one_head"], args.seeds, work, args.extra)
        out = (Path(args.out) if args.out else RESULTS) / f"fit_{name}.json"
        write_result(out.name, merged(result, out), out)


if __name__ == "__main__":
    main()
