"""Lightning layer: frozen backbones (and, later, heads and the LightningModule)."""

from icon_lightning.models.backbones import (
    DINO_MODELS,
    FrozenBackbone,
    Identity,
    efficientnet_lite0,
    load_efficientnet_lite0_weights,
    timm_backbone,
)

__all__ = [
    "DINO_MODELS",
    "FrozenBackbone",
    "Identity",
    "efficientnet_lite0",
    "load_efficientnet_lite0_weights",
    "timm_backbone",
]
