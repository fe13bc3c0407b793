"""Exact identities of the Model Prior losses (values and gradients), on many random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.ctr.losses import (
    bce,
    bernoulli_entropy,
    count_strength,
    distill_loss,
    mp_kl_loss,
    mp_logit_loss,
    mp_posterior_loss,
    posterior_label,
)

D = torch.float64  # identities are checked in double precision


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    v = fn(z)
    (g,) = torch.autograd.grad(v, z)
    return v.detach(), g


def _random(seed: int, n: int = 257):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=D) * 3
    y = (torch.rand(n, generator=g, dtype=D) < 0.3).to(D)
    p = torch.rand(n, generator=g, dtype=D).clamp(1e-4, 1 - 1e-4)
    lam = float(torch.rand(1, generator=g) * 10)
    return z, y, p, lam


def test_bce_plus_prior_equals_posterior_label_bce() -> None:
    for seed in range(50):
        z, y, p, lam = _random(seed)
        lhs = lambda z: F.binary_cross_entropy_with_logits(z, y) + lam * F.binary_cross_entropy_with_logits(z, p)  # noqa: E731
        rhs = lambda z: (1 + lam) * F.binary_cross_entropy_with_logits(z, (y + lam * p) / (1 + lam))  # noqa: E731
        v1, g1 = _grad(lhs, z)
        v2, g2 = _grad(rhs, z)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
        # and the library function computes the same thing
        zp = torch.logit(p)
        v3, g3 = _grad(lambda z: mp_posterior_loss(z, y, zp, lam), z)
        torch.testing.assert_close(v3, v1, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(g3, g1, rtol=1e-8, atol=1e-10)


def test_per_sample_lambda_identity() -> None:
    z, y, p, _ = _random(7)
    lam = torch.rand(len(z), dtype=D) * 5
    zp = torch.logit(p)
    expect = (F.binary_cross_entropy_with_logits(z, y, reduction="none")
              + lam * F.binary_cross_entropy_with_logits(z, p, reduction="none")).mean()
    torch.testing.assert_close(mp_posterior_loss(z, y, zp, lam), expect)


def test_kl_form_is_bce_form_minus_entropy() -> None:
    for seed in range(20):
        z, y, p, lam = _random(seed)
        zp = torch.logit(p)
        kl = mp_kl_loss(z, y, zp, lam)
        post = mp_posterior_loss(z, y, zp, lam)
        torch.testing.assert_close(kl, post - lam * bernoulli_entropy(torch.sigmoid(zp)).mean(), rtol=1e-9, atol=1e-9)
        _, gk = _grad(lambda z: mp_kl_loss(z, y, zp, lam), z)
        _, gp = _grad(lambda z: mp_posterior_loss(z, y, zp, lam), z)
        torch.testing.assert_close(gk, gp, rtol=1e-9, atol=1e-12)


def test_lambda_zero_is_finetuning() -> None:
    for seed in range(10):
        z, y, p, _ = _random(seed)
        zp = torch.logit(p)
        _, g0 = _grad(lambda z: bce(z, y), z)
        for fn in (mp_posterior_loss, mp_kl_loss):
            v, g = _grad(lambda z: fn(z, y, zp, 0.0), z)
            torch.testing.assert_close(v, bce(z, y))
            torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-15)
        _, gd = _grad(lambda z: distill_loss(z, y, zp, weight=0.0), z)
        torch.testing.assert_close(gd, g0, rtol=1e-12, atol=1e-15)


def test_model_prior_term_vanishes_at_previous_model() -> None:
    for seed in range(10):
        _, y, p, lam = _random(seed)
        zp = torch.logit(p)
        # KL term alone: value 0 and gradient 0 when the model equals the previous one
        kl_only = lambda z: mp_kl_loss(z, y, zp, lam) - bce(z, y)  # noqa: E731
        v, g = _grad(kl_only, zp)
        assert abs(float(v)) < 1e-10
        assert float(g.abs().max()) < 1e-12
        # posterior-label form: the MP term's gradient contribution is zero at z = logit(p_prev)
        mp_term = lambda z: mp_posterior_loss(z, y, zp, lam) - bce(z, y)  # noqa: E731
        _, g2 = _grad(mp_term, zp)
        assert float(g2.abs().max()) < 1e-12
        # ... but not elsewhere (the test can fail)
        _, g3 = _grad(mp_term, zp + 0.5)
        assert float(g3.abs().max()) > 1e-6


def test_large_lambda_pins_target_to_previous_model() -> None:
    y = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    p = torch.tensor([0.2, 0.7, 0.01], dtype=D)
    torch.testing.assert_close(posterior_label(y, p, 1e9), p, rtol=1e-6, atol=1e-8)


def test_logit_form_and_count_strength() -> None:
    z, y, p, _ = _random(3)
    zp = torch.logit(p)
    torch.testing.assert_close(mp_logit_loss(torch.zeros_like(z), y, zp), bce(zp, y))
    counts = torch.tensor([[0, 0], [20, 20], [1_000_000, 1_000_000]])
    lam = count_strength(2.0, counts, n0=20.0)
    torch.testing.assert_close(lam, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_distillation_at_t1_is_the_posterior_model_prior() -> None:
    """Logit distillation (T=1, weight w) and the posterior-label MP (λ=w) are the same loss."""
    for seed in range(5):
        z, y, p, lam = _random(seed)
        zp = torch.logit(p)
        v1, g1 = _grad(lambda z: distill_loss(z, y, zp, weight=lam, temperature=1.0), z)
        v2, g2 = _grad(lambda z: mp_posterior_loss(z, y, zp, lam), z)
        torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
        _, g3 = _grad(lambda z: distill_loss(z, y, zp, weight=lam, temperature=2.0), z)
        assert float((g3 - g2).abs().max()) > 1e-6
