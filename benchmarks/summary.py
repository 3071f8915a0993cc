"""README's results summary, and every page block generated from ``benchmarks/results/*.json``.

    python -m benchmarks.summary              → print README's results summary
    python -m benchmarks.summary --readme     → write it between its markers (README.md)
    python -m benchmarks.summary --docs       → rewrite every block of README.md and docs/*.md that is generated from
                                                the JSON results (this summary, the clustering results, the fit,
                                                judge, data-speed, training-step, memory and α-sweep tables, and the
                                                benchmark's config-file rows), each in
                                                the page that holds it

The summary is made from ``benchmarks/results/clustering_*.json`` alone: for each method that ran under the
clustering benchmark's current protocol (``benchmarks.clustering.current_rows``; rows of an earlier protocol are never
shown), its Hungarian accuracy, mean over seeds, on each set; one table for the balanced sets and one for their
long-tailed versions. Methods and sets are whatever the JSON holds (a new peer config's rows appear once its
benchmark has run); nothing here lists them.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

from benchmarks import common
from benchmarks.common import RESULTS, long_tailed_name

MARKERS = ("<!-- results-summary -->", "<!-- results-summary-end -->")
COMMAND = "python -m benchmarks.summary --readme"
# the training-step table of docs/speed.md (benchmarks.train_step.table of train_step_cpu.json)
TRAIN_STEP_MARKERS = ("<!-- train-step-table -->", "<!-- train-step-table-end -->")
# the data table of docs/speed.md (k-NN, extraction and cluster-kernel JSON files)
DATA_SPEED_MARKERS = ("<!-- data-speed-table -->", "<!-- data-speed-table-end -->")
# the digits α sweep of docs/runs-and-sweeps.md (`icon sweep experiments/digits/sweep.yaml`'s sweep_summary.json)
ALPHA_SWEEP_MARKERS = ("<!-- alpha-sweep-table -->", "<!-- alpha-sweep-table-end -->")
ALPHA_SWEEP = common.ROOT / "experiments" / "digits" / "results" / "sweep_summary.json"
# the benchmark's config-file rows of docs/protocols.md (configs/peers/*.yaml, configs/ablations/*.yaml)
METHOD_CONFIGS_MARKERS = ("<!-- method-configs -->", "<!-- method-configs-end -->")
# the memory table of docs/speed.md (ddp_memory_cpu.json, ``make bench-ddp-memory``)
DDP_MEMORY_MARKERS = ("<!-- ddp-memory-table -->", "<!-- ddp-memory-table-end -->")


def _cell(row: dict | None, k: int, best: bool) -> str:
    if row is None:
        return "—"
    clusters = row.get("clusters", k)
    over = clusters != "auto" and clusters > k
    score = row["over_clustering_acc" if over else "hungarian_acc"]["mean"]
    text = f"**{score:.3f}**" if best else f"{score:.3f}"
    chosen = sorted({run["num_clusters"] for run in row["runs"] if "num_clusters" in run})
    if clusters == "auto" and chosen:  # the K each seed chose without labels: its range over the seeds
        text += f" (K={chosen[0]})" if len(chosen) == 1 else f" (K={chosen[0]}–{chosen[-1]})"
    return text + " (oc)" if over else text


def _best(rows: dict, k: int) -> str | None:
    """The clustering table's best row of a set: highest mean accuracy among the rows at the set's K."""
    fixed = [m for m in rows if rows[m].get("clusters", k) == k]
    return max(fixed, key=lambda m: rows[m]["hungarian_acc"]["mean"]) if fixed else None


def _table(sets: list[tuple[str, int, dict]], methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(name for name, _, _ in sets) + " |", "|---" + "|---:" * len(sets) + "|"]
    best = [_best(rows, k) for _, k, rows in sets]
    for method in methods:
        if not any(method in rows for _, _, rows in sets):
            continue
        cells = [_cell(rows.get(method), k, method == b) for (_, k, rows), b in zip(sets, best)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def summary(paths: list[Path]) -> str:
    """README's results summary from the clustering results files ``paths``: per method (rows in the order the
    results files first name them), Hungarian accuracy on each set, mean over its seeds; bold: the set's best row
    at the set's K (the clustering table's rule); then a line per method saying what it is (the JSON's
    description) and how often the I-Con default is the best row."""
    from benchmarks.clustering import current_rows  # the one owner of "which rows are current"

    sets, methods, described = [], [], {}
    for path in paths:
        data, rows = json.loads(path.read_text()), current_rows(path)
        if not rows:
            continue
        sets.append((data["dataset"], data["num_clusters"], rows))
        for method, row in rows.items():
            if method not in described:
                methods.append(method)
                described[method] = row.get("description", "")
    balanced = [s for s in sets if long_tailed_name(s[0])[1] is None]
    long_tailed = [s for s in sets if long_tailed_name(s[0])[1] is not None]
    seeds = sorted({len(row["runs"]) for _, _, rows in sets for row in rows.values()})
    header = (
        f"Hungarian accuracy, mean over {' or '.join(map(str, seeds))} seeds (labels only score); **bold**: the best "
        "row of the set at its number of classes; a row run with `--data.num_clusters auto` is scored at the K it "
        "chose (K=: over the seeds), never bold; (oc): over-clustering accuracy; —: not run under the current "
        f"protocol. Generated from `benchmarks/results/clustering_*.json` by `{COMMAND}`; every row, with NMI, ARI, "
        "steps and wall time, is in [docs/results.md](docs/results.md)."
    )
    lines = [*textwrap.wrap(header, 117, break_on_hyphens=False, break_long_words=False), ""]
    for title, group in (
        ("Balanced sets", balanced),
        ("Long-tailed versions (imbalance ratio 10 or 100)", long_tailed),
    ):
        if group:
            lines += [f"**{title}**", "", *_table(group, methods), ""]
    lines += [f"- `{method}`: {described[method]}" for method in methods]
    with_icon = [(rows, k) for _, k, rows in sets if "icon" in rows]
    wins = sum(_best(rows, k) == "icon" for rows, k in with_icon)
    lines += ["", f"The I-Con default (`icon`) is the best row on {wins} of the {len(with_icon)} sets it ran on."]
    return "\n".join(lines)


def results_summary(results: Path = RESULTS) -> str:
    return summary(sorted(results.glob("clustering_*.json")))


def ddp_memory_table(path: Path = RESULTS / "ddp_memory_cpu.json") -> str:
    """Memory per process after ``setup`` and a read of every view row (MiB, ``/proc/self/smaps_rollup``), one line
    per setting and rank of ``benchmarks.ddp_memory``'s results file."""
    lines = ["| views | rank | RSS | PSS (shared pages split) | private | peak RSS |", "|---|---:|---:|---:|---:|---:|"]
    for row in json.loads(path.read_text())["rows"]:
        mib = row["after_setup_and_reads"]
        values = " | ".join(f"{mib[key]:,.0f}" for key in ("rss", "pss", "private", "peak_rss"))
        lines.append(f"| {row['views']} | {row['rank']} | {values} |")
    return "\n".join(lines)


