"""Every clusterer on the same features, scored by the same metrics, several seeds each.

    python -m benchmarks.clustering --dataset digits            → benchmarks/results/clustering_digits.json
    python -m benchmarks.clustering --dataset cifar10_test      (needs CIFAR-10: --cifar10-tar-dir or ../shared)
    python -m benchmarks.clustering --dataset cifar10_train_test
    python -m benchmarks.clustering --dataset fashion_mnist_test (Debian's dataset-fashion-mnist)
    python -m benchmarks.clustering --dataset digits_lt10       → clustering_digits_lt10.json (long-tailed)
    python -m benchmarks.clustering --features X.npz            → clustering_X.json (a user's features file)
    python -m benchmarks.clustering --dataset digits --methods icon icon_published --seeds 0 --results /tmp/r
    python -m benchmarks.clustering --table [--readme]          → the README table from the JSON files (--readme
                                                                  writes it between README's two markers)

The lists live in configs (``--configs``, default the package's configs/; docs/contributing.md): a data set is a
file of ``benchmark/datasets/`` (its loader, paths, backbone, image size), a peer a file of ``peers/`` (a method
named by its stem, described by its first comment line, a row of the table), an ablation or option of the I-Con
default a file of ``ablations/`` (overrides on the default recipe; ``table: true``: a row of the table).

Features come from the project's own pipeline (``cached_features``: EfficientNet-Lite0, ImageNet weights). The
head-based methods (I-Con, its ablations, the peers) are ``icon fit`` on them, built by the one builder
(``HeadClusterer``), which centres them by the fitting split's mean and L2-normalises them unless the method's config
says otherwise (the peers as released take the features as the backbone gives them: ``data.normalize: false``); the
classical methods get the centred, L2-normalised features. Methods that fit on one split and score another
(``cifar10_train_test``) fit on train and predict test. Labels only score; no method or hyper-parameter is
chosen by them. Per-seed values, means and standard deviations go to the JSON.

Long-tailed sets: ``<set>_lt10``, ``<set>_lt100`` of every set whose file says ``long_tailed: true`` (digits,
cifar10_test, mnist_test, fashion_mnist_test: ``LONG_TAILED``): the set's features, restricted to a subset whose
class sizes fall geometrically by the ratio (``icon_lightning.data.long_tailed``: n_c = floor(n_max · r^(-c/(C-1))),
n_max the smallest class's size, class 0 largest). Each seed of a row fits and scores on its own subset (rows drawn
by ``default_rng(seed)``; the class sizes are the same for every seed); each run records its subset (class sizes,
ratio, sha256 of the indices). Scored by the same Hungarian accuracy, NMI and ARI; nothing label-based enters a
method.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.cluster import KMeans

from benchmarks import common
from benchmarks.common import (
    LONG_TAILED_RULE,
    RESULTS,
    long_tailed_name,
    long_tailed_names,
    long_tailed_subset,
    write_result,
)
from icon_lightning.baselines import FaissKMeans, KNNSpectralClustering
from icon_lightning.data.datasets import FeaturesFile, IndexedDataset
from icon_lightning.data.feature_store import FeatureStore, cached_features
from icon_lightning.data.neighbours import centred_unit_rows
from icon_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from icon_lightning.estimator import HeadClusterer
from icon_lightning.metrics import METRICS, score_assignments
from icon_lightning.recipes import CONFIG_DIR, recipe_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    """Features to fit on and to score (the same array for transductive datasets), as extracted: the head-based
    methods get them as a user's features file gives them to ``icon fit``, whose DataModule centres them by the fit
    split's mean and L2-normalises them; the classical methods get that same preparation here (``prepared``)."""

    name: str
    fit_x: np.ndarray
    score_x: np.ndarray
    score_y: np.ndarray
    source: str
    long_tailed: int | None = None  # imbalance ratio of a long-tailed set: each seed scores on its own subset

    @property
    def num_classes(self) -> int:
        return int(self.score_y.max()) + 1

    @property
    def transductive(self) -> bool:
        return self.score_x is self.fit_x

    def prepared(self) -> tuple[np.ndarray, np.ndarray]:
        """(fit, score) centred by the fit split's mean and L2-normalised, as ``icon fit`` prepares features."""
        mean = self.fit_x.mean(0, keepdims=True)
        fit = centred_unit_rows(self.fit_x, mean)
        return fit, (fit if self.transductive else centred_unit_rows(self.score_x, mean))

    def for_seed(self, seed: int) -> tuple[Split, dict | None]:
        """The split a seed fits and scores on, and its subset's record: itself (None) for a balanced set; for a
        long-tailed one, its long-tailed subset for ``seed`` (``benchmarks.common.long_tailed_subset``)."""
        if self.long_tailed is None:
            return self, None
        index, record = long_tailed_subset(self.score_y, self.long_tailed, seed)
        x = self.fit_x[index]
        return Split(self.name, x, x, self.score_y[index], self.source), record


