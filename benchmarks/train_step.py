"""Speed and memory of the I-Con training step, sparse path against dense, beside a FLOP and a memory bound.

    python -m benchmarks.train_step [--device cpu|cuda] [--batch-sizes 1024,4096,16384] [--clusters 10,100,1000]
                                    [--heads 1,16] [--dim 384] [--threads 1]

B is the side of the pair matrix: the rows the loss sees in one step. As in ``ClusteringDataModule`` each
anchor brings 2 cached views and 2 neighbours sampled from its row of the k-NN table (k = 3), so a batch of
B rows holds B/4 anchors. The recipe is ``icon_clustering`` (p = debiased k-NN + 1-step walks, q = debiased
UniformCluster) with H linear heads of width D → K.

For each (B, K, H), measured in one run:

* ``step`` (sparse): ``IConModule.training_step`` + backward + Adam step, p built every step (mini-batch),
  with the sparse path (``IConLoss(sparse=True)``, the default).
* ``dense_step``: the same step with ``IConLoss(sparse=False)``: today's dense path (the reference).
* ``loss`` and ``plain_loss``: the loss alone, forward + backward from the heads' logits with p given: the
  library's sparse path, and a plain dense torch implementation written here from the paper's formulas
  (φ = softmax, q_ij ∝ Σ_c φ_ic φ_jc / n_c as one (B, K) @ (K, B) product, self pairs masked, both sides
  debiased, KL), the same value to rounding.
* bounds: ``matmul``: this machine's fp32 matmul throughput (an n × n product) measured in the same run;
  the FLOP-bound time of the sparse loss is 3 · 2·B·B·K·H FLOPs over it (its three B×B×K products: forward,
  and one per factor's gradient). ``stream``: one pass over a (B, B) float32 (``x.mul_(1)``), H times:
  the memory-bound time of touching every pair once. Each step's ratio to those bounds is reported.

Memory: peak bytes beyond those live before one call (inputs, parameters, Adam state excluded). On CUDA
``torch.cuda.max_memory_allocated``; on CPU a worker subprocess started with a fixed mmap threshold (every
buffer ≥ 64 KiB is mmap'd and returned on free), VmHWM reset through /proc/self/clear_refs, VmHWM − VmRSS
around one call (resident bytes, page-granular, library scratch included).
Cases whose estimated time exceeds the budget are listed as skipped with the estimate, not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import best_of, matmul_gflops, sync, write_result

VIEWS, NEIGHBOURS, KNN_K, WALK_STEPS = 2, 2, 3, 1  # the DataModule's defaults (I-Con §4)
RECIPE = "icon_clustering"
ALPHA = 0.6  # the recipe's α on both sides (checked against the recipe in the tests)
TARGETS = {
    "speed": {"B": 4096, "K": 10, "H": 1, "min_over_plain": 8.0, "min_over_dense_step": 6.0},
    "memory": {"B": 16384, "K": 1000, "H": 5, "max_peak_bytes": 2 * 2**30},
    "heads": {"B": 4096, "K": 10, "H": 16, "max_over_one_head": 2.0},
}
DENSE_MAX_BYTES = 12 * 2**30  # dense cases that would hold more are skipped (this machine has 24 GiB)
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() before one call, after a warm-up",
    "cpu": "worker subprocess with MALLOC_MMAP_THRESHOLD_=65536; VmHWM reset via /proc/self/clear_refs after a "
    "warm-up call; VmHWM - VmRSS around one call (resident bytes, page-granular)",
}


def loss_flops(b: int, k: int, heads: int) -> int:
    """FLOPs of the sparse loss's three B×B×K products (value, one gradient per factor), all heads."""
    return 3 * 2 * b * b * k * heads