def _machine(data: dict) -> str:
    info = data.get("machine", {})
    if "gpu" in info:
        return f"{info['gpu']} ({info['cores']} CPU cores)"
    return data.get("device") or f"{info['cores']}-core CPU ({info['cpu']})"


def _knn_rows(name: str) -> list[str]:
    data = json.loads((RESULTS / name).read_text())
    case = f"exact k-NN, {data['n']:,} × {data['d']} fp32, k = {data['k']}"
    return [
        f"| {case} | {_machine(data)} | {r['backend']}: {r['seconds']:.3g} s = {r['gflops']:,.0f} GFLOP/s = "
        f"**{r['fraction_of_matmul']:.2g}** of fp32 matmul ({data['matmul_gflops']:,.0f} GFLOP/s, same run) "
        f"| `{name}` |"
        for r in data["rows"]
    ]


def _extraction_row(name: str) -> str:
    data = json.loads((RESULTS / name).read_text())
    case = f"extraction, {data['images']:,} CIFAR-10 test images, `{data['backbone']}` at {data['image_size']} px"
    result = (
        f"pipeline (tar → JPEG decode → transform → backbone → cache) {data['pipeline_images_per_s']:,.1f} img/s, "
        f"bare forward loop {data['bare_images_per_s']:,.1f} img/s: ratio **{data['ratio_to_bare']:.2f}** "
        f"({data['num_workers']} loader workers)"
    )
    return f"| {case} | {_machine(data)} | {result} | `{name}` |"


def _tuning_row(name: str = "extraction_cpu_tuning.json") -> str:
    data = json.loads((RESULTS / name).read_text())
    runs = {(r["image_size"], r["cpu_tuning"]): r for r in data["runs"]}
    parts = []
    for size in sorted({s for s, _ in runs}):
        off, on = runs[size, "off"], runs[size, "on"]
        parts.append(
            f"{size} px: **{off['pipeline_images_per_s']:.1f} → {on['pipeline_images_per_s']:.1f} img/s** "
            f"({on['pipeline_images_per_s'] / off['pipeline_images_per_s']:.1f}×), user {off['pipeline_user_s']:.1f} "
            f"→ {on['pipeline_user_s']:.1f} s, sys {off['pipeline_sys_s']:.1f} → {on['pipeline_sys_s']:.1f} s, "
            f"minor faults {off['pipeline_minor_faults']:,} → {on['pipeline_minor_faults']:,}"
        )
    first = data["runs"][0]
    case = f"CPU extraction without / with `cpu_tuning`, {first['images']:,} images, batches of {first['batch_size']}"
    return f"| {case} | {_machine(data)} | {'; '.join(parts)} | `{name}` |"


