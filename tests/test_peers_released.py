"""configs/peers/scan.yaml and temi.yaml: SCAN and TEMI as their authors released them, on frozen features (issue 33,
deliverable 1); scan_common.yaml and temi_common.yaml: the project's common protocol on their losses (ablations).

References: SCAN wvangansbeke/Unsupervised-Classification (configs/scan/scan_imagenet_50.yml, "in50", the cluster
heads on a frozen backbone, and the code it runs), TEMI HHU-MMBS/TEMI-official-BMVC2023 (README.md's CIFAR-10
command, "readme", main_args.py's defaults, "args", and the code). Every pinned value is checked against a table
citing its file; the DINO head against a float64 hand computation and torch's own weight_norm; the warm-up against
the release's formula; the frozen last layer step by step; the sampled neighbour against the batch's layout; real
fits on scikit-learn digits check that every head trains to the end and the lowest-loss head is reported.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from scipy.special import erf
from torch import nn

from icon_lightning.baselines.pairs import SampledNeighbours, sampled_pairs
from icon_lightning.callbacks.peer_schedule import FreezeLastLayer, warmup_cosine_factor
from icon_lightning.models.heads_dino import DINOHeads, module_heads
from icon_lightning.recipes import CONFIG_DIR
from icon_lightning.rows import Rows
from tests.conftest import quiet_fit_words

PEERS = CONFIG_DIR / "peers"
SCAN, TEMI = PEERS / "scan.yaml", PEERS / "temi.yaml"
SCAN_COMMON, TEMI_COMMON = PEERS / "scan_common.yaml", PEERS / "temi_common.yaml"
SAMPLED = "icon_lightning.baselines.SampledNeighbours"

# key → (value, where the release sets it): wvangansbeke/Unsupervised-Classification
SCAN_RELEASED = {
    "trainer.max_epochs": (100, "in50 epochs: 100; scan.py for epoch in range(p['epochs'])"),
    "model.loss.class_path": ("icon_lightning.baselines.SCANLoss", "losses/losses.py SCANLoss"),
    "model.loss.init_args.p.class_path": (SAMPLED, "data/custom_dataset.py NeighborsDataset: one sampled neighbour"),
    "model.loss.init_args.p.init_args.symmetric": (False, "losses.py SCANLoss(anchors, neighbors)"),
    "model.loss.init_args.p.init_args.include_self": (True, "NeighborsDataset indices[:, :k+1]; memory.py topk+1"),
    "model.loss.init_args.entropy_weight": (5.0, "in50 criterion_kwargs.entropy_weight: 5.0"),
    "model.loss.init_args.temperature": (1.0, "losses.py softmax of the logits"),
    "model.loss.init_args.entropy_over": ("anchors", "losses.py entropy(torch.mean(anchors_prob, 0))"),
    "model.loss.init_args.entropy_floor": (1e-8, "losses.py entropy: torch.clamp(x, min=EPS), EPS=1e-8"),
    "model.num_heads": (10, "in50 num_heads: 10"),
    "model.head_temperature": (1.0, "models/models.py the linear head's logits"),
    "model.head_init": ([], "models.py nn.Linear default init"),
    "model.projection_dim": (None, "models.py heads on the backbone features"),
    "model.head_hidden_dim": (None, "models.py linear heads"),
    "model.head_bottleneck_dim": (None, "models.py linear heads"),
    "model.ema_momentum": (None, "scan.py no EMA"),
    "model.teacher_candidates": (False, "scan.py no teacher"),
    "model.with_labels": (False, "utils/train_utils.py scan_train reads no labels"),
    "model.keep_heads": (None, "train_utils.py scan_train sums every head's loss, every step"),
    "model.selection": ("loss", "scan.py lowest_loss_head"),
    "model.optimizer.class_path": ("torch.optim.SGD", "in50 optimizer: sgd; utils/common_config.py get_optimizer"),
    "model.optimizer.init_args.lr": (5.0, "in50 optimizer_kwargs.lr: 5.0"),
    "model.optimizer.init_args.momentum": (0.9, "in50 optimizer_kwargs.momentum: 0.9"),
    "model.optimizer.init_args.weight_decay": (0.0, "in50 optimizer_kwargs.weight_decay: 0.0000"),
    "model.optimizer.init_args.nesterov": (False, "in50 optimizer_kwargs.nesterov: False"),
    "model.scheduler": (None, "in50 scheduler: constant"),
    "convergence.stop_on_plateau": (False, "scan.py runs every epoch"),
    "convergence.max_steps": (None, "the length is trainer.max_epochs"),
    "convergence.lr_drops": (0, "in50 scheduler: constant"),
    "data.batch_size": (512, "in50 batch_size: 512; common_config.py get_train_dataloader drop_last=True"),
    "data.num_neighbours": (1, "NeighborsDataset np.random.choice(self.indices[index], 1)"),
    "data.k": (50, "in50 num_neighbors: 50"),
    "data.walk_steps": (1, "the neighbours themselves"),
    "data.normalize": (False, "models.py cluster_head(backbone(x)): raw backbone features"),
}
# key → (value, where): HHU-MMBS/TEMI-official-BMVC2023
TEMI_RELEASED = {
    "trainer.max_epochs": (100, "readme --epochs=100"),
    "trainer.callbacks": (
        [
            {
                "class_path": "icon_lightning.callbacks.WarmupCosineLR",
                "init_args": {"warmup_epochs": 20, "final_lr_factor": 1.0},
            },
            {"class_path": "icon_lightning.callbacks.FreezeLastLayer", "init_args": {"epochs": 1}},
        ],
        "readme --warmup_epochs=20 --min_lr=1e-4 = --lr; train_main.py cosine_scheduler; args --freeze_last_layer 1",
    ),
    "model.loss.class_path": ("icon_lightning.baselines.TEMILoss", "losses/multihead_losses.py TEMI"),
    "model.loss.init_args.p.class_path": (SAMPLED, "loaders/embedNN.py EmbedNN: one sampled neighbour"),
    "model.loss.init_args.p.init_args.symmetric": (True, "multihead_losses.py both crops as student and teacher"),
    "model.loss.init_args.p.init_args.include_self": (False, "gen_embeds.py compute_neighbors fill_diagonal_(-inf)"),
    "model.loss.init_args.beta": (0.6, "readme --loss-args beta=0.6"),
    "model.loss.init_args.prior_momentum": (0.9, "multihead_losses.py probs_momentum=0.9"),
    "model.loss.init_args.student_temperature": (0.1, "losses/mi.py student_temp=0.1"),
    "model.loss.init_args.teacher_temperature": (0.1, "args --warmup_teacher_temp 0.1, --teacher_temp 0.1"),
    "model.loss.init_args.weighted": (True, "multihead_losses.py TEMI.weight = sim_weight"),
    "model.loss.init_args.head_weight": ("mean", "multihead_losses.py compute_weight averages over the heads"),
    "model.num_heads": (16, "readme --num_heads=16"),
    "model.head_hidden_dim": (512, "args --hidden_dim 512, --nlayers 2"),
    "model.head_bottleneck_dim": (256, "args --bottleneck_dim 256"),
    "model.head_temperature": (1.0, "model_builders/multi_head.py the last layer's output"),
    "model.head_init": ([], "multi_head.py DINOHead random init"),
    "model.projection_dim": (None, "multi_head.py the head acts on the embeddings"),
    "model.ema_momentum": (0.996, "args --momentum_teacher 0.996; readme --max_momentum_teacher=0.996"),
    "model.teacher_candidates": (True, "multihead_losses.py the teacher's probabilities of the other crop"),
    "model.with_labels": (False, "train_main.py reads no labels"),
    "model.keep_heads": (None, "train_main.py head_losses.mean() over all heads"),
    "model.selection": ("loss", "multi_head.py MultiHead.set_losses argmin"),
    "model.optimizer.class_path": ("torch.optim.AdamW", "args --optimizer adamw"),
    "model.optimizer.init_args.lr": (4.0e-4, "readme --lr=1e-4 × batch 1,024 / 256 (train_main.py bs_factor)"),
    "model.optimizer.init_args.weight_decay": (1.0e-4, "args --weight_decay 1e-4 = --weight_decay_end"),
    "model.scheduler": (None, "the LR is WarmupCosineLR's"),
    "convergence.stop_on_plateau": (False, "train_main.py runs every epoch"),
    "convergence.max_steps": (None, "the length is trainer.max_epochs"),
    "convergence.lr_drops": (0, "the LR is the schedule's"),
    "data.batch_size": (1024, "readme --batch_size=1024; train_main.py drop_last=True"),
    "data.num_neighbours": (1, "embedNN.py np.random.choice(self.neighbors[idx], 1)"),
    "data.k": (50, "readme --knn=50"),
    "data.walk_steps": (1, "the neighbours themselves"),
    "data.normalize": (False, "readme: no --embed_norm, no --l2_norm"),
}
# the ablations: the configs scan.yaml and temi.yaml were before issue 33, values unchanged
SCAN_COMMON_PROTOCOL = {
    "model": {
        "loss": {
            "class_path": "icon_lightning.baselines.SCANLoss",
            "init_args": {
                "p": {"class_path": "icon_lightning.supervisory.KNNGraph", "init_args": {"k": 20}},
                "entropy_weight": 5.0,
                "entropy_over": "anchors",
            },
        },
        "num_heads": 10,
        "head_init": [],
        "selection": "loss",
    }
}
TEMI_COMMON_PROTOCOL = {
    "model": {
        "loss": {
            "class_path": "icon_lightning.baselines.TEMILoss",
            "init_args": {
                "p": {"class_path": "icon_lightning.supervisory.KNNGraph", "init_args": {"k": 50, "symmetric": True}},
                "beta": 0.6,
                "prior_momentum": 0.9,
                "head_weight": "mean",
            },
        },
        "num_heads": 16,
        "head_hidden_dim": 512,
        "ema_momentum": 0.996,
        "teacher_candidates": True,
        "head_init": [],
        "selection": "loss",
    }
}


def _get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _keys(config: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a config's leaves (a class's init_args are leaves of their own; a list is one leaf)."""
    keys = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys |= _keys(value, f"{name}.") if isinstance(value, dict) and value else {name}
    return keys