# One protocol for every head-based method (I-Con, its ablations, SCAN, TEMI): ``icon fit``'s, built by the one
# builder through ``HeadClusterer`` (README's first command on the split's features, the method's config and its
# overrides). ``BUDGET``: overrides appended to every head-based run (tests shrink it); a run records its protocol
# in the JSON.
PROTOCOL = "icon fit defaults (one builder): features file, views clean, the method's config + overrides"
# Revisions that change only the rows of the methods they name; such a method's row from before is of an earlier
# protocol (not shown, re-run by --resume). Since issue 33 ``scan``, ``temi`` and ``turtle`` are the peers as their
# authors released them; their rows from before ran the common protocol (now ``<peer>_common``). The EMA teacher's
# settling revision names the common-protocol TEMI row (a test keeps it so).
RELEASED = "issue 33: the peer as its authors released it (configs/peers/<peer>.yaml: their optimiser, heads, schedule)"
REVISIONS = {
    "scan": RELEASED,
    "temi": RELEASED,
    "turtle": RELEASED,
    "temi_common": "a plateau counts once the EMA teacher has settled (Convergence: 749 steps at momentum 0.996)",
}
# every row of the I-Con default (``icon``, the files of ``ablations/``) since issue 32: rows from before are of an
# earlier protocol
ISSUE_32 = "issue 32: heads started from k-means and spectral clustering kept to the end, the judge selects the head"
BUDGET: list[str] = []
# The lists live in configs (README's contributing section, docs/contributing.md): a data set is a file of
# ``benchmark/datasets/``, a peer a file of ``peers/`` (every one a table row), an ablation or option of the I-Con
# default a file of ``ablations/`` (``table: true``: a table row), all under ``--configs`` (default: the package's
# configs/). Nothing here lists them.
PEERS = CONFIG_DIR / "peers"
CLASSICAL = ("kmeans_sklearn", "kmeans_faiss", "spectral")  # the table's first rows; then the peers, icon, ablations


# ---------------------------------------------------------------------------------------------- data
def first_comment(path: Path) -> str:
    """A config's first line, ``# <text>``, without the ``#``: its row's description (a data set's source)."""
    line = path.read_text().split("\n", 1)[0]
    if not line.startswith("#") or not line.lstrip("# ").strip():
        raise ValueError(f"{path}: expected a first line '# <one-line description>'")
    return line.lstrip("#").strip()


def config_files(configs: str | Path, folder: str) -> dict[str, Path]:
    """The YAML files of ``configs/folder`` by stem (sorted): what the benchmark finds there."""
    return {path.stem: path for path in sorted((Path(configs) / folder).glob("*.yaml"))}


def read_config(path: Path, keys: tuple[str, ...]) -> dict:
    """A benchmark config file's mapping, with only ``keys`` (an unknown key is named in one line)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {keys}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {list(keys)}")
    return data


DATASET_KEYS = ("fit", "score", "backbone", "image_size", "grayscale", "normalization", "long_tailed")


def dataset_configs(configs: str | Path = CONFIG_DIR) -> dict[str, Path]:
    """The benchmark's data sets: ``benchmark/datasets/<name>.yaml`` (one file a set)."""
    return config_files(configs, "benchmark/datasets")


