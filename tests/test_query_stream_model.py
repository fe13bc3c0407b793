"""The query classifier's stream side, pure: decayed click statistics and the StreamModel
(learn / score / predict / state) on windows of query snapshots from the synthetic world."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from core.world import DriftConfig, World, WorldConfig
from models.query.encoder import HashFeatures
from models.query.stats import QueryClickStats, StatsConfig
from models.query.stream import QueryStreamConfig, QueryStreamModel
from models.stream_model import gate_decision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_records():
    w = World(WorldConfig(n_users=500, drift=DriftConfig.none()))
    return w, w.to_examples_frame(duration_s=900, requests_per_s=8).to_dict("records")


def snapshots(stats: QueryClickStats, records) -> list[dict]:
    return [stats.snapshot(q) for q in sorted(stats.add_many(records))]


def model(**over) -> QueryStreamModel:
    cfg = QueryStreamConfig(encoder={"kind": "adapter", "features": "hash", "features_dim": 256, "hidden": 64},
                            finetune_steps=over.pop("finetune_steps", 15), **over)
    return QueryStreamModel(cfg)


# ---- statistics -------------------------------------------------------------------------------
def test_incremental_equals_batch_and_decay_is_monotone(world_records):
    _, recs = world_records
    recs = recs[:3000]
    one = QueryClickStats(StatsConfig(half_life_s=300))
    one.add_many(recs)
    many = QueryClickStats(StatsConfig(half_life_s=300))
    shuffled = list(recs)
    rng = random.Random(3)
    chunks, i = [], 0
    while i < len(shuffled):
        k = rng.randint(1, 400)
        chunks.append(shuffled[i:i + k])
        i += k
    for c in chunks:
        rng.shuffle(c)  # out of order inside a micro-batch: late events are decayed, not lost
        many.add_many(c)
    t = max(r["event_time"] for r in recs)
    for q in list(one._q)[:50]:
        a, b = one.counts_at(q, t), many.counts_at(q, t)
        for kind in ("clicks", "impressions"):
            assert set(a[kind]) == set(b[kind])
            for k in a[kind]:
                assert a[kind][k] == pytest.approx(b[kind][k], rel=1e-9, abs=1e-12)
    q = next(iter(one._q))
    c0 = sum(one.counts_at(q, t)["impressions"].values())
    c1 = sum(one.counts_at(q, t + 300)["impressions"].values())
    assert c1 == pytest.approx(c0 / 2) and c1 < c0


def test_labels_and_knowledge():
    s = QueryClickStats(StatsConfig(label_share=0.3, top_k=2))
    for i in range(8):
        s.add({"query": "tents", "category": "outdoor/tents", "clicked": 1, "bidword": "buy tents", "event_time": 100.0 + i})
    s.add({"query": "tents", "category": "outdoor/backpacks", "clicked": 1, "bidword": "backpacks", "event_time": 110.0})
    s.add({"query": "tents", "category": "home/rugs", "clicked": 0, "event_time": 111.0})
    assert s.add({"query": "", "category": "x", "event_time": 1.0}) is None
    assert s.add({"query": "x", "category": "x", "event_time": float("nan")}) is None
    assert list(s.labels("tents")) == ["outdoor/tents"]
    assert s.knowledge("tents") == ["tents", "backpacks", "buy tents"]
    snap = s.snapshot("tents")
    assert snap["clicks"] > 8.9 and snap["impressions"] > snap["clicks"]
    again = QueryClickStats.from_state(s.state())
    assert again.snapshot("tents") == snap


# ---- the StreamModel --------------------------------------------------------------------------
def test_learns_the_world_and_round_trips(world_records):
    w, recs = world_records
    stats, m = QueryClickStats(), model()
    for k in range(3):
        m.learn(snapshots(stats, recs[k * len(recs) // 3:(k + 1) * len(recs) // 3]))
    gold = {q.text: q.category for q in w.queries}
    qs = [q for q in m.buffer][:80]
    top = [p[0][0] for p in m.predict(qs)]
    acc = np.mean([t == gold[q] for t, q in zip(top, qs)])
    assert acc > 0.7, acc
    again = QueryStreamModel.from_state(m.state())
    assert again.predict(qs[:20] + ["never seen query"]) == m.predict(qs[:20] + ["never seen query"])
    again.warm()
    assert m.predict(["", "   ", None, 42]) == [[], [], [], []]


def test_a_moved_query_follows_the_fresh_clicks(world_records):
    w, recs = world_records
    m = model()
    stats = QueryClickStats(StatsConfig(half_life_s=120))
    m.learn(snapshots(stats, recs[: len(recs) // 2]))
    gold = {q.text: q.category for q in w.queries}
    q = next(q for q in m.buffer if gold[q].startswith("outdoor/") and m.predict([q])[0][0][0] == gold[q])
    t = max(r["event_time"] for r in recs[: len(recs) // 2])
    moved = [{"query": q, "category": "home/sofas", "clicked": 1, "bidword": "leather sofas", "event_time": t + i}
             for i in range(1, 40)]
    m.learn(snapshots(stats, moved))
    assert m.predict([q])[0][0][0] == "home/sofas"
    assert m.predict(["leather sofas"])[0][0][0] == "home/sofas"


def test_a_new_category_is_predictable_at_once_through_its_name(world_records):
    w, recs = world_records
    stats = QueryClickStats()
    m = model(finetune_every=0)  # no training at all: only the label node, its name and the graphs
    m.learn(snapshots(stats, recs[:2000]))
    assert "kitchen/espresso-machines" not in m.labels
    t = max(r["event_time"] for r in recs[:2000])
    m.learn([{"query": "espresso machine", "labels": {"kitchen/espresso-machines": 1.0}, "clicks": 3.0,
              "impressions": 10.0, "knowledge": [], "event_time": t + 1}])
    assert "kitchen/espresso-machines" in m.labels
    probs = m._proba(["espresso machines", "cheap espresso machines"])
    j = m.labels.index("kitchen/espresso-machines")
    assert all(int(np.argmax(p)) == j for p in probs)


def test_a_poisoned_window_is_rejected_by_the_gate(world_records):
    w, recs = world_records
    stats = QueryClickStats()
    n = len(recs)
    m = model(finetune_steps=40)
    m.learn(snapshots(stats, recs[: n // 2]))
    serving = QueryStreamModel.from_state(m.state())
    clean = snapshots(stats, recs[n // 2: 3 * n // 4])
    labels = [s["labels"] for s in clean]
    random.Random(0).shuffle(labels)
    poisoned = [dict(s, labels=ls, knowledge=list(reversed(s["knowledge"]))) for s, ls in zip(clean, labels)]
    m.learn(poisoned)
    held_out = snapshots(stats, recs[3 * n // 4:])
    cand, serv = m.score(held_out), serving.score(held_out)
    ok, why = gate_decision(cand, serv, m.gate)
    assert not ok, (cand, serv, why)
    assert math.isfinite(cand["f1"]) and cand["f1"] < serv["f1"] - 0.02
