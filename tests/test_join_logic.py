"""Unit tests of the pure join state (no broker)."""

import random

from core.events import Click, Conversion, Impression
from streams.join import CLICK, CONVERSION, IMPRESSION, JoinState, join_offline


def imp(rid, ad, t, user="u1"):
    return Impression(request_id=rid, event_time=t, user_id=user, query="q", ad_id=ad, creative_id="c",
                      bidword="b", category="cat", position=0, bid=1.0)


def clk(rid, ad, t):
    return Click(request_id=rid, event_time=t, ad_id=ad, user_id="u1")


def test_click_within_window_is_positive_and_others_negative():
    recs = [(IMPRESSION, 0, 0, imp("r1", "a", 100.0)), (IMPRESSION, 0, 1, imp("r1", "b", 100.0)),
            (CLICK, 0, 0, clk("r1", "a", 105.0)), (IMPRESSION, 0, 2, imp("r2", "a", 500.0))]
    ex, dead = join_offline(recs, window_s=30, lateness_s=5)
    labels = {e.key: e.clicked for e in ex}
    assert labels == {"r1:a": 1, "r1:b": 0, "r2:a": 0}
    assert dead == []
    assert [e for e in ex if e.key == "r1:a"][0].click_time == 105.0


def test_window_closes_only_after_watermark_passes():
    st = JoinState(window_s=30, lateness_s=5)
    st.add(IMPRESSION, 0, 0, imp("r1", "a", 100.0))
    st.advance()
    assert st.out.examples == []
    st.add(IMPRESSION, 0, 1, imp("r2", "a", 134.0))  # watermark 129 < 130
    st.advance()
    assert st.out.examples == []
    st.add(IMPRESSION, 0, 2, imp("r3", "a", 136.0))  # watermark 131 >= 130
    st.advance()
    assert [e.key for e in st.out.examples] == ["r1:a"]


def test_click_outside_window_does_not_count_and_conversion_counts():
    recs = [(IMPRESSION, 0, 0, imp("r1", "a", 100.0)),
            (CONVERSION, 0, 0, Conversion(request_id="r1", event_time=120.0, ad_id="a", user_id="u1")),
            (CLICK, 0, 0, clk("r1", "a", 140.0))]
    ex, _ = join_offline(recs, window_s=30, lateness_s=5)
    assert ex[0].clicked == 0 and ex[0].converted == 1
    # the same conversion arriving after the watermark closed the window is late, not silently lost
    late = [recs[0], recs[2], recs[1]]
    ex, dead = join_offline(late, window_s=30, lateness_s=5)
    assert ex[0].converted == 0 and [d.error.reason for d in dead] == ["late"]


def test_orphan_and_late_clicks_are_dead_lettered():
    recs = [(CLICK, 0, 0, clk("nope", "a", 100.0)), (IMPRESSION, 0, 0, imp("r1", "a", 100.0)),
            (IMPRESSION, 0, 1, imp("r9", "a", 200.0)),  # closes r1, expires the orphan
            (CLICK, 0, 1, clk("r1", "a", 110.0))]  # its impression was already emitted
    ex, dead = join_offline(recs, window_s=30, lateness_s=5)
    assert sorted(d.error.reason for d in dead) == ["late", "orphan_click"]
    assert {e.key: e.clicked for e in ex} == {"r1:a": 0, "r9:a": 0}


def test_out_of_order_click_before_impression_is_attached():
    recs = [(CLICK, 0, 0, clk("r1", "a", 101.0)), (IMPRESSION, 0, 0, imp("r1", "a", 100.0))]
    ex, dead = join_offline(recs, window_s=30, lateness_s=5)
    assert ex[0].clicked == 1 and dead == []


def test_committable_offsets_never_pass_a_needed_record():
    st = JoinState(window_s=30, lateness_s=5)
    st.add(IMPRESSION, 0, 0, imp("r1", "a", 100.0))
    st.add(IMPRESSION, 0, 1, imp("r2", "a", 120.0))
    st.add(CLICK, 0, 0, clk("r2", "a", 125.0))
    st.add(IMPRESSION, 0, 2, imp("r3", "a", 136.0))  # closes r1 only
    st.advance()
    c = st.committable()
    assert c[(IMPRESSION, 0)] == 1  # r2 still open
    assert c[(CLICK, 0)] == 0  # its click is needed to rebuild r2


def test_restart_from_committed_offsets_gives_same_examples():
    """Simulate a crash at every point: replay from the committed offsets, union of outputs ==
    uninterrupted output, same content per key."""
    rng = random.Random(7)
    imps, clicks = [], []
    t = 0.0
    for i in range(300):
        t += rng.expovariate(1.0)
        imps.append(imp(f"r{i}", "a", t))
        if rng.random() < 0.3:
            clicks.append(clk(f"r{i}", "a", t + rng.uniform(0, 20)))
    clicks.sort(key=lambda c: c.event_time)
    # interleave by event time: offsets per topic
    merged = sorted([(e.event_time, IMPRESSION, i, e) for i, e in enumerate(imps)] +
                    [(e.event_time, CLICK, i, e) for i, e in enumerate(clicks)], key=lambda x: (x[0], x[1]))
    recs = [(k, 0, off, e) for _, k, off, e in merged]
    full, _ = join_offline(recs, 30, 2)
    expected = {e.key: e.to_json() for e in full}
    for crash_at in range(0, len(recs), 37):
        st = JoinState(30, 2)
        got = {}
        for r in recs[:crash_at]:
            st.add(*r)
            st.part(0).advance(st.out)
        for e in st.out.examples:
            got[e.key] = e.to_json()
        commit = st.committable()
        # restart: re-read each topic from its committed offset
        rest = [r for r in recs if r[2] >= commit.get((r[0], 0), 0)]
        ex2, _ = join_offline(rest, 30, 2)
        for e in ex2:
            assert got.get(e.key, e.to_json()) == e.to_json(), "same key must carry the same content"
            got[e.key] = e.to_json()
        assert got == expected
