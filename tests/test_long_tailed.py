"""Long-tailed subsets (icon_lightning.data.long_tailed) and the benchmarks' ``<set>_lt<r>`` sets."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits

from icon_lightning.data.long_tailed import long_tailed_indices, long_tailed_sizes

ROOT = Path(__file__).resolve().parents[1]


def closed_form(num_classes: int, n_max: int, ratio: float) -> list[int]:
    return [math.floor(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def uneven_labels(sizes: list[int], seed: int = 0, offset: int = 0, step: int = 1) -> np.ndarray:
    """Labels offset + step·c, class c holding sizes[c] rows, in a shuffled order."""
    labels = np.concatenate([np.full(n, offset + step * c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("num_classes, n_max, ratio", [(10, 892, 10), (10, 174, 100), (5, 60, 3.5), (2, 50, 7)])
def test_sizes_are_the_closed_form(num_classes, n_max, ratio):
    assert long_tailed_sizes(num_classes, n_max, ratio).tolist() == closed_form(num_classes, n_max, ratio)


def test_sizes_at_the_ends_balanced_and_a_hundredfold():
    assert long_tailed_sizes(10, 1000, 1).tolist() == [1000] * 10  # r = 1: the full quota for every class
    assert long_tailed_sizes(10, 1000, 100).tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert long_tailed_sizes(3, 1000, 100).tolist() == [1000, 100, 10]  # exact integers are not floored down
    assert long_tailed_sizes(10, 1000, 10).tolist()[-1] == 100 and long_tailed_sizes(1, 30, 10).tolist() == [30]


@pytest.mark.parametrize("ratio", [1, 10, 100, 2.5])
def test_a_subset_has_the_rule_s_class_sizes_and_valid_indices(ratio):
    sizes = [130, 101, 150, 120, 110, 140]  # uneven: n_max is the smallest class's size, 101
    labels = uneven_labels(sizes, offset=3, step=2)  # classes 3, 5, ..., 13: ranked in sorted order
    index = long_tailed_indices(labels, ratio, seed=0)
    assert index.dtype == np.int64 and np.all(np.diff(index) > 0)  # sorted and unique
    assert index.min() >= 0 and index.max() < len(labels)
    classes, counts = np.unique(labels[index], return_counts=True)
    assert classes.tolist() == [3, 5, 7, 9, 11, 13]  # every class present
    assert counts.tolist() == closed_form(6, 101, ratio)
    n_max, n_min = counts[0], counts[-1]
    assert n_max == 101 and n_max / (n_min + 1) < ratio <= n_max / n_min  # r, within the floor's rounding


def test_the_subset_is_fixed_by_the_seed():
    labels = load_digits().target
    first, again, other = (long_tailed_indices(labels, 10, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(np.bincount(labels[first]), np.bincount(labels[other]))  # only the rows differ
    # digits_lt10, seed 0, as numpy's default_rng(0) draws it: a change of the rule or of NumPy's stream shows here
    assert len(first) == 707 and first[:8].tolist() == [0, 1, 5, 10, 11, 12, 14, 15]
    digest = hashlib.sha256(first.tobytes()).hexdigest()
    assert digest == "80e218200786eaee94e432ae497ad734fbf640613be57d8b10a04335a3227863"


@pytest.mark.parametrize("ratio", [0.5, 0, -1, float("nan"), float("inf"), "10", True, None])
def test_a_bad_ratio_is_one_line_naming_it(ratio):
    with pytest.raises(ValueError, match=r"^ratio: expected a (finite )?number >= 1") as error:
        long_tailed_indices(np.arange(20) % 2, ratio, seed=0)
    assert "\n" not in str(error.value)


def test_a_ratio_that_empties_the_tail_or_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"^ratio: 200 leaves the tail class 9 floor\(174 / 200\) = 0 rows"):
        long_tailed_indices(load_digits().target, 200, seed=0)
    for labels in (np.zeros((4, 2), np.int64), np.array([0.0, 1.0]), np.array([], np.int64), np.array([-1, 0, 1])):
        with pytest.raises(ValueError, match=r"^labels: expected"):
            long_tailed_indices(labels, 10, seed=0)


# ---------------------------------------------------------------------------------------------- the benchmarks
def test_the_clustering_loader_gives_each_seed_its_subset():
    import benchmarks.clustering as bc

    split = bc.load_split("digits_lt10", bc.arguments().parse_args([]))
    digits = load_digits()
    assert split.name == "digits_lt10" and split.long_tailed == 10 and "imbalance ratio 10" in split.source
    for seed in (0, 1):
        sub, record = split.for_seed(seed)
        index = long_tailed_indices(digits.target, 10, seed)
        np.testing.assert_array_equal(sub.fit_x, digits.data[index].astype(np.float32))
        np.testing.assert_array_equal(sub.score_y, digits.target[index])
        assert sub.transductive and sub.num_classes == 10
        assert record["class_sizes"] == closed_form(10, 174, 10) and record["size"] == 707 and record["seed"] == seed
    assert bc.load_split("digits", bc.arguments().parse_args([])).for_seed(0)[1] is None  # balanced: no subset
    with pytest.raises(ValueError, match="^dataset: expected one of"):
        bc.load_split("cifar10_train_test_lt10", bc.arguments().parse_args([]))  # no long-tailed train → test


def hungarian_acc(pred: np.ndarray, y: np.ndarray) -> float:
    counts = np.zeros((pred.max() + 1, y.max() + 1))
    np.add.at(counts, (pred, y), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts[rows, cols].sum() / len(y)


def test_the_clustering_benchmark_scores_each_seed_on_its_own_subset(tmp_path, monkeypatch):
    """``--dataset digits_lt10`` end to end with k-means: each seed's accuracy is scikit-learn's k-means on that
    seed's subset (centred, unit rows), scored by a Hungarian match written here; the JSON records the subsets."""
    from sklearn.cluster import KMeans

    import benchmarks.clustering as bc
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    bc.main(
        ["--dataset", "digits_lt10", "--seeds", "0", "1", "--methods", "kmeans_sklearn", "--cache-dir", str(tmp_path)]
    )
    data = json.loads((tmp_path / "clustering_digits_lt10.json").read_text())
    assert data["fit_shape"] == [707, 64] and data["num_clusters"] == 10
    assert data["long_tailed"]["ratio"] == 10 and data["long_tailed"]["class_sizes"] == closed_form(10, 174, 10)
    digits = load_digits()
    runs = data["methods"]["kmeans_sklearn"]["runs"]
    for run in runs:
        index = long_tailed_indices(digits.target, 10, run["seed"])
        assert run["subset"]["indices_sha256"] == hashlib.sha256(index.tobytes()).hexdigest()
        x = digits.data[index].astype(np.float32)
        x = x - x.mean(0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        pred = KMeans(10, n_init=10, random_state=run["seed"]).fit(x).labels_
        assert run["hungarian_acc"] == pytest.approx(hungarian_acc(pred, digits.target[index]), abs=2e-3)
    assert runs[0]["subset"]["indices_sha256"] != runs[1]["subset"]["indices_sha256"]


def test_the_fit_benchmark_writes_each_seed_s_subset(tmp_path, monkeypatch):
    """``benchmarks.fit --dataset digits_lt100``: each seed's ``icon fit`` reads its own subset's file, and the row
    records it (the ``icon`` process is replaced by a stub that returns what a run's record holds)."""
    from benchmarks import fit as bench

    seen = []

    def run_fit(args, run_dir, env=None):
        seen.append(next(a for a in args if a.endswith(".npz")))
        row = dict.fromkeys(("process_wall_s", "fit_wall_s", "peak_rss_mb", "hungarian_acc", "nmi", "train_loss"), 0.5)
        return {"steps": 1, "converged": False, **row}

    monkeypatch.setattr(bench, "run_fit", run_fit)
    result = bench.bench("digits_lt100", ["default"], [0, 1], tmp_path)
    digits = load_digits()
    assert seen == [str(tmp_path / "data" / f"digits_lt100_seed{s}.npz") for s in (0, 1)]
    for seed, (path, row) in enumerate(zip(seen, result["settings"]["default"]["runs"], strict=True)):
        index = long_tailed_indices(digits.target, 100, seed)
        with np.load(path) as data:
            np.testing.assert_array_equal(data["features"], digits.data[index].astype(np.float32))
            np.testing.assert_array_equal(data["labels"], digits.target[index])
        assert row["subset"]["class_sizes"] == closed_form(10, 174, 100) and row["subset"]["seed"] == seed
    assert "long-tailed subset, imbalance ratio 100" in result["source"]


def test_every_long_tailed_name_is_known_to_both_benchmarks_and_the_makefile():
    import benchmarks.clustering as bc
    from benchmarks import fit as bench

    expected = {f"{s}_lt{r}" for s in ("digits", "cifar10_test", "mnist_test", "fashion_mnist_test") for r in (10, 100)}
    assert set(bc.LONG_TAILED) == expected and expected <= set(bc.DATASETS) and expected <= set(bench.DATASETS)
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    names = re.search(r"^LONG_TAILED_DATASETS := (.*)$", text, re.MULTILINE)[1].split()
    assert set(names) == expected
