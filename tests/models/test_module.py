"""IConModule pieces that the CLI tests do not pin: the EMA teacher and its use as the candidate side of q."""

from __future__ import annotations

import pytest
import torch

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.models import IConModule
from icon_lightning.models.module import EndOfStep
from icon_lightning.recipes import load_recipe
from tests.models.test_ddp import global_batch


def test_ema_teacher_is_a_registered_module_that_follows_the_heads():
    model = IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, ema_momentum=0.9)
    assert any(k.startswith("bank.teacher.") for k in model.state_dict())  # checkpointed, moves with .to()
    w0 = model.heads.weight.detach().clone()
    EndOfStep().on_train_batch_end(None, model)  # first update copies the student
    with torch.no_grad():
        model.heads.weight.add_(1.0)
    EndOfStep().on_train_batch_end(None, model)
    expected = 0.9 * w0 + 0.1 * (w0 + 1.0)
    torch.testing.assert_close(model.bank.teacher.heads.weight, expected)


def test_teacher_outputs_can_form_the_candidate_side():
    torch.manual_seed(0)
    model = IConModule(
        load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, ema_momentum=0.5, teacher_candidates=True
    )
    batch = global_batch()
    EndOfStep().on_train_batch_end(None, model)
    with torch.no_grad():
        model.heads.weight.mul_(3.0)  # student and teacher now differ
    z = model(batch.inputs)
    with_teacher = model.objective(batch, z, model.bank.teacher_output(batch.inputs))
    without = model.objective(batch, z)
    assert torch.isfinite(with_teacher).all() and not torch.allclose(with_teacher, without)
    with_teacher.sum().backward()
    assert model.heads.weight.grad is not None
    assert all(p.grad is None for p in model.bank.teacher.parameters())


def test_bad_teacher_arguments():
    with pytest.raises(ValueError, match="teacher_candidates"):
        IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, teacher_candidates=True)
    with pytest.raises(ValueError, match="ema_momentum"):
        IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, ema_momentum=1.5)


def test_full_batch_training_reuses_p_and_only_while_the_rows_are_the_same(monkeypatch):
    batch = global_batch()
    model = IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, num_samples=len(batch))
    fresh = IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, num_samples=0)
    fresh.load_state_dict(model.state_dict())
    calls = []
    target = model.loss.target
    monkeypatch.setattr(model.loss, "target", lambda *a, **kw: calls.append(1) or target(*a, **kw))
    for _ in range(3):  # the same full batch every step: p is built once
        losses = model.objective(batch, model(batch.inputs))
    assert len(calls) == 1
    torch.testing.assert_close(losses, fresh.objective(batch, fresh(batch.inputs)))
    other = ClusteringBatch(**{**vars(batch), "inputs": batch.inputs + 1.0})  # other features → other p
    torch.testing.assert_close(model.objective(other, model(other.inputs)), fresh.objective(other, fresh(other.inputs)))
    assert len(calls) == 2

    mini = IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, num_samples=10 * len(batch))
    mini.objective(batch, mini(batch.inputs))
    assert mini.targets.p is None  # mini-batches keep nothing


@pytest.mark.parametrize("name", ["icon", "scan"])
def test_p_is_built_once_per_step_for_all_heads_and_equals_each_heads_own(name, monkeypatch):
    from icon_lightning.baselines import SCANLoss
    from icon_lightning.supervisory import KNNGraph

    loss = load_recipe("icon_clustering") if name == "icon" else SCANLoss(KNNGraph(k=3))
    model = IConModule(loss, feature_dim=6, num_clusters=4, num_heads=3)
    batch = global_batch()
    z = model(batch.inputs)
    calls = []
    target = model.loss.target
    monkeypatch.setattr(model.loss, "target", lambda *a, **kw: calls.append(1) or target(*a, **kw))
    shared = model.objective(batch, z)
    assert len(calls) == 1
    own = torch.stack([model.loss(batch.rows(z[:, h]), batch.rows(z[:, h]), self_offset=0).loss for h in range(3)])
    torch.testing.assert_close(shared, own)


@pytest.mark.parametrize("hidden", [None, 5])
def test_the_teacher_is_torchs_ema_of_the_heads(hidden):
    """``EmaTeacher`` against ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (the teacher
    before the head bank): the first update copies the heads, later ones move by 1 − m."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = IConModule(
        load_recipe("icon_clustering"), feature_dim=6, num_clusters=4, num_heads=3, ema_momentum=0.9,
        head_hidden_dim=hidden,
    )  # fmt: skip
    reference = AveragedModel(model.heads, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for p in model.heads.parameters():
                p.add_(torch.randn_like(p))
        model.end_of_step(None)
        reference.update_parameters(model.heads)
        for (name, ema), ref in zip(model.bank.teacher.heads.named_parameters(), reference.module.parameters()):
            torch.testing.assert_close(ema, ref, rtol=1e-6, atol=1e-7, msg=name)
    x = torch.randn(5, 6)
    torch.testing.assert_close(model.bank.teacher_output(x), reference(x), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in model.bank.teacher.parameters())  # no optimizer, no DDP bucket


def test_a_projection_is_one_head():
    torch.manual_seed(0)
    model = IConModule(load_recipe("icon_clustering"), feature_dim=6, num_clusters=0, projection_dim=5)
    x = torch.randn(7, 6)
    assert model(x).shape == (7, 1, 5) and model.live_head_ids() == [0] and model.bank.head_init == []
    projection = model.heads.projection
    torch.testing.assert_close(model(x)[:, 0], projection[2](torch.relu(projection[0](x))))
