"""`Rows`: one side of the (B, M) pair matrix, the model's output with the dataset facts p is built from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from icon_lightning.functional.checks import check_finite, check_shape


@dataclass(frozen=True)
class Rows:
    """B rows seen by the model, each tied to a dataset item.

    z: (B, D) model output: embeddings, or cluster logits (B, K) for cluster kernels.
    index: (B,) dataset index of each row; views of one image share it.
    view: (B,) view / modality id (augmentation number, image=0 / text=1), for cross-view p.
    label: (B,) class labels (SupCon, cross-entropy; never used by unsupervised recipes).
    features: (B, D_in) input-space features for supervisory kernels (SNE, t-SNE, k-means, in-batch k-NN).
    neighbours: (B, k) dataset indices of each row's nearest neighbours (a row of the k-NN table).
    degree: (B,) degree of each row in the neighbour graph (normalized cuts).
    """

    z: Tensor
    index: Tensor
    view: Tensor | None = None
    label: Tensor | None = None
    features: Tensor | None = None
    neighbours: Tensor | None = None
    degree: Tensor | None = None

    def __post_init__(self) -> None:
        check_shape("z", self.z, 2)
        check_finite("z", self.z)
        b = self.z.shape[0]
        check_shape("index", self.index, 1, {0: b})
        for name in ("view", "label", "degree"):
            value = getattr(self, name)
            if value is not None:
                check_shape(name, value, 1, {0: b})
        for name in ("features", "neighbours"):
            value = getattr(self, name)
            if value is not None:
                check_shape(name, value, 2, {0: b})
        if self.features is not None:
            check_finite("features", self.features)

    def __len__(self) -> int:
        return self.z.shape[0]

    def with_z(self, z: Tensor) -> Rows:
        """The same rows with another model output (e.g. another head's), checking only the new z."""
        check_shape("z", z, 2, {0: len(self)})
        check_finite("z", z)
        rows = copy.copy(self)
        object.__setattr__(rows, "z", z)
        return rows

    def first(self, n: int) -> Rows:
        """The first ``n`` rows (every field cut alike)."""
        return Rows(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:n] for f in fields(self)}
        )

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        """Stack rows (e.g. the two views of SimCLR into 2B rows); optional fields must be all or none."""
        kwargs = {}
        for f in fields(Rows):
            values = [getattr(r, f.name) for r in parts]
            if all(v is None for v in values):
                kwargs[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"{f.name}: present in some parts and missing in others")
            else:
                kwargs[f.name] = torch.cat(values)
        return Rows(**kwargs)