def data_speed_table() -> str:
    """docs/speed.md's data table: k-NN, the k-NN cache key, feature extraction and the cluster kernel, each row
    from the JSON file its last column names (``make bench-data``, ``make bench-kernel``)."""
    lines = ["| benchmark | machine | result | JSON |", "|---|---|---|---|", *_knn_rows("knn_cpu.json")]
    key = json.loads((RESULTS / "knn_fingerprint_cpu.json").read_text())
    lines.append(
        f"| k-NN cache key: SHA-256 of every byte, {key['rows']:,} × {key['dim']:,} {key['dtype']} "
        f"({key['gigabytes']:.2f} GB, memory-mapped) | {_machine(key)} | "
        + ", ".join(f"{s:.2f} s" for s in key["seconds"])
        + " (just written, then again) | `knn_fingerprint_cpu.json` |"
    )
    lines += _knn_rows("knn_cuda.json")
    lines += [_extraction_row("extraction_cpu.json"), _tuning_row()]
    lines += [_extraction_row(p.name) for p in sorted(RESULTS.glob("extraction_cuda*.json"))]
    kernel = json.loads((RESULTS / "cluster_kernel_cuda.json").read_text())
    for r in (r for r in kernel["rows"] if (r["B"], r["K"]) == (4096, 1000)):
        lines.append(
            f"| cluster kernel fwd+bwd, {kernel['dtype']}, B = {r['B']}, K = {r['K']} | {_machine(kernel)} | "
            f"{r['kernel_ms']:.1f} ms vs {r['matmul_ms']:.1f} ms for a plain B×K·K×B matmul fwd+bwd "
            f"(**{r['fraction_of_matmul']:.2f}** of matmul) | `cluster_kernel_cuda.json` |"
        )
    return "\n".join(lines)


def alpha_sweep_table(path: Path = ALPHA_SWEEP) -> str:
    """Validation Hungarian accuracy of the debias-α sweep, mean ± std (numpy's, over the seeds) per α on p only,
    on q only and on both, from an ``icon sweep`` summary (one row per trial)."""
    import numpy as np

    p_key, q_key = "model.loss.init_args.p.init_args.alpha", "model.loss.init_args.q.init_args.alpha"
    trials = json.loads(path.read_text())
    lines = ["| α | α on p only | α on q only | α on both |", "|---|---|---|---|"]
    for alpha in sorted({t[p_key] for t in trials}):
        cells = []
        for p, q in ((alpha, 0.0), (0.0, alpha), (alpha, alpha)):
            acc = [t["val/hungarian_acc/best"] for t in trials if (t[p_key], t[q_key]) == (p, q)]
            cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" if acc else "—")
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_configs_table(configs: Path = common.ROOT / "configs") -> str:
    """The clustering benchmark's rows that are config files: every ``peers/*.yaml`` and ``ablations/*.yaml``,
    named by its stem and described by its first comment line (as the benchmark names and describes them)."""
    lines = ["| row | file | what it is (the file's first line) |", "|---|---|---|"]
    for folder in ("peers", "ablations"):
        for path in sorted((configs / folder).glob("*.yaml")):
            first = path.read_text().splitlines()[0] if path.read_text().strip() else ""
            lines.append(f"| `{path.stem}` | `configs/{folder}/{path.name}` | {first.lstrip('#').strip() or '—'} |")
    return "\n".join(lines)


def generated_blocks() -> dict[tuple[str, str], tuple[str, Callable[[], str]]]:
    """Every block of README.md and docs/*.md generated from ``benchmarks/results/*.json``: its markers → (the
    command that writes it, the function that makes it now). tests/test_docs.py holds each page to it."""
    from benchmarks import clustering, fit, judge, train_step

    def steps() -> str:
        return train_step.table(json.loads((RESULTS / "train_step_cpu.json").read_text())["rows"])

    return {
        MARKERS: (COMMAND, results_summary),
        clustering.MARKERS: (
            "python -m benchmarks.clustering --table --readme",
            lambda: clustering.markdown_table(sorted(RESULTS.glob("clustering_*.json"))),
        ),
        fit.MARKERS: ("python -m benchmarks.fit --table --readme", fit.table),
        judge.MARKERS: ("python -m benchmarks.judge --table --readme", judge.table),
        TRAIN_STEP_MARKERS: ("python -m benchmarks.summary --docs", steps),
        DDP_MEMORY_MARKERS: ("python -m benchmarks.summary --docs", ddp_memory_table),
        DATA_SPEED_MARKERS: ("python -m benchmarks.summary --docs", data_speed_table),
        ALPHA_SWEEP_MARKERS: ("python -m benchmarks.summary --docs", alpha_sweep_table),
        METHOD_CONFIGS_MARKERS: ("python -m benchmarks.summary --docs", method_configs_table),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the summary into README.md")
    parser.add_argument("--docs", action="store_true", help="rewrite every JSON-generated block of README and docs/")
    args = parser.parse_args(argv)
    if args.docs:
        for markers, (_, make) in generated_blocks().items():
            print(f"{markers[0]} → {common.write_readme_block(make(), markers=markers)}")
        return
    text = results_summary()
    print(text)
    if args.readme:
        common.write_readme_block(text, markers=MARKERS)


if __name__ == "__main__":
    main()
