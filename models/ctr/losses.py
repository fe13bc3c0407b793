"""Losses for incremental CTR updates: plain BCE, the Model Prior (three forms) and distillation.

All functions take logits ``z`` [B], labels ``y`` [B] in {0,1} (floats) and, where relevant, the
previous model's logits ``z_prev`` [B] (treated as constants) and a per-sample or scalar strength.
They return the *mean over the batch*.

Model Prior (MP) forms, see docs/ctr.md:

- ``posterior``: ``(1+λ)·BCE(z, ŷ)`` with ``ŷ = (y + λ·p_prev)/(1+λ)``, the posterior mean of a
  Beta-Bernoulli model whose prior is the previous model's output read as λ pseudo-observations.
  Identical (values and gradients) to ``BCE(z,y) + λ·BCE(z,p_prev)``.
- ``kl``: ``BCE(z,y) + λ·KL(Bern(p_prev) || Bern(σ(z)))``; differs from ``posterior`` by the
  constant ``λ·H(p_prev)``, so it is exactly 0 (with zero gradient) when ``z == z_prev`` and y
  is explained.
- ``logit``: the previous logit is an offset, ``BCE(z_prev + h, y)``; ``h`` learns the
  log-likelihood-ratio update from the new data (used by the learner's logit-chain mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Strength = float | torch.Tensor


def bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits (targets may be soft)."""
    return F.binary_cross_entropy_with_logits(z, y)


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) elementwise, with 0·log 0 = 0."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def posterior_label(y: torch.Tensor, p_prev: torch.Tensor, lam: Strength) -> torch.Tensor:
    """ŷ = (y + λ·p_prev) / (1 + λ)."""
    return (y + lam * p_prev) / (1 + lam)


def mp_posterior_loss(
    z: torch.Tensor, y: torch.Tensor, z_prev: torch.Tensor, lam: Strength, weighted: bool = True
) -> torch.Tensor:
    """(1+λ)·BCE(z, ŷ), per sample, then mean. λ may be a [B] tensor.

    ``weighted=False`` drops the (1+λ) weight: every example pulls with weight 1 toward its
    posterior label (the prior moves the target, not the step size).
    """
    p_prev = torch.sigmoid(z_prev.detach())
    y_hat = posterior_label(y, p_prev, lam)
    per = F.binary_cross_entropy_with_logits(z, y_hat, reduction="none")
    return ((1 + lam) * per).mean() if weighted else per.mean()


def mp_kl_loss(
    z: torch.Tensor, y: torch.Tensor, z_prev: torch.Tensor, lam: Strength, weighted: bool = True
) -> torch.Tensor:
    """BCE(z,y) + λ·KL(Bern(p_prev) || Bern(σ(z))), mean over the batch (``weighted=False``:
    each example's loss divided by 1+λ, as in :func:`mp_posterior_loss`)."""
    p_prev = torch.sigmoid(z_prev.detach())
    soft = F.binary_cross_entropy_with_logits(z, p_prev, reduction="none")
    kl = soft - bernoulli_entropy(p_prev)
    hard = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    per = hard + lam * kl
    return per.mean() if weighted else (per / (1 + lam)).mean()


def mp_logit_loss(h: torch.Tensor, y: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
    """BCE(z_prev + h, y): the new network learns the update on top of the previous logit."""
    return F.binary_cross_entropy_with_logits(z_prev.detach() + h, y)


def distill_loss(
    z: torch.Tensor, y: torch.Tensor, z_prev: torch.Tensor, weight: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """Logit distillation: BCE(z,y) + w·T²·BCE(z/T, σ(z_prev/T))."""
    t = float(temperature)
    soft = F.binary_cross_entropy_with_logits(z / t, torch.sigmoid(z_prev.detach() / t))
    return bce(z, y) + weight * t * t * soft


def count_strength(lam: float, counts: torch.Tensor, n0: float) -> torch.Tensor:
    """Per-sample MP strength λ_i = λ · mean_f n_{i,f} / (n_{i,f} + n0).

    ``counts`` [B, F] are how often the previous model saw each of the sample's values before the
    window (0 for values it never saw). A sample made only of values the previous model never saw
    gets λ_i = 0 (nothing to trust); one made of well-known values gets λ_i → λ.
    """
    c = counts.to(torch.float32)
    return lam * (c / (c + n0)).mean(1)


def evidence_strength(lam: float, before: torch.Tensor, window: torch.Tensor, agg: str = "min") -> torch.Tensor:
    """Per-sample MP strength from the evidence behind the previous model: λ_i = λ · agg_f n/m.

    ``before`` [B, F]: sightings of each value before the window (what the previous model rests
    on; 0 for values it never saw). ``window`` [B, F]: sightings of the value in the current
    window. For a model of one value's CTR this is the exact conjugate update: the window's ``m``
    examples pulled toward ``p_prev`` with ``λ·n/m`` each add up to ``λ·n`` pseudo-observations,
    Beta(λ·n·p_prev, λ·n·(1-p_prev)) updated with the window's clicks; λ ≤ 1 discounts old evidence
    (a power prior). ``agg`` combines the fields: ``min`` (the least-supported value limits the
    trust in the prediction) or ``mean``.
    """
    r = before.to(torch.float32) / window.to(torch.float32).clamp(min=1.0)
    r = r.min(1).values if agg == "min" else r.mean(1)
    return lam * r
