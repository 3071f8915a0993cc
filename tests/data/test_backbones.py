"""Frozen backbones: the EfficientNet-Lite0 key map covers every tensor, frozen stays frozen, offline fails fast,
and the weights are real (features equal the shared reference; neighbours agree with labels)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch

from icon_lightning.data.backbones import (
    EfficientNetLite0,
    FrozenBackbone,
    TimmBackbone,
    load_efficientnet_lite0_weights,
)
from tests.conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def test_key_map_covers_every_tensor():
    mapped = load_efficientnet_lite0_weights()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(mapped) == set(model)
    assert all(mapped[k].shape == model[k].shape for k in model)


def test_frozen_backbone_has_no_gradients_and_stays_in_eval():
    backbone = TimmBackbone("test_vit", pretrained=False)
    parent = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.feature_dim, 3))
    parent.train()
    assert not backbone.training and not backbone.model.training and parent[1].training
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(backbone(x), backbone(x))  # no dropout / BN updates
    assert backbone(x).shape == (2, backbone.feature_dim)


def test_offline_without_weights_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        TimmBackbone("vit_small_patch14_dinov2.lvd142m")
    assert time.perf_counter() - start < 10
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        TimmBackbone("vit_small_patch14_dinov2.lvd142m", checkpoint_path="/nonexistent/dinov2.pth")
    with pytest.raises(ValueError, match="not a timm model"):
        TimmBackbone("no_such_model_name")


def test_local_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    loaded = TimmBackbone("test_vit", checkpoint_path=str(path))
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(loaded(x), source.eval()(x))
    assert str(path.resolve()) in loaded.cache_key


def lite0_features(backbone: FrozenBackbone, n_per_class: int):
    from icon_lightning.data.datasets import TarImageFolder
    from icon_lightning.data.feature_store import extract
    from icon_lightning.data.transforms import eval_transform

    data = TarImageFolder(str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"), "test", eval_transform(128))
    pick = np.concatenate([np.flatnonzero(data.labels == c)[:n_per_class] for c in range(10)])
    feats = extract(backbone, data, batch_size=100, progress=False, indices=pick)[pick]
    return pick, feats, data.labels[pick]


@needs_shared
def test_lite0_features_reproduce_the_shared_reference():
    pick, feats, _ = lite0_features(EfficientNetLite0(), 10)
    ref = np.load(SHARED_DATA / "features" / "cifar10_test_effnetlite0_r128.npz")["features"].astype(np.float32)
    cos = (feats * ref[pick]).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref[pick], axis=1)
    assert cos.min() > 0.999


@needs_shared
def test_pretrained_neighbours_agree_with_labels_far_more_than_random_weights():
    from icon_lightning.data.neighbours import knn, label_agreement

    def agreement(backbone):
        _, feats, labels = lite0_features(backbone, 30)
        feats = feats - feats.mean(0)
        return label_agreement(knn(feats, 10)[0], labels)

    torch.manual_seed(0)
    real, random = agreement(EfficientNetLite0()), agreement(EfficientNetLite0(pretrained=False))
    assert real > random + 0.1, (real, random)


@needs_shared
@pytest.mark.slow
def test_cifar10_test_knn_agreement_at_least_half(tmp_path):
    """The whole CIFAR-10 test set through the pipeline (tar → Lite0 at 128 px → cache → k-NN)."""
    from icon_lightning.data.__main__ import main

    result = main(
        [
            "--tar",
            str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"),
            "--split",
            "test",
            "--image-size",
            "128",
            "--k",
            "10",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    assert result["n"] == 10000 and result["dim"] == 1280
    assert result["knn_agreement"] >= 0.5
