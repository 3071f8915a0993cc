"""The divergence between the supervisory and the learned neighbourhood of each anchor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from icon_lightning.functional import kl_divergence


@dataclass(frozen=True)
class PerAnchor:
    """Per-anchor values, each (B,)."""

    divergence: Tensor
    cross_entropy: Tensor


class KL(nn.Module):
    """KL(p(.|i) ‖ q(.|i)) = Σ_j p (log p − log q), with the cross-entropy −Σ_j p log q beside it.

    The two differ by the entropy of p, which carries no gradient; published code often reports the
    cross-entropy under the name "KL". Entries with p == 0 count exactly 0, even where log q = -inf.
    """

    def forward(self, p: Tensor, log_q: Tensor) -> PerAnchor:
        kl, cross_entropy = kl_divergence(p, log_q)
        return PerAnchor(kl, cross_entropy)
