"""benchmarks/fit.py (``make bench-fit``): README's first command through the CLI, one process per run."""

from __future__ import annotations

import json

import numpy as np
from sklearn.datasets import load_digits

from benchmarks import common
from benchmarks import fit as bench


def test_settings_are_the_first_command_plus_named_overrides():
    assert bench.SETTINGS["default"] == []
    assert set(bench.SETTINGS["before"]) == set(bench.SETTINGS["unpruned"] + bench.SETTINGS["batch_4096"])
    command = bench.first_command(bench.ROOT / "x.npz")
    assert command[:3] == ["fit", "--config", str(bench.RECIPE)] and command[-2:] == ["--data.views", "clean"]


def test_one_run_records_what_its_metrics_json_says(tmp_path):
    """A 30-step run of the defaults on digits: the row is the run's own record (not converged, 30 steps), with
    the process's peak memory, and the table shows it."""
    out = tmp_path / "results"
    bench.main(
        [
            "--dataset",
            "digits",
            "--seeds",
            "0",
            "--setting",
            "default",
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
        + ["--extra", "--convergence.max_steps=30"]
    )
    x = np.load(tmp_path / "w" / "data" / "digits.npz")
    np.testing.assert_array_equal(x["features"], load_digits().data.astype(np.float32))
    result = json.loads((out / "fit_digits.json").read_text())
    (row,) = result["settings"]["default"]["runs"]
    report = json.loads((tmp_path / "w" / "runs" / "digits-default-seed0" / "metrics.json").read_text())
    assert row["steps"] == report["steps"] == 30 and row["converged"] is False
    assert row["hungarian_acc"] == report["metrics"]["val/hungarian_acc/best"] and 0 < row["hungarian_acc"] <= 1
    assert row["peak_rss_mb"] > 100 and row["process_wall_s"] > row["fit_wall_s"] > 0
    assert row["kmeans_process_wall_s"] > 0  # the reference: scikit-learn k-means at the same K, its own process
    ratio = row["process_wall_s"] / row["kmeans_process_wall_s"]
    day = result["settings"]["default"]["measured"][:10]
    line = f"| digits | default | {day} | 1 | 0/1 | 30 | {row['process_wall_s']:.1f} | {ratio:.1f} |"
    assert line in bench.table(out)


def test_the_k_means_reference_runs_at_the_settings_k(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, features=np.zeros((5, 2), np.float32), labels=np.array([0, 1, 2, 0, 1]))
    assert bench.clusters_of("default", path) == 3 and bench.clusters_of("k30", path) == 30
    assert "KMeans(int(sys.argv[2]), n_init=10" in bench.KMEANS


def test_a_run_of_one_setting_keeps_the_files_other_settings(tmp_path):
    path = tmp_path / "fit_digits.json"
    command = "icon fit …"
    path.write_text(json.dumps({"dataset": "digits", "command": command, "settings": {"default": 1, "one_head": 2}}))
    new = bench.merged({"dataset": "digits", "command": command, "settings": {"one_head": 3, "unpruned": 4}}, path)
    assert new["settings"] == {"default": 1, "one_head": 3, "unpruned": 4}
    other = {"dataset": "digits", "command": "icon fit --other", "settings": {"unpruned": 4}}
    assert bench.merged(other, path) == other  # another command's figures are not mixed in
    # a file written in another checkout (its absolute config path) is the same command
    elsewhere = bench.COMMAND.replace("configs/", "/elsewhere/clone/configs/")
    path.write_text(json.dumps({"dataset": "digits", "command": elsewhere, "settings": {"default": 1}}))
    here = {"dataset": "digits", "command": bench.COMMAND, "settings": {"k30": 5}}
    assert bench.merged(here, path)["settings"] == {"default": 1, "k30": 5} and "/work" not in bench.COMMAND


def test_readmes_fit_table_is_the_committed_json():
    """The fit table (docs/speed.md) is generated from benchmarks/results/fit_*.json (``--table --readme``)."""
    assert common.read_block(bench.MARKERS) == bench.table().strip()
