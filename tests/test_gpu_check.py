"""`make gpu-check` (benchmarks/gpu_check.sh): it parses, names its four parts, stops in one line without a CUDA
python, records a failing part and goes on, and its k-NN comparison (benchmarks/gpu_knn.py) agrees on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def run_script(env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("PYTHON", "OUT")}
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


def parts() -> list[str]:
    (line,) = re.findall(r"^PARTS=\((.*)\)$", TEXT, re.M)
    return line.split()


def limits() -> dict[str, int]:
    (text,) = re.findall(r"^declare -A LIMIT_S=\((.*?)\)", TEXT, re.M | re.S)
    return {name: int(value) for name, value in re.findall(r"\[(\w+)\]=(\d+)", text)}


def test_script_parses():
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_the_dry_run_runs_the_four_required_parts(tmp_path):
    """What the check does, not what its text says: the CPU dry run of every part (the CUDA tests collected and
    skipped, bench-train's rows at B 64 and 128 over K {10, 1000}, the k-NN comparison of faiss and torch, the digits
    fit in fp32 and in bf16-mixed) records each part's result in the summary JSON."""
    results = tmp_path / "results"
    env = {"PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_RESULTS": str(results)}
    out = run_script(env, timeout=420)
    summary = json.loads((results / "gpu_check_cpu_dry.json").read_text())
    by_name = {p["name"]: p for p in summary["parts"]}
    assert [p["name"] for p in summary["parts"]] == parts() and set(limits()) == set(parts())
    assert {
        "cuda_tests",
        "train_step_b4096",
        "train_step_b16384",
        "knn_faiss_gpu",
        "digits_fp32",
        "digits_bf16",
    } <= set(by_name)
    failed = {n: p.get("last_lines") for n, p in by_name.items() if p["status"] == "failed"}
    assert out.returncode == 0 and not failed, (out.stdout[-2000:], out.stderr[-2000:], failed)
    tests = by_name["cuda_tests"]["pytest"]  # (a) the CUDA tests ran: collected, and skipped without a GPU
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    for name in ("train_step_b4096", "train_step_b16384"):  # (b) bench-train's rows, measured
        rows = by_name[name]["rows"]
        assert {r["K"] for r in rows} == {10, 1000} and all(r["step_ms"] for r in rows), rows
    knn = by_name["knn_faiss_gpu"]["knn"]  # (c) the k-NN tables of the backends against the reference
    assert knn["ok"] is True and len(knn["rows"]) >= 2
    for name in ("digits_fp32", "digits_bf16"):  # (d) the digits fit in each precision wrote its record
        metrics = by_name[name]["metrics"]
        assert metrics["steps"] > 0 and 0 < metrics["hungarian_acc"] <= 1, metrics


def test_the_configured_bounds_stay_under_eight_minutes():
    budget = int(re.search(r"^BUDGET_S=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", TEXT, re.M).group(1))
    kill_after = int(re.search(r"^KILL_AFTER_S=(\d+)", TEXT, re.M).group(1))
    assert budget + kill_after + 30 < 8 * 60  # parts are capped at what is left of the budget; 30 s to write up
    assert sum(limits().values()) <= budget
    assert re.search(r'timeout --kill-after=\$KILL_AFTER_S "\$limit" "\$@"', TEXT)  # every part runs under it


@pytest.mark.parametrize("python", ["/bin/false", "stub"])
def test_without_a_cuda_python_it_stops_in_one_line(tmp_path, python):
    if python == "stub":  # a python whose torch sees no CUDA, whatever this machine has
        stub = tmp_path / "python"
        stub.write_text("#!/bin/sh\necho torch 0.0, no CUDA\nexit 3\n")
        stub.chmod(0o755)
        python = str(stub)
    results = tmp_path / "results"
    out = run_script({"PYTHON": python, "GPU_CHECK_RESULTS": str(results), "OUT": str(tmp_path / "out")}, 60)
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: FAILED: no python with torch and CUDA")
    assert python in lines[0] and "GPU_CHECK_ALLOW_CPU=1" in lines[0]
    assert not results.exists() and not (tmp_path / "out").exists()


