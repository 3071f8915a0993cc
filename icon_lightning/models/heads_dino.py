"""DINO-style cluster heads (TEMI's released heads): D → hidden (GELU) → bottleneck, L2-normalised, then a
weight-normalised bottleneck → K layer without bias; H of them held as stacks of per-head weights, as
``ClusterHeads`` holds its heads, so the ``HeadBank`` (EMA teacher, live mask, selection) treats them alike."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from icon_lightning.models.heads import ClusterHeads, apply_heads
from icon_lightning.settings import PositiveFloat, PositiveInt, check_arguments

# TEMI-official-BMVC2023 model_builders/multi_head.py (DINOHead._init_weights): trunc_normal_(std=.02), whose
# bounds are DINO's utils.trunc_normal_ defaults, a=-2, b=2 (absolute, not in standard deviations); biases 0
INIT_STD, INIT_BOUND = 0.02, 2.0


def stacked_last_layer(bottleneck_dim: int, num_clusters: int, num_heads: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(H, K, bottleneck) direction v and (H, K, 1) gain g of H weight-normalised ``nn.Linear(bottleneck, K,
    bias=False)`` layers as the release starts them: v at ``nn.Linear``'s default initialisation, g filled with 1
    (``weight_g.data.fill_(1)``), so each output row starts as a unit vector."""
    v = torch.stack([nn.Linear(bottleneck_dim, num_clusters, bias=False).weight.detach() for _ in range(num_heads)])
    return nn.Parameter(v), nn.Parameter(torch.ones(num_heads, num_clusters, 1))


def truncated_normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=INIT_STD, a=-INIT_BOUND, b=INIT_BOUND))


class DINOHeads(nn.Module):
    """features (B, D) → logits (B, h, K) = W_h normalize(mlp_h(x)) / temperature for the heads numbered ``heads``
    (all H by default); only those heads are computed.

    mlp_h: D → ``hidden_dim`` (GELU) → ``bottleneck_dim`` (TEMI's ``nlayers=2``, no batch norm, no dropout, no
    final GELU), weights truncated-normal (std 0.02), biases 0. W_h = g ⊙ v / ‖v‖ row by row: the weight
    normalisation of ``torch.nn.utils.weight_norm`` (dim 0), no bias, g trainable (TEMI's
    ``norm_last_layer=False``). Parameters, stacked over the H heads (dim 0): ``hidden_weight`` (H, hidden, D),
    ``hidden_bias`` (H, hidden), ``bottleneck_weight`` (H, bottleneck, hidden), ``bottleneck_bias`` (H, bottleneck),
    ``last_v`` (H, K, bottleneck), ``last_g`` (H, K, 1); ``last_layer_parameters`` are the last two (the layer
    ``callbacks.FreezeLastLayer`` holds still in the first epoch).
    """

    kind = "dino"
    is_linear = False

    def __init__(
        self,
        feature_dim: PositiveInt,
        num_clusters: PositiveInt,
        num_heads: PositiveInt = 1,
        temperature: PositiveFloat = 1.0,
        hidden_dim: PositiveInt = 512,
        bottleneck_dim: PositiveInt = 256,
    ) -> None:
        super().__init__()
        check_arguments(DINOHeads.__init__, locals())
        self.num_heads, self.num_clusters, self.temperature = num_heads, num_clusters, float(temperature)
        self.projection = nn.Identity()  # no projection: the heads act on the features
        self.in_dim, self.out_dim = feature_dim, num_clusters
        self.hidden_weight = truncated_normal(num_heads, hidden_dim, feature_dim)
        self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden_dim))
        self.bottleneck_weight = truncated_normal(num_heads, bottleneck_dim, hidden_dim)
        self.bottleneck_bias = nn.Parameter(torch.zeros(num_heads, bottleneck_dim))
        self.last_v, self.last_g = stacked_last_layer(bottleneck_dim, num_clusters, num_heads)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [self.last_v, self.last_g]

    def forward(self, features: Tensor, heads: Tensor | Sequence[int] | None = None) -> Tensor:
        index = slice(None) if heads is None else torch.as_tensor(heads, dtype=torch.long, device=features.device)
        hidden = nn.functional.gelu(apply_heads(features, self.hidden_weight[index], self.hidden_bias[index]))
        bottleneck = torch.einsum("bhd,hed->bhe", hidden, self.bottleneck_weight[index]) + self.bottleneck_bias[index]
        bottleneck = nn.functional.normalize(bottleneck, dim=-1, p=2)
        v = self.last_v[index]
        weight = self.last_g[index] * v / v.norm(dim=-1, keepdim=True)  # torch's _weight_norm(v, g, dim=0)
        return torch.einsum("bhe,hke->bhk", bottleneck, weight) / self.temperature


def cluster_heads(
    bottleneck_dim: int | None,
    feature_dim: int,
    num_clusters: int,
    num_heads: int,
    temperature: float,
    projection_dim: int | None,
    hidden_dim: int | None,
    *options,
) -> ClusterHeads | DINOHeads:
    """``IConModule``'s heads: ``ClusterHeads`` (linear, MLP, projection; ``options``: its further arguments), or,
    when ``bottleneck_dim`` is set, ``DINOHeads`` (``hidden_dim`` required; no projection, no option)."""
    if bottleneck_dim is None:
        return ClusterHeads(feature_dim, num_clusters, num_heads, temperature, projection_dim, hidden_dim, *options)
    if hidden_dim is None or projection_dim is not None or any(option is not None for option in options):
        raise ValueError("head_bottleneck_dim: DINO heads need head_hidden_dim, and no projection_dim or head_norm")
    return DINOHeads(feature_dim, num_clusters, num_heads, temperature, hidden_dim, bottleneck_dim)


def module_heads(arguments: dict) -> ClusterHeads | DINOHeads:
    """The heads an ``IConModule`` constructor's ``arguments`` (its ``locals()``) ask for (``cluster_heads``): its
    ``head_bottleneck_dim``, dimensions and head options, ``ClusterHeads``' further arguments being the module's
    ``head_<name>`` ones."""
    a = arguments
    dims = (a["feature_dim"], a["num_clusters"], a["num_heads"], a["head_temperature"], a["projection_dim"])
    options = [a.get(f"head_{name}") for name in list(inspect.signature(ClusterHeads).parameters)[6:]]
    return cluster_heads(a.get("head_bottleneck_dim"), *dims, a["head_hidden_dim"], *options)
