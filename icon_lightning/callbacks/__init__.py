"""Callbacks: convergence in optimizer steps, prediction files, pictures of the clustering."""

from icon_lightning.callbacks.convergence import Convergence
from icon_lightning.callbacks.plots import ClusteringPlots
from icon_lightning.callbacks.predictions import ClusterAssignmentWriter

__all__ = ["ClusterAssignmentWriter", "ClusteringPlots", "Convergence"]