@pytest.mark.parametrize("config, released", [(SCAN, SCAN_RELEASED), (TEMI, TEMI_RELEASED)], ids=["scan", "temi"])
def test_the_config_is_the_release_s_protocol_value_by_value(config, released):
    ours = yaml.safe_load(config.read_text())
    for key, (value, where) in released.items():
        assert _get(ours, key) == value, f"{key}: {_get(ours, key)!r}, the release {value!r} ({where})"
    assert _keys(ours) == set(released)  # nothing pinned that the table does not trace to the release


@pytest.mark.parametrize("config", [SCAN, TEMI], ids=["scan", "temi"])
def test_every_value_says_where_it_comes_from_and_the_first_line_describes_the_row(config):
    lines = config.read_text().splitlines()
    assert lines[0].startswith(f"# {config.stem.upper()} as released")
    for line in lines:
        code = line.split("#")[0]
        if ":" in code and code.split(":", 1)[1].strip():
            assert "#" in line, f"{config.name}: a value without its source: {line}"


@pytest.mark.parametrize(
    "config, values", [(SCAN_COMMON, SCAN_COMMON_PROTOCOL), (TEMI_COMMON, TEMI_COMMON_PROTOCOL)], ids=["scan", "temi"]
)
def test_the_common_protocol_is_the_named_ablation_with_the_old_values(config, values):
    """The ablation's file pins what it pinned before issue 33, and the module's and Convergence's defaults it runs
    under are the common protocol's (Adam 1e-2, the random heads pruned to one every 10 steps, the plateau rule)."""
    from icon_lightning.callbacks import Convergence
    from icon_lightning.models import module

    text = config.read_text()
    assert text.splitlines()[0].startswith(f"# {config.stem.split('_')[0].upper()} ablation:")
    assert yaml.safe_load(text) == values
    assert (module.DEFAULT_LR, module.DEFAULT_KEEP_HEADS, module.DEFAULT_PRUNE_EVERY) == (1e-2, 1, 10)
    assert inspect.signature(Convergence).parameters["stop_on_plateau"].default is True


