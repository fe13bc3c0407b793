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


def _raw(cats: dict, y: np.ndarray, t0: float = 0.0, i0: int = 0) -> RawBatch:
    n = len(y)
    return RawBatch({k: np.asarray(v, dtype=object) for k, v in cats.items()}, np.zeros((n, 0), np.float32),
                    y.astype(np.float32), t0 + np.arange(n, dtype=float), i0 + np.arange(n))


def test_count_prior_never_sees_the_labels_of_its_own_batch() -> None:
    """A leakage trap: ``imp`` is unique per example, so its count-prior input could only tell the
    label if the batch's own labels were fed to the prior before the batch was encoded. The prior
    inputs the network trains on must carry no information about the label (AUC ≈ 0.5); with the
    feed-then-encode order they separate the classes perfectly."""
    from models.ctr import auc

    rng = np.random.default_rng(0)
    n = 4096
    y = (rng.random(n) < 0.3).astype(np.float32)
    raw = _raw({"imp": [f"i{k}" for k in range(n)], "ad": rng.integers(0, 20, n)}, y)
    cfg = CTRConfig(fields=[FieldConfig("imp", 8192), FieldConfig("ad", 64)], fp="count", fp_strength=2.0,
                    embedding_dim=4, hidden=(8,))
    learner = CTRLearner(cfg)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    step = learner._step

    def spy(inp, z_prev, lam):
        seen.append((inp.prior_counts[:, 0].numpy().copy(), inp.labels.numpy().copy()))
        return step(inp, z_prev, lam)

    learner._step = spy  # type: ignore[method-assign]
    learner.train_window(iter_batches(raw, 256))
    u = np.concatenate([s[0] for s in seen])
    lab = np.concatenate([s[1] for s in seen])
    assert abs(auc(lab, u) - 0.5) < 0.05, auc(lab, u)
    # the trap is live: the same statistics fed before encoding reveal every label
    t = learner.count_prior
    assert auc(lab, t.logits(np.stack([learner.mappers[0].lookup(raw.cats["imp"]), learner.mappers[1].lookup(raw.cats["ad"])], 1))[:, 0]) > 0.99


def test_count_prior_is_bounded_by_id_expiry() -> None:
    """The count table lives in the mappers' row space: its size is the table capacity, and a
    recycled row forgets its previous owner's clicks, exactly like the embedding row."""
    cfg = CTRConfig(fields=[FieldConfig("ad", 3, ttl=10.0)], fp="count", fp_strength=1.0, embedding_dim=4, hidden=(8,))
    learner = CTRLearner(cfg)
    learner.train_window([_raw({"ad": ["a"] * 50 + ["b"] * 50}, np.r_[np.ones(50), np.zeros(50)])])
    t = learner.count_prior
    assert [len(c) for c in t.clicks] == [3]  # the table never grows beyond the capacity
    rows_ab = learner.mappers[0].lookup(np.array(["a", "b"], dtype=object))
    assert t.logits(rows_ab[:1, None], centred=True)[0, 0] > 2.0  # "a": 50 clicks out of 50
    assert t.imps[0][rows_ab].tolist() == [50.0, 50.0]
    # 200 s later "c" arrives: "a" and "b" expire, "c" takes a recycled row, with empty counts
    later = _raw({"ad": ["c"]}, np.zeros(1), t0=200.0, i0=100)
    inp, n_reset = learner.encode(later, train=True)
    row_c = int(inp.rows[0, 0])
    assert learner.mappers[0].stats().evicted_total == 2 and row_c in rows_ab.tolist()
    assert n_reset >= 1 and t.imps[0][row_c] == 0.0 and t.clicks[0][row_c] == 0.0
    assert float(inp.prior_counts[0, 0]) == pytest.approx(0.0, abs=1e-6)  # the field mean: no evidence