# ---------------------------------------------------------------------------------------------- inputs
def make_batch(rows: int, dim: int, seed: int = 0):
    """A ClusteringBatch of ``rows`` rows built by the DataModule's own sampler and collate.

    Synthetic dataset: N random unit-norm features (centred like the cached ones) and a k-NN table (k = 3,
    no self loops) drawn inside groups of 8 items, so the graph has the reciprocity of a real one: anchors
    and most sampled neighbours have in-batch positives. The rows are what the training loop would see.
    """
    from icon_lightning.data.collate import FeatureCollate
    from icon_lightning.data.neighbours import centred_unit_rows, symmetric_degree, walks
    from icon_lightning.data.sampling import AnchorDataset

    per_anchor = VIEWS + NEIGHBOURS
    if rows % per_anchor:
        raise ValueError(f"batch size: expected a multiple of {per_anchor} rows (views + neighbours), got {rows}")
    anchors = rows // per_anchor
    n = 8 * max(1250, anchors)
    rng = np.random.default_rng(seed)
    features = centred_unit_rows(rng.standard_normal((n, dim), dtype=np.float32))
    item = np.arange(n)[:, None]
    group = 8  # neighbours within blocks of 8 items, never the item itself
    offsets = rng.permuted(np.tile(np.arange(1, group), (n, 1)), axis=1)[:, :KNN_K]  # distinct, non-zero
    table = item - item % group + (item % group + offsets) % group
    labels = torch.as_tensor(rng.integers(0, 10, size=n), dtype=torch.long)
    data = AnchorDataset(n, walks(table, WALK_STEPS), VIEWS, 0, NEIGHBOURS, seed)
    collate = FeatureCollate(
        torch.from_numpy(features),
        None,
        labels,
        torch.as_tensor(table),
        torch.from_numpy(symmetric_degree(table)),
    )
    batch = collate([data[(0, int(i))] for i in rng.choice(n, anchors, replace=False)])
    assert len(batch) == rows
    return batch


def plain_loss(logits: torch.Tensor, p: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Σ_h mean_i KL(p~_i ‖ q~_hi) written from the paper's formulas with dense (B, B) matrices.

    logits: (H, B, K); p: (B, B) the supervisory p before q (already debiased, zero on the diagonal).
    """
    total = logits.new_zeros(())
    b = logits.shape[1]
    valid = ~torch.eye(b, dtype=torch.bool, device=logits.device)
    off = valid.to(logits.dtype)  # (a bool mask times a Python float would round α/(B−1) to float32)
    has = p.sum(1) > 0
    for z in logits:
        phi = torch.softmax(z, -1)
        s = (phi @ (phi / phi.sum(0)).T) * off  # Σ_c φ_ic φ_jc / n_c, self pairs masked
        q = (1 - alpha) * s / s.sum(1, keepdim=True) + alpha / (b - 1) * off
        log_q = torch.log(torch.where(valid, q, torch.ones_like(q)))
        log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
        total = total + (p * (log_p - log_q)).sum(1)[has].mean()
    return total


def icon_module(b: int, k: int, dim: int, heads: int):
    """The module ``icon fit`` builds (the one builder) for the recipe at K clusters, D features and H heads, all
    kept (no pruning: a step's cost at H heads), on a stand-in features file of B + 1 random rows: a step of B
    anchors is a mini-batch (p is built every step, never reused as in full batch)."""
    import tempfile

    from icon_lightning.cli import assemble, features_command
    from icon_lightning.estimator import features_file, quiet

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, quiet():
        x = np.random.default_rng(0).standard_normal((b + 1, dim)).astype(np.float32)
        words = [*features_command(features_file(x, Path(tmp)), RECIPE), "--seed_everything=0"]
        words += [f"--data.num_clusters={k}", f"--model.num_heads={heads}", "--model.keep_heads=null"]
        words += ["--trainer.logger=false", f"--trainer.default_root_dir={tmp}", f"--data.cache_dir={tmp}"]
        return assemble(words).model


def build(case: str, b: int, k: int, dim: int, heads: int, device: str) -> Callable[[], None]:
    """One timed / measured call of ``case`` at (B, K, H): step, dense_step, loss, plain_loss, stream."""
    from icon_lightning.recipes import load_recipe

    warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")  # no Trainer: no-op
    if case == "stream":
        x = torch.ones(b, b, device=device)

        def stream() -> None:
            for _ in range(heads):
                x.mul_(1.0)

        return stream
    batch = make_batch(b, dim).to(device)
    module = icon_module(b, k, dim, heads).to(device)
    loss = module.loss
    loss.sparse = case != "dense_step"
    module.train()
    if case in ("step", "dense_step"):
        optimizer = module.configure_optimizers()["optimizer"]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            out = module.training_step(batch, 0)
            (out["loss"] if isinstance(out, dict) else out).backward()  # Lightning's two return forms
            optimizer.step()

        return step
    with torch.no_grad():
        logits = module(batch.inputs).transpose(0, 1).contiguous()  # (H, B, K)
    logits.requires_grad_(True)
    rows = batch.rows(logits[0].detach())
    if case == "plain_loss":
        dense = load_recipe(RECIPE)
        dense.sparse = False
        p = dense.target(rows)

        def plain() -> None:
            logits.grad = None
            plain_loss(logits, p).backward()

        return plain
    p = loss.target(rows)

    def sparse() -> None:
        logits.grad = None
        outs = loss.forward_heads([rows.with_z(z) for z in logits], [rows.with_z(z) for z in logits], p, 0)
        sum(o.loss for o in outs).backward()

    return sparse


# ---------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], None], device: str, max_repeats: int, budget_s: float, min_repeats: int = 2) -> float:
    """best_of with as many repeats as fit in ``budget_s`` (min_repeats..max_repeats).

    The first call is the warm-up; its time sets the repeats, and best_of's own warm-up is skipped (one
    warm-up call in all, as in best_of, so the largest sizes stay within minutes on a CPU)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(first, 1e-6))))
    warmed = [False]

    def after_warm_up() -> None:
        if warmed[0]:
            fn()
        warmed[0] = True

    return best_of(after_warm_up, repeats, device)


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_bytes_here(fn: Callable[[], None], device: str) -> int:
    """Peak bytes allocated during one ``fn()`` beyond those live before it (after a warm-up call)."""
    fn()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return 1024 * (_status_kib("VmHWM") - base)


