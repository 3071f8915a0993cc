"""The peers' released positives: the neighbour the data sampled for each anchor this step (SCAN's
``NeighborsDataset``, TEMI's ``EmbedNN``: one neighbour drawn per anchor per step from its top-k), as a p.

The DataModule draws S neighbours per anchor (``data.num_neighbours``) and lays each process's rows out as
``ClusteringBatch`` says: B anchors × V views (view ≥ 0), then B × S sampled neighbours (view −1; row V·B + s·B + b
is anchor b's s-th). A global batch (DDP) is the processes' blocks one after another.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional import normalize_rows
from icon_lightning.rows import Rows
from icon_lightning.supervisory import Supervisory
from icon_lightning.supervisory.base import target_dtype


def _runs(marked: Tensor) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True in the (R,) bool ``marked``."""
    edges = torch.diff(
        marked.to(torch.int8),
        prepend=marked.new_zeros(1, dtype=torch.int8),
        append=marked.new_zeros(1, dtype=torch.int8),
    )
    starts, stops = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return [(int(a), int(b - a)) for a, b in zip(starts, stops)]


def sampled_pairs(view: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of every (anchor row, its sampled neighbour row) pair of a batch (or global batch) laid out in
    blocks of V·B anchor rows (``view`` ≥ 0) followed by S·B neighbour rows (``view`` −1); B is the number of
    distinct items (``index``) among a block's anchor rows (a process draws distinct anchors)."""
    rows, cols = [], []
    anchor_runs = _runs(view >= 0)
    for number, (start, width) in enumerate(anchor_runs):
        stop = anchor_runs[number + 1][0] if number + 1 < len(anchor_runs) else len(view)
        anchors = int(torch.unique(index[start : start + width]).numel())
        sampled = stop - start - width
        if width % anchors or sampled % anchors or not sampled:
            raise ValueError(
                f"data.num_neighbours: expected rows of B anchors × V views then B × S ≥ 1 sampled neighbours; "
                f"a block has {width} anchor rows of {anchors} items and {sampled} neighbour rows"
            )
        per_anchor = sampled // anchors
        anchor_rows = start + torch.arange(width, device=view.device)
        s = torch.arange(per_anchor, device=view.device)
        neighbour_rows = start + width + s[None, :] * anchors + (anchor_rows - start)[:, None] % anchors  # (V·B, S)
        rows.append(anchor_rows.repeat_interleave(per_anchor))
        cols.append(neighbour_rows.flatten())
    if not rows:
        raise ValueError("data.num_neighbours: the batch has no anchor rows (view ≥ 0) to pair with a neighbour")
    return torch.cat(rows), torch.cat(cols)


class SampledNeighbours(Supervisory):
    """p(j|i) uniform over the rows the data sampled as anchor i's neighbours this step (one with
    ``data.num_neighbours: 1``: p is one-hot, the peers' released positive); neighbour rows have none, or with
    ``symmetric`` their anchor's rows (TEMI's loss, which also takes the neighbour as the student's view and the
    anchor as the teacher's). Read from the batch's layout (``sampled_pairs``), never from the model.
    include_self: the data draws the neighbours from the item itself and its top-k (SCAN's ``NeighborsDataset``:
    ``indices[:, :k + 1]``, the mined top-k + 1 starting with the item), declared to the DataModule through
    ``data_needs``; otherwise from the top-k alone (TEMI's ``EmbedNN``, whose table excludes the item). The k is
    the DataModule's table width (``data.k``)."""

    def __init__(self, symmetric: bool = False, include_self: bool = False) -> None:
        super().__init__()
        self.symmetric, self.include_self = bool(symmetric), bool(include_self)

    def data_needs(self) -> dict:
        """What the data must sample for this p (``IConModule.data_needs`` passes it on)."""
        return {"sampled_neighbours": True, "neighbours_include_self": self.include_self}

    @torch.no_grad()
    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        if candidates.view is None or len(candidates) != len(anchors):
            raise ValueError("candidates: SampledNeighbours pairs the rows of one (global) batch with each other")
        rows, cols = sampled_pairs(candidates.view, candidates.index)
        if self.symmetric:
            rows, cols = torch.cat([rows, cols]), torch.cat([cols, rows])
        adjacency = torch.zeros(len(anchors), len(candidates), dtype=target_dtype(anchors), device=rows.device)
        return normalize_rows(adjacency.index_put_((rows, cols), torch.ones_like(rows, dtype=adjacency.dtype)), valid)
