"""Shared fixtures: small synthetic problems, one per kind of batch a recipe needs.

Each `Problem` holds fixed inputs ``x`` and turns a model output ``z`` (N, D) into the rows the recipe's
loss takes, so the same problem serves the reference tests (z random) and the training tests (z = f(x)).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor

from icon_lightning.rows import Rows

# The project's real data (not in the repo): ../shared/data beside the checkout, or $ICON_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("ICON_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Which kind of batch each recipe consumes. A recipe missing here fails tests/test_periodic_table.py.
RECIPE_KIND = {
    "sne": "features",
    "tsne": "features",
    "kmeans": "features",
    "infonce": "views",
    "kernel_infonce_laplacian": "views",
    "kernel_infonce_simple_sum": "views",
    "kernel_infonce_concat_sum": "views",
    "kernel_infonce_code_sum": "views",
    "supcon": "labels",
    "cmc_clip": "cross_view",
    "sc_infonce": "cross_view",
    "cross_entropy": "prototypes",
    "mi_clustering": "graph",
    "icon_clustering": "graph",
    "normalized_cuts": "graph",
}


@dataclass
class Problem:
    """x: (N, D_in) inputs; out_dim: D of z; rows(z) -> (anchors, candidates or None)."""

    x: Tensor
    out_dim: int
    rows: Callable[[Tensor], tuple[Rows, Rows | None]]
    facts: dict = field(default_factory=dict)


def knn_table_brute(x: Tensor, k: int) -> Tensor:
    """(N, k) cosine k-NN by brute force, self excluded."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def make_problem(kind: str, seed: int = 0, dtype=torch.float64) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    if kind == "views":  # B items, two noisy views each, stacked into 2B rows
        b = 12
        base = randn(b, 10)
        x = torch.cat([base + 0.3 * randn(b, 10), base + 0.3 * randn(b, 10)])
        index = torch.arange(b).repeat(2)
        view = torch.arange(2).repeat_interleave(b)
        return Problem(x, 8, lambda z: (Rows(z=z, index=index, view=view), None), {"B": b})
    if kind == "cross_view":  # anchors = view 0 (images), candidates = view 1 (texts)
        b = 12
        base = randn(b, 10)
        x = torch.cat([base + 0.3 * randn(b, 10), base + 0.3 * randn(b, 10)])
        index = torch.arange(b)

        def rows(z):
            return (
                Rows(z=z[:b], index=index, view=torch.zeros(b, dtype=torch.long)),
                Rows(z=z[b:], index=index, view=torch.ones(b, dtype=torch.long)),
            )

        return Problem(x, 8, rows, {"B": b})
    if kind == "labels":
        label = torch.arange(4).repeat_interleave(5)[torch.randperm(20, generator=g)]
        x = 2.0 * torch.nn.functional.one_hot(label, 4).to(dtype) @ randn(4, 10) + randn(20, 10)
        return Problem(x, 8, lambda z: (Rows(z=z, index=torch.arange(20), label=label), None), {"label": label})
    if kind == "prototypes":  # candidates: C fixed class prototypes, labelled 0..C-1
        c = 5
        label = torch.arange(c).repeat(4)
        x = 2.0 * torch.nn.functional.one_hot(label, c).to(dtype) @ randn(c, 10) + randn(20, 10)
        prototypes = randn(c, 8)
        protos = Rows(z=prototypes, index=torch.arange(c), label=torch.arange(c))
        return Problem(
            x,
            8,
            lambda z: (Rows(z=z, index=torch.arange(20), label=label), protos),
            {"label": label, "prototypes": prototypes},
        )
    if kind == "features":  # input features for Gaussian p; 80 rows so a perplexity of 30 fits
        n = 80
        centers = 3.0 * randn(4, 6)
        x = centers[torch.arange(n) % 4] + randn(n, 6)
        return Problem(x, 4, lambda z: (Rows(z=z, index=torch.arange(n), features=x), None))
    if kind == "graph":  # dataset = batch; k-NN table by brute force, degrees of the symmetrised graph
        n = 40
        centers = 3.0 * randn(4, 6)
        x = centers[torch.arange(n) % 4] + randn(n, 6)
        table = knn_table_brute(x, 10)
        adj = torch.zeros(n, n, dtype=torch.bool)
        adj[torch.arange(n).unsqueeze(1), table] = True
        degree = (adj | adj.T).sum(1).to(dtype)
        return Problem(
            x, 4, lambda z: (Rows(z=z, index=torch.arange(n), neighbours=table, degree=degree), None), {"table": table}
        )
    raise KeyError(kind)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def to_np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


class EndProcessGroup(L.Callback):
    """For ``ddp_spawn`` tests: at teardown, after the fit's last collective, every worker meets the others at a
    barrier and closes the gloo process group itself. A worker that exits with the group still open races its
    peer's socket shutdown at interpreter exit, and gloo can then abort it (CI saw "process 1 terminated with
    signal SIGABRT" after a fit that had finished)."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def quiet_fit_words(path, config, tmp_path, *extra: str) -> list[str]:
    """``icon fit`` words for a features file under ``config``, in-process and quiet: K = 10, the run's files under
    ``tmp_path``, no logger, checkpoint or progress bar, on the CPU; ``extra`` last."""
    from icon_lightning.cli import features_command

    return [
        *features_command(path, config),
        "--data.num_clusters=10",
        f"--data.cache_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        *extra,
    ]