# ---------------------------------------------------------------------- SCAN's entropy floor
def _released_entropy(mean: torch.Tensor) -> torch.Tensor:
    """losses.py entropy(x, input_as_probabilities=True): x_ = torch.clamp(x, min=EPS); −Σ x_ log x_ (EPS 1e-8)."""
    clamped = torch.clamp(mean, min=1e-8)
    return -(clamped * torch.log(clamped)).sum()


def test_the_entropy_floor_is_the_release_s_clamp_and_keeps_a_saturated_gradient_finite():
    from icon_lightning.baselines import SCANLoss

    view = torch.tensor([0] * 4 + [-1] * 4)
    index = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    saturated = torch.tensor([[0.0, -200.0, -300.0]] * 8, dtype=torch.float64, requires_grad=True)  # exp(-200) > 0
    for z, floored in ((saturated, True), (torch.randn(8, 3, dtype=torch.float64, requires_grad=True), False)):
        rows = Rows(z=z, index=index, view=view)
        out = SCANLoss(SampledNeighbours(), 5.0, entropy_floor=1e-8)(rows)
        mean = z[:4].softmax(-1).mean(0)
        torch.testing.assert_close(out.terms["entropy"], _released_entropy(mean), rtol=1e-15, atol=1e-15)
        plain = SCANLoss(SampledNeighbours(), 5.0)(rows)  # the default: H as it is, the same away from the floor
        assert (out.loss == plain.loss) is not floored
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isfinite(grad).all()
    underflow = torch.tensor([[0.0, -2000.0, -3000.0]] * 8, requires_grad=True)  # float32: p = 0 exactly
    for floor, finite in ((1e-8, True), (None, False)):  # 0 · log 0: the default's gradient is NaN there
        loss = SCANLoss(SampledNeighbours(), 5.0, entropy_floor=floor)(Rows(z=underflow, index=index, view=view))
        (grad,) = torch.autograd.grad(loss.loss, underflow)
        assert bool(torch.isfinite(grad).all()) is finite


