"""Callbacks: prediction files, pictures of the clustering."""

from icon_lightning.callbacks.predictions import ClusterAssignmentWriter

__all__ = ["ClusterAssignmentWriter"]
