"""benchmarks/train_step.py at tiny sizes: its FLOP count, its kernel against the materialised B×B×K
reference, its batch, and one pass of the whole measurement."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import train_step as bench
from icon_lightning.recipes import load_recipe


def materialised(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_c φ_ic φ_jc / n_c through the (B, B, K) tensor, written out here independently."""
    log_phi = torch.log_softmax(logits, -1)
    log_size = torch.logsumexp(log_phi, dim=0)  # log n_c, the soft cluster sizes
    pairs = log_phi[:, None, :] + log_phi[None, :, :] - log_size  # (B, B, K)
    assert pairs.shape == (len(logits), len(logits), logits.shape[1])
    return torch.logsumexp(pairs, dim=-1)


def test_flop_formula():
    assert bench.kernel_flops(32, 5) == {
        "forward": 2 * 32 * 32 * 5,
        "backward": 4 * 32 * 32 * 5,
        "total": 6 * 32 * 32 * 5,
    }
    assert bench.kernel_flops(32, 5, m=8)["total"] == 6 * 32 * 8 * 5
    assert bench.naive_bytes(4096, 1000) == 4096 * 4096 * 1000 * 4


@pytest.mark.parametrize("scale", [1.0, 50.0])  # 50: confident heads, the underflow-repair path
def test_kernel_equals_materialised_reference(scale):
    b, k = 32, 5
    logits = bench.make_logits(b, k, "cpu", scale=scale)  # float32, where the repair path triggers
    reference = logits.detach().double().requires_grad_(True)
    out, expected = bench.cluster_kernel(logits), materialised(reference)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    grad = bench.upstream_grad(b, b, "cpu")
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bench.naive_kernel(logits.detach()).double(), expected.detach(), rtol=1e-5, atol=1e-4)


def test_sharp_logits_take_the_repair_path():
    assert bench.underflow_pairs(bench.make_logits(32, 5, "cpu", scale=50.0)) > 0
    assert bench.underflow_pairs(bench.make_logits(32, 5, "cpu")) == 0


def test_batch_is_the_datamodule_layout_with_positives():
    batch = bench.make_batch(32, 16)
    per_anchor = bench.VIEWS + bench.NEIGHBOURS
    assert len(batch) == 32 and batch.inputs.shape == (32, 16)
    anchors = 32 // per_anchor
    assert torch.equal(batch.index[:anchors], batch.index[anchors : 2 * anchors])  # two views of each anchor
    p = load_recipe(bench.RECIPE).target(batch.rows(torch.zeros(32, 5)))
    assert bool((p[:anchors] > 0).sum(-1).gt(1).all())  # every anchor has positives beyond the uniform part
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.make_batch(30, 16)


def test_run_at_tiny_sizes():
    result = bench.run(
        "cpu", [32], [5], dim=16, max_repeats=2, budget_s=0.01, matmul_n=64, memory=False, sharp_probe=False
    )
    (row,) = result["rows"]
    assert row["kernel_flops"]["total"] == 6 * 32 * 32 * 5
    assert row["samples_per_s"] == pytest.approx(32 / (row["step_ms"] / 1e3))
    assert row["kernel_gflops"] == pytest.approx(6 * 32 * 32 * 5 / (row["kernel_ms"] / 1e3) / 1e9)
    assert row["fraction_of_matmul"] == pytest.approx(row["kernel_gflops"] / row["matmul_gflops_adjacent"])
    assert row["fraction_of_peak_matmul"] == pytest.approx(row["kernel_gflops"] / result["matmul_gflops"]["peak"])
    assert row["fraction_of_peak_matmul"] <= row["fraction_of_matmul"]
    assert row["naive_ms"] is not None and row["underflow_pairs"] == 0
    assert result["target"] == {**bench.TARGET, "measured": False}
    assert "| 32 | 5 |" in bench.table(result["rows"])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_cpu_peak_memory_sees_a_64_mib_buffer():
    # 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): mapped on allocation, unmapped on free.
    peak = bench.peak_bytes_here(lambda: torch.ones(16 * 2**20).sum(), "cpu")
    assert 60 * 2**20 <= peak < 200 * 2**20