# ---------------------------------------------------------------------- TEMI's DINO head
def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def test_the_dino_head_is_mlp_l2_then_weight_normalised_without_bias_in_float64():
    torch.manual_seed(0)
    heads = DINOHeads(6, 4, num_heads=3, temperature=0.5, hidden_dim=8, bottleneck_dim=5).double()
    with torch.no_grad():  # move every parameter off its start, so each one's role is checked
        for parameter in heads.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(7, 6, dtype=torch.float64)
    out = heads(x).detach().numpy()
    assert out.shape == (7, 3, 4) and heads(x, [2, 0]).shape == (7, 2, 4)
    p = {name: value.detach().numpy() for name, value in heads.named_parameters()}
    assert sorted(p) == ["bottleneck_bias", "bottleneck_weight", "hidden_bias", "hidden_weight", "last_g", "last_v"]
    for h in range(3):  # by hand: D → 8 (GELU) → 5, L2, then g · v / ‖v‖ per output unit, no bias, / temperature
        hidden = _gelu(x.numpy() @ p["hidden_weight"][h].T + p["hidden_bias"][h])
        z = hidden @ p["bottleneck_weight"][h].T + p["bottleneck_bias"][h]
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        w = p["last_g"][h] * p["last_v"][h] / np.linalg.norm(p["last_v"][h], axis=1, keepdims=True)
        np.testing.assert_allclose(out[:, h], z @ w.T / 0.5, rtol=1e-12, atol=1e-12)
        # torch's weight_norm of the release's nn.Linear(bottleneck, K, bias=False) gives the same last layer
        last = nn.utils.parametrizations.weight_norm(nn.Linear(5, 4, bias=False).double())
        with torch.no_grad():
            last.parametrizations.weight.original0.copy_(torch.from_numpy(p["last_g"][h]))
            last.parametrizations.weight.original1.copy_(torch.from_numpy(p["last_v"][h]))
        np.testing.assert_allclose(out[:, h], last(torch.from_numpy(z)).detach().numpy() / 0.5, rtol=1e-12)
    np.testing.assert_allclose(heads(x, [2, 0]).detach().numpy(), out[:, [2, 0]], rtol=1e-12)


