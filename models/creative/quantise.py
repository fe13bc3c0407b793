"""The pCTR quantiser of JAC (Peri-CR paper, Eq. 5) and its straight-through embedding.

    bucket(p) = ⌊ K · log_{r+1}(1 + r·p) ⌋,   p ∈ [0, 1]  →  bucket ∈ {0, …, K}

The log compression gives small pCTRs (where almost every ad lives) most of the buckets; ``r`` sets
how much (r → 0: linear, r ≫ 1/p: log-uniform). The paper's r is "calculated for information gain"
and its value is not known; our default r = 1000 puts about half of the buckets below a 2.4 % pCTR
(docs/creative.md). ``bucket(1) = K``, so the table has ``K + 1`` rows.

:class:`PctrBucketEmbed` looks the bucket up in an embedding table. Its forward output is exactly the
hard bucket's row; the backward pass lets the creative ranker's loss reach the ad ranker through
``p`` (the paper: "gradients are directly copied from CR to AR"), in one of three forms:

- ``copy``: ``dL/dp = Σ_j dL/dh_j`` (the literal copy: the bucket embedding's gradient summed);
- ``interp``: the gradient of the linear interpolation between the bucket's row and the next, at
  the continuous bucket coordinate (a slope that says which way moving p would change h);
- ``none``: p is a constant for the creative ranker (no gradient to the ad ranker).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

STE_MODES = ("copy", "interp", "none")


def bucket_coordinate(p: torch.Tensor, k: int, r: float) -> torch.Tensor:
    """The continuous bucket coordinate ``K · log(1 + r·p) / log(1 + r)`` in [0, K] (differentiable)."""
    return k * torch.log1p(r * p.clamp(0.0, 1.0)) / math.log1p(r)


def bucket_index(p: torch.Tensor | np.ndarray, k: int, r: float) -> torch.Tensor | np.ndarray:
    """Eq. 5: the integer bucket of each pCTR (numpy in, numpy out; torch in, torch out)."""
    if isinstance(p, np.ndarray):
        t = k * np.log1p(r * np.clip(p, 0.0, 1.0)) / math.log1p(r)
        return np.clip(np.floor(t), 0, k).astype(np.int64)
    t = bucket_coordinate(p.detach(), k, r)
    return torch.floor(t).clamp(0, k).long()


def bucket_bounds(k: int, r: float) -> np.ndarray:
    """The lowest pCTR of every bucket 0..K (the inverse of Eq. 5): ``((1+r)^(b/K) − 1) / r``."""
    b = np.arange(k + 1, dtype=np.float64)
    return np.expm1(b / k * math.log1p(r)) / r


class PctrBucketEmbed(nn.Module):
    """Bucket embedding of an ad pCTR with a straight-through gradient (see the module docstring)."""

    def __init__(self, k: int = 64, dim: int = 8, r: float = 1000.0, ste: str = "copy", ste_scale: float = 1.0) -> None:
        super().__init__()
        if k < 1 or dim < 1 or r <= 0:
            raise ValueError("need buckets >= 1, dim >= 1 and r > 0")
        if ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, not {ste!r}")
        self.k, self.r, self.ste, self.ste_scale = k, float(r), ste, float(ste_scale)
        self.emb = nn.Embedding(k + 1, dim)
        nn.init.normal_(self.emb.weight, 0.0, 0.01)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """``p``: pCTR [B] (with its graph to the ad ranker, or detached) -> embedding [B, dim]."""
        i0 = bucket_index(p, self.k, self.r)
        hard = self.emb(i0)
        if self.ste == "none" or not p.requires_grad:
            return hard
        s = self.ste_scale
        if self.ste == "copy":
            # forward: + 0; backward: dL/dp = s · Σ_j dL/dh_j
            return hard + s * (p - p.detach()).unsqueeze(-1)
        t = bucket_coordinate(p, self.k, self.r)
        i1 = (i0 + 1).clamp(max=self.k)
        a = (t - i0.to(t.dtype)).unsqueeze(-1)
        soft = (1 - a) * self.emb(i0).detach() + a * self.emb(i1).detach()  # grad only to p
        return hard + s * (soft - soft.detach())
