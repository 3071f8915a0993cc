"""Base class of the learned distributions q."""

from __future__ import annotations

from torch import Tensor, nn

from icon_lightning.functional import log_debias, masked_log_softmax
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.rows import Rows


class Learned(nn.Module):
    """log q(j|i) = masked log_softmax_j of ``log_kernel(anchors, candidates)``."""

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:  # pragma: no cover
        """(B, M) unnormalised log-kernel between anchor and candidate outputs ``z``."""
        raise NotImplementedError

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        return masked_log_softmax(self.log_kernel(anchors, candidates), valid)

    def debiased(self, anchors: Rows, candidates: Rows, valid: Tensor | None, alpha: float) -> Tensor:
        """(B, M) log q~ = log((1−α) q + α/M) over the valid candidates (``learned.Debiased`` calls this).

        Subclasses with a cheaper exact form override it (``UniformCluster``)."""
        return log_debias(self(anchors, candidates, valid), alpha, valid)

    def sparse_kl(
        self, p: SparseTarget, anchors: list[Rows], candidates: list[Rows], alpha: float = 0.0
    ) -> tuple[Tensor, Tensor] | None:
        """(H,) KL(p ‖ q~) and cross-entropy of H heads' rows against a sparse p, q~ = (1−α) q + α/M, each a
        mean over the anchors with a positive, without a (B, M) matrix. None where this q has no such form
        (the loss then builds log_q densely)."""
        return None