def test_the_dino_head_starts_as_the_release_s():
    """multi_head.py DINOHead: the MLP's weights truncated-normal (std 0.02, DINO's absolute bounds ±2), biases 0;
    the last layer nn.Linear's default U(±1/√bottleneck) with weight_g filled with 1 (unit rows)."""
    torch.manual_seed(0)
    heads = DINOHeads(64, 10, num_heads=16, hidden_dim=512, bottleneck_dim=256)
    for weight in (heads.hidden_weight.detach(), heads.bottleneck_weight.detach()):
        assert abs(float(weight.std()) - 0.02) < 0.001 and float(weight.abs().max()) < 2.0
        assert abs(float(weight.mean())) < 0.001
    assert not heads.hidden_bias.any() and not heads.bottleneck_bias.any()
    assert torch.equal(heads.last_g, torch.ones(16, 10, 1))
    g, v = heads.last_g.detach(), heads.last_v.detach()
    assert float(v.abs().max()) <= 1 / 256**0.5
    rows = g * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(16, 10))
    assert heads.last_layer_parameters() == [heads.last_v, heads.last_g]


def test_the_module_builds_dino_heads_only_when_asked_and_refuses_what_they_lack():
    common = {"feature_dim": 6, "num_clusters": 4, "num_heads": 2, "head_temperature": 1.0, "projection_dim": None}
    assert isinstance(module_heads({**common, "head_hidden_dim": 8, "head_bottleneck_dim": 5}), DINOHeads)
    assert not isinstance(module_heads({**common, "head_hidden_dim": 8}), DINOHeads)
    for wrong in ({"head_hidden_dim": None}, {"head_hidden_dim": 8, "projection_dim": 3}):
        with pytest.raises(ValueError, match="head_bottleneck_dim: DINO heads need head_hidden_dim"):
            module_heads({**common, "head_bottleneck_dim": 5, **wrong})


# ---------------------------------------------------------------------- TEMI's schedule and frozen last layer
def _released_schedule(base, end, epochs, per_epoch, warmup_epochs):
    """TEMI utils.cosine_scheduler (start_warmup_value 0), as the release writes it."""
    warmup = np.linspace(0, base, warmup_epochs * per_epoch) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * per_epoch - warmup_epochs * per_epoch)
    return np.concatenate((warmup, end + 0.5 * (base - end) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("per_epoch, epochs, warmup, final", [(3, 10, 4, 0.1), (1, 100, 20, 1.0), (5, 6, 0, 0.0)])
def test_the_lr_factor_is_the_release_s_cosine_scheduler(per_epoch, epochs, warmup, final):
    reference = _released_schedule(1.0, final, epochs, per_epoch, warmup)
    ours = [warmup_cosine_factor(step, per_epoch, epochs, warmup, final) for step in range(epochs * per_epoch)]
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-15)


def test_the_last_layer_stays_still_in_the_first_epoch_and_moves_after():
    torch.manual_seed(0)
    heads = DINOHeads(6, 4, num_heads=2, hidden_dim=8, bottleneck_dim=5)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-2, weight_decay=1e-4)
    freeze, module, x = FreezeLastLayer(epochs=1), SimpleNamespace(heads=heads), torch.randn(32, 6)

    def step(epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        before = [p.detach().clone() for p in heads.parameters()]
        optimizer.zero_grad()
        (-heads(x).log_softmax(-1).max(-1).values.mean()).backward()
        freeze.on_before_optimizer_step(SimpleNamespace(current_epoch=epoch), module, optimizer)
        optimizer.step()
        return before, [p.detach() for p in heads.parameters()]

    for _ in range(3):  # epoch 0: the MLP moves, the last layer (v, g) does not, not even by weight decay
        before, after = step(0)
        assert not torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])
        assert torch.equal(before[4], after[4]) and torch.equal(before[5], after[5])
    before, after = step(1)  # epoch 1: the last layer trains
    assert not torch.equal(before[4], after[4]) and not torch.equal(before[5], after[5])