def test_learned_prior_checkpoint_keeps_its_optimizer_state() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    ads = rng.integers(0, 50, n)
    y = (rng.random(n) < 0.05 + 0.4 * (ads % 5 == 0)).astype(np.float32)
    raw = _raw({"ad": ads}, y)
    cfg = CTRConfig(fields=[FieldConfig("ad", 64)], fp="learned", fp_use="both", embedding_dim=4, hidden=(8,),
                    mp="posterior", mp_lambda_mode="evidence", mp_adapt="pv", first_order=True)
    a = CTRLearner(cfg)
    a.train_window(iter_batches(raw.slice(0, 1000), 128))
    a.train_window(iter_batches(raw.slice(1000, 2000), 128))
    b = CTRLearner(cfg)
    b.load_state_dict(a.state_dict())
    for opt_a, opt_b in ((a.fp_opt, b.fp_opt), (a.lin_opt, b.lin_opt)):
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert torch.equal(sa[k]["sum"], sb[k]["sum"]) and float(sa[k]["sum"].abs().sum()) > 0
    # training on from the checkpoint is training on from the live learner
    a.train_window(iter_batches(raw.slice(2000, 3000), 128))
    b.train_window(iter_batches(raw.slice(2000, 3000), 128))
    probe = raw.slice(0, 200)
    np.testing.assert_allclose(a.predict(probe), b.predict(probe), rtol=0, atol=1e-6)
    assert a.mp_scales == b.mp_scales


def test_priors_start_from_the_data_ctr() -> None:
    """The output bias and the learned prior's field means start at the logit of the first
    window's CTR, not at a constant."""
    y = np.r_[np.ones(30), np.zeros(970)]
    raw = _raw({"ad": np.arange(1000) % 7}, y)
    cfg = CTRConfig(fields=[FieldConfig("ad", 16)], fp="learned", embedding_dim=4, hidden=(8,),
                    dense_lr=1e-12, fp_lr=1e-12, emb_lr=1e-12)
    learner = CTRLearner(cfg)
    learner.train_window([raw])
    z0 = np.log(30.5 / 970.5)
    assert float(learner.net.bias) == pytest.approx(z0, abs=1e-4)
    np.testing.assert_allclose(learner.net.feature_prior.field_mean.detach().numpy(), z0, atol=1e-4)
    off = CTRLearner(CTRConfig(**{**cfg.__dict__, "init_from_data": False}))
    off.train_window([raw])
    assert float(off.net.bias) == pytest.approx(0.0, abs=1e-4)


def test_window_update_holds_the_window_back_until_it_ends() -> None:
    """fp_update="window": within a window every prior input comes from earlier windows only; the
    window's counts arrive when it ends (the default "batch" feeds them after each step)."""
    rng = np.random.default_rng(2)
    ads = rng.integers(0, 5, 1000)
    y = (rng.random(1000) < np.where(ads == 0, 0.9, 0.1)).astype(np.float32)
    raw = _raw({"ad": ads}, y)
    seen: dict[str, list[np.ndarray]] = {}
    for mode in ("window", "batch"):
        cfg = CTRConfig(fields=[FieldConfig("ad", 16)], fp="count", fp_update=mode, embedding_dim=4, hidden=(8,))
        learner = CTRLearner(cfg)
        step = learner._step
        got: list[np.ndarray] = []

        def spy(inp, z_prev, lam, got=got, step=step):
            got.append(inp.prior_counts.numpy().copy())
            return step(inp, z_prev, lam)

        learner._step = spy  # type: ignore[method-assign]
        learner.train_window(iter_batches(raw.slice(0, 500), 100))
        learner.train_window(iter_batches(raw.slice(500, 1000), 100))
        assert learner.count_prior.imps[0].sum() == 1000
        seen[mode] = got
    assert all(np.abs(u).max() == 0.0 for u in seen["window"][:5])  # nothing before the first window ends
    # the second window reads the first window's counts, frozen for the whole window: one value per ad
    second = np.concatenate(seen["window"][5:])[:, 0]
    assert np.abs(second).max() > 1.0 and len(np.unique(second)) <= 5
    assert np.abs(seen["batch"][1]).max() > 0.5  # batch mode: the first batch's labels already count
    assert len(np.unique(np.concatenate(seen["batch"][5:])[:, 0])) > 5
