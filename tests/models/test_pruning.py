"""Label-free head pruning (successive halving by training loss): the kept heads are the old heads, their optimizer
state goes with them, the schedule follows the losses and never the labels, resumes keep the survivors, and the
pruned run selects a head as good as the unpruned one."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

from icon_lightning.callbacks.convergence import watched_loss
from icon_lightning.data import ClusteringDataModule, FeaturesArray
from icon_lightning.models import IConModule
from icon_lightning.models.heads import ClusterHeads, keep_heads
from icon_lightning.models.parts import HeadPruning, carry_optimizer_state
from icon_lightning.recipes import load_recipe
from tests.conftest import EndProcessGroup


@pytest.mark.parametrize("hidden", [None, 5])
def test_kept_heads_compute_what_the_old_heads_did(hidden):
    torch.manual_seed(0)
    heads = ClusterHeads(feature_dim=7, num_clusters=4, num_heads=5, temperature=0.5, hidden_dim=hidden).double()
    x = torch.randn(13, 7, dtype=torch.float64)
    before = heads(x)
    rows = keep_heads(heads, [3, 0])
    assert heads.num_heads == 2 and heads(x).shape == (13, 2, 4)
    torch.testing.assert_close(heads(x), before[:, [3, 0]], rtol=1e-12, atol=1e-12)  # float64 rounding of the products
    n_params = sum(p.numel() for p in heads.parameters())
    full = ClusterHeads(7, 4, num_heads=2, temperature=0.5, hidden_dim=hidden)
    assert n_params == sum(p.numel() for p in full.parameters())  # the pruned heads' parameters are gone
    assert set(rows) == {name for name, _ in heads.named_parameters()}


def test_bad_head_positions_are_one_line_errors():
    heads = ClusterHeads(4, 3, num_heads=3)
    for bad in ([], [0, 0], [3], [-1]):
        with pytest.raises(ValueError, match="heads: expected"):
            keep_heads(heads, bad)
    with pytest.raises(ValueError, match="^keep_heads: expected at least 1 or null, got 0$"):
        IConModule(load_recipe("icon_clustering"), feature_dim=4, num_clusters=3, keep_heads=0)
    with pytest.raises(ValueError, match="^prune_every: expected at least 1, got 0$"):
        IConModule(load_recipe("icon_clustering"), feature_dim=4, num_clusters=3, prune_every=0)


def _adam_steps(heads: ClusterHeads, optimizer, x: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        z = heads(x)  # each head's loss reads only its own output: heads train independently
        loss = sum(torch.nn.functional.cross_entropy(z[:, h], target) for h in range(heads.num_heads))
        loss.backward()
        optimizer.step()


def test_survivors_continue_exactly_as_if_nothing_was_pruned():
    # The reference: the same 4 heads trained on without pruning. Adam's moments carried row by row make the kept
    # heads' later steps equal to the unpruned run's (to float64 rounding of the smaller products).
    torch.manual_seed(0)
    x, target = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    pruned = ClusterHeads(6, 3, num_heads=4).double()
    reference = ClusterHeads(6, 3, num_heads=4).double()
    reference.load_state_dict(pruned.state_dict())
    opt_p, opt_r = (torch.optim.Adam(h.parameters(), lr=0.05) for h in (pruned, reference))
    _adam_steps(pruned, opt_p, x, target, 3)
    _adam_steps(reference, opt_r, x, target, 3)
    before = dict(pruned.named_parameters())
    rows = keep_heads(pruned, [2, 1])
    after = dict(pruned.named_parameters())
    carry_optimizer_state(opt_p, {before[n]: (after[n], r) for n, r in rows.items()})
    assert sum(v.numel() for s in opt_p.state.values() for v in s.values() if v.ndim) == 2 * sum(
        p.numel() for p in pruned.parameters()
    )  # two moments for the kept parameters only
    _adam_steps(pruned, opt_p, x, target, 4)
    _adam_steps(reference, opt_r, x, target, 4)
    torch.testing.assert_close(pruned(x), reference(x)[:, [2, 1]], rtol=1e-10, atol=1e-10)


def test_the_schedule_keeps_the_lower_half_by_mean_loss_until_keep_remain():
    pruning = HeadPruning(keep=1, every=2)
    ids = torch.tensor([0, 1, 2, 3, 4])
    losses = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0], [3.0, 1.2, 2.0, 0.0, 4.0]])  # means 3, 1.1, 2, 2.5, 4
    pruning.add(losses[0])
    assert pruning.survivors(1, ids) is None  # not due at step 1
    pruning.add(losses[1])
    kept = pruning.survivors(2, ids)
    assert kept.tolist() == [1, 2, 3]  # ceil(5 / 2) heads, best first
    assert pruning.history[-1]["dropped"] == [0, 4] and pruning.history[-1]["losses"]["3"] == pytest.approx(2.5)
    ids = ids[kept]
    for _ in range(2):
        pruning.add(torch.tensor([0.5, 0.4, 0.9]))
    assert pruning.survivors(4, ids).tolist() == [1, 0]  # heads 2 and 1 by number; 3 dropped
    for _ in range(2):
        pruning.add(torch.tensor([0.7, 0.1]))
    assert pruning.survivors(6, ids[torch.tensor([1, 0])]).tolist() == [1]
    assert HeadPruning(keep=None, every=1).survivors(1, ids) is None  # no pruning at all


def test_the_convergence_loss_is_the_best_heads_so_dropping_worse_heads_is_no_progress():
    losses = torch.tensor([1.5, 0.75, 2.0])
    assert float(watched_loss({"loss": losses.sum(), "head_losses": losses})) == 0.75
    assert float(watched_loss({"loss": losses.sum(), "head_losses": losses[[1, 0]]})) == 0.75
    assert float(watched_loss(torch.tensor(2.0))) == 2.0


# ---------------------------------------------------------------------- real fits
def _blobs(labels_seed: int = 0, n: int = 240):
    g = np.random.default_rng(0)
    centres = g.normal(size=(4, 8)) * 3
    y = np.repeat(np.arange(4), n // 4)
    x = centres[y] + g.normal(size=(n, 8))
    shuffled = np.random.default_rng(labels_seed).permutation(y) if labels_seed else y
    return x.astype(np.float32), shuffled


def _fit(tmp_path, labels_seed=0, max_steps=30, keep=1, ckpt=None, heads=4):
    x, y = _blobs(labels_seed)
    L.seed_everything(0, verbose=False)
    data = ClusteringDataModule(FeaturesArray(x, y), views="clean", cache_dir=str(tmp_path / "cache"), seed=0)
    model = IConModule(
        load_recipe("icon_clustering"),
        feature_dim=8,
        num_clusters=4,
        num_classes=4,
        num_samples=len(x),
        num_heads=heads,
        head_init=[],
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        keep_heads=keep,
        prune_every=5,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt, weights_only=False)  # our own file: hparams hold a partial
    return trainer, model


def test_pruning_reads_losses_never_labels(tmp_path):
    _, plain = _fit(tmp_path / "a")
    _, shuffled = _fit(tmp_path / "b", labels_seed=7)  # the same features, the labels permuted
    assert plain.pruning.history == shuffled.pruning.history
    assert [h["step"] for h in plain.pruning.history] == [5, 10]  # 4 → 2 → 1 heads
    assert plain.head_ids.tolist() == shuffled.head_ids.tolist() and len(plain.head_ids) == 1
    torch.testing.assert_close(plain.heads.linear.weight, shuffled.heads.linear.weight, rtol=0, atol=0)


def test_a_resumed_run_keeps_the_survivors_and_continues_as_the_uninterrupted_one(tmp_path):
    trainer, first = _fit(tmp_path / "run", max_steps=7)  # pruned once (4 → 2 heads at step 5)
    assert len(first.head_ids) == 2
    path = tmp_path / "step7.ckpt"
    trainer.save_checkpoint(path)
    _, resumed = _fit(tmp_path / "run", max_steps=30, ckpt=str(path))
    _, straight = _fit(tmp_path / "straight", max_steps=30)
    assert resumed.head_ids.tolist() == straight.head_ids.tolist()
    assert resumed.pruning.history == straight.pruning.history
    torch.testing.assert_close(resumed.heads.linear.weight, straight.heads.linear.weight)
    # built in Python, the loss is a module, not a hyper-parameter: the checkpoint holds its weights, not its object
    with pytest.raises(TypeError, match="loss"):
        IConModule.load_from_checkpoint(path, weights_only=False)
    assert "loss" not in first.hparams and "backbone" not in first.hparams
    reloaded = IConModule.load_from_checkpoint(path, weights_only=False, loss=load_recipe("icon_clustering"))
    assert reloaded.head_ids.tolist() == first.head_ids.tolist() and reloaded.heads.num_heads == 2


@pytest.mark.slow
def test_on_digits_the_pruned_run_selects_a_head_as_good_by_training_loss(tmp_path):
    from sklearn.datasets import load_digits

    from icon_lightning.estimator import HeadClusterer

    x = load_digits().data.astype(np.float32)
    runs = {}
    for keep in (1, None):
        est = HeadClusterer(overrides=[f"--model.keep_heads={keep or 'null'}"], cache_dir=str(tmp_path))
        runs[keep] = est.fit(x)
    pruned, full = runs[1], runs[None]
    assert len(pruned.head_losses_) == 1 and len(full.head_losses_) == 10
    # the same seed: the pruned run's head is at least as good by training loss (to float rounding of the batched
    # 10-head products against the 1-head ones, 1e-4 relative)
    assert pruned.head_losses_[pruned.selected_head_] <= full.head_losses_.min() * (1 + 1e-4)


class _RecordHeads(L.Callback):
    """Each process's view of the pruning at the end of fit, written to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "step": trainer.global_step,
            "history": pl_module.pruning.history,
            "head_ids": pl_module.head_ids.tolist(),
            "weight": pl_module.heads.linear.weight.detach().cpu().clone(),
            "adam_steps": [float(s["step"]) for s in trainer.optimizers[0].state.values()],
        }
        torch.save(record, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_processes_prune_the_same_heads_and_train_on_in_sync(tmp_path):
    """Under DDP each process sees its own anchors, so its losses differ; the heads dropped are chosen from the
    losses averaged over processes, so both keep the same survivors. Training goes on after each pruning through a
    DDP wrapper built anew around the smaller heads: the survivors' weights stay identical across processes (they
    would drift, or backward would fail, if the old wrapper's gradient buckets were still in use). It also pins
    two DDP bugs it found: extraction in ``prepare_data`` (rank 0 alone) joined a collective and hung, and the
    main process could not load the pruned workers' weights."""
    x, y = _blobs()
    L.seed_everything(0, verbose=False)
    data = ClusteringDataModule(FeaturesArray(x, y), views="clean", cache_dir=str(tmp_path / "cache"), seed=0)
    model = IConModule(
        load_recipe("icon_clustering"),
        feature_dim=8,
        num_clusters=4,
        num_classes=4,
        num_samples=len(x),
        num_heads=4,
        head_init=[],
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        keep_heads=1,
        prune_every=5,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=20,
        max_epochs=-1,
        callbacks=[_RecordHeads(str(tmp_path)), EndProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 20
    assert ranks[0]["history"] == ranks[1]["history"] and [h["step"] for h in ranks[0]["history"]] == [5, 10]
    assert ranks[0]["head_ids"] == ranks[1]["head_ids"] and len(ranks[0]["head_ids"]) == 1
    torch.testing.assert_close(ranks[0]["weight"], ranks[1]["weight"], rtol=0, atol=0)
    assert ranks[0]["adam_steps"] and all(s == 20 for s in ranks[0]["adam_steps"])  # state carried, not restarted
    # ddp_spawn hands the workers' weights back to this process's 4-head module: it shrinks to the survivor
    assert model.head_ids.tolist() == ranks[0]["head_ids"]
    torch.testing.assert_close(model.heads.linear.weight.detach(), ranks[0]["weight"], rtol=0, atol=0)
