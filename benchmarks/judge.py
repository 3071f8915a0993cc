"""Does the judge pick the right partition? Candidates trained under the I-Con loss, judged without labels, scored.

    python -m benchmarks.judge --dataset digits --dataset digits_lt10 [--seeds 0 1 2]
        → benchmarks/results/judge_<dataset>.json (and a table on stdout)
    python -m benchmarks.judge --table [--readme]  → README's table from those files (--readme: written into it)

Per seed of a set (a long-tailed set: the seed's own subset, as ``benchmarks.clustering`` draws it) the candidates
are ``icon fit`` runs on the same features, one head each, built by the one builder (``HeadClusterer``), differing
only in their start (``CANDIDATES``: the k-means start, the spectral start, and random heads of two seeds), each run
to its own convergence (nothing prunes one start against another). Each candidate gets two label-free scores:
the judge (``icon_lightning.metrics.judge``: the cosine silhouette of its assignment in the prepared features,
on one seeded subsample) and its training loss (the run's own head selection today); labels then score it
(Hungarian accuracy, NMI, ARI). The JSON holds per seed: every candidate, the one the judge picks, the one the loss
picks, the best by accuracy, and the Spearman rank correlations of judge score and of −loss with accuracy over the
candidates; and over seeds: the mean of each. The judge's rule is fixed in its module; nothing here chooses it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from functools import partial
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from benchmarks import common
from benchmarks.clustering import DATASETS, load_split
from benchmarks.clustering import arguments as clustering_arguments
from benchmarks.common import RESULTS, write_result
from icon_lightning.estimator import HeadClusterer
from icon_lightning.metrics import score_assignments
from icon_lightning.metrics.judge import choose, judge

# The candidates: one head each, its start the only difference (random heads: two seeds of the run's RNG).
CANDIDATES = {
    "kmeans_start": ["--model.head_init=[kmeans]"],
    "spectral_start": ["--model.head_init=[spectral]"],
    "random_a": ["--model.head_init=[]"],
    "random_b": ["--model.head_init=[]", "--seed_everything={seed_b}"],
}
SEED_B = 1000  # random_b's run seed: the seed + 1000


def candidate(split, start: list[str], seed: int, cache_dir: str, budget: list[str]) -> dict:
    """One converged ``icon fit`` of one head with ``start`` on the split's fit features: its assignment, training
    loss, steps, verdict, wall time and scores (labels only score)."""
    overrides = ["--model.num_heads=1", *(w.format(seed_b=seed + SEED_B) for w in start), *budget]
    clock = time.perf_counter()
    est = HeadClusterer(n_clusters=split.num_classes, random_state=seed, cache_dir=cache_dir, overrides=overrides)
    est.fit(split.fit_x)
    pred = est.labels_ if split.transductive else est.predict(split.score_x)
    out = {"loss": float(est.head_losses_.min()), "steps": est.steps_, "converged": est.converged_}
    out["wall_s"] = round(time.perf_counter() - clock, 2)
    out.update(score_assignments(pred, split.score_y, split.num_classes))
    return out | {"assignment": est.labels_}


def judge_seed(split, seed: int, cache_dir: str, budget: list[str]) -> dict:
    """Every candidate of one seed, judged on the prepared fit features (one subsample for all), and the picks."""
    runs = {name: candidate(split, start, seed, cache_dir, budget) for name, start in CANDIDATES.items()}
    names = list(runs)
    scores = judge(split.prepared()[0], [runs[n].pop("assignment") for n in names], seed=seed)
    for name, score in zip(names, scores):
        runs[name]["judge"] = float(score)
    acc = np.array([runs[n]["hungarian_acc"] for n in names])
    loss = np.array([runs[n]["loss"] for n in names])
    picked, by_loss = names[choose(scores, loss)], names[int(loss.argmin())]
    return {
        "seed": seed,
        "candidates": runs,
        "judge_pick": picked,
        "loss_pick": by_loss,
        "best": names[int(acc.argmax())],
        "judge_pick_acc": runs[picked]["hungarian_acc"],
        "loss_pick_acc": runs[by_loss]["hungarian_acc"],
        "best_acc": float(acc.max()),
        "spearman_judge_acc": rank_correlation(scores, acc),
        "spearman_neg_loss_acc": rank_correlation(-loss, acc),
    }


def rank_correlation(score: np.ndarray, acc: np.ndarray) -> float | None:
    """Spearman's rho of a score with accuracy over the candidates (None when either is constant)."""
    if np.ptp(score) == 0 or np.ptp(acc) == 0:
        return None
    return float(spearmanr(score, acc).statistic)


