"""Heads on frozen features: H cluster heads (linear or MLP, K outputs each) held as stacks of per-head weights,
or a projection for representations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from icon_lightning.settings import PositiveFloat, PositiveInt, check_arguments


def check_heads(num_clusters, projection_dim, hidden_dim=None, norm=None) -> None:
    """The one-line errors ``ClusterHeads``' annotations do not say (their limits: ``settings.check_arguments``)."""
    if num_clusters < 1 and projection_dim is None:
        raise ValueError("num_clusters: expected ≥ 1 (or a projection_dim for representation learning)")
    if norm is not None and (hidden_dim is not None or num_clusters < 1):
        raise ValueError(f"head_norm: {norm!r} normalises linear cluster heads; MLP heads and projections have none")


class HeadWeightNorm(nn.Module):
    """Weight normalisation of stacked linear heads (a ``parametrize`` parametrization of ``weight`` (H, K, D)):
    weight = g · v / ‖v‖, the norm over D for each head and output unit, g (H, K, 1) and v (H, K, D) the trained
    parameters (``parametrizations.weight.original0``, ``original1``): on each head what
    ``torch.nn.utils.parametrizations.weight_norm`` (dim 0) makes of an ``nn.Linear(D, K)``, which starts at
    g = ‖w‖, v = w (``right_inverse``); the bias is not normalised. TURTLE's task encoder."""

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_v * (weight_g / torch.linalg.vector_norm(weight_v, dim=-1, keepdim=True))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.linalg.vector_norm(weight, dim=-1, keepdim=True), weight