# ---------------------------------------------------------------------- the sampled neighbour as p
def test_the_sampled_neighbour_is_the_one_positive_of_its_anchor_in_the_batch_layout():
    """Two processes' blocks (a global batch): B = 3 anchors × V = 2 views, then B × S = 1 neighbours each."""
    view = torch.tensor([0, 0, 0, 1, 1, 1, -1, -1, -1] * 2)
    index = torch.tensor([5, 6, 7, 5, 6, 7, 6, 2, 7, 8, 9, 4, 8, 9, 4, 0, 0, 1])
    rows, cols = sampled_pairs(view, index)
    expected = [(0, 6), (1, 7), (2, 8), (3, 6), (4, 7), (5, 8), (9, 15), (10, 16), (11, 17)]
    expected += [(12, 15), (13, 16), (14, 17)]
    assert sorted(zip(rows.tolist(), cols.tolist())) == expected
    rows_ = Rows(z=torch.zeros(18, 3), index=index, view=view)
    p = SampledNeighbours()(rows_, rows_, None)
    dense = torch.zeros(18, 18)
    dense[[r for r, _ in expected], [c for _, c in expected]] = 1.0
    assert torch.equal(p, dense)  # one-hot rows at the anchors, nothing for the neighbour rows
    both = SampledNeighbours(symmetric=True)(rows_, rows_, None)
    assert torch.equal(both[:9].sum(1), torch.ones(9)) and torch.equal(both[6, [0, 3]], torch.tensor([0.5, 0.5]))
    needs = {"sampled_neighbours": True, "neighbours_include_self": True}
    assert SampledNeighbours(include_self=True).data_needs() == needs
    with pytest.raises(ValueError, match="data.num_neighbours: expected rows of B anchors"):
        sampled_pairs(torch.zeros(4, dtype=torch.long), torch.arange(4))  # full batch: no neighbour rows


