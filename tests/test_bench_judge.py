"""`python -m benchmarks.judge`: candidates of every start, judged without labels, scored; the judge's choices do
not move when the labels do (they only score)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def blobs_file(path, labels_order=None):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 4
    labels = np.repeat(np.arange(3), 60)
    features = centres[labels] + rng.normal(size=(180, 6))
    np.savez(path, features=features, labels=labels if labels_order is None else labels_order(labels))
    return path


@pytest.mark.slow
def test_the_judge_picks_without_labels_and_records_every_candidate(tmp_path):
    from benchmarks import judge

    budget = ["--budget=--trainer.max_steps=15", "--budget=--convergence.max_steps=15"]
    common = ["--seeds", "0", "--cache-dir", str(tmp_path / "cache"), *budget]
    plain = blobs_file(tmp_path / "blobs.npz")
    permuted = blobs_file(tmp_path / "permuted.npz", lambda y: np.random.default_rng(1).permutation(y))
    (first,) = judge.main(["--features", str(plain), "--out", str(tmp_path / "a"), *common])
    (second,) = judge.main(["--features", str(permuted), "--out", str(tmp_path / "b"), *common])
    (a,), (b,) = first["seeds"], second["seeds"]
    assert set(a["candidates"]) == set(judge.CANDIDATES) == set(b["candidates"])
    for name in judge.CANDIDATES:  # labels only score: the label-free numbers and the picks are the same
        assert a["candidates"][name]["judge"] == b["candidates"][name]["judge"]
        assert a["candidates"][name]["loss"] == b["candidates"][name]["loss"]
    assert a["judge_pick"] == b["judge_pick"] and a["loss_pick"] == b["loss_pick"]
    assert a["best_acc"] > b["best_acc"]  # permuted labels are not learnable: accuracy, and only it, moves
    accs = [c["hungarian_acc"] for c in a["candidates"].values()]
    assert a["best_acc"] == max(accs) and a["judge_pick_acc"] == a["candidates"][a["judge_pick"]]["hungarian_acc"]
    saved = json.loads((tmp_path / "a" / "judge_blobs.json").read_text())
    assert saved["summary"]["seeds"] == 1 and saved["seeds"][0]["judge_pick"] == a["judge_pick"]


def test_rank_correlation_is_spearmans_and_none_for_a_constant():
    from scipy.stats import rankdata

    from benchmarks.judge import rank_correlation

    score, acc = np.array([0.1, 0.4, 0.2, 0.3]), np.array([0.5, 0.9, 0.7, 0.6])
    expected = np.corrcoef(rankdata(score), rankdata(acc))[0, 1]  # Pearson of the ranks
    assert rank_correlation(score, acc) == pytest.approx(expected)
    assert rank_correlation(np.ones(4), acc) is None


def test_the_table_pools_a_sets_seed_files_and_counts_picks_within_a_point(tmp_path):
    from benchmarks import judge

    def seed(s: int, picked: float, best: float) -> dict:
        rho = {"spearman_judge_acc": 0.5, "spearman_neg_loss_acc": None}
        return {"seed": s, "judge_pick_acc": picked, "loss_pick_acc": 0.4, "best_acc": best, **rho}

    files = {"x_seed0": [seed(0, 0.50, 0.505)], "x_seed1": [seed(1, 0.40, 0.455)], "y": [seed(0, 0.7, 0.7)]}
    for name, seeds in files.items():
        (tmp_path / f"judge_{name}.json").write_text(json.dumps({"dataset": name, "seeds": seeds}))
    lines = judge.table(tmp_path).splitlines()
    assert "| x | 2 | 0.450 | 0.400 | 0.480 | 1/2 | 0.50 | — |" in lines  # pooled: means over its two seed files
    assert "| y | 1 | 0.700 | 0.400 | 0.700 | 1/1 | 0.50 | — |" in lines
    assert lines[-1].endswith("on 2 of 3 set-seeds, and in the mean on 1 of 2 sets.")


def test_readmes_judge_table_is_the_committed_json(tmp_path):
    """The judge table (docs/results.md) is generated from benchmarks/results/judge_*.json, never edited by hand."""
    from benchmarks import common, judge

    assert common.read_block(judge.MARKERS) == judge.table().strip()
    copy = tmp_path / "README.md"
    copy.write_text(f"intro\n{judge.MARKERS[0]}\nstale\n{judge.MARKERS[1]}\nrest\n")
    judge.write_readme("| new |", copy)
    assert judge.readme_block(copy.read_text()) == "| new |" and copy.read_text().endswith("rest\n")