def summary(seeds: list[dict]) -> dict:
    """Means over seeds (a correlation that is None for a seed is left out of its mean)."""
    out = {}
    for key in ("judge_pick_acc", "loss_pick_acc", "best_acc", "spearman_judge_acc", "spearman_neg_loss_acc"):
        values = [s[key] for s in seeds if s[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    out["judge_within_1_point"] = sum(s["best_acc"] - s["judge_pick_acc"] <= 0.01 for s in seeds)
    out["seeds"] = len(seeds)
    return out


def run(name: str, args: argparse.Namespace) -> dict:
    split = load_split(name, args)
    seeds = []
    for seed in args.seeds:
        seed_split, subset = split.for_seed(seed)
        seeds.append(judge_seed(seed_split, seed, args.cache_dir, args.budget) | ({"subset": subset} if subset else {}))
        print_seed(name, seeds[-1])
    result = {"dataset": split.name, "source": split.source, "candidates": CANDIDATES, "seeds": seeds}
    result["summary"] = summary(seeds)
    write_result(f"judge_{split.name}.json", result, Path(args.out) / f"judge_{split.name}.json")
    return result


def print_seed(name: str, seed: dict) -> None:
    for cand, r in seed["candidates"].items():
        print(f"{name} seed {seed['seed']} {cand:<15} acc {r['hungarian_acc']:.3f} nmi {r['nmi']:.3f} "
              f"judge {r['judge']:.4f} loss {r['loss']:.4f} steps {r['steps']}")  # fmt: skip
    print(f"  judge picks {seed['judge_pick']} ({seed['judge_pick_acc']:.3f}), loss picks {seed['loss_pick']} "
          f"({seed['loss_pick_acc']:.3f}), best {seed['best']} ({seed['best_acc']:.3f})", flush=True)  # fmt: skip


def table(results: Path = RESULTS) -> str:
    """README's judge table from ``judge_<set>.json`` (a set run one seed a file, ``judge_<set>_seed<s>.json``, is
    pooled under its set): per set the mean accuracy of the judge's pick, the loss's pick and the best candidate,
    the set-seeds where the judge's pick is within 1 point of the best, and the mean Spearman correlations."""
    pooled: dict[str, list[dict]] = {}
    for path in sorted(results.glob("judge_*.json")):
        data = json.loads(path.read_text())
        pooled.setdefault(re.sub(r"_seed\d+$", "", data["dataset"]), []).extend(data["seeds"])
    lines = [
        "| set | seeds | judge's pick | loss's pick | best candidate | judge within 1 point | ρ judge | ρ −loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    near = 0
    for name, seeds in pooled.items():
        mean = summary(seeds)
        near += mean["best_acc"] - mean["judge_pick_acc"] <= 0.01
        rho = [
            f"{mean[k]:.2f}" if mean[k] is not None else "—" for k in ("spearman_judge_acc", "spearman_neg_loss_acc")
        ]
        lines.append(
            f"| {name} | {len(seeds)} | {mean['judge_pick_acc']:.3f} | {mean['loss_pick_acc']:.3f} | "
            f"{mean['best_acc']:.3f} | {mean['judge_within_1_point']}/{len(seeds)} | {rho[0]} | {rho[1]} |"
        )
    total = sum(len(seeds) for seeds in pooled.values())
    within = sum(summary(seeds)["judge_within_1_point"] for seeds in pooled.values())
    lines += [
        "",
        f"The judge's pick is within 1 point of the best candidate on {within} of {total} set-seeds, and in the mean "
        f"on {near} of {len(pooled)} sets.",
    ]
    return "\n".join(lines)


MARKERS = ("<!-- judge-table -->", "<!-- judge-table-end -->")
readme_block = partial(common.readme_block, markers=MARKERS)  # README's generated judge table
write_readme = partial(common.write_readme_block, markers=MARKERS)
README = common.README


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, action="append")
    parser.add_argument("--features", action="append", help="an .npz features file (features, labels) as a dataset")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    parser.add_argument("--out", default=str(RESULTS), help="folder of judge_<dataset>.json")
    parser.add_argument(
        "--budget", action="append", default=[], help="an override added to every candidate's fit: --budget=--key=value"
    )
    parser.add_argument("--table", action="store_true", help="print README's judge table from --out's JSON files")
    parser.add_argument("--readme", action="store_true", help="with --table: write it into README.md")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.out)))
        if args.readme:
            write_readme(table(Path(args.out)))
        return []
    data = vars(clustering_arguments().parse_args([]))  # where the data sets live: the clustering benchmark's
    args = argparse.Namespace(**{**data, **vars(args)})
    return [run(name, args) for name in [*(args.dataset or []), *(args.features or [])] or ["digits"]]


if __name__ == "__main__":
    main()
