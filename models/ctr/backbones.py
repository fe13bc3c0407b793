"""Interaction backbones. Each maps pooled field embeddings + dense inputs to one logit.

Interface (every backbone): ``forward(flat, stacked, dense) -> logit [B]`` where

- ``flat`` [B, Σ dims]: the concatenated field embeddings,
- ``stacked`` [B, F, D]: the same embeddings at one common dim ``D`` (for pairwise interactions),
- ``dense`` [B, n_dense]: standardised numeric features and prior logits (may have 0 columns).

Backbones:

- :class:`DeepFM`: factorisation machine over the fields (the dense vector projected to one extra
  field) + an MLP over ``flat ⊕ dense`` (Guo et al., 2017; the first-order sparse term is left to
  the Feature Prior's logit term / the MLP).
- :class:`DCNv2`: a DCN-v2 cross network (:class:`CrossNetV2`, full rank, the same maths as
  ``torchrec.modules.crossnet.CrossNet`` written as one ``Linear`` per layer, which is several
  times faster on CPU than its batched ``[B, N, 1]`` matmul; or torchrec's ``LowRankCrossNet`` when
  ``low_rank`` is set) in parallel with an MLP, over ``flat ⊕ dense`` (Wang et al., 2021).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP


class DeepFM(nn.Module):
    """FM + deep part. Args: n_fields, field_dim (D), flat_dim (Σ dims), dense_dim, hidden sizes."""

    def __init__(self, n_fields: int, field_dim: int, flat_dim: int, dense_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.dense_proj = nn.Linear(dense_dim, field_dim) if dense_dim else None
        self.mlp = MLP(flat_dim + dense_dim, list(hidden))
        self.out = nn.Linear(hidden[-1], 1)

    def forward(self, flat: torch.Tensor, stacked: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if self.dense_proj is not None:
            stacked = torch.cat([stacked, self.dense_proj(dense).unsqueeze(1)], 1)  # [B, F+1, D]
        s = stacked.sum(1)
        fm = 0.5 * (s * s - (stacked * stacked).sum(1)).sum(1)  # [B]
        deep = self.out(self.mlp(torch.cat([flat, dense], 1))).squeeze(1)
        return fm + deep


class CrossNetV2(nn.Module):
    """Full-rank DCN-v2 cross layers: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``."""

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(num_layers))
        for lin in self.layers:
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for lin in self.layers:
            x = x0 * lin(x) + x
        return x


class DCNv2(nn.Module):
    """Cross network ∥ MLP. Args: flat_dim, dense_dim, hidden sizes, cross layers, low rank."""

    def __init__(self, flat_dim: int, dense_dim: int, hidden: Sequence[int], cross_layers: int, low_rank: int | None) -> None:
        super().__init__()
        d_in = flat_dim + dense_dim
        self.cross = LowRankCrossNet(d_in, cross_layers, low_rank) if low_rank else CrossNetV2(d_in, cross_layers)
        self.mlp = MLP(d_in, list(hidden))
        self.out = nn.Linear(d_in + hidden[-1], 1)

    def forward(self, flat: torch.Tensor, stacked: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([flat, dense], 1)
        return self.out(torch.cat([self.cross(x0), self.mlp(x0)], 1)).squeeze(1)


BACKBONES = ("deepfm", "dcn")


def build_backbone(
    name: str,
    n_fields: int,
    field_dim: int,
    flat_dim: int,
    dense_dim: int,
    hidden: Sequence[int],
    cross_layers: int = 2,
    low_rank: int | None = None,
) -> nn.Module:
    """Backbone by name (``deepfm`` or ``dcn``)."""
    if name == "deepfm":
        return DeepFM(n_fields, field_dim, flat_dim, dense_dim, hidden)
    if name == "dcn":
        return DCNv2(flat_dim, dense_dim, hidden, cross_layers, low_rank)
    raise ValueError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