def memory_worker() -> None:
    """Serve memory measurements: one JSON case a line on stdin, one JSON answer a line on stdout."""
    import icon_lightning.models.module  # noqa: F401  (import before "ready": no overlap with the timings)
    import icon_lightning.recipes  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            fn = build(spec["case"], spec["b"], spec["k"], spec["dim"], spec["heads"], "cpu")
            answer = {"peak_bytes": peak_bytes_here(fn, "cpu")}
            del fn
            gc.collect()
        except Exception as error:  # report, keep serving
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


class MemoryMeter:
    """Peak-memory figures: in this process on CUDA, in a fresh worker subprocess on CPU (see the docstring)."""

    def __init__(self, device: str, dim: int, threads: int) -> None:
        self.device, self.dim = device, dim
        self.worker = None
        self.unavailable = None
        if device != "cuda":
            if not os.path.exists("/proc/self/clear_refs"):
                self.unavailable = "no /proc/self/clear_refs (Linux only): CPU memory not measured"
                return
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.train_step", "--memory-worker", "--threads", str(threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            if self.worker.stdout.readline().strip() != "ready":
                raise RuntimeError("memory worker: did not start")

    def peak(self, case: str, b: int, k: int, heads: int) -> int | str:
        if self.unavailable:
            return self.unavailable
        if self.worker is None:
            try:
                return peak_bytes_here(build(case, b, k, self.dim, heads, self.device), self.device)
            except torch.cuda.OutOfMemoryError as error:
                return f"OutOfMemoryError: {str(error).splitlines()[0]}"
            finally:
                gc.collect()
                torch.cuda.empty_cache()
        spec = {"case": case, "b": b, "k": k, "dim": self.dim, "heads": heads}
        self.worker.stdin.write(json.dumps(spec) + "\n")
        self.worker.stdin.flush()
        answer = json.loads(self.worker.stdout.readline())
        return answer.get("peak_bytes", answer.get("error"))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stdin.close()
            self.worker.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- plan
def estimate_s(case: str, b: int, k: int, heads: int, device: str) -> float:
    """A rough time for one call, from this CPU's measured rates (sparse ~2 ns a pair-head + FLOPs at
    ~60 GFLOP/s; dense ~120 ns a pair-head at K = 10, growing with K), to skip what would not fit the budget.
    On CUDA everything is estimated at 1/100 of that."""
    pairs = b * b * heads
    sparse = 2e-9 * pairs + loss_flops(b, k, heads) / 60e9
    dense = pairs * (120e-9 + 0.5e-9 * k)
    plain = 3 * sparse + pairs * 20e-9
    guess = {"step": sparse, "loss": sparse, "dense_step": dense, "plain_loss": plain, "stream": 1e-9 * pairs}[case]
    return guess / (100 if device == "cuda" else 1)


def measure(case, b, k, heads, dim, device, budget_s, max_repeats, meter, case_budget_s) -> dict:
    """Time (and, for steps, memory) of one case; a dict with ``skipped`` where its estimate is over budget."""
    guess = estimate_s(case, b, k, heads, device)
    if guess > case_budget_s:
        return {"skipped": f"estimated {guess:,.0f} s a call > --case-budget-s {case_budget_s:g}"}
    dense_bytes = 8 * 4 * b * b * heads  # about 8 live (B, B) float32 matrices a head for autograd
    if case in ("dense_step", "plain_loss") and dense_bytes > DENSE_MAX_BYTES:
        return {"skipped": f"would hold about {dense_bytes / 2**30:.0f} GiB of (B, B) matrices"}
    out = {"ms": 1e3 * timed(build(case, b, k, dim, heads, device), device, max_repeats, budget_s, min_repeats=1)}
    if meter is not None and case in ("step", "dense_step"):
        out["peak_bytes"] = meter.peak(case, b, k, heads)
    return out