# ---------------------------------------------------------------------- real fits on digits
def _digits_fit(tmp_path, config, extra=(), scale: float = 1.0):
    """A real in-process fit of ``config`` on a file of digits' 1,797 × 64 raw pixels times ``scale``; returns the
    run, the file's rows, each step's LR, each step's batch (index, view) and the last layer at each epoch's end."""
    from lightning.pytorch.callbacks import Callback

    from icon_lightning.cli import assemble
    from icon_lightning.data.datasets import DigitsDataset
    from icon_lightning.estimator import features_file

    class Seen(Callback):
        def __init__(self) -> None:
            self.lrs, self.batches, self.last = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append((batch.index.clone(), batch.view.clone()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def on_train_start(self, trainer, pl_module) -> None:
            self.on_train_epoch_end(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if hasattr(pl_module.heads, "last_layer_parameters"):
                self.last.append([p.detach().clone() for p in pl_module.heads.last_layer_parameters()])

    path = features_file(DigitsDataset().data.numpy().astype(np.float32) * np.float32(scale), tmp_path)
    run = assemble(quiet_fit_words(path, config, tmp_path, "--seed_everything=0", *extra))
    seen = Seen()
    run.trainer.callbacks.append(seen)
    return run.execute(), np.load(path)["features"], seen


def _every_head_to_the_end(run, num_heads: int) -> None:
    record = run.record
    assert record["heads"] == list(range(num_heads)) and record["pruning"] == []  # no pruning
    losses = np.array(record["head_losses"])
    assert len(losses) == num_heads and np.isfinite(losses).all()
    assert record["selected_head"] == int(np.argmin(losses)) and record["selection"] == "training loss"


def _neighbours_of_anchors(run, seen, include_self: bool) -> int:
    """Every step: B anchors (view 0) then one neighbour each, drawn from the anchor's top-50 (and itself when
    ``include_self``); returns how often the item itself was drawn."""
    table, itself = run.datamodule.prepared.table.numpy(), 0
    for index, view in seen.batches:
        half = len(index) // 2
        assert (view[:half] == 0).all() and (view[half:] == -1).all()
        anchors, neighbours = index[:half].numpy(), index[half:].numpy()
        same = neighbours == anchors
        itself += int(same.sum())
        inside = (table[anchors, :50] == neighbours[:, None]).any(1)
        assert (inside | (same & include_self)).all()
    return itself


@pytest.mark.slow
def test_a_released_scan_fit_trains_every_head_at_a_constant_sgd_lr_on_sampled_neighbours(tmp_path):
    """3 of the release's 100 epochs on digits' raw pixels: 3 batches of 512 anchors an epoch, each with one
    neighbour drawn from itself and its top-50; SGD at a constant 5.0; every head to the end, the lowest loss
    reported (finite: the entropy's floor keeps the gradient finite where SGD 5.0 saturates the softmax)."""
    run, raw, seen = _digits_fit(tmp_path, SCAN, ["--trainer.max_epochs=3"])
    assert run.record["steps"] == 9 and seen.lrs == [5.0] * 9
    _every_head_to_the_end(run, 10)
    np.testing.assert_array_equal(run.datamodule.train_features.numpy(), raw)  # raw rows: not centred, not L2
    assert all(len(index) == 1024 for index, _ in seen.batches)
    assert _neighbours_of_anchors(run, seen, include_self=True) > 0  # 1 in 51 draws is the item: ~90 of 4,608
    assert (run.datamodule.prepared.anchors.pool[:, 0] == np.arange(len(raw))).all()


@pytest.mark.slow
def test_a_released_temi_fit_warms_up_freezes_the_last_layer_and_trains_every_head(tmp_path):
    """3 epochs of 7 batches of 256 (the batch shrunk so the first epoch has steps with LR > 0): the LR rises as
    linspace(0, 4e-4, 140) per step, the last layer is still in epoch 1 and moves after, every head trains on
    pairs of an anchor and one of its top-50 (never itself), on the raw rows."""
    run, raw, seen = _digits_fit(tmp_path, TEMI, ["--trainer.max_epochs=3", "--data.batch_size=256"])
    assert run.record["steps"] == 21
    np.testing.assert_allclose(seen.lrs, 4e-4 * np.arange(21) / 139, rtol=1e-12, atol=0)
    _every_head_to_the_end(run, 16)
    assert isinstance(run.model.heads, DINOHeads)
    start, first, second, third = seen.last  # (v, g) at the start and at each epoch's end
    assert all(torch.equal(a, b) for a, b in zip(start, first))  # 6 steps at LR > 0, the last layer still
    assert not any(torch.equal(a, b) for a, b in zip(first, second)) and not torch.equal(second[0], third[0])
    assert _neighbours_of_anchors(run, seen, include_self=False) == 0
    np.testing.assert_array_equal(run.datamodule.train_features.numpy(), raw)


@pytest.mark.slow
def test_a_set_smaller_than_the_batch_trains_on_all_of_it_each_anchor_with_its_sampled_neighbour(tmp_path):
    """N = 1,797 ≤ a batch of 2,048: every step is the whole set (the release's drop_last would leave no batch), and
    the anchors keep their sampled neighbours (the full batch drops them for the in-batch graph p)."""
    run, raw, seen = _digits_fit(tmp_path, TEMI, ["--trainer.max_epochs=2", "--data.batch_size=2048"])
    assert run.record["steps"] == 2 and [len(index) for index, _ in seen.batches] == [2 * len(raw)] * 2
    assert _neighbours_of_anchors(run, seen, include_self=False) == 0
    assert sorted(seen.batches[0][0][: len(raw)].tolist()) == list(range(len(raw)))
    assert not torch.equal(seen.batches[0][0][len(raw) :], seen.batches[1][0][len(raw) :])  # drawn anew each step
