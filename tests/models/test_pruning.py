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
from icon_lightning.models.bank import HeadBank
from icon_lightning.models.heads import ClusterHeads
from icon_lightning.recipes import load_recipe
from tests.conftest import EndProcessGroup


@pytest.mark.parametrize("hidden", [None, 5])
def test_pruned_heads_cost_nothing_get_no_gradient_and_the_live_ones_compute_what_they_did(hidden):
    torch.manual_seed(0)
    heads = ClusterHeads(feature_dim=7, num_clusters=4, num_heads=5, temperature=0.5, hidden_dim=hidden).double()
    bank = HeadBank(heads)
    x = torch.randn(13, 7, dtype=torch.float64)
    before = bank(x)
    bank.live[[1, 2, 4]] = False
    assert bank.live_ids() == [0, 3] and bank(x).shape == (13, 2, 4)
    torch.testing.assert_close(bank(x), before[:, [0, 3]], rtol=1e-12, atol=1e-12)  # float64 rounding of products
    bank(x).square().sum().backward()
    for name, p in heads.named_parameters():  # the stacks keep every head; only the live rows get a gradient
        assert p.shape[0] == 5 and p.grad[[1, 2, 4]].abs().max() == 0 and p.grad[[0, 3]].abs().max() > 0, name
    with torch.no_grad():  # a pruned head is not computed at all: its weights do not reach the output
        heads.out_weight[1].fill_(float("nan")) if hidden else heads.weight[1].fill_(float("nan"))
    assert torch.isfinite(bank(x)).all()


def test_bad_pruning_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="^keep_heads: expected at least 1 or null, got 0$"):
        IConModule(load_recipe("icon_clustering"), feature_dim=4, num_clusters=3, keep_heads=0)
    with pytest.raises(ValueError, match="^prune_every: expected at least 1, got 0$"):
        IConModule(load_recipe("icon_clustering"), feature_dim=4, num_clusters=3, prune_every=0)


def _adam_steps(bank: HeadBank, optimizer, x: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        z = bank(x)  # each head's loss reads only its own output: heads train independently
        loss = sum(torch.nn.functional.cross_entropy(z[:, h], target) for h in range(z.shape[1]))
        loss.backward()
        optimizer.step()


def test_survivors_continue_exactly_as_if_nothing_was_pruned_and_nothing_is_rebuilt():
    # The reference: the same 4 heads trained on without pruning. Pruning flips the live mask only: the optimizer
    # keeps the same parameters and state (Adam's moments are per element, so the live rows step as before).
    torch.manual_seed(0)
    x, target = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    pruned = HeadBank(ClusterHeads(6, 3, num_heads=4).double(), keep=2, every=3)
    reference = HeadBank(ClusterHeads(6, 3, num_heads=4).double())
    reference.load_state_dict(pruned.state_dict())
    opt_p, opt_r = (torch.optim.Adam(b.heads.parameters(), lr=0.05) for b in (pruned, reference))
    _adam_steps(pruned, opt_p, x, target, 3)
    _adam_steps(reference, opt_r, x, target, 3)
    params, shapes = list(pruned.heads.parameters()), {k: v.shape for k, v in pruned.heads.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in opt_p.state[p].items()} for p in params}
    pruned.add(torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64))
    assert pruned.prune(3) and pruned.live_ids() == [1, 2]
    assert list(pruned.heads.parameters()) == params and opt_p.param_groups[0]["params"] == params
    assert {k: v.shape for k, v in pruned.heads.state_dict().items()} == shapes  # the checkpoint's layout stays
    assert all(torch.equal(opt_p.state[p][k], v) for p in params for k, v in state[id(p)].items())
    _adam_steps(pruned, opt_p, x, target, 4)
    _adam_steps(reference, opt_r, x, target, 4)
    torch.testing.assert_close(pruned(x), reference(x)[:, [1, 2]], rtol=1e-10, atol=1e-10)


def test_the_schedule_keeps_the_lower_half_by_mean_loss_until_keep_remain():
    bank = HeadBank(ClusterHeads(3, 2, num_heads=5), keep=1, every=2)
    losses = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0], [3.0, 1.2, 2.0, 0.0, 4.0]])  # means 3, 1.1, 2, 2.5, 4
    bank.add(losses[0])
    assert not bank.prune(1)  # not due at step 1
    bank.add(losses[1])
    assert bank.prune(2) and bank.live_ids() == [1, 2, 3]  # ceil(5 / 2) heads
    history = bank.report()["pruning"]
    assert history[-1]["kept"] == [1, 2, 3] and history[-1]["dropped"] == [0, 4]  # best first
    assert history[-1]["losses"]["3"] == pytest.approx(2.5) and int(bank.selected) == 1  # a number: the best
    for _ in range(2):
        bank.add(torch.tensor([0.5, 0.4, 0.9]))  # heads 1, 2, 3
    assert bank.prune(4) and bank.live_ids() == [1, 2] and bank.report()["pruning"][-1]["kept"] == [2, 1]
    for _ in range(2):
        bank.add(torch.tensor([0.1, 0.7]))
    assert bank.prune(6) and bank.live_ids() == [1] and not bank.prune(8)
    unpruned = HeadBank(ClusterHeads(3, 2, num_heads=2))
    unpruned.add(torch.tensor([1.0, 0.5]))
    assert not unpruned.prune(10) and unpruned.live_ids() == [0, 1]  # keep None: no pruning at all


