"""Base class of the supervisory distributions p."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.rows import Rows


class Supervisory(nn.Module):
    """p(j|i) over M candidates for B anchors. Subclasses implement ``forward``; p carries no gradient.

    reads_z: this p's own ``forward`` reads the rows' z (the model's or a teacher's output), not only their
    dataset facts (index, view, label, features, neighbours). ``reads_output`` is true when this p or any part
    of it does: such a p changes as the model trains and may never be cached across steps.
    """

    reads_z: ClassVar[bool] = False

    @property
    def reads_output(self) -> bool:
        return any(isinstance(m, Supervisory) and m.reads_z for m in self.modules())

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:  # pragma: no cover
        """(B, M) probabilities; ``valid`` (B, M) marks allowed pairs (False at self pairs)."""
        raise NotImplementedError

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget | None:
        """The same p as a ``SparseTarget`` (self pairs at ``self_col``, (B,), -1 for none), for losses that
        use p's structure; None where p has no sparse form (the loss then takes ``forward``)."""
        return None


def target_dtype(rows: Rows) -> torch.dtype:
    """p is built in at least float32, also when the model's output is bf16/fp16 under autocast."""
    return torch.promote_types(rows.z.dtype, torch.float32)