def long_tailed_bases(configs: str | Path = CONFIG_DIR) -> tuple[str, ...]:
    """The sets whose file says ``long_tailed: true`` (``<set>_lt10``, ``<set>_lt100``)."""
    files = dataset_configs(configs)
    return tuple(name for name, path in files.items() if read_config(path, DATASET_KEYS).get("long_tailed"))


def dataset_names(configs: str | Path = CONFIG_DIR) -> tuple[str, ...]:
    return (*dataset_configs(configs), *long_tailed_names(long_tailed_bases(configs)))


# Long-tailed versions (``<set>_lt<r>``, r = 10, 100) of the sets whose file says so; none of cifar10_train_test.
LONG_TAILED_BASES = long_tailed_bases()
LONG_TAILED = long_tailed_names(LONG_TAILED_BASES)
DATASETS = dataset_names()


def _filled(value, values: dict, where: str):
    """A config value with its ``{placeholders}`` filled from the command's arguments (``values``)."""
    if isinstance(value, dict):
        return {key: _filled(item, values, f"{where}.{key}") for key, item in value.items()}
    if not isinstance(value, str):
        return value
    try:
        return value.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{where}: {value!r} names no argument of the command ({error})") from None


def _instance(spec: dict, values: dict, where: str):
    """``class_path`` / ``init_args`` (as in `icon`'s configs) built, the arguments' placeholders filled."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{where}: expected a mapping with class_path (and init_args)")
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**_filled(spec.get("init_args") or {}, values, f"{where}.init_args"))


def _features(dataset: IndexedDataset, spec: dict, values: dict, cache_dir: str, where: str) -> np.ndarray:
    """The set's features: its items themselves (no ``backbone``), or the backbone's (cached, ``cached_features``)
    on the images at ``image_size`` with the ``normalization`` named (imagenet, or the backbone's own)."""
    if spec.get("backbone") is None:
        return torch.stack([torch.as_tensor(dataset.load(i)) for i in range(len(dataset))]).numpy().astype(np.float32)
    backbone = _instance(spec["backbone"], values, f"{where}.backbone")
    size = int(_filled(spec.get("image_size", 224), values, f"{where}.image_size"))
    norm = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "backbone": backbone.normalization}
    if spec.get("normalization", "backbone") not in norm:
        raise ValueError(f"{where}.normalization: expected imagenet or backbone, got {spec['normalization']!r}")
    transform = eval_transform(size, *norm[spec.get("normalization", "backbone")], bool(spec.get("grayscale")))
    return np.asarray(cached_features(FeatureStore(cache_dir), backbone, dataset, transform), np.float32)


def load_split(name: str, args: argparse.Namespace) -> Split:
    """The features and labels of ``name``: a set of ``dataset_names`` (its file), a long-tailed ``<set>_lt<r>``
    of one (its full set, with the ratio: ``Split.for_seed`` draws each seed's subset) or an ``.npz`` features
    file."""
    base, ratio = long_tailed_name(name)
    configs = getattr(args, "configs", CONFIG_DIR)
    if ratio is None or base not in long_tailed_bases(configs):  # cifar10_train_test_lt10: unknown, named below
        return _full_split(name, args)
    split = _full_split(base, args)
    source = f"{split.source}; long-tailed, imbalance ratio {ratio}, one subset per seed: {LONG_TAILED_RULE}"
    return replace(split, name=name, source=source, long_tailed=ratio)


