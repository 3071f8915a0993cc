"""Heads on frozen features: H linear cluster heads (K outputs each), or a projection for representations."""

from __future__ import annotations

from torch import Tensor, nn


class ClusterHeads(nn.Module):
    """features (B, D) → logits (B, H, K) = (W_h x + b_h) / temperature for each of H heads.

    projection_dim: when set, an MLP D → D' → D' first (representation learning); the heads then act on it.
    With ``num_clusters=0`` the module returns the projection itself as (B, 1, D').
    """

    def __init__(
        self,
        feature_dim: int,
        num_clusters: int,
        num_heads: int = 1,
        temperature: float = 1.0,
        projection_dim: int | None = None,
    ) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim: expected ≥ 1, got {feature_dim}")
        if num_heads < 1:
            raise ValueError(f"num_heads: expected ≥ 1, got {num_heads}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature}")
        if num_clusters < 1 and projection_dim is None:
            raise ValueError("num_clusters: expected ≥ 1 (or a projection_dim for representation learning)")
        self.num_heads, self.num_clusters, self.temperature = num_heads, num_clusters, float(temperature)
        dim = feature_dim
        self.projection = nn.Identity()
        if projection_dim is not None:
            self.projection = nn.Sequential(
                nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim)
            )
            dim = projection_dim
        self.out_dim = num_clusters if num_clusters >= 1 else dim
        self.linear = nn.Linear(dim, num_heads * num_clusters) if num_clusters >= 1 else None

    def forward(self, features: Tensor) -> Tensor:
        h = self.projection(features)
        if self.linear is None:
            return h.unsqueeze(1)
        return self.linear(h).view(len(features), self.num_heads, self.num_clusters) / self.temperature
