"""Frozen backbones: the EfficientNet-Lite0 key map covers every tensor, frozen stays frozen, offline fails fast,
the weights are real (features equal the shared reference; neighbours agree with labels), and each backbone's
images are normalised with its weights' own mean and std."""

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
    from icon_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    # The shared reference was extracted with ImageNet's mean/std (../shared/data/README.md), not Lite0's own.
    transform = eval_transform(128, IMAGENET_MEAN, IMAGENET_STD)
    data = TarImageFolder(str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"), "test", transform)
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


# ------------------------------------------------------------------ each backbone's own input normalisation (D10)
def grey_image(value: int):
    from PIL import Image

    return Image.new("RGB", (8, 8), (value, value, value))


def test_a_timm_model_without_imagenet_statistics_is_normalised_with_its_own():
    """Every backbone used to be fed ImageNet-normalised images; timm's ``test_vit`` declares mean = std = 0.5
    (as CLIP's or Inception's configs declare theirs), and its transforms now apply it."""
    from PIL import Image

    from icon_lightning.data.prepare import FeaturePrep
    from icon_lightning.data.transforms import augment_transform

    backbone = TimmBackbone("test_vit", pretrained=False)
    assert timm.data.resolve_model_data_config(backbone.model)["mean"] == (0.5, 0.5, 0.5)  # the reference config
    assert backbone.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    prep = FeaturePrep(None, backbone, images=True, image_size=8)
    x = prep.eval_tf(grey_image(51))
    expected = (51 / 255 - 0.5) / 0.5  # the formula with the model's own mean and std
    torch.testing.assert_close(x, torch.full_like(x, expected), atol=1e-5, rtol=0)
    noise = Image.effect_noise((8, 8), 40).convert("RGB")
    torch.manual_seed(0)
    views = prep.augment_tf(noise)
    torch.manual_seed(0)  # the same draws, unnormalised; Normalize draws nothing
    raw = augment_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(noise)
    torch.testing.assert_close(views, (raw - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_clip_statistics_come_from_the_timm_config():
    from icon_lightning.data.backbones import timm_normalization

    model = timm.create_model(
        "test_vit", pretrained=False, pretrained_cfg_overlay={"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1]}
    )
    assert timm_normalization(model) == OPENAI_CLIP


OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_imagenet_backbones_keep_their_transform_and_so_their_cached_features():
    """Only where the normalisation really changes does the feature-cache key (which holds repr(transform))."""
    from icon_lightning.data.prepare import FeaturePrep
    from icon_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_transform, eval_transform

    dino = TimmBackbone("vit_small_patch16_224.dino", pretrained=False)
    assert dino.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    prep = FeaturePrep(None, dino, images=True, image_size=224)
    legacy = "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"  # today's keys hold this
    assert repr(prep.eval_tf) == repr(eval_transform(224)) and legacy in repr(prep.eval_tf)
    assert repr(prep.augment_tf) == repr(augment_transform(224))
    custom = FrozenBackbone(torch.nn.Identity(), 3, "custom", "none")  # a module of the user's: ImageNet's
    assert custom.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="^std: expected positive"):
        FrozenBackbone(torch.nn.Identity(), 3, std=(0.2, 0.0, 0.2))


def test_lite0_declares_its_weights_statistics_so_its_key_changes():
    from icon_lightning.data.prepare import FeaturePrep
    from icon_lightning.data.transforms import eval_transform

    backbone = EfficientNetLite0(pretrained=False)
    assert backbone.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    prep = FeaturePrep(None, backbone, images=True, image_size=128)
    assert repr(prep.eval_tf) != repr(eval_transform(128))  # ImageNet-normalised features are not reused


@needs_shared
def test_lite0_statistics_match_its_batchnorm_running_statistics():
    """The independent reference for Lite0's normalisation: its stem BatchNorm's running means, accumulated in
    training, are matched by the stem's outputs on natural images only under the statistics it was trained with."""
    from icon_lightning.data.datasets import TarImageFolder
    from icon_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    backbone = EfficientNetLite0()
    model = backbone.model

    def distance(mean, std) -> float:
        data = TarImageFolder(
            str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"), "test", eval_transform(128, mean, std)
        )
        x = torch.stack([data[i][0] for i in range(0, 10000, 50)])
        with torch.no_grad():
            out = model.conv_stem(x)
        z = (out.mean((0, 2, 3)) - model.bn1.running_mean) / model.bn1.running_var.clamp(min=1e-3).sqrt()
        return z.abs().median().item()

    own, imagenet = distance(*backbone.normalization), distance(IMAGENET_MEAN, IMAGENET_STD)
    assert own < 0.15 < 0.25 < imagenet, (own, imagenet)
