"""Every ``benchmarks/`` entry point runs on tiny inputs and writes its JSON: here the two without a test of their
own (``knn``, ``train_step``'s command line; the others: tests/test_bench_*.py, tests/test_gpu_check.py)."""

from __future__ import annotations

import json

import benchmarks.common as common
from benchmarks import knn, train_step


def test_knn_entry_point_writes_both_backends_and_the_fingerprint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    fingerprint = ["--fingerprint-rows", "1000", "--fingerprint-dim", "4"]
    knn.main(["--n", "300", "--d", "8", "--k", "3", *fingerprint, "--out", "k.json"])
    result = json.loads((tmp_path / "k.json").read_text())
    assert (result["n"], result["d"], result["k"]) == (300, 8, 3)
    assert [r["backend"].split("-")[0] for r in result["rows"]] == ["faiss", "torch"]
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in result["rows"])
    fingerprint = json.loads((tmp_path / "fingerprint_k.json").read_text())
    assert fingerprint["rows"] == 1000 and len(fingerprint["seconds"]) == 2


def test_train_step_entry_point_writes_its_rows_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    argv = ["--device", "cpu", "--batch-sizes", "64", "--clusters", "4", "--heads", "1", "--extra", "", "--dim", "8"]
    train_step.main([*argv, "--max-repeats", "2", "--budget-s", "0.05", "--no-memory", "--out", "t.json"])
    result = json.loads((tmp_path / "t.json").read_text())
    assert [(r["B"], r["K"], r["H"]) for r in result["rows"]] == [(64, 4, 1)]
    assert result["rows"][0]["step"]["ms"] > 0
    capsys.readouterr()
    train_step.main(["--device", "cpu", "--table", "--out", "t.json"])
    assert "| 64 | 4 | 1 |" in capsys.readouterr().out