def test_dry_run_records_a_failing_part_and_skips_the_unselected(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2, 'the planted failure'\n")
    results, out_dir = tmp_path / "results", tmp_path / "out"
    env = {
        "PYTHON": sys.executable,
        "GPU_CHECK_ALLOW_CPU": "1",
        "GPU_CHECK_PARTS": "cuda_tests",
        "GPU_CHECK_TESTS": str(failing),
        "GPU_CHECK_RESULTS": str(results),
        "OUT": str(out_dir),
    }
    out = run_script(env)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = json.loads((results / "gpu_check_cpu_dry.json").read_text())
    assert summary["status"] == "failed" and summary["failed_parts"] == ["cuda_tests"]
    assert [p["name"] for p in summary["parts"]] == parts()
    (tests,) = [p for p in summary["parts"] if p["name"] == "cuda_tests"]
    assert tests["status"] == "failed" and tests["exit_code"] == 1
    assert any("the planted failure" in line for line in tests["last_lines"])
    assert tests["pytest"]["failures"] == 1 and tests["pytest"]["not_passed"][0].endswith("test_fails")
    others = [p for p in summary["parts"] if p["name"] != "cuda_tests"]
    assert all(p["status"] == "skipped" and p["reason"].startswith("not selected") for p in others)
    assert json.loads((out_dir / "gpu_check_cpu_dry.json").read_text()) == summary
    assert (out_dir / "gpu_check_logs" / "01_cuda_tests.log").is_file()


def knn_result(tmp_path, argv: list[str]) -> dict:
    pytest.importorskip("faiss")
    from benchmarks import gpu_knn

    path = tmp_path / "knn.json"
    assert gpu_knn.main(["--device", "cpu", "--k", "5", "--out", str(path), *argv]) == 0
    return json.loads(path.read_text())


def test_gpu_knn_on_cpu_agrees_between_faiss_and_torch(tmp_path):
    result = knn_result(tmp_path, ["--features", str(tmp_path / "absent.npz"), "--n", "400", "--dim", "48"])
    assert result["features"]["source"].startswith("synthetic") and result["n"] == 400 and result["dim"] == 48
    reference, faiss_cpu = result["rows"]
    assert reference["backend"] == "torch-cpu" and reference["reference"]
    assert faiss_cpu["backend"] == "faiss-cpu"
    assert faiss_cpu["id_agreement"] == 1.0 and faiss_cpu["set_agreement"] == 1.0
    assert faiss_cpu["max_similarity_diff"] < 1e-5
    assert faiss_cpu["ok"] and result["ok"] and result["failures"] == []


def test_gpu_knn_reads_a_features_file_with_labels(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 500)
    features = (rng.standard_normal((4, 64))[labels] + rng.standard_normal((500, 64))).astype(np.float16)
    np.savez(tmp_path / "f.npz", features=features, labels=labels)
    result = knn_result(tmp_path, ["--features", str(tmp_path / "f.npz"), "--n", "300"])
    assert result["features"]["shape"] == [500, 64] and result["n"] == 300
    faiss_cpu = result["rows"][1]
    assert faiss_cpu["id_agreement"] == 1.0
    assert 0.25 < faiss_cpu["label_agreement"] == result["rows"][0]["label_agreement"] <= 1.0


def test_gpu_knn_fails_when_a_backend_disagrees(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    from benchmarks import gpu_knn

    def shuffled(x, k):
        indices, sims = gpu_knn.knn_torch(x, k, device="cpu")
        return indices[::-1].copy(), sims[::-1].copy()  # rows swapped: the wrong table

    monkeypatch.setattr(gpu_knn, "knn_faiss", lambda x, k, use_gpu=None: shuffled(x, k))
    path = tmp_path / "knn.json"
    argv = ["--device", "cpu", "--features", str(tmp_path / "absent.npz"), "--n", "200", "--dim", "16"]
    assert gpu_knn.main([*argv, "--out", str(path)]) == 1
    result = json.loads(path.read_text())
    assert not result["ok"] and result["failures"][0].startswith("faiss-cpu")
    assert result["rows"][1]["id_agreement"] < 0.5