def _full_split(name: str, args: argparse.Namespace) -> Split:
    if name.endswith(".npz"):  # --features PATH: a user's features file, as `icon fit` reads it
        data = FeaturesFile(name)
        x = data.features.numpy()
        return Split(Path(name).stem, x, x, data.labels, f"features file {name}")
    configs = getattr(args, "configs", CONFIG_DIR)
    path = dataset_configs(configs).get(name)
    if path is None:
        raise ValueError(f"dataset: expected one of {dataset_names(configs)} or an .npz path, got {name!r}")
    spec = read_config(path, DATASET_KEYS)
    values = {**vars(args), "shared": SHARED, "configs": configs}
    fit = _instance(spec.get("fit"), values, f"{path}: fit")
    fit_x = _features(fit, spec, values, args.cache_dir, str(path))
    source = _filled(first_comment(path), values, f"{path}: first line")
    if spec.get("score") is None:  # transductive: fitted and scored on the same items
        return Split(name, fit_x, fit_x, np.asarray(fit.labels), source)
    score = _instance(spec["score"], values, f"{path}: score")
    return Split(
        name, fit_x, _features(score, spec, values, args.cache_dir, str(path)), np.asarray(score.labels), source
    )


# ---------------------------------------------------------------------------------------------- methods
SPECTRAL_ARPACK_MAX = 20_000
ABLATION_KEYS = ("table", "config", "clusters", "overrides")


def ablation_configs(configs: str | Path = CONFIG_DIR) -> dict[str, dict]:
    """``ablations/<name>.yaml`` by name: an ablation or option of the I-Con default, read (``ABLATION_KEYS``)."""
    return {name: read_config(path, ABLATION_KEYS) for name, path in config_files(configs, "ablations").items()}


def override_words(overrides: dict | None, where: str) -> list[str]:
    """An ablation's ``overrides`` (key: value) as `icon`'s words: ``--key=value`` (a string as it is, any other
    value as JSON, which `icon` parses as it parses YAML)."""
    if not isinstance(overrides or {}, dict):
        raise ValueError(f"{where}: expected a mapping of `icon fit` keys to values")
    words = []
    for key, value in (overrides or {}).items():
        words.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    return words


def cluster_count(setting, classes: int, where: str) -> int | str:
    """An ablation's ``clusters``: absent, the classes; ``auto``, the judge's choice; ``<n>x``, n × the classes."""
    if setting is None:
        return classes
    if setting == "auto":
        return "auto"
    match = re.fullmatch(r"(\d+)x", str(setting))
    if not match or int(match[1]) < 1:
        raise ValueError(f"{where}: expected auto or <n>x (n × the classes), got {setting!r}")
    return int(match[1]) * classes


def table_methods(configs: str | Path = CONFIG_DIR) -> tuple[str, ...]:
    """The README table's rows: the classical methods, every peer (a file of ``peers/``), the I-Con default and
    the ablations whose file says ``table: true``; the other ablations run with ``--methods``."""
    ablations = [name for name, spec in ablation_configs(configs).items() if spec.get("table")]
    return (*CLASSICAL, *config_files(configs, "peers"), "icon", *ablations)


