"""Callbacks: convergence in optimizer steps, self-labelling, prediction files,
pictures of the clustering."""

from icon_lightning.callbacks.convergence import Convergence
from icon_lightning.callbacks.peer_schedule import FreezeLastLayer, WarmupCosineLR
from icon_lightning.callbacks.plots import ClusteringPlots
from icon_lightning.callbacks.predictions import ClusterAssignmentWriter
from icon_lightning.callbacks.self_label import SelfLabel

__all__ = [
    "ClusterAssignmentWriter",
    "ClusteringPlots",
    "Convergence",
    "FreezeLastLayer",
    "SelfLabel",
    "WarmupCosineLR",
]