def run(
    device: str,
    batch_sizes: list[int],
    clusters: list[int],
    heads: list[int],
    dim: int = 384,
    max_repeats: int = 5,
    budget_s: float = 2.0,
    case_budget_s: float = 60.0,
    matmul_n: int | None = None,
    memory: bool = True,
    extra: list[tuple[int, int, int]] = (),
) -> dict:
    """Measure every (B, K, H) of the grid, plus ``extra`` (B, K, H) triples (the memory target: the sparse
    step alone, whatever its estimated time)."""
    matmul_n = matmul_n or (8192 if device == "cuda" else 2048)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mm = [matmul_gflops(matmul_n, device)]
    print(f"matmul ({matmul_n}², fp32): {mm[0]:.1f} GFLOP/s", flush=True)
    meter = MemoryMeter(device, dim, torch.get_num_threads()) if memory else None
    grid = [(b, k, h, False) for b in batch_sizes for k in clusters for h in heads] + [(*t, True) for t in extra]
    rows = []
    for b, k, h, is_extra in grid:
        row = {"B": b, "K": k, "H": h, "anchors": b // (VIEWS + NEIGHBOURS), "loss_flops": loss_flops(b, k, h)}
        for case in CASES:
            if is_extra and case not in ("step", "stream"):  # an extra case (a target) runs the step alone,
                row[case] = {"skipped": "extra case: the sparse step only"}
                continue
            limit = math.inf if is_extra else case_budget_s  # whatever it costs
            row[case] = measure(case, b, k, h, dim, device, budget_s, max_repeats, meter, limit)
        mm.append(matmul_gflops(matmul_n, device))  # the reference right after this row: the same machine state
        row["matmul_gflops_adjacent"] = max(mm[-2], mm[-1])
        rows.append(with_ratios(row))
        print(f"B={b:6d} K={k:5d} H={h:3d}  " + "  ".join(f"{c} {_ms(row[c])}" for c in CASES), flush=True)
    if meter is not None:
        meter.close()
    return {
        **description(device, dim, max_repeats, budget_s),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "matmul_n": matmul_n,
        "matmul_gflops": {"start": mm[0], "end": mm[-1], "peak": max(mm)},
        "rows": rows,
        "targets": targets(rows),
    }


CASES = ("step", "dense_step", "loss", "plain_loss", "stream")


def with_ratios(row: dict) -> dict:
    """``row`` with its throughput and ratios (to the FLOP bound, the stream, dense / sparse, plain / sparse)."""
    ms = {c: row[c].get("ms") for c in CASES}
    if ms["step"] is not None:
        row["samples_per_s"] = row["B"] / (ms["step"] / 1e3)
        flop_bound_ms = 1e3 * row["loss_flops"] / (row["matmul_gflops_adjacent"] * 1e9)
        row["flop_bound_ms"] = flop_bound_ms
        row["step_over_flop_bound"] = ms["step"] / flop_bound_ms
        if ms["stream"] is not None:
            row["step_over_stream"] = ms["step"] / ms["stream"]
        if ms["dense_step"] is not None:
            row["dense_step_over_step"] = ms["dense_step"] / ms["step"]
    if ms["loss"] is not None and ms["plain_loss"] is not None:
        row["plain_over_loss"] = ms["plain_loss"] / ms["loss"]
    return row


def description(device: str, dim: int, max_repeats: int, budget_s: float) -> dict:
    """What every result of this benchmark states about its setting."""
    return {
        "device": device,
        "dtype": "float32",
        "dim": dim,
        "recipe": RECIPE,
        "batch": {
            "B": "rows of the pair matrix = anchors × (views + neighbours)",
            "views": VIEWS,
            "neighbours": NEIGHBOURS,
            "knn_k": KNN_K,
            "walk_steps": WALK_STEPS,
            "features": "random unit-norm (centred) vectors of width dim; k-NN table drawn within groups of 8 items",
        },
        "timing": f"best_of (min over repeats after one warm-up); repeats 1..{max_repeats} within ~{budget_s}s",
        "flops_formula": "3 * 2*B*B*K*H (the sparse loss's three B×B×K products per head)",
        "memory_method": MEMORY_METHOD["cuda" if device == "cuda" else "cpu"],
        "threads": torch.get_num_threads(),
    }


def _find(rows: list[dict], b: int, k: int, h: int) -> dict | None:
    return next((r for r in rows if (r["B"], r["K"], r["H"]) == (b, k, h)), None)


def targets(rows: list[dict]) -> dict:
    """The issue's targets, each with what was measured and whether it was met (None: not measured)."""
    out = {}
    t = TARGETS["speed"]
    r = _find(rows, t["B"], t["K"], t["H"])
    over_plain = r.get("plain_over_loss") if r else None
    over_dense = r.get("dense_step_over_step") if r else None
    out["speed"] = {
        **t,
        "plain_over_loss": over_plain,
        "dense_step_over_step": over_dense,
        "met": None
        if over_plain is None or over_dense is None
        else over_plain >= t["min_over_plain"] and over_dense >= t["min_over_dense_step"],
    }
    t = TARGETS["memory"]
    r = _find(rows, t["B"], t["K"], t["H"])
    peak = r["step"].get("peak_bytes") if r else None
    out["memory"] = {**t, "peak_bytes": peak, "met": peak <= t["max_peak_bytes"] if isinstance(peak, int) else None}
    t = TARGETS["heads"]
    many, one = _find(rows, t["B"], t["K"], t["H"]), _find(rows, t["B"], t["K"], 1)
    ratio = many["step"]["ms"] / one["step"]["ms"] if many and one and "ms" in many["step"] else None
    out["heads"] = {**t, "over_one_head": ratio, "met": None if ratio is None else ratio <= t["max_over_one_head"]}
    return out


# ---------------------------------------------------------------------------------------------- report
def _ms(case: dict) -> str:
    return f"{case['ms']:,.1f} ms" if "ms" in case else "skipped"


def _mib(x) -> str:
    return f"{x / 2**20:,.0f} MiB" if isinstance(x, int) else "–"


def table(rows: list[dict]) -> str:
    head = (
        "| B | K | H | sparse step | samples/s | dense step | dense / sparse | sparse loss | plain loss | "
        "plain / sparse | step / FLOP bound | step / stream | step peak | dense step peak |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def ratio(r, name):
        return f"{r[name]:.1f}×" if name in r else "–"

    lines = [
        f"| {r['B']} | {r['K']} | {r['H']} | {_ms(r['step'])} | {r.get('samples_per_s', 0):,.0f} | "
        f"{_ms(r['dense_step'])} | {ratio(r, 'dense_step_over_step')} | {_ms(r['loss'])} | {_ms(r['plain_loss'])} | "
        f"{ratio(r, 'plain_over_loss')} | {ratio(r, 'step_over_flop_bound')} | {ratio(r, 'step_over_stream')} | "
        f"{_mib(r['step'].get('peak_bytes'))} | {_mib(r['dense_step'].get('peak_bytes'))} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", default="1024,4096,16384")
    parser.add_argument("--clusters", default="10,100,1000")
    parser.add_argument("--heads", default="1,16")
    parser.add_argument("--extra", default="16384:1000:5", help="more B:K:H cases, comma-separated")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--max-repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=2.0, help="time budget per measurement (sets repeats)")
    parser.add_argument("--case-budget-s", type=float, default=60.0, help="skip cases estimated to take longer")
    parser.add_argument("--matmul-n", type=int, default=None, help="side of the reference matmul (cpu 2048, cuda 8192)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="file name under benchmarks/results (train_step_<device>.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the README table of the saved JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        from benchmarks import common

        result = json.loads((common.RESULTS / (args.out or f"train_step_{args.device}.json")).read_text())
        print(table(result["rows"]))
        print(json.dumps(result["targets"], indent=1))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker()
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    start = time.perf_counter()
    result = run(
        args.device,
        [int(x) for x in args.batch_sizes.split(",")],
        [int(x) for x in args.clusters.split(",")],
        [int(x) for x in args.heads.split(",")],
        dim=args.dim,
        max_repeats=args.max_repeats,
        budget_s=args.budget_s,
        case_budget_s=args.case_budget_s,
        matmul_n=args.matmul_n,
        memory=not args.no_memory,
        extra=[tuple(int(v) for v in t.split(":")) for t in args.extra.split(",") if t],
    )
    result["wall_s"] = time.perf_counter() - start
    print()
    print(table(result["rows"]))
    print()
    print(json.dumps(result["targets"], indent=1))
    write_result(args.out or f"train_step_{args.device}.json", result)


if __name__ == "__main__":
    main()