def methods(
    num_clusters: int, num_fit: int = 0, cache_dir: str = ".cache/icon_lightning", configs: str | Path = CONFIG_DIR
) -> dict[str, tuple[str, Callable[[int], object], int | str]]:
    """name → (description, seed → estimator, clusters). Spectral clustering solves with LOBPCG above 20 000 points:
    ARPACK's shift-invert LU had not finished on CIFAR-10 train's 50 000-point graph after 30 min; on CIFAR-10
    test both solvers give the same partition (accuracy 0.476), LOBPCG in 9 s against 81 s. Head-based rows are
    ``icon fit`` with a config and overrides (``HeadClusterer``): every file of ``configs/peers`` (named by its
    stem, described by its first comment line), the default recipe (``icon``) and every file of
    ``configs/ablations`` (the default with its overrides). Rows whose clusters exceed the classes
    (over-clustering) are scored by over-clustering accuracy."""
    solver = "lobpcg" if num_fit > SPECTRAL_ARPACK_MAX else None
    k = num_clusters  # the cluster count (never a k-NN width: those are in the configs)

    def fit(config: str | Path, words: list[str], clusters: int | str) -> Callable[[int], object]:
        words = [*words, *BUDGET]
        return lambda seed: HeadClusterer(config, words, clusters, seed, cache_dir=cache_dir)

    alpha = recipe_config("icon_clustering")["init_args"]["p"]["init_args"]["alpha"]
    table = {
        "kmeans_sklearn": ("k-means, scikit-learn, n_init=10", lambda s: KMeans(k, n_init=10, random_state=s), k),
        "kmeans_faiss": (
            "k-means, FAISS, n_init=10 (all points)",
            lambda s: FaissKMeans(k, n_init=10, random_state=s),
            k,
        ),
        "spectral": (
            f"spectral clustering, 10-NN graph (scikit-learn, {solver or 'arpack'})",
            lambda s: KNNSpectralClustering(k, 10, eigen_solver=solver, random_state=s),
            k,
        ),
    }
    for name, path in config_files(configs, "peers").items():
        table[name] = (first_comment(path), fit(path, [], k), k)
    table["icon"] = (
        f"I-Con defaults (icon fit): k-NN (k = 3) + 1-step walks, α = {alpha}",
        fit("icon_clustering", [], k),
        k,
    )
    for name, path in config_files(configs, "ablations").items():
        if name in table:
            raise ValueError(f"{path}: the method {name!r} is also a peer or a built-in row; rename the file")
        spec = read_config(path, ABLATION_KEYS)
        clusters = cluster_count(spec.get("clusters"), k, f"{path}: clusters")
        words = override_words(spec.get("overrides"), f"{path}: overrides")
        table[name] = (first_comment(path), fit(spec.get("config", "icon_clustering"), words, clusters), clusters)
    return table


def run_method(split: Split, make: Callable[[int], object], seed: int, clusters: int) -> dict:
    """One seed of one method: its scores, wall time and a hash of its assignments (int64 bytes, sha256), so a
    row can be checked against another run of the same command. A long-tailed set fits and scores on the seed's
    subset (``Split.for_seed``), recorded as ``subset``."""
    split, subset = split.for_seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    estimator = make(seed)
    pipeline = isinstance(estimator, HeadClusterer)  # `icon fit` prepares the features itself
    fit_x, score_x = (split.fit_x, split.score_x) if pipeline else split.prepared()
    estimator.fit(fit_x)
    pred = np.asarray(estimator.labels_ if split.transductive else estimator.predict(score_x), dtype=np.int64)
    elapsed = time.perf_counter() - start
    searched = clusters == "auto"
    clusters = estimator.n_clusters_ if searched else clusters  # K chosen by the judge, never by the labels
    result = {"seed": seed, **score_assignments(pred, split.score_y, clusters, split.num_classes), "wall_s": elapsed}
    if searched:
        search = estimator.record_["num_clusters_search"]
        result["num_clusters"] = clusters
        result["num_clusters_search"] = {key: search[key] for key in ("range", "chosen", "scores", "wall_time_s")}
    result["assignments_sha256"] = hashlib.sha256(pred.tobytes()).hexdigest()
    if subset is not None:
        result["subset"] = subset
    if pipeline:
        result["selected_head"] = estimator.selected_head_  # a head's number (of ``heads``)
        result["heads"] = [int(h) for h in estimator.head_ids_]
        result["head_losses"] = [float(v) for v in estimator.head_losses_]
        result["selection"] = estimator.record_["selection"]
        result["judge_scores"] = (estimator.record_["judge"] or {}).get("scores")  # by head number
        result["steps"] = estimator.steps_
        result["converged"] = bool(estimator.converged_)
    return result


def summarise(runs: list[dict]) -> dict:
    out = {}
    over = ("over_clustering_acc",) if all("over_clustering_acc" in r for r in runs) else ()
    for name in (*METRICS, *over, "wall_s"):
        values = np.array([r[name] for r in runs])
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