def stacked_linear(in_dim: int, out_dim: int, num_heads: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(H, out, in) weight and (H, out) bias of H linear maps, initialised as one ``nn.Linear(in, H · out)``
    (the same draws: a seeded run starts where the single wide layer started)."""
    wide = nn.Linear(in_dim, num_heads * out_dim)
    weight = wide.weight.detach().view(num_heads, out_dim, in_dim).clone()
    return nn.Parameter(weight), nn.Parameter(wide.bias.detach().view(num_heads, out_dim).clone())


def apply_heads(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(B, D) features through the stacked maps ``weight`` (h, out, D), ``bias`` (h, out) → (B, h, out): one
    product with the heads' rows side by side (the computation of one wide ``nn.Linear``)."""
    h, out = bias.shape
    return nn.functional.linear(x, weight.reshape(h * out, -1), bias.reshape(-1)).view(len(x), h, out)


class ClusterHeads(nn.Module):
    """features (B, D) → logits (B, h, K) = head(x) / temperature for the heads numbered ``heads`` (all H heads by
    default); only those heads are computed, so the others cost nothing and get no gradient.

    Every per-head parameter is a stack over the H heads (dim 0): linear heads ``weight`` (H, K, D) and ``bias``
    (H, K); MLP heads (``hidden_dim``: D → hidden (ReLU) → K, TEMI's heads) ``hidden_weight`` (H, hidden, D),
    ``hidden_bias`` (H, hidden), ``out_weight`` (H, hidden, K), ``out_bias`` (H, K).
    projection_dim: when set, an MLP D → D' → D' first (representation learning); the heads then act on it.
    With ``num_clusters=0`` the module returns the projection itself as (B, 1, D') (one head).
    norm: ``weight``: linear heads are weight-normalised (``HeadWeightNorm``: TURTLE's task encoder); None: plain.
    """

    def __init__(
        self,
        feature_dim: PositiveInt,
        num_clusters: int,
        num_heads: PositiveInt = 1,
        temperature: PositiveFloat = 1.0,
        projection_dim: PositiveInt | None = None,
        hidden_dim: PositiveInt | None = None,
        norm: Literal["weight"] | None = None,
    ) -> None:
        super().__init__()
        check_arguments(ClusterHeads.__init__, locals())
        check_heads(num_clusters, projection_dim, hidden_dim, norm)
        num_heads = num_heads if num_clusters >= 1 else 1
        self.num_heads, self.num_clusters, self.temperature = num_heads, num_clusters, float(temperature)
        self.projection = nn.Identity()
        if projection_dim is not None:
            self.projection = nn.Sequential(
                nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim)
            )
        dim = feature_dim if projection_dim is None else projection_dim
        self.in_dim, self.out_dim = dim, num_clusters if num_clusters >= 1 else dim
        self.kind = "projection" if num_clusters < 1 else "linear" if hidden_dim is None else "mlp"
        if self.kind == "linear":
            self.weight, self.bias = stacked_linear(dim, num_clusters, num_heads)
            if norm == "weight":
                parametrize.register_parametrization(self, "weight", HeadWeightNorm())
        elif self.kind == "mlp":
            self.hidden_weight, self.hidden_bias = stacked_linear(dim, hidden_dim, num_heads)
            bound = 1 / hidden_dim**0.5  # nn.Linear's default initialisation, per head
            self.out_weight = nn.Parameter(torch.empty(num_heads, hidden_dim, num_clusters).uniform_(-bound, bound))
            self.out_bias = nn.Parameter(torch.empty(num_heads, num_clusters).uniform_(-bound, bound))

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def forward(self, features: Tensor, heads: Tensor | Sequence[int] | None = None) -> Tensor:
        h = self.projection(features)
        if self.kind == "projection":
            return h.unsqueeze(1)
        index = slice(None) if heads is None else torch.as_tensor(heads, dtype=torch.long, device=h.device)
        if self.kind == "mlp":
            a = torch.relu(apply_heads(h, self.hidden_weight[index], self.hidden_bias[index]))  # (B, h, hidden)
            logits = torch.einsum("bhd,hdk->bhk", a, self.out_weight[index]) + self.out_bias[index]
            return logits / self.temperature
        return apply_heads(h, self.weight[index], self.bias[index]) / self.temperature

    @torch.no_grad()
    def init_from_partition(self, head: int, features: Tensor, assignment: Tensor, sharpness: float = 3.0) -> None:
        """Start linear head ``head`` at the nearest-centroid rule of a partition of ``features`` (N, D).

        logit_c(x) = s · (2⟨x, μ_c⟩ − |μ_c|²), whose argmax is the nearest centroid μ_c; a cluster with no member
        gets the mean. s makes the logits' standard deviation over clusters ``sharpness`` on average (a soft start
        that the loss can still move; chosen once, without labels).
        """
        if not self.is_linear or not isinstance(self.projection, nn.Identity):
            raise ValueError("head_init: starting heads from a clustering needs linear heads on the features")
        k = self.num_clusters
        x = features.to(self.weight.dtype)
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
    """Linear head number ``head`` of ``cluster_heads`` computes the logits ``x @ weight.T + bias`` ((K, D), (K,));
    forward divides by the temperature, so they are stored times it (or times ``stored_scale``, which then
    includes it)."""
    k = cluster_heads.num_clusters
    if not cluster_heads.is_linear:
        raise ValueError("replace_head: only linear heads can be replaced; MLP heads (head_hidden_dim) have none")
    if tuple(weight.shape) != (k, cluster_heads.in_dim) or tuple(bias.shape) != (k,):
        raise ValueError(
            f"replace_head: expected weight ({k}, {cluster_heads.in_dim}) and bias ({k},), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if not 0 <= head < cluster_heads.num_heads:
        raise ValueError(f"replace_head: expected a head number in [0, {cluster_heads.num_heads}), got {head}")
    scale = cluster_heads.temperature if stored_scale is None else stored_scale
    if parametrize.is_parametrized(cluster_heads, "weight"):  # weight-normalised: this head's g and v
        g, v = cluster_heads.parametrizations.weight.original0, cluster_heads.parametrizations.weight.original1
        v[head] = (weight * scale).to(v)
        g[head] = torch.linalg.vector_norm(v[head], dim=-1, keepdim=True)
    else:
        cluster_heads.weight[head] = (weight * scale).to(cluster_heads.weight)
    cluster_heads.bias[head] = (bias * scale).to(cluster_heads.bias)
