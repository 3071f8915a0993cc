"""Base class of the supervisory distributions p."""

from __future__ import annotations

from torch import Tensor, nn

from icon_lightning.rows import Rows


class Supervisory(nn.Module):
    """p(j|i) over M candidates for B anchors. Subclasses implement ``forward``; p carries no gradient."""

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:  # pragma: no cover
        """(B, M) probabilities; ``valid`` (B, M) marks allowed pairs (False at self pairs)."""
        raise NotImplementedError