def benchmark(name: str, args: argparse.Namespace) -> Path:
    split = load_split(name, args)
    k = split.num_classes
    first, subset = split.for_seed(args.seeds[0])  # a long-tailed set's subsets: one size and shape for every seed
    configs = args.configs
    table = methods(k, len(first.fit_x), args.cache_dir, configs)
    chosen = args.methods or list(table_methods(configs))
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected some of {list(table)}")
    path = Path(args.results or RESULTS) / f"clustering_{split.name}.json"
    print(f"{split.name}: fit {first.fit_x.shape}, score {first.score_x.shape}, {k} clusters; {split.source}")
    # Merge into an existing file, and write after every method: one method can be re-run, and an interrupted
    # run resumes with --resume (methods already in the file are skipped).
    # Every method's entry names the protocol it ran under, so rows from an earlier protocol kept in the same file
    # are never attributed to this one, and --resume re-runs them.
    results = current_rows(path, configs)
    ran: set[str] = set()

    def save() -> Path:
        # Re-read first: another process may have added other methods of this dataset meanwhile.
        results.update({m: v for m, v in current_rows(path, configs).items() if m not in ran})
        payload = {
            "dataset": split.name,
            "source": split.source,
            "fit_shape": list(first.fit_x.shape),
            "score_shape": list(first.score_x.shape),
            "num_clusters": k,
            **long_tailed_record(subset),
            "seeds": list(args.seeds),
            "command": f"python -m benchmarks.clustering --{'features' if name.endswith('.npz') else 'dataset'} {name}",
            "methods": {m: results[m] for m in table if m in results},
        }
        return write_result(path.name, payload, path)

    for method in chosen:
        done = results.get(method)
        if args.resume and done and len(done["runs"]) == len(args.seeds):
            continue
        description, make, clusters = table[method]
        runs = [run_method(split, make, seed, clusters) for seed in args.seeds]
        results[method] = {
            "description": description,
            "clusters": clusters,
            "protocol": current_protocol(method, configs),
            "runs": runs,
            **summarise(runs),
        }
        ran.add(method)
        s = results[method]
        print(
            f"  {method:<20} acc {s['hungarian_acc']['mean']:.3f} ± {s['hungarian_acc']['std']:.3f}"
            f"  nmi {s['nmi']['mean']:.3f}  ari {s['ari']['mean']:.3f}  {s['wall_s']['mean']:.1f} s",
            flush=True,
        )
        save()
    return save()


def long_tailed_record(subset: dict | None) -> dict:
    """A long-tailed set's entry of its results file: the ratio, the class sizes every seed's subset has, the rule
    (each run's own subset, with the hash of its indices, is in its ``subset``); nothing for a balanced set."""
    if subset is None:
        return {}
    keys = ("ratio", "class_sizes", "size", "of", "rule")
    return {"long_tailed": {key: subset[key] for key in keys}}


def current_protocol(method: str = "", configs: str | Path = CONFIG_DIR) -> str:
    """The protocol a row of ``method`` runs under now: ``PROTOCOL``, the method's revision, the budget. Issue 32's
    revision is every row of the I-Con default (``icon``, a file of ``ablations/``), never a peer's
    (``icon_published``)."""
    default = method == "icon" or (Path(configs) / "ablations" / f"{method}.yaml").is_file()
    text = REVISIONS.get(method) or (ISSUE_32 if default else None)
    revision = f"; {text}" if text else ""
    return PROTOCOL + revision + (f"; budget overrides {list(BUDGET)}" if BUDGET else "")


def current_rows(path: Path, configs: str | Path = CONFIG_DIR) -> dict:
    """The methods of a results file that ran under the current protocol: a file is rewritten with these only,
    so rows of an earlier protocol are removed rather than shown beside this one's."""
    if not path.exists():
        return {}
    rows = methods_of(json.loads(path.read_text())).items()
    return {m: v for m, v in rows if v["protocol"] == current_protocol(m, configs)}


