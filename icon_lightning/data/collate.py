"""Collation: the rows a sampler drew become one ``ClusteringBatch`` (features or images, with the dataset facts
p is built from: labels, k-NN table rows, graph degrees)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from icon_lightning.data.batch import ClusteringBatch


class RowFacts:
    """Dataset-level facts gathered for every row of a batch: labels, k-NN table rows, graph degrees."""

    def __init__(self, labels: torch.Tensor, table: torch.Tensor, degree: torch.Tensor) -> None:
        self.labels, self.table, self.degree = labels, table, degree

    def batch(
        self, inputs: torch.Tensor, anchors: torch.Tensor, anchor_views: torch.Tensor, nbrs: torch.Tensor
    ) -> ClusteringBatch:
        """Rows [V views of the B anchors (view-major), then their B × S neighbours (neighbour-major)].

        anchors: (B,) dataset indices; anchor_views: (V·B,) view ids; nbrs: (B, S) dataset indices.
        """
        b, s = nbrs.shape
        v = len(anchor_views) // b
        index = torch.cat([anchors.repeat(v), nbrs.T.reshape(-1)])
        return ClusteringBatch(
            inputs=inputs,
            index=index,
            view=torch.cat([anchor_views, torch.full((b * s,), -1, dtype=torch.long)]),
            label=self.labels[index],
            neighbours=self.table[index],
            degree=self.degree[index],
        )


class FeatureCollate(RowFacts):
    """Gathers cached features for a list of AnchorDataset items into one ClusteringBatch."""

    def __init__(
        self,
        clean: torch.Tensor,
        views: torch.Tensor | None,
        labels: torch.Tensor,
        table: torch.Tensor,
        degree: torch.Tensor,
    ) -> None:
        super().__init__(labels, table, degree)
        self.clean, self.views = clean, views

    def __call__(self, items) -> ClusteringBatch:
        anchors = torch.as_tensor(np.array([i for i, _, _ in items]), dtype=torch.long)
        view_ids = torch.as_tensor(np.stack([v for _, v, _ in items]), dtype=torch.long)  # (B, V)
        nbrs = torch.as_tensor(np.stack([n for _, _, n in items]), dtype=torch.long)  # (B, S)
        b, v = view_ids.shape
        anchor_index = anchors.repeat(v)  # view-major: rows [view 0 of all anchors, view 1 of all, ...]
        anchor_views = view_ids.T.reshape(-1)
        if self.views is None or (anchor_views < 0).all():
            anchor_inputs = self.clean[anchor_index]
            anchor_views = torch.arange(v).repeat_interleave(b)  # clean mode: the view's position 0..V-1
        else:
            anchor_inputs = self.views[anchor_views, anchor_index].float()  # float16 rows of the shared map
        inputs = torch.cat([anchor_inputs, self.clean[nbrs.T.reshape(-1)]])
        return self.batch(inputs, anchors, anchor_views, nbrs)


class OnlineCollate(RowFacts):
    """Stacks OnlineViews items (images) into one ClusteringBatch."""

    def __call__(self, items) -> ClusteringBatch:
        anchors = torch.as_tensor([i for i, _, _, _ in items], dtype=torch.long)
        views = torch.stack([v for _, v, _, _ in items])  # (B, V, 3, H, W)
        nbrs = torch.stack([n for _, _, n, _ in items])  # (B, S)
        nbr_images = torch.stack([x for _, _, _, x in items])  # (B, S, 3, H, W)
        b, v = views.shape[:2]
        inputs = torch.cat([views.transpose(0, 1).flatten(0, 1), nbr_images.transpose(0, 1).flatten(0, 1)])
        return self.batch(inputs, anchors, torch.arange(v).repeat_interleave(b), nbrs)


class EvalDataset(Dataset):
    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, table: torch.Tensor | None, degree: torch.Tensor | None
    ) -> None:
        self.features, self.labels, self.table, self.degree = features, labels, table, degree

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> ClusteringBatch:
        index = torch.as_tensor(items, dtype=torch.long)
        n = len(index)
        table = self.table[index] if self.table is not None else torch.zeros(n, 0, dtype=torch.long)
        degree = self.degree[index] if self.degree is not None else torch.ones(n)
        return ClusteringBatch(
            inputs=self.features[index],
            index=index,
            view=torch.full((n,), -1),
            label=self.labels[index],
            neighbours=table,
            degree=degree,
        )
