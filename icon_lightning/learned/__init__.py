"""Learned neighbourhoods q(j|i), computed from the model's output. Each returns log-probabilities.

Contract: ``forward(anchors, candidates, valid) -> log_q`` with log_q (B, M), -inf on invalid pairs and
rows log-summing to 0. Subclasses give an unnormalised ``log_kernel``; normalisation is a masked
log_softmax, done once in the base class.
"""

from icon_lightning.learned.base import Learned
from icon_lightning.learned.cluster import UniformCluster
from icon_lightning.learned.combinators import Debiased, KernelMixture
from icon_lightning.learned.kernels import ExponentialKernel, Gaussian, StudentT

__all__ = [
    "Debiased",
    "ExponentialKernel",
    "Gaussian",
    "KernelMixture",
    "Learned",
    "StudentT",
    "UniformCluster",
]
