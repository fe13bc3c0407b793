"""Model Prior: the teacher is the model at the start of the window (frozen, never reading rows
admitted or recycled after it), per-example strength from the evidence *before* the window, the
per-window adaptation from progressive validation, the logit chain, and read-only prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ctr import CTRConfig, CTRLearner, FieldConfig, RawBatch, iter_batches
from models.ctr.prior_strength import best_step, pv_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(ads: list[str], labels: np.ndarray | None = None, t0: float = 0.0, i0: int = 0) -> RawBatch:
    n = len(ads)
    y = np.zeros(n, np.float32) if labels is None else labels.astype(np.float32)
    return RawBatch({"ad": np.array(ads, dtype=object)}, np.zeros((n, 0), np.float32), y,
                    t0 + np.arange(n, dtype=float), i0 + np.arange(n))


def _recording(learner: CTRLearner) -> list[tuple]:
    """Replaces ``learner._step`` by a wrapper that records (rows, z_prev, λ) of every step."""
    calls: list[tuple] = []
    step = learner._step

    def wrapped(inp, z_prev, lam):
        calls.append((inp.rows.numpy().copy(), None if z_prev is None else z_prev.clone(),
                      lam.clone() if isinstance(lam, torch.Tensor) else lam))
        return step(inp, z_prev, lam)

    learner._step = wrapped  # type: ignore[method-assign]
    return calls


def _cfg(**kw) -> CTRConfig:
    base = dict(fields=[FieldConfig("ad", 128)], embedding_dim=4, hidden=(8,), mp="posterior", mp_lambda=2.0)
    return CTRConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["evidence", "count"])
def test_strength_is_zero_for_values_first_seen_in_the_window(mode: str) -> None:
    rng = np.random.default_rng(0)
    learner = CTRLearner(_cfg(mp_lambda_mode=mode, mp_count_n0=5.0))
    old = [f"a{i % 4}" for i in range(40)]  # a0..a3, 10 sightings each before the window
    learner.train_window([_batch(old, rng.random(40) < 0.3)])
    calls = _recording(learner)
    # the window: 3 batches; old values once per batch, new values n0..n3 in every batch, so a
    # count that included this window's own sightings would give the new values a prior by batch 2
    win = [_batch([f"a{j}" for j in range(4)] + [f"n{j}" for j in range(4)] * 3, t0=100 + 20 * b, i0=40 + 20 * b)
           for b in range(3)]
    learner.train_window(win)
    assert len(calls) == 3
    key = {int(learner.mappers[0].lookup(np.array([v], dtype=object))[0]): v for v in [*[f"a{j}" for j in range(4)], *[f"n{j}" for j in range(4)]]}
    for rows, z_prev, lam in calls:
        assert z_prev is not None
        for r, l_i in zip(rows[:, 0], lam.numpy()):
            v = key[int(r)]
            if v.startswith("n"):
                assert l_i == 0.0, (v, l_i)  # first seen in this window: no prior
            else:  # 10 sightings before the window, 3 in it
                expect = 2.0 * 10 / 3 if mode == "evidence" else 2.0 * 10 / (10 + 5.0)
                assert l_i == pytest.approx(expect, rel=1e-5), (v, l_i)


def test_teacher_is_frozen_at_the_window_start_even_for_recycled_rows() -> None:
    """ids admitted or recycled during the window never reach the teacher: it predicts exactly
    what a snapshot taken at the window start predicts, and that snapshot stays frozen."""
    cfg = _cfg(fields=[FieldConfig("ad", 6, ttl=50.0)], fp="learned", emb_lr=0.3)
    learner = CTRLearner(cfg)
    rng = np.random.default_rng(1)
    first = [f"a{i % 5}" for i in range(200)]
    learner.train_window([_batch(first, rng.random(200) < np.where(np.arange(200) % 5 == 0, 0.9, 0.1))])
    snap = learner.snapshot()
    probe = _batch(["a0", "a1", "b0", "b1", "zzz"])
    before = snap.predict_logits(probe).copy()
    calls = _recording(learner)
    # 100 s later: every a* is evicted and b* take the recycled rows (a0's old row among them)
    later = [_batch([f"b{i % 5}" for i in range(64)], np.ones(64), i0=200 + 64 * k) for k in range(3)]
    for k, b in enumerate(later):
        b.times[:] = 1000.0 + k
    learner.train_window(later)
    assert learner.mappers[0].stats().evicted_total == 5
    for (rows, z_prev, _), raw in zip(calls, later):
        np.testing.assert_allclose(z_prev.numpy(), snap.predict_logits(raw), rtol=0, atol=1e-6)
    # the teacher of b* is the cold row of the old model, not a0's row that b0 took over
    np.testing.assert_allclose(snap.predict_logits(_batch(["b0"])), snap.predict_logits(_batch(["zzz"])), atol=1e-7)
    # and the snapshot did not move while the learner trained
    np.testing.assert_allclose(snap.predict_logits(probe), before, rtol=0, atol=0)
    assert not np.allclose(learner.predict_logits(probe), before)


def test_predict_changes_no_state() -> None:
    cfg = CTRConfig(fields=[FieldConfig("ad", 64, admission=2), FieldConfig("u", 32, ttl=10.0)], numeric=["x"],
                    embedding_dim=4, hidden=(8,), fp="count", mp="posterior", mp_lambda_mode="evidence", mp_adapt="pv")
    learner = CTRLearner(cfg)
    rng = np.random.default_rng(2)

    def raw(n: int, t0: float, i0: int) -> RawBatch:
        x = rng.normal(size=(n, 1)).astype(np.float32)
        x[::7] = np.nan
        return RawBatch({"ad": rng.integers(0, 30, n).astype(object), "u": np.array([f"u{k}" for k in rng.integers(0, 9, n)], dtype=object)},
                        x, (rng.random(n) < 0.3).astype(np.float32), t0 + np.arange(n, dtype=float), i0 + np.arange(n))

    for w in range(3):
        learner.train_window(iter_batches(raw(300, 100.0 * w, 300 * w), 64))
    before = learner.state_dict()
    new = raw(500, 10_000.0, 5000)  # later event times (would expire rows), unseen ids, NaN numerics
    new.cats["ad"][:50] = "never-seen"
    learner.predict(new)
    learner.predict_logits([{"ad": "x", "u": "u1", "x": 1.0, "event_time": 1e9}])
    after = learner.state_dict()
    _assert_same(before, after)


def _assert_same(a, b, path: str = "state") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


def test_logit_chain_trains_drops_links_and_reloads() -> None:
    rng = np.random.default_rng(3)
    cfg = _cfg(mp="logit", mp_logit_max_chain=2, emb_lr=0.2, dense_lr=0.05)
    learner = CTRLearner(cfg)
    ctr = {f"a{i}": p for i, p in enumerate(np.linspace(0.05, 0.6, 8))}

    def window(w: int) -> list[RawBatch]:
        ads = [f"a{i}" for i in rng.integers(0, 8, 512)]
        y = rng.random(512) < np.array([ctr[a] for a in ads])
        return list(iter_batches(_batch(ads, y, t0=1000.0 * w, i0=512 * w), 128))

    probe = _batch([f"a{i}" for i in range(8)])
    learner.train_window(window(0))
    base = {k: v.clone() for k, v in learner.chain[0].state_dict().items()}
    for w in range(1, 5):
        learner.train_window(window(w))
    assert len(learner.chain) == 2  # capped: the base model and the newest update
    for k, v in learner.chain[0].state_dict().items():  # the base is the one kept
        assert torch.equal(v, base[k]), k
    # it learned: the predictor ranks the ads by their true CTR
    p = learner.predict(probe)
    assert np.corrcoef(p, list(ctr.values()))[0, 1] > 0.9
    # a checkpoint reloads the chain and the live residual: same predictions
    twin = CTRLearner(cfg)
    twin.load_state_dict(learner.state_dict())
    np.testing.assert_allclose(twin.predict(probe), p, rtol=0, atol=1e-7)
    assert len(twin.chain) == 2


def test_best_step_and_pv_scale() -> None:
    rng = np.random.default_rng(4)
    z0 = rng.normal(-1, 1, 20_000)
    d = rng.normal(0, 0.5, 20_000)
    for true_alpha in (0.0, 0.5, 2.0):
        y = (rng.random(20_000) < 1 / (1 + np.exp(-(z0 + true_alpha * d)))).astype(np.float32)
        assert best_step(z0 + d, z0, y) == pytest.approx(true_alpha, abs=0.26)
    # the update was exactly right: the scale stays; too timid: the prior weakens (to 0 at most);
    # too bold: the prior strengthens
    assert pv_scale(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert pv_scale(1.5, 1.0, 1.0) < 1.0
    assert pv_scale(2.0, 1.0, 1.0, gain=1.0) == 0.0  # undamped: the step doubles, no prior left
    assert pv_scale(4.0, 1.0, 1.0) == 0.0  # damped: φ = ½·√4 = 1
    assert 0.0 < pv_scale(2.0, 1.0, 1.0) < pv_scale(1.5, 1.0, 1.0)
    assert pv_scale(0.5, 1.0, 1.0) > 1.0
    assert pv_scale(0.0, 1.0, 1.0) == 8.0
    assert pv_scale(0.25, 0.0, 1.0) == pytest.approx(1.0)  # from fine-tuning back to a prior: φ = √¼


def _periods(seed: int, walk: float, sizes: tuple[int, ...] = (3000,) * 6):
    """200 ads whose CTR logits take a random-walk step of sd ``walk`` at every period boundary."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(-1.5, 1.0, 200)
    out, i = [], 0
    for t, per in enumerate(sizes):
        logit = logit + rng.normal(0, walk, 200) * (t > 0)
        ads = rng.integers(0, 200, per)
        y = rng.random(per) < 1 / (1 + np.exp(-logit[ads]))
        out.append(_batch([f"a{a}" for a in ads], y, t0=i, i0=i))
        i += per
    return out


def _scales(cfg: CTRConfig, periods: list[RawBatch]) -> list[float]:
    learner = CTRLearner(cfg)
    for raw in periods:
        learner.train_window(iter_batches(raw, 256))
    return learner.mp_scales


def test_pv_falls_back_to_finetuning_when_the_prior_holds_learning_back() -> None:
    """Drifting CTRs: the newest window is the best guide to the next one, each update was too
    timid for the data, and the scale drops to 0 (the window is plain fine-tuning). Stationary
    CTRs, well learned from a large first window, then updated boldly (high learning rate, 3
    epochs) on small windows: each update chased noise, and the same rule strengthens the prior."""
    base = dict(mp_lambda=1.0, mp_lambda_mode="const", mp_adapt="pv")
    drift = _scales(_cfg(**base, emb_lr=0.05), _periods(5, walk=0.8))
    assert drift[0] == 1.0 and drift[-1] == 0.0 and drift[-2] == 0.0, drift
    bold = _scales(_cfg(**base, emb_lr=0.5, dense_lr=0.1, epochs=3), _periods(5, walk=0.0, sizes=(20000,) + (400,) * 5))
    assert bold[0] == 1.0 and min(bold[1:]) > 1.0 and max(bold) > 4.0, bold
