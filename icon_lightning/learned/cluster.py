"""The shared cluster likelihood → k-means, normalized cuts, MI clustering, I-Con clustering."""

from __future__ import annotations

import torch
from torch import Tensor

from icon_lightning.functional import check_positive, log_cluster_affinity, log_debiased_cluster_affinity
from icon_lightning.functional.cluster_kl import sparse_cluster_kl
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.learned.base import Learned
from icon_lightning.rows import Rows


class UniformCluster(Learned):
    """q(j|i) = Σ_c φ_ic φ_jc / Σ_k φ_kc with φ = softmax(logits / temperature) (rows' ``z``: (B, K) logits).

    Two items are neighbours when they share a cluster; picking j uniformly inside the anchor's cluster.
    degree_weighted: q(j|i) = Σ_c φ_ic d_j φ_jc / Σ_k d_k φ_kc with degrees d from ``candidates.degree``
        (the random walk restricted to a cluster, as in normalized cuts).
    Computed in log space, without a (B, M, K) tensor (see ``functional.log_matmul_exp``).
    """

    def __init__(self, temperature: float = 1.0, degree_weighted: bool = False) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.degree_weighted = degree_weighted

    def _log_phi(self, anchors: Rows, candidates: Rows) -> tuple[Tensor, Tensor, Tensor | None]:
        return self._log_softmax(anchors.z), self._log_softmax(candidates.z), self._log_weight(candidates)

    def _log_softmax(self, z: Tensor) -> Tensor:
        return torch.log_softmax(z if self.temperature == 1.0 else z / self.temperature, dim=-1)

    def _log_weight(self, candidates: Rows) -> Tensor | None:
        """(M,) log degrees of the candidates (normalized cuts), or None (uniform weights)."""
        if not self.degree_weighted:
            return None
        if candidates.degree is None:
            raise ValueError("degree: UniformCluster(degree_weighted=True) needs candidates.degree")
        if bool((candidates.degree <= 0).any()):
            raise ValueError("degree: expected positive degrees")
        return torch.log(candidates.degree.to(torch.promote_types(candidates.z.dtype, torch.float32)))

    def log_kernel(self, anchors: Rows, candidates: Rows) -> Tensor:
        return log_cluster_affinity(*self._log_phi(anchors, candidates))

    def debiased(self, anchors: Rows, candidates: Rows, valid: Tensor | None, alpha: float) -> Tensor:
        """log((1−α) q + α/M) in probability space (exact, since q~ ≥ α/M; about 3× fewer (B, M) passes),
        or in log space where that would lose precision (see ``log_debiased_cluster_affinity``)."""
        log_phi_a, log_phi_c, log_weight = self._log_phi(anchors, candidates)
        out = log_debiased_cluster_affinity(log_phi_a, log_phi_c, alpha, valid, log_weight)
        return super().debiased(anchors, candidates, valid, alpha) if out is None else out

    def sparse_kl(
        self, p: SparseTarget, anchors: list[Rows], candidates: list[Rows], alpha: float = 0.0
    ) -> tuple[Tensor, Tensor] | None:
        """All heads in one call of ``functional.sparse_cluster_kl``, in at least float32 (outside autocast)."""
        with torch.autocast(anchors[0].z.device.type, enabled=False):
            log_phi_a = self._log_softmax(_stack_full(anchors))
            square = all(a.z is c.z for a, c in zip(anchors, candidates))  # the anchors are the candidates
            log_phi_c = log_phi_a if square else self._log_softmax(_stack_full(candidates))
            return sparse_cluster_kl(p, log_phi_a, log_phi_c, alpha, self._log_weight(candidates[0]))


def _stack_full(heads: list[Rows]) -> Tensor:
    """(H, B, K) the heads' z, in at least float32."""
    z = torch.stack([rows.z for rows in heads])
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