def methods_of(data: dict) -> dict:
    """A results file's methods, each with its ``protocol`` (files written before per-method protocols name one
    for all, at the top level: ``protocol``, or the still earlier ``schedule``)."""
    default = data.get("protocol") or f"earlier fixed schedule {data.get('schedule')}"
    if data.get("budget_overrides"):
        default += f"; budget overrides {data['budget_overrides']}"
    return {name: {"protocol": default, **entry} for name, entry in data["methods"].items()}


# ---------------------------------------------------------------------------------------------- README table
def markdown_table(paths: list[Path], configs: str | Path = CONFIG_DIR) -> str:
    """README's results: per set, the rows that ran under this protocol (rows of an earlier protocol are never
    shown beside them), then a line naming the best method, the I-Con default and the gap in points."""
    revisions = "".join(f" {m}: {text}." for m, text in {**REVISIONS, "icon*": ISSUE_32}.items())
    lines = [
        f"Every head-based row: {current_protocol()}.{revisions} Regenerate with `python -m benchmarks.clustering "
        "--table --readme`.",
        "",
        "**Issue 32's targets** (the per-set tables below hold every row):",
        "",
        targets_table(paths),
        "",
    ]
    for path in paths:
        data = json.loads(path.read_text())
        rows = {m: v for m, v in methods_of(data).items() if v["protocol"] == current_protocol(m, configs)}
        if not rows:
            lines += [f"**{data['dataset']}**: not run under this protocol yet (`{data['command']}`)", ""]
            continue
        k = data["num_clusters"]
        lines += [
            f"**{data['dataset']}**: {data['source']}; {len(data['seeds'])} seeds, mean ± std (`{data['command']}`)",
            "",
            "| method | Hungarian acc | NMI | ARI | steps (converged) | wall s |",
            "|---|---|---|---|---|---|",
        ]
        best = max((m for m in rows if rows[m].get("clusters", k) == k), key=lambda m: rows[m]["hungarian_acc"]["mean"])
        for name, m in rows.items():
            searched = m.get("clusters") == "auto"  # K chosen by the judge: the chosen Ks follow its scores
            over = not searched and m.get("clusters", k) > k
            score = m["over_clustering_acc"] if over else m["hungarian_acc"]
            acc = f"{score['mean']:.3f} ± {score['std']:.3f}"
            acc = f"**{acc}**" if name == best else acc
            acc = acc + " (over-clustering acc)" if over else acc
            acc = acc + f" (K = {', '.join(str(r['num_clusters']) for r in m['runs'])})" if searched else acc
            runs = m["runs"]
            steps = "—"
            if "steps" in runs[0]:
                done = sum(bool(r["converged"]) for r in runs)
                steps = f"{np.mean([r['steps'] for r in runs]):.0f} ({done}/{len(runs)})"
            lines.append(
                f"| {name} | {acc} | {m['nmi']['mean']:.3f} ± {m['nmi']['std']:.3f} "
                f"| {m['ari']['mean']:.3f} ± {m['ari']['std']:.3f} | {steps} | {m['wall_s']['mean']:.1f} |"
            )
        missing = [m for m in table_methods(configs) if m not in rows]
        partial = (
            f" Not run on this set yet: {', '.join(missing)} (the best is among the rows above only)."
            if missing
            else ""
        )
        lines += ["", gap_line(rows, best) + partial, ""]
    return "\n".join(lines)


