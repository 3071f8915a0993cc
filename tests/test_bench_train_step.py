"""benchmarks/train_step.py at tiny sizes: its plain loss against the library, its batch, its bounds and
targets, and one pass of the whole measurement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import train_step as bench
from icon_lightning.recipes import load_recipe


def test_plain_loss_is_the_recipe_loss():
    """The plain formula implementation the benchmark compares against is the same loss, values and grads."""
    batch = bench.make_batch(64, 16)
    loss = load_recipe(bench.RECIPE)
    assert loss.p.alpha == loss.q.alpha == bench.ALPHA
    logits = torch.randn(3, 64, 5, dtype=torch.float64, requires_grad=True)
    rows = batch.rows(logits[0].detach())
    dense = load_recipe(bench.RECIPE)
    dense.sparse = False
    plain = bench.plain_loss(logits, dense.target(rows).double())
    outs = loss.forward_heads([rows.with_z(z) for z in logits], [rows.with_z(z) for z in logits], None, 0)
    library = sum(o.loss for o in outs)
    torch.testing.assert_close(plain, library, rtol=1e-9, atol=0)
    (g_plain,) = torch.autograd.grad(plain, logits)
    (g_library,) = torch.autograd.grad(library, logits)
    torch.testing.assert_close(g_plain, g_library, rtol=1e-8, atol=1e-12)


def test_batch_is_the_datamodule_layout_with_positives():
    batch = bench.make_batch(32, 16)
    per_anchor = bench.VIEWS + bench.NEIGHBOURS
    assert len(batch) == 32 and batch.inputs.shape == (32, 16)
    anchors = 32 // per_anchor
    assert torch.equal(batch.index[:anchors], batch.index[anchors : 2 * anchors])  # two views of each anchor
    p = load_recipe(bench.RECIPE).target(batch.rows(torch.zeros(32, 5))).to_dense()
    assert bool((p[:anchors] > p[:anchors].min(1, keepdim=True).values).sum(-1).gt(1).all())  # beyond uniform
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.make_batch(30, 16)


def test_run_at_tiny_sizes_and_its_targets():
    result = bench.run("cpu", [32], [5], [1, 2], dim=16, max_repeats=2, budget_s=0.01, matmul_n=64, memory=False)
    one, two = result["rows"]
    assert (one["H"], two["H"]) == (1, 2) and one["loss_flops"] == 3 * 2 * 32 * 32 * 5
    assert one["samples_per_s"] == pytest.approx(32 / (one["step"]["ms"] / 1e3))
    assert one["dense_step_over_step"] == pytest.approx(one["dense_step"]["ms"] / one["step"]["ms"])
    assert one["plain_over_loss"] == pytest.approx(one["plain_loss"]["ms"] / one["loss"]["ms"])
    bound = 1e3 * one["loss_flops"] / (one["matmul_gflops_adjacent"] * 1e9)
    assert one["step_over_flop_bound"] == pytest.approx(one["step"]["ms"] / bound)
    assert one["step_over_stream"] == pytest.approx(one["step"]["ms"] / one["stream"]["ms"])
    assert result["targets"]["speed"]["met"] is None  # B = 4096 was not measured
    assert "| 32 | 5 | 2 |" in bench.table(result["rows"])
    fake = [
        {"B": 4096, "K": 10, "H": 1, "step": {"ms": 10.0}, "plain_over_loss": 9.0, "dense_step_over_step": 5.0},
        {"B": 4096, "K": 10, "H": 16, "step": {"ms": 15.0}},
        {"B": 16384, "K": 1000, "H": 5, "step": {"ms": 1.0, "peak_bytes": 3 * 2**30}},
    ]
    t = bench.targets(fake)
    assert t["speed"]["met"] is False and t["heads"]["over_one_head"] == 1.5 and t["heads"]["met"] is True
    assert t["memory"]["met"] is False


def test_expensive_cases_are_skipped_with_their_estimate():
    skipped = bench.measure("dense_step", 16384, 1000, 16, 16, "cpu", 0.01, 1, None, case_budget_s=60.0)
    assert "estimated" in skipped["skipped"]
    big = bench.measure("plain_loss", 16384, 10, 2, 16, "cpu", 0.01, 1, None, case_budget_s=1e9)
    assert "GiB" in big["skipped"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_cpu_peak_memory_sees_a_64_mib_buffer():
    """In a fresh process, as the benchmark measures (MemoryMeter's worker): 64 MiB is above glibc's largest mmap
    threshold (32 MiB), so it is mapped on allocation and unmapped on free. In this long-lived pytest process
    the heap may already hold 64 MiB of resident free chunks, which malloc serves before mapping anything: no
    RSS rise to see (CI saw a peak of 0), which is why the benchmark never measures in a used process."""
    code = (
        "import torch; from benchmarks.train_step import peak_bytes_here; "
        "print(peak_bytes_here(lambda: torch.ones(16 * 2**20).sum(), 'cpu'))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert 60 * 2**20 <= peak < 200 * 2**20


def test_cluster_kernel_benchmark_writes_its_rows(tmp_path):
    """The kernel benchmark times through benchmarks.common and writes one row per (B, K), atomically."""
    import json

    from benchmarks import cluster_kernel

    out = tmp_path / "ck.json"
    cluster_kernel.main(["--device", "cpu", "--sizes", "16,32", "--clusters", "4", "--repeats", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["B"], r["K"]) for r in result["rows"]] == [(16, 4), (32, 4)] and "machine" in result
    assert all(r["kernel_ms"] > 0 and r["fraction_of_matmul"] > 0 for r in result["rows"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_ddp_memory_benchmark_runs_both_settings_on_two_processes(tmp_path):
    """The DDP memory benchmark builds real DataModules (FeaturePrep reading its synthetic files) in 2 processes."""
    import json

    from benchmarks import ddp_memory

    out = tmp_path / "ddp.json"
    ddp_memory.main(["--n", "3000", "--d", "8", "--views", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["views"].split()[0] for r in rows] == ["float32", "float32", "shared", "shared"]
    assert all(r["after_setup_and_reads"]["rss"] > 0 for r in rows)
