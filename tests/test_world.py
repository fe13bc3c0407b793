"""The synthetic world: determinism, ground truth, drift, event-stream invariants."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from core.errors import ConfigError
from core.events import BidwordChange, Click, Conversion, Impression, decode, encode
from core.world import DriftConfig, World, WorldConfig, example_columns, generate_examples

HORIZON = 2400.0  # event-time span of the shared log; drift times scale with it


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=11, drift=DriftConfig(horizon_s=HORIZON)))


@pytest.fixture(scope="module")
def frame(world: World):
    # ~96k labelled impressions
    return world.to_examples_frame(duration_s=HORIZON, requests_per_s=10.0, slots=4, seed=3)


@pytest.fixture(scope="module")
def stream(world: World) -> list:
    return list(world.generate(duration_s=600.0, requests_per_s=10.0, seed=5))


def _z(clicks: float, expected: float) -> float:
    """Standard score of a click count against the sum of its Bernoulli probabilities."""
    return abs(clicks - expected) / math.sqrt(max(expected, 1.0))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_stream():
    a = b"\n".join(encode(e) for e in World(WorldConfig(seed=3)).generate(duration_s=120, seed=9))
    b = b"\n".join(encode(e) for e in World(WorldConfig(seed=3)).generate(duration_s=120, seed=9))
    assert a == b and len(a) > 10_000


def test_different_seeds_differ():
    w = World(WorldConfig(seed=3))
    a = [encode(e) for e in w.generate(duration_s=60, seed=1)]
    b = [encode(e) for e in w.generate(duration_s=60, seed=2)]
    assert a != b
    assert World(WorldConfig(seed=4)).ads[0] != w.ads[0]


def test_request_ids_are_deterministic(stream):
    rids = [e.request_id for e in stream if isinstance(e, Impression)]
    assert rids[0] == "r5-0"
    assert all(r.startswith("r5-") for r in rids)


# ---------------------------------------------------------------- stream invariants


def test_events_are_valid_and_in_event_time_order(stream):
    times = [e.event_time for e in stream]
    assert all(a <= b for a, b in zip(times, times[1:]))
    kinds = Counter(type(e) for e in stream)
    assert kinds[Impression] > 20_000 and kinds[Click] > 100 and kinds[Conversion] > 5
    for e in stream[:5000] + [e for e in stream if not isinstance(e, Impression)][:2000]:
        assert decode(encode(e)) == e


def test_clicks_follow_a_real_impression_and_conversions_a_click(stream):
    shown = {}
    clicked = {}
    for e in stream:
        if isinstance(e, Impression):
            shown[(e.request_id, e.ad_id)] = e
        elif isinstance(e, Click):
            imp = shown.get((e.request_id, e.ad_id))
            assert imp is not None, f"click {e.request_id}/{e.ad_id} before or without its impression"
            assert e.event_time > imp.event_time
            assert (e.creative_id, e.user_id, e.query, e.bidword, e.category) == (
                imp.creative_id, imp.user_id, imp.query, imp.bidword, imp.category)
            clicked[(e.request_id, e.ad_id)] = e
        elif isinstance(e, Conversion):
            c = clicked.get((e.request_id, e.ad_id))
            assert c is not None and e.event_time > c.event_time and e.value > 0


def test_impressions_of_a_request_fill_distinct_positions(stream):
    by_req: dict[str, list[Impression]] = {}
    for e in stream:
        if isinstance(e, Impression):
            by_req.setdefault(e.request_id, []).append(e)
    for imps in by_req.values():
        assert [i.position for i in imps] == list(range(len(imps)))
        assert len({i.ad_id for i in imps}) == len(imps)
        assert len({(i.user_id, i.query, i.event_time) for i in imps}) == 1
        assert all(i.slot == ("top" if i.position < 2 else "side") for i in imps)


def test_frame_rows_are_the_generated_impressions(world):
    imps = [e for e in world.generate(duration_s=200, seed=8, inventory_events=False)
            if isinstance(e, Impression)]
    df = world.to_examples_frame(duration_s=200, seed=8)
    assert len(df) == len(imps)
    assert df["request_id"].tolist() == [i.request_id for i in imps]
    assert df["ad_id"].tolist() == [i.ad_id for i in imps]
    assert df["creative_id"].tolist() == [i.creative_id for i in imps]
    assert df["event_time"].tolist() == [i.event_time for i in imps]
    cols = example_columns()
    for c in [cols["time_col"], cols["label_col"], *cols["categorical"], *cols["numeric"], "true_ctr"]:
        assert c in df.columns
    assert set(df["clicked"].unique()) <= {0, 1}


# ---------------------------------------------------------------- ground truth


def test_empirical_ctr_matches_true_ctr_per_position(frame):
    for pos, g in frame.groupby("position"):
        assert len(g) > 10_000
        z = _z(g["clicked"].sum(), g["true_ctr"].sum())
        assert z < 4.5, f"position {pos}: {g['clicked'].mean():.4f} vs true {g['true_ctr'].mean():.4f}"
    by_pos = frame.groupby("position")["clicked"].mean()
    assert by_pos.iloc[0] > 1.5 * by_pos.iloc[-1]  # position bias is visible


def test_empirical_ctr_matches_true_ctr_per_match_type(frame):
    rates = {}
    for m, g in frame.groupby("match"):
        z = _z(g["clicked"].sum(), g["true_ctr"].sum())
        assert z < 4.5, f"match {m}: {g['clicked'].mean():.4f} vs true {g['true_ctr'].mean():.4f}"
        rates[m] = g["clicked"].mean()
    assert {"exact", "broad", "related", "explore"} <= set(rates)
    # relevant ads are clicked more than off-topic ones
    assert rates["exact"] > 2 * rates["explore"] and rates["broad"] > rates["related"] > rates["explore"]


def test_true_ctr_components(world):
    u, a = world.users[0], world.ads[0]
    same_leaf = next(q for q in world.queries if q.category == a.category)
    other = next(q for q in world.queries if world.top_of(q.category) != world.top_of(a.category))
    t = world.config.epoch
    cr = a.creatives[0]
    p = world.true_ctr(u.id, same_leaf.text, a.id, cr.id, 0, t)
    assert 0 < p < 1
    assert world.true_ctr(u, other, a, cr, 0, t) < p
    assert world.click_prob(u, same_leaf, a, cr, 3, t) == pytest.approx(p * world.position_bias(3))
    assert [world.position_bias(i) for i in range(4)] == sorted((world.position_bias(i) for i in range(4)),
                                                                   reverse=True)
    best = world.best_creative(a)
    assert world.true_ctr(u, same_leaf, a, best, 0, t) >= max(
        world.true_ctr(u, same_leaf, a, c, 0, t) for c in a.creatives)
    assert 0 < world.conversion_prob(u, a) < 1
    logit = (world.config.base_logit + u.preference[world.tops.index(world.top_of(a.category))]
             + world.config.rel_same_leaf + a.quality + cr.quality)
    assert world.drift_shift(a, t) == 0.0  # nothing drifts at the epoch
    assert p == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-9)


def test_public_simulator_api(world):
    rng = random.Random(0)
    t = world.config.epoch + 10
    seen = Counter()
    for _ in range(2000):
        req = world.sample_request(rng, t)
        seen[req.query] += 1
        cands = world.candidates(req.query, t)
        assert cands, f"no candidates for {req.query!r}"
        assert {c.match for c in cands} <= {"exact", "broad", "category", "related"}
        assert all(world.ad_by_id[c.ad_id].active_from <= t for c in cands)
        c = cands[0]
        ad = world.ad_by_id[c.ad_id]
        assert 0 < world.click_prob(req.user_id, req.query, c.ad_id, ad.creatives[0].id, 0, t) < 1
    assert len(seen) > 50  # queries are varied


# ---------------------------------------------------------------- drift


def _before_after(frame, t_split: float, mask):
    g = frame[mask]
    b, a = g[g["event_time"] < t_split], g[g["event_time"] >= t_split]
    return b, a


def test_abrupt_drift_changes_ctr_of_drifted_categories_only(world, frame):
    seg = next(s for s in world.drifted_segments() if s.kind == "abrupt")
    for cat, shift in zip(seg.ids, seg.shifts):
        b, a = _before_after(frame, seg.start, frame["category"] == cat)
        assert len(b) > 1000 and len(a) > 1000
        # the truth moved in the announced direction ...
        assert np.sign(a["true_ctr"].mean() - b["true_ctr"].mean()) == np.sign(shift)
        # ... and so did the observed clicks, while staying calibrated on each side
        cb, ca = b["clicked"].mean(), a["clicked"].mean()
        assert (ca > 1.5 * cb) if shift > 0 else (cb > 1.5 * ca), (cat, cb, ca)
        assert _z(a["clicked"].sum(), a["true_ctr"].sum()) < 4.5
    stable = set(world.stable_categories())
    assert stable and not stable & set(seg.ids)
    b, a = _before_after(frame, seg.start, frame["category"].isin(stable))
    assert abs(a["clicked"].mean() / b["clicked"].mean() - 1) < 0.15
    assert abs(a["true_ctr"].mean() / b["true_ctr"].mean() - 1) < 0.1


def test_stable_categories_never_drift(world):
    stable = set(world.stable_categories())
    tops_stable = set(world.tops[: world.config.drift.stable_tops])
    assert {c.id for c in world.categories if c.top in tops_stable} <= stable
    times = np.linspace(world.config.epoch, world.config.epoch + 2 * HORIZON, 25)
    for ad in world.ads:
        if ad.category in stable:
            assert not world.is_drifted(ad)
            assert all(world.drift_shift(ad, float(t)) == 0.0 for t in times)
            assert not math.isfinite(ad.active_from)


def test_gradual_drift_moves_linearly(world):
    seg = next(s for s in world.drifted_segments() if s.kind == "gradual")
    ad = seg.ids[0]
    mid = (seg.start + seg.end) / 2
    assert world.drift_shift(ad, seg.start - 1) == 0.0
    assert world.drift_shift(ad, mid) == pytest.approx(seg.shift / 2)
    assert world.drift_shift(ad, seg.end + 100) == pytest.approx(seg.shift)


def test_new_ads_appear_with_inventory_events(world):
    seg = next(s for s in world.drifted_segments() if s.kind == "new_ads")
    events = list(world.generate(duration_s=HORIZON, requests_per_s=4, seed=4))
    adds = [e for e in events if isinstance(e, BidwordChange)]
    assert {e.ad_id for e in adds} == set(seg.ids)
    first_seen: dict[str, float] = {}
    for e in events:
        if isinstance(e, Impression) and e.ad_id in seg.ids:
            first_seen.setdefault(e.ad_id, e.event_time)
    assert len(first_seen) >= len(seg.ids) // 2
    for ad_id, t in first_seen.items():
        assert t >= world.ad_by_id[ad_id].active_from
        add = min(e.event_time for e in adds if e.ad_id == ad_id)
        assert add == pytest.approx(world.ad_by_id[ad_id].active_from)


def test_trending_queries_spike_inside_their_window(world, frame):
    seg = next(s for s in world.drifted_segments() if s.kind == "trending")
    is_trend = frame["query"].isin(seg.ids)
    inside = (frame["event_time"] >= seg.start) & (frame["event_time"] < seg.end)
    share_in = is_trend[inside].mean()
    share_out = is_trend[~inside].mean()
    assert share_in > 5 * share_out and share_in > 0.08


def test_no_drift_world_is_stationary():
    w = World(WorldConfig(seed=2, drift=DriftConfig.none()))
    assert w.drifted_segments() == []
    assert set(w.stable_categories()) == {c.id for c in w.categories}
    assert all(not math.isfinite(a.active_from) for a in w.ads)


def test_drift_config_parse():
    d = DriftConfig.parse("abrupt,trending", horizon_s=100)
    assert d.abrupt and d.trending and not d.gradual and not d.new_ads and d.horizon_s == 100
    assert not DriftConfig.parse("none").enabled
    with pytest.raises(ConfigError, match="unknown drift"):
        DriftConfig.parse("sideways")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError):
        WorldConfig(n_ads=0)
    with pytest.raises(ConfigError, match="creative_policy"):
        WorldConfig(creative_policy="greedy")
    with pytest.raises(ConfigError):
        list(World(WorldConfig(seed=1)).generate(duration_s=10, requests_per_s=0))


def test_generate_examples_default_world_and_sizes():
    df = generate_examples(World(WorldConfig(n_top=2, n_leaf_per_top=3, n_ads=30, n_users=100)),
                           duration_s=60, requests_per_s=5)
    assert len(df) > 100
    assert df["category"].nunique() <= 6
    assert (df["event_time"].diff().dropna() >= 0).all()
