"""Heads on frozen features: H cluster heads (linear or MLP, K outputs each), or a projection for representations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from icon_lightning.settings import PositiveFloat, PositiveInt, check_arguments


def check_heads(num_clusters, projection_dim) -> None:
    """The one-line error ``ClusterHeads``' annotations do not say (their limits: ``settings.check_arguments``)."""
    if num_clusters < 1 and projection_dim is None:
        raise ValueError("num_clusters: expected ≥ 1 (or a projection_dim for representation learning)")


class ClusterHeads(nn.Module):
    """features (B, D) → logits (B, H, K) = head_h(x) / temperature for each of H heads.

    hidden_dim: None → linear heads W_h x + b_h; an integer → an MLP per head, D → hidden (ReLU) → K (TEMI's heads
        are MLPs). All heads run as one batched product either way.
    projection_dim: when set, an MLP D → D' → D' first (representation learning); the heads then act on it.
    With ``num_clusters=0`` the module returns the projection itself as (B, 1, D').
    """

    def __init__(
        self,
        feature_dim: PositiveInt,
        num_clusters: int,
        num_heads: PositiveInt = 1,
        temperature: PositiveFloat = 1.0,
        projection_dim: PositiveInt | None = None,
        hidden_dim: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        check_arguments(ClusterHeads.__init__, locals())
        check_heads(num_clusters, projection_dim)
        self.num_heads, self.num_clusters, self.temperature = num_heads, num_clusters, float(temperature)
        dim = feature_dim
        self.projection = nn.Identity()
        if projection_dim is not None:
            self.projection = nn.Sequential(
                nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim)
            )
            dim = projection_dim
        self.out_dim = num_clusters if num_clusters >= 1 else dim
        self.hidden = None
        self.linear = None
        if num_clusters >= 1 and hidden_dim is not None:
            self.hidden = nn.Linear(dim, num_heads * hidden_dim)
            bound = 1 / math.sqrt(hidden_dim)  # nn.Linear's default initialisation, per head
            self.out_weight = nn.Parameter(torch.empty(num_heads, hidden_dim, num_clusters).uniform_(-bound, bound))
            self.out_bias = nn.Parameter(torch.empty(num_heads, num_clusters).uniform_(-bound, bound))
        elif num_clusters >= 1:
            self.linear = nn.Linear(dim, num_heads * num_clusters)

    @property
    def is_linear(self) -> bool:
        return self.linear is not None

    def forward(self, features: Tensor) -> Tensor:
        h = self.projection(features)
        if self.hidden is not None:
            a = torch.relu(self.hidden(h)).view(len(features), self.num_heads, -1)  # (B, H, hidden)
            logits = torch.einsum("bhd,hdk->bhk", a, self.out_weight) + self.out_bias
            return logits / self.temperature
        if self.linear is None:
            return h.unsqueeze(1)
        return self.linear(h).view(len(features), self.num_heads, self.num_clusters) / self.temperature

    @torch.no_grad()
    def init_from_partition(self, head: int, features: Tensor, assignment: Tensor, sharpness: float = 3.0) -> None:
        """Start linear head ``head`` at the nearest-centroid rule of a partition of ``features`` (N, D).

        logit_c(x) = s · (2⟨x, μ_c⟩ − |μ_c|²), whose argmax is the nearest centroid μ_c; a cluster with no member
        gets the mean. s makes the logits' standard deviation over clusters ``sharpness`` on average (a soft start
        that the loss can still move; chosen once, without labels).
        """
        if self.linear is None or not isinstance(self.projection, nn.Identity):
            raise ValueError("head_init: starting heads from a clustering needs linear heads on the features")
        k = self.num_clusters
        x = features.to(self.linear.weight.dtype)
        a = assignment.to(device=x.device, dtype=torch.long)
        if a.shape != (len(x),) or a.min() < 0 or a.max() >= k:
            raise ValueError(f"assignment: expected ({len(x)},) cluster ids in [0, {k}), got {tuple(a.shape)}")
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, a, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], x.mean(0, keepdim=True))
        weight, bias = 2 * means, -(means * means).sum(1)
        spread = (x @ weight.T + bias).std(1).mean().clamp_min(1e-12)
        set_linear_head(self, head, weight, bias, stored_scale=sharpness * self.temperature / spread)


@torch.no_grad()
def set_linear_head(
    cluster_heads: ClusterHeads, head: int, weight: Tensor, bias: Tensor, stored_scale: Tensor | float | None = None
) -> None:
    """Linear head ``head`` of ``cluster_heads`` computes the logits ``x @ weight.T + bias`` ((K, D), (K,)); forward
    divides by the temperature, so they are stored times it (or times ``stored_scale``, which then includes it)."""
    linear, k = cluster_heads.linear, cluster_heads.num_clusters
    if linear is None:
        raise ValueError("replace_head: only linear heads can be replaced; MLP heads (head_hidden_dim) have none")
    if tuple(weight.shape) != (k, linear.in_features) or tuple(bias.shape) != (k,):
        raise ValueError(
            f"replace_head: expected weight ({k}, {linear.in_features}) and bias ({k},), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    rows = slice(head * k, (head + 1) * k)
    scale = cluster_heads.temperature if stored_scale is None else stored_scale
    linear.weight[rows] = (weight * scale).to(linear.weight)
    linear.bias[rows] = (bias * scale).to(linear.bias)


@torch.no_grad()
def keep_heads(cluster_heads: ClusterHeads, heads: Sequence[int]) -> dict[str, Tensor]:
    """``cluster_heads`` keeps only the heads at positions ``heads`` (in that order; the shared projection stays):
    every per-head parameter is replaced by a smaller one holding the kept heads' rows. Returns, for each replaced
    parameter's name, the indices along dim 0 of the old parameter that the new one holds (to carry optimizer state)."""
    index = torch.as_tensor(list(heads), dtype=torch.long)
    if index.ndim != 1 or len(index) == 0 or len(set(index.tolist())) != len(index):
        raise ValueError(f"heads: expected distinct head positions, got {list(heads)}")
    if int(index.min()) < 0 or int(index.max()) >= cluster_heads.num_heads:
        raise ValueError(f"heads: expected positions in [0, {cluster_heads.num_heads}), got {list(heads)}")
    if cluster_heads.linear is None and cluster_heads.hidden is None:
        raise ValueError("heads: a projection (num_clusters 0) has no cluster heads to keep")

    def blocks(width: int) -> Tensor:  # rows of head h are [h·width, (h+1)·width)
        return (index.view(-1, 1) * width + torch.arange(width)).flatten()

    if cluster_heads.linear is not None:
        rows = {"linear.weight": blocks(cluster_heads.num_clusters), "linear.bias": blocks(cluster_heads.num_clusters)}
    else:
        hidden = cluster_heads.out_weight.shape[1]
        rows = {"hidden.weight": blocks(hidden), "hidden.bias": blocks(hidden)}
        rows |= {"out_weight": index, "out_bias": index}
    for name, index_rows in rows.items():
        owner, _, attr = name.rpartition(".")
        module = cluster_heads.get_submodule(owner) if owner else cluster_heads
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(old[index_rows.to(old.device)].clone(), requires_grad=old.requires_grad))
    for module in (cluster_heads.linear, cluster_heads.hidden):
        if module is not None:
            module.out_features = module.weight.shape[0]
    cluster_heads.num_heads = len(index)
    return rows