def targets_table(paths: list[Path]) -> str:
    """Issue 32's targets, per set that ran the default, k-means (FAISS) and spectral clustering under this protocol:
    the default's Hungarian accuracy against the better of the two (within 1 point? above both?), and, where
    ``icon_auto_k`` ran, the Ks the judge chose (one a seed) and the NMI there against the default's NMI at the
    true K (at least that − 0.02?). Means over seeds; labels only score."""
    lines = [
        "| set | I-Con default | k-means | spectral | default − better (points) | K chosen (seeds) | NMI at chosen K "
        "| NMI at true K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    within = above = k_met = k_sets = sets = 0
    for path in paths:
        data = json.loads(path.read_text())
        rows = {m: v for m, v in methods_of(data).items() if v["protocol"] == current_protocol(m)}
        if not {"icon", "kmeans_faiss", "spectral"} <= set(rows):
            continue
        acc = {m: rows[m]["hungarian_acc"]["mean"] for m in ("icon", "kmeans_faiss", "spectral")}
        gap = 100 * (acc["icon"] - max(acc["kmeans_faiss"], acc["spectral"]))
        sets, within, above = sets + 1, within + (gap >= -1), above + (gap > 0)
        chosen, nmi_auto, nmi_true = "—", "—", f"{rows['icon']['nmi']['mean']:.3f}"
        if "icon_auto_k" in rows:
            auto = rows["icon_auto_k"]
            chosen = ", ".join(str(r["num_clusters"]) for r in auto["runs"])
            met = auto["nmi"]["mean"] >= rows["icon"]["nmi"]["mean"] - 0.02
            k_sets, k_met = k_sets + 1, k_met + met
            nmi_auto = f"{auto['nmi']['mean']:.3f}" + ("" if met else " (below − 0.02)")
        lines.append(
            f"| {data['dataset']} | {acc['icon']:.3f} | {acc['kmeans_faiss']:.3f} | {acc['spectral']:.3f} | "
            f"{gap:+.1f} | {chosen} | {nmi_auto} | {nmi_true} |"
        )
    lines += [
        "",
        f"The default is within 1 point of the better of k-means and spectral clustering on {within} of {sets} sets "
        f"and above both on {above}; the judge's K keeps NMI within 0.02 of the true K's on {k_met} of {k_sets}.",
    ]
    return "\n".join(lines)


MARKERS = ("<!-- clustering-results -->", "<!-- clustering-table -->")
readme_block = partial(common.readme_block, markers=MARKERS)  # the generated part of README's results section
write_readme = partial(common.write_readme_block, markers=MARKERS)
README = common.README


def gap_line(rows: dict, best: str) -> str:
    top = rows[best]["hungarian_acc"]["mean"]
    if "icon" not in rows:
        return f"Best: {best} {top:.3f}; the I-Con default has not run under this protocol."
    icon = rows["icon"]["hungarian_acc"]["mean"]
    gap = 100 * (icon - top)
    verdict = "I-Con's default is the best" if best == "icon" else f"I-Con's default {gap:+.1f} points from it"
    return f"Best: {best} {top:.3f}; I-Con default {icon:.3f}; {verdict}."


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``arguments().parse_args([])``: the defaults, e.g. where the data sets live)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset", action="append", help=f"a set of --configs' benchmark/datasets (here: {', '.join(DATASETS)})"
    )
    parser.add_argument("--features", action="append", help="an .npz features file (features, labels) as a dataset")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cifar10-tar-dir", default=str(SHARED / "cifar10"))
    parser.add_argument("--fashion-dir", default=str(FASHION))
    parser.add_argument("--mnist-dir", default=str(SHARED / "mnist"))
    parser.add_argument("--fashion-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    parser.add_argument(
        "--configs", default=str(CONFIG_DIR), help="the folder of peers/, ablations/ and benchmark/datasets/"
    )
    parser.add_argument("--results", default=None, help="the folder of the JSON results (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true", help="skip methods already in the JSON with every seed")
    parser.add_argument("--table", action="store_true", help="print the README table from the JSON results")
    parser.add_argument("--readme", action="store_true", help="with --table: write it into README.md's results")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    if len(args.seeds) < 1:
        parser.error("--seeds: at least one seed")
    known = dataset_names(args.configs)
    for name in args.dataset or []:
        if name not in known:
            parser.error(f"--dataset: expected one of {', '.join(known)} (files of {args.configs}), got {name!r}")
    for name in [*(args.dataset or []), *(args.features or [])]:
        benchmark(name, args)
    if args.table:
        table = markdown_table(sorted(Path(args.results or RESULTS).glob("clustering_*.json")), args.configs)
        print(table)
        if args.readme:
            write_readme(table)


if __name__ == "__main__":
    main()
