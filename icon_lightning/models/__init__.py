"""Lightning layer: frozen backbones, cluster heads, the LightningModule."""

from icon_lightning.data.backbones import (
    DINO_MODELS,
    EfficientNetLite0,
    FrozenBackbone,
    Identity,
    TimmBackbone,
    load_efficientnet_lite0_weights,
)
from icon_lightning.models.heads import ClusterHeads
from icon_lightning.models.module import IConModule

__all__ = [
    "ClusterHeads",
    "IConModule",
    "DINO_MODELS",
    "FrozenBackbone",
    "Identity",
    "EfficientNetLite0",
    "load_efficientnet_lite0_weights",
    "TimmBackbone",
]
