"""CTR model: backbones behind one wrapper, id mapper policies, complete checkpoints, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.events import Example
from models.ctr import (
    CTRConfig,
    CTRLearner,
    FieldConfig,
    IdMapper,
    RawBatch,
    auc,
    batched,
    iter_batches,
    logloss,
    raw_from_examples,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _learnable(n: int = 30_000, seed: int = 0) -> RawBatch:
    """Clicks driven by an ad effect, a user×category interaction and a numeric feature."""
    rng = np.random.default_rng(seed)
    ads = rng.integers(0, 300, n)
    users = rng.integers(0, 50, n)
    cats = ads % 7
    a_eff = rng.normal(0, 1, 300)
    inter = rng.normal(0, 1, (50, 7))
    x = rng.normal(size=(n, 1)).astype(np.float32)
    z = -1.5 + a_eff[ads] + inter[users, cats] + 0.5 * x[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
    x[rng.random(n) < 0.05, 0] = np.nan  # missing numeric values are allowed
    cats_d = {"ad": ads.astype(object), "user": np.array([f"u{u}" for u in users], dtype=object), "cat": cats.astype(object)}
    return RawBatch(cats_d, x, y, np.arange(n, dtype=float), np.arange(n))


def _cfg(backbone: str, **kw) -> CTRConfig:
    fields = [FieldConfig("ad", 512), FieldConfig("user", 128, dim=4), FieldConfig("cat", 16)]
    return CTRConfig(fields=fields, numeric=["x"], backbone=backbone, embedding_dim=8, emb_lr=0.1, dense_lr=0.02, **kw)


@pytest.mark.parametrize("backbone", ["deepfm", "dcn"])
def test_same_wrapper_trains_both_backbones(backbone: str) -> None:
    data = _learnable()
    train, test = data.slice(0, 24_000), data.slice(24_000, 30_000)
    learner = CTRLearner(_cfg(backbone))
    p0 = learner.predict(test)
    s = learner.train_window(iter_batches(train, 512), epochs=3, shuffle_seed=0)
    p1 = learner.predict(test)
    assert s.examples == 24_000 and s.epochs == 3
    assert logloss(test.labels, p1) < logloss(test.labels, p0) - 0.05
    assert auc(test.labels, p1) > 0.7
    assert learner.validate_state() == []


def test_checkpoint_is_complete() -> None:
    data = _learnable(8000)
    cfg = _cfg("dcn", fp="count", mp="posterior")
    a = CTRLearner(cfg)
    a.train_window(iter_batches(data.slice(0, 4000), 512))
    b = CTRLearner(cfg)
    b.load_state_dict(a.state_dict())
    nxt = data.slice(4000, 6000)
    np.testing.assert_allclose(a.predict(nxt), b.predict(nxt), rtol=0, atol=1e-7)
    # continuing training from the checkpoint gives the same model (optimizer states restored)
    a.train_window(iter_batches(nxt, 512))
    b.train_window(iter_batches(nxt, 512))
    test = data.slice(6000, 8000)
    np.testing.assert_allclose(a.predict(test), b.predict(test), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        CTRLearner(_cfg("deepfm")).load_state_dict(a.state_dict())


def test_validate_state_catches_nan() -> None:
    learner = CTRLearner(_cfg("deepfm", fp="learned"))
    assert learner.validate_state() == []
    with torch.no_grad():
        learner.net.bias.fill_(float("nan"))
    assert any("bias" in p for p in learner.validate_state())


def test_mapper_admission_expiry_and_counts() -> None:
    m = IdMapper(capacity=4, admission=2, ttl=10.0)
    rows, fresh = m.observe(np.array(["a", "b"], dtype=object), np.array([0.0, 0.0]))
    assert rows.tolist() == [0, 0] and len(fresh) == 0  # both still candidates
    rows, fresh = m.observe(np.array(["a", "c", "c"], dtype=object), np.array([1.0, 1.0, 1.0]))
    assert rows[0] != 0 and rows[1] == rows[2] != 0 and set(fresh) == {rows[0], rows[1]}
    st = m.stats()
    assert st.admitted_total == 2 and st.rows_used == 2 and st.candidates == 1
    assert m.lookup(np.array(["a", "zzz"], dtype=object)).tolist() == [rows[0], 0]
    # "d" takes the last free row; "e" and "f" overflow to the cold row
    m.observe(np.array(["d", "d", "e", "e", "f", "f"], dtype=object), np.full(6, 2.0))
    assert m.stats().overflow_total == 2 and m.stats().fill == 1.0
    # 20 s later everything unused is evicted; "a" comes back and gets a recycled, fresh row
    rows2, fresh2 = m.observe(np.array(["a", "a"], dtype=object), np.array([30.0, 30.0]))
    assert m.stats().evicted_total == 3 and rows2[0] in fresh2 and m.counts[rows2[0]] == 2
    assert m.validate() == []
    m2 = IdMapper(capacity=4, admission=2, ttl=10.0)
    m2.load_state_dict(m.state_dict())
    assert m2.lookup(np.array(["a"], dtype=object)).tolist() == [rows2[0]] and m2.stats() == m.stats()


def test_hash_mapper_is_stable_across_processes() -> None:
    """Rows must not depend on the process (Python's own str hash is salted per process)."""
    import os
    import subprocess
    import sys

    probe = ["x", 5, 5.0, None, "ad-123", "query words"]
    code = ("import numpy as np; from models.ctr import IdMapper; "
            f"print(IdMapper(capacity=101, mode='hash').lookup(np.array({probe!r}, dtype=object)).tolist())")
    outs = set()
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
        outs.add(out.stdout.strip())
    here = IdMapper(capacity=101, mode="hash").lookup(np.array(probe, dtype=object))
    assert outs == {str(here.tolist())} and (here > 0).all()
    assert len(set(here.tolist())) >= 4  # distinct values spread over the table


def test_evicted_rows_are_reset_in_the_model() -> None:
    cfg = CTRConfig(fields=[FieldConfig("ad", 8, admission=1, ttl=5.0)], fp="learned", embedding_dim=4, hidden=(8,), emb_lr=0.5)
    learner = CTRLearner(cfg)
    raw = RawBatch({"ad": np.array(["a"] * 64, dtype=object)}, np.zeros((64, 0), np.float32), np.ones(64, np.float32),
                   np.zeros(64), np.arange(64))
    learner.train_window([raw] * 5)
    row = int(learner.mappers[0].lookup(np.array(["a"], dtype=object))[0])
    state_before = float(learner._emb_states()[0][0][row])
    assert learner.net.feature_prior.delta.weight[row, 0].item() > 0.1 and state_before > 0
    # "b" arrives 100 s later: "a" is evicted and its row recycled for "b", from a clean slate
    learner.net.eval()
    later = RawBatch({"ad": np.array(["b"], dtype=object)}, np.zeros((1, 0), np.float32), np.zeros(1, np.float32),
                     np.array([100.0]), np.array([64]))
    inp, n_reset = learner.encode(later, train=True)
    assert n_reset == 1 and int(inp.rows[0, 0]) == row and learner.mappers[0].stats().evicted_total == 1
    assert float(learner.net.feature_prior.delta.weight[row, 0]) == 0.0
    assert float(learner._emb_states()[0][0][row]) == 0.0
    bound = (1.0 / 8) ** 0.5
    assert float(learner.net.ebc.embedding_bags["t_ad"].weight[row].abs().max()) <= bound
    assert learner.mappers[0].lookup(np.array(["a"], dtype=object)).tolist() == [0]


def test_batching_from_example_dicts() -> None:
    ex = [
        Example(request_id=f"r{i}", event_time=1000.0 + i, user_id=f"u{i % 3}", query="red shoes", ad_id=f"a{i % 5}",
                creative_id="c1", bidword="shoes", category="shoes", position=i % 4, bid=0.5, slot="top",
                domain="search", clicked=i % 2, converted=0, features={"price": 10.0 + i, "brand": "acme"}).to_dict()
        for i in range(40)
    ]
    ex[3]["features"]["price"] = None
    raw = raw_from_examples(ex, numeric=["price", "bid"])
    assert raw.dense.shape == (40, 2) and np.isnan(raw.dense[3, 0]) and raw.labels.sum() == 20
    assert raw.times[0] == 1000.0 and raw.cats["ad_id"][7] == "a2"
    fields = ["user_id", "query", "ad_id", "creative_id", "bidword", "category", "position", "domain", "slot", "brand"]
    cfg = CTRConfig(fields=[FieldConfig(f, 64) for f in fields], numeric=["price", "bid"], embedding_dim=4, hidden=(8,))
    learner = CTRLearner(cfg)
    stats = learner.train_window(batched(ex, 16))
    assert stats.examples == 40 and stats.batches == 3
    p = learner.predict(ex[:5])
    assert p.shape == (5,) and np.all((p > 0) & (p < 1))
    assert stats.mapper["ad_id"]["rows_used"] == 5


def test_metrics_exact() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    # brute force: P(pos > neg) + 0.5 P(tie)
    pos, neg = p[y == 1], p[y == 0]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auc(y, p) == pytest.approx(brute)
    assert np.isnan(auc(np.ones(3), np.ones(3)))
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_small_and_large_lookups_agree():
    """Serving-size batches take a per-value path; it must map exactly like the vectorised one."""
    from models.ctr.hashing import SMALL_LOOKUP

    m = IdMapper(capacity=64)
    vals = np.array(["a", "b", 7, 7.0, np.int64(7), None, float("nan"), "c"], dtype=object)
    m.observe(vals, np.zeros(len(vals)))
    probe = np.array(["a", "zz", 7, np.int64(7), None, float("nan"), "c", 3.5], dtype=object)
    small = m.lookup(probe)
    big = m.lookup(np.concatenate([probe] * (SMALL_LOOKUP // len(probe) + 1)))[: len(probe)]
    assert small.tolist() == big.tolist()
    assert small[1] == 0 and small[0] != 0 and small[4] == small[5] != 0