def test_selection_is_a_heads_number_through_the_declared_scores():
    bank = HeadBank(ClusterHeads(3, 2, num_heads=4), keep=2, every=1)
    assert bank.report()["selected_head"] is None  # nothing measured yet
    bank.add(torch.tensor([0.4, 0.9, 0.1, 0.3]))
    bank.prune(1)  # heads 2 and 3 go on
    bank.add(torch.tensor([0.5, 0.2]))
    bank.close_epoch()
    assert int(bank.selected) == 3 and bank.selection_scores()[[0, 1]].isinf().all()
    assert bank.report() == {
        "selected_head": 3,
        "heads": [2, 3],
        "head_losses": [pytest.approx(0.3), pytest.approx(0.25)],  # the epoch's two steps
        "selection": "training loss",  # no judge given
        "judge": None,
        "pruning": bank.report()["pruning"],
    }
    assert bank.select(torch.tensor([0.0, 0.0, 0.7, 0.6])) == 3  # a pruned head is never selected


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
    assert plain.head_report()["pruning"] == shuffled.head_report()["pruning"]
    assert [h["step"] for h in plain.head_report()["pruning"]] == [5, 10]  # 4 → 2 → 1 heads
    assert plain.live_head_ids() == shuffled.live_head_ids() and len(plain.live_head_ids()) == 1
    torch.testing.assert_close(plain.heads.weight, shuffled.heads.weight, rtol=0, atol=0)


def test_a_resumed_run_keeps_the_survivors_and_continues_as_the_uninterrupted_one(tmp_path):
    trainer, first = _fit(tmp_path / "run", max_steps=7)  # pruned once (4 → 2 heads at step 5)
    assert len(first.live_head_ids()) == 2
    path = tmp_path / "step7.ckpt"
    trainer.save_checkpoint(path)
    _, resumed = _fit(tmp_path / "run", max_steps=30, ckpt=str(path))
    _, straight = _fit(tmp_path / "straight", max_steps=30)
    assert resumed.live_head_ids() == straight.live_head_ids()
    assert resumed.head_report() == straight.head_report()
    torch.testing.assert_close(resumed.heads.weight, straight.heads.weight)
    # built in Python, the loss is a module, not a hyper-parameter: the checkpoint holds its weights, not its object
    with pytest.raises(TypeError, match="loss"):
        IConModule.load_from_checkpoint(path, weights_only=False)
    assert "loss" not in first.hparams and "backbone" not in first.hparams
    reloaded = IConModule.load_from_checkpoint(path, weights_only=False, loss=load_recipe("icon_clustering"))
    assert reloaded.live_head_ids() == first.live_head_ids() and reloaded.heads.weight.shape[0] == 4
    assert reloaded.head_report() == first.head_report()


def test_a_checkpoint_of_the_layout_before_the_head_bank_is_refused_in_one_line(tmp_path):
    trainer, _ = _fit(tmp_path / "run", max_steps=2)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]  # the old layout: one nn.Linear of the live heads, their numbers in head_ids
    state["heads.linear.weight"] = state.pop("bank.heads.weight").flatten(0, 1)
    state["head_ids"] = torch.arange(4)
    torch.save(checkpoint, path)
    with pytest.raises(
        ValueError, match=f"^ckpt_path: {path} holds heads of the layout before HeadBank .*; re-fit it$"
    ):
        _fit(tmp_path / "run", max_steps=4, ckpt=str(path))


@pytest.mark.slow
def test_on_digits_the_pruned_run_selects_a_head_as_good_by_training_loss(tmp_path):
    from sklearn.datasets import load_digits

    from icon_lightning.estimator import HeadClusterer

    x = load_digits().data.astype(np.float32)
    runs = {}
    for keep in (1, None):
        # one k-means start (never pruned), selected by training loss: the halving of the 9 random heads against none
        overrides = [f"--model.keep_heads={keep or 'null'}", "--model.head_init=[kmeans]", "--model.selection=loss"]
        est = HeadClusterer(overrides=overrides, cache_dir=str(tmp_path))
        runs[keep] = est.fit(x)
    pruned, full = runs[1], runs[None]
    assert len(pruned.head_losses_) == 2 and len(full.head_losses_) == 10 and 0 in pruned.head_ids_
    # the same seed: the pruned run's head is at least as good by training loss (to float rounding of the batched
    # 10-head products against the 1-head ones, 1e-4 relative)
    selected = pruned.head_losses_[list(pruned.head_ids_).index(pruned.selected_head_)]  # selected_head_: a number
    assert selected <= full.head_losses_.min() * (1 + 1e-4)


class _RecordHeads(L.Callback):
    """Each process's view of the pruning at the end of fit, written to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "step": trainer.global_step,
            "history": pl_module.head_report()["pruning"],
            "head_ids": pl_module.live_head_ids(),
            "weight": pl_module.heads.weight.detach().cpu().clone(),
            "adam_steps": [float(s["step"]) for s in trainer.optimizers[0].state.values()],
        }
        torch.save(record, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_processes_prune_the_same_heads_and_train_on_in_sync(tmp_path):
    """Under DDP each process sees its own anchors, so its losses differ; the heads dropped are chosen from the
    losses averaged over processes, so both keep the same survivors. Training goes on after each pruning through
    the same DDP wrapper (the stacks keep their shapes; pruned rows get zero gradients): the survivors' weights stay
    identical across processes. It also pins two DDP bugs it found: extraction in ``prepare_data`` (rank 0 alone)
    joined a collective and hung, and the main process could not load the pruned workers' weights."""
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
    # ddp_spawn hands the workers' weights back to this process's module: the same layout, the survivor live
    assert model.live_head_ids() == ranks[0]["head_ids"]
    torch.testing.assert_close(model.heads.weight.detach(), ranks[0]["weight"], rtol=0, atol=0)
