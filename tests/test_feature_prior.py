"""Feature Prior: per-value click estimates converge to the empirical CTR; rare values shrink."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ctr import BetaPriorTable, CTRConfig, CTRLearner, FieldConfig, RawBatch, iter_batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stream(seed: int = 0):
    """10 frequent values with known CTRs (exact click counts) + 10 rare values (3 impressions)."""
    rng = np.random.default_rng(seed)
    freq_ctr = np.linspace(0.05, 0.5, 10)
    vals, labels = [], []
    for i, p in enumerate(freq_ctr):
        n = 1000
        y = np.zeros(n)
        y[: int(round(p * n))] = 1
        vals += [f"f{i}"] * n
        labels.append(y)
    for i in range(10):  # rare: all clicked (empirical CTR 1.0) or none clicked (0.0)
        vals += [f"r{i}"] * 3
        labels.append(np.full(3, 1.0 if i % 2 == 0 else 0.0))
    vals = np.array(vals, dtype=object)
    y = np.concatenate(labels).astype(np.float32)
    order = rng.permutation(len(y))
    vals, y = vals[order], y[order]
    n = len(y)
    raw = RawBatch({"v": vals}, np.zeros((n, 0), np.float32), y, np.arange(n, dtype=float), np.arange(n))
    return raw, freq_ctr


def test_learned_prior_converges_and_shrinks() -> None:
    raw, freq_ctr = _stream()
    cfg = CTRConfig(fields=[FieldConfig("v", capacity=64)], fp="learned", fp_use="input", fp_lr=0.2,
                    fp_weight=1.0, fp_shrink=10.0, embedding_dim=4, hidden=(8,))
    learner = CTRLearner(cfg)
    learner.train_window(iter_batches(raw, 256), epochs=8, shuffle_seed=1)
    fp = learner.net.feature_prior
    m = learner.mappers[0]
    field_mean = float(torch.sigmoid(fp.field_mean[0]).detach())  # the shrinkage target m_f
    est_f = fp.estimate(0, m.lookup(np.array([f"f{i}" for i in range(10)], dtype=object)))
    # frequent values: the estimate is the empirical CTR
    np.testing.assert_allclose(est_f, freq_ctr, atol=0.03)
    # rare values: pulled toward the field mean, far from their empirical 0 / 1
    est_r = fp.estimate(0, m.lookup(np.array([f"r{i}" for i in range(10)], dtype=object)))
    emp_r = np.array([1.0 if i % 2 == 0 else 0.0 for i in range(10)])
    assert np.all(np.abs(est_r - field_mean) < 0.5 * np.abs(emp_r - field_mean)), (est_r, field_mean)
    # sanity: the shrinkage is what does it (without it, rare values move further from the mean)
    learner2 = CTRLearner(CTRConfig(**{**cfg.__dict__, "fp_shrink": 0.0}))
    learner2.train_window(iter_batches(raw, 256), epochs=8, shuffle_seed=1)
    m2 = float(torch.sigmoid(learner2.net.feature_prior.field_mean[0]).detach())
    est_r2 = learner2.net.feature_prior.estimate(0, learner2.mappers[0].lookup(np.array([f"r{i}" for i in range(10)], dtype=object)))
    assert np.abs(est_r2 - m2).mean() > np.abs(est_r - field_mean).mean() + 0.01


def test_beta_table_exact_posterior_means() -> None:
    raw, freq_ctr = _stream()
    t = BetaPriorTable(strength=20.0)
    for b in iter_batches(raw, 500):  # streamed per occurrence
        t.update(b.cats["v"], b.labels)
    m = float(raw.labels.mean())
    assert t.field_mean() == pytest.approx((raw.labels.sum() + 0.05) / (len(raw) + 1.0))
    m = t.field_mean()
    a, b_ = 20.0 * m, 20.0 * (1 - m)
    vals = np.array([f"f{i}" for i in range(10)] + [f"r{i}" for i in range(10)], dtype=object)
    clicks = np.array([round(p * 1000) for p in freq_ctr] + [3 if i % 2 == 0 else 0 for i in range(10)], float)
    imps = np.array([1000] * 10 + [3] * 10, float)
    np.testing.assert_allclose(t.estimate(vals), (clicks + a) / (imps + a + b_), rtol=1e-12)
    # frequent -> empirical, rare -> near the field mean
    np.testing.assert_allclose(t.estimate(vals[:10]), freq_ctr, atol=0.01)
    emp_r = clicks[10:] / 3
    assert np.all(np.abs(t.estimate(vals[10:]) - m) < 0.2 * np.abs(emp_r - m))
    # unseen value -> field mean; aggregated updates give the same result as per-occurrence ones
    assert t.estimate(np.array(["never"], dtype=object))[0] == pytest.approx(m)
    t2 = BetaPriorTable(strength=20.0)
    t2.update(vals, clicks, imps)
    np.testing.assert_allclose(t2.estimate(vals), t.estimate(vals), rtol=1e-12)


def test_beta_table_state_roundtrip_and_decay() -> None:
    t = BetaPriorTable(strength=10.0)
    t.update(np.array(["a", "b", 3, None], dtype=object), np.array([1, 0, 1, 0]), np.array([4, 2, 1, 5]))
    t2 = BetaPriorTable(strength=1.0)
    t2.load_state_dict(t.state_dict())
    q = np.array(["a", "b", 3, None, "z"], dtype=object)
    np.testing.assert_allclose(t2.estimate(q), t.estimate(q))
    c0, n0 = t.counts(q)
    t.decay(0.5)
    c1, n1 = t.counts(q)
    np.testing.assert_allclose(c1, c0 * 0.5)
    np.testing.assert_allclose(n1, n0 * 0.5)
    assert t.validate() == []
