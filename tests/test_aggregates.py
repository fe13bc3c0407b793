"""Unit tests of the pure streaming aggregates (features.aggregates)."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest

from core.events import Click, Impression
from features.aggregates import (
    FIELD_KEY,
    AggregateState,
    feature_schema,
    half_life_tag,
    prior_mean,
    smoothed_ctr,
)

HL = [60.0, 3600.0]
T0 = 1_700_000_000.0


def imp(i: int, t: float, user: str = "u1", ad: str = "a1", category: str = "c1") -> Impression:
    return Impression(request_id=f"r{i}", event_time=t, user_id=user, query="q1", ad_id=ad,
                      creative_id=f"{ad}-cr", bidword="bw1", category=category, position=0, bid=1.0)


def click(i: int, t: float, user: str = "u1", ad: str = "a1", creative: str = "") -> Click:
    return Click(request_id=f"r{i}", event_time=t, ad_id=ad, user_id=user, creative_id=creative)


def events(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = T0 + rng.uniform(0, 7200)
        u, a = f"u{rng.randrange(5)}", f"a{rng.randrange(7)}"
        out.append(imp(i, t, u, a))
        if rng.random() < 0.2:
            out.append(click(i, t + rng.uniform(1, 60), u, a, creative=f"{a}-cr"))
    return out


def fold(evts) -> AggregateState:
    s = AggregateState(HL)
    for e in evts:
        (s.apply_click if isinstance(e, Click) else s.apply_impression)(e)
    return s


def test_half_life_tags():
    assert [half_life_tag(h) for h in (3600, 86400, 604800, 60, 90, 1.5)] == ["1h", "1d", "7d", "1m", "90s", "1p5s"]


def test_counts_recency_and_decay_against_direct_formula():
    times = [T0, T0 + 30, T0 + 100]
    s = AggregateState(HL)
    for i, t in enumerate(times):
        s.apply_impression(imp(i, t))
    s.apply_click(click(9, T0 + 50))
    row = s.row_values("ad", "a1")
    t_ref = T0 + 100
    assert row["impressions"] == 3 and row["clicks"] == 1
    for h in HL:
        tag = half_life_tag(h)
        assert row[f"imp_{tag}"] == pytest.approx(sum(2 ** (-(t_ref - t) / h) for t in times), rel=1e-12)
        assert row[f"clk_{tag}"] == pytest.approx(2 ** (-(t_ref - (T0 + 50)) / h), rel=1e-12)
    assert row["last_impression_time"] == t_ref and row["last_click_time"] == T0 + 50
    assert row["imp_age_s"] == 0.0 and row["click_age_s"] == 50.0 and row["event_time"] == t_ref


def test_click_with_unknown_entities_skips_them():
    s = AggregateState(HL)
    s.apply_click(click(1, T0))  # creative, query, bidword, category unknown
    assert s.row_values("ad", "a1")["clicks"] == 1
    assert s.row_values("user", "u1")["clicks"] == 1
    assert s.rows["creative"] == {} and s.rows["category"] == {}
    assert s.row_values("creative", "") is None


def test_field_row_aggregates_all_keys():
    s = fold(events(200))
    for etype in ("user", "ad"):
        rows = {k: v for k, v in s.rows[etype].items() if k != FIELD_KEY}
        field = s.row_values(etype, FIELD_KEY)
        assert field["impressions"] == sum(r.impressions for r in rows.values())
        assert field["clicks"] == sum(r.clicks for r in rows.values())


def test_out_of_order_and_partition_order_give_the_same_rows():
    evts = events(400, seed=3)
    a = fold(sorted(evts, key=lambda e: e.event_time)).all_rows()
    shuffled = list(evts)
    random.Random(7).shuffle(shuffled)
    b = fold(shuffled).all_rows()
    # "partitions": round-robin split consumed one partition after the other
    parts = [evts[i::3] for i in range(3)]
    c = fold([e for p in reversed(parts) for e in p]).all_rows()
    for other in (b, c):
        assert a.keys() == other.keys()
        for etype in a:
            assert a[etype].keys() == other[etype].keys()
            for col, vals in a[etype].items():
                if isinstance(vals[0], float):
                    assert other[etype][col] == pytest.approx(vals, rel=1e-9, abs=1e-12), col
                else:
                    assert other[etype][col] == vals, col


def test_late_event_does_not_move_time_backwards():
    s = AggregateState(HL)
    s.apply_impression(imp(1, T0 + 100))
    s.apply_impression(imp(2, T0))  # late by 100 s
    row = s.row_values("user", "u1")
    assert row["event_time"] == T0 + 100 and row["last_impression_time"] == T0 + 100
    assert row["imp_1m"] == pytest.approx(1 + 2 ** (-100 / 60))


def test_dirty_rows_columns_and_clearing():
    s = AggregateState(HL)
    s.apply_impression(imp(1, T0, user="u2", ad="a9"))
    rows = s.dirty_rows()
    assert set(rows) == {"user", "ad", "creative", "query", "bidword", "category"}
    names = [n for n, _ in feature_schema(HL)]
    assert list(rows["ad"]) == ["ad_id", *names]
    assert rows["ad"]["ad_id"] == [FIELD_KEY, "a9"]
    assert not s.has_dirty() and s.dirty_rows() == {}
    s.apply_click(click(2, T0 + 1, user="u2", ad="a9"))
    assert set(s.dirty_rows()) == {"user", "ad"}


def test_snapshot_restore_roundtrip_json_and_pickle():
    s = fold(events(100, seed=5))
    s.apply_impression(imp(999, T0 + 1))  # leave something dirty
    snap = s.snapshot()
    for blob in (json.loads(json.dumps(snap)), pickle.loads(pickle.dumps(snap))):
        r = AggregateState.restore(blob)
        assert r.all_rows() == s.all_rows()
        assert r.dirty == s.dirty and r.events_applied == s.events_applied
    # continuing after restore == never having stopped
    more = events(50, seed=6)
    r = AggregateState.restore(pickle.loads(pickle.dumps(snap)))
    for e in more:
        (r.apply_click if isinstance(e, Click) else r.apply_impression)(e)
        (s.apply_click if isinstance(e, Click) else s.apply_impression)(e)
    assert r.all_rows() == s.all_rows()


def test_smoothed_ctr_formula():
    assert smoothed_ctr(0.0, 0.0, 0.05, 20.0) == 0.05
    assert smoothed_ctr(3.0, 10.0, 0.05, 20.0) == pytest.approx((3 + 20 * 0.05) / 30)
    assert prior_mean(2.0, 40.0) == 0.05 and prior_mean(1.0, 0.0) == 0.0
    assert math.isclose(smoothed_ctr(1e6, 1e7, 0.5, 20.0), 0.1, rel_tol=1e-4)


def test_invalid_half_lives():
    with pytest.raises(ValueError):
        AggregateState([])
    with pytest.raises(ValueError):
        AggregateState([0.0])


@pytest.mark.parametrize("shards", [1, 3])
def test_batch_fold_equals_the_per_event_fold(shards):
    """apply_records (numpy, one batch at a time) gives the rows apply_record gives event by event,
    for batches of any size, out-of-order times, repeated keys within a batch, empty keys, and the
    paths mixed; sharded states hold the same rows for the keys they own."""
    rng = random.Random(4)
    evts = events(1500, seed=9)
    rng.shuffle(evts)  # out of event-time order
    recs = [e.to_dict() for e in evts]
    for shard in range(shards):
        ref, got = AggregateState(HL, shard, shards), AggregateState(HL, shard, shards)
        for r in recs:
            ref.apply_record(r)
        i = 0
        while i < len(recs):
            k = rng.choice([1, 2, 7, 64, 500])
            if rng.random() < 0.2:  # the per-event path in between
                for r in recs[i:i + k]:
                    got.apply_record(r)
            else:
                got.apply_records(recs[i:i + k])
            i += k
        assert got.events_applied == ref.events_applied
        a, b = ref.all_rows(), got.all_rows()
        assert a.keys() == b.keys()
        for etype in a:
            assert a[etype].keys() == b[etype].keys()
            for col in a[etype]:
                if isinstance(a[etype][col][0], str) or col in ("impressions", "clicks"):
                    assert a[etype][col] == b[etype][col], (etype, col)
                else:
                    assert b[etype][col] == pytest.approx(a[etype][col], rel=1e-12, abs=1e-9), (etype, col)
        assert ref.dirty_rows().keys() == got.dirty_rows().keys()
