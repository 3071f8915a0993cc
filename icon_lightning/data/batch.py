"""The typed batch of the clustering DataModule: every row carries its dataset index and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from icon_lightning.rows import Rows


@dataclass
class ClusteringBatch:
    """R rows: B anchors × V views, then B × S sampled neighbours.

    inputs: (R, D) cached features, or (R, 3, H, W) images when views are augmented online.
    index: (R,) dataset index of each row.
    view: (R,) view of anchor rows (cached: the augmentation's id; clean / online: 0..V-1); -1 on evaluation rows
        and on neighbour rows, sampled from the anchors' k-NN table rows or walks (row V·B + s·B + b: anchor b's s-th).
    label: (R,) class labels, -1 when unknown (only scored, never used by unsupervised recipes).
    neighbours: (R, k) the dataset-level k-NN table row of each row's item.
    degree: (R,) degree of each row's item in the symmetrised k-NN graph (normalized cuts).
    """

    inputs: Tensor
    index: Tensor
    view: Tensor
    label: Tensor
    neighbours: Tensor
    degree: Tensor

    def to(self, device) -> ClusteringBatch:
        return ClusteringBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def pin_memory(self) -> ClusteringBatch:
        return ClusteringBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, z: Tensor, with_labels: bool = False) -> Rows:
        """The loss's view of these rows for model output ``z`` (R, ·); input features go along for p."""
        features = self.inputs if self.inputs.ndim == 2 else None
        label = self.label if with_labels else None
        return Rows(
            z=z,
            index=self.index,
            view=self.view,
            label=label,
            features=features,
            neighbours=self.neighbours,
            degree=self.degree,
        )
