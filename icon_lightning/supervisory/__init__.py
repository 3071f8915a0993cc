"""Supervisory neighbourhoods p(j|i): who *should* be anchor i's neighbours. Each returns probabilities.

Contract: ``forward(anchors, candidates, valid) -> p`` with p (B, M) ≥ 0, zero on invalid pairs, each row
summing to 1, or to 0 for an anchor with no positive among the candidates (left out of the loss).
"""

from icon_lightning.supervisory.base import Supervisory
from icon_lightning.supervisory.combinators import Debiased, Mixture, Propagated
from icon_lightning.supervisory.gaussian import Gaussian
from icon_lightning.supervisory.graph import KNNGraph
from icon_lightning.supervisory.identity import Augmentation, CrossView, SameCluster, SameLabel

__all__ = [
    "Augmentation",
    "CrossView",
    "Debiased",
    "Gaussian",
    "KNNGraph",
    "Mixture",
    "Propagated",
    "SameCluster",
    "SameLabel",
    "Supervisory",
]
