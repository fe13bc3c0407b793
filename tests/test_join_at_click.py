"""Positives emitted at the click (``join.emit_positives_at_click``): the pure join state, no broker.

What must hold: a clicked impression gives a ``click`` record as soon as its first click is joined
(before its window closes) and a ``close`` record at window close; an unclicked one a ``full``
record; the final records (``full`` + ``close``) are exactly what the join gives without the
option; the same input gives the same records whatever the interleaving of the topics; and a crash
at any point followed by a restart from the committed offsets re-emits nothing with other content."""

from __future__ import annotations

import json
import random

from core.events import Click, Conversion, Impression
from streams.join import CLICK, CONVERSION, IMPRESSION, JoinState, join_offline
from tests.test_join_logic import crash_and_restart


def imp(rid, t):
    return Impression(request_id=rid, event_time=t, user_id="u1", query="q", ad_id="a", creative_id="c",
                      bidword="b", category="cat", position=0, bid=1.0)


def clk(rid, t):
    return Click(request_id=rid, event_time=t, ad_id="a", user_id="u1")


def _events(seed: int, n: int = 300):
    """Impressions; 30 % clicked (10 % of those twice), 10 % converted; some clicks come before
    their impression (a reordering producer)."""
    rng = random.Random(seed)
    out = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(1.0)
        out.append((t, IMPRESSION, imp(f"r{i}", t)))
        if rng.random() < 0.3:
            for _ in range(2 if rng.random() < 0.1 else 1):
                if rng.random() < 0.05:  # arrives half a second before its impression
                    ct = t + rng.uniform(0, 0.4)
                    out.append((t - 0.5, CLICK, clk(f"r{i}", ct)))
                else:
                    ct = t + rng.uniform(0, 20)
                    out.append((ct, CLICK, clk(f"r{i}", ct)))
        if rng.random() < 0.1:
            vt = t + rng.uniform(0, 25)
            out.append((vt, CONVERSION, Conversion(request_id=f"r{i}", event_time=vt, ad_id="a", user_id="u1")))
    return out


def _records(events, jitter_seed: int | None = None):
    """Offsets per topic in arrival order; ``jitter_seed`` perturbs the interleaving of the topics
    (each topic keeps its own order) by less than the allowed lateness."""
    rng = random.Random(jitter_seed)
    by_kind: dict[str, list] = {IMPRESSION: [], CLICK: [], CONVERSION: []}
    for at, kind, e in sorted(events, key=lambda x: (x[0], x[1])):
        by_kind[kind].append((at, e))
    merged = []
    for kind, evs in by_kind.items():
        for off, (at, e) in enumerate(evs):
            merged.append((at + (rng.uniform(0, 1.5) if jitter_seed is not None else 0.0), kind, off, e))
    # stable per topic: the jittered arrival never reorders one topic's records
    merged.sort(key=lambda x: (x[0], x[1], x[2]))
    for kind in by_kind:
        offs = [m[2] for m in merged if m[1] == kind]
        if offs != sorted(offs):  # the jitter reordered a topic: keep that topic in offset order
            slots = [i for i, m in enumerate(merged) if m[1] == kind]
            ordered = sorted((merged[i] for i in slots), key=lambda m: m[2])
            for i, m in zip(slots, ordered):
                merged[i] = m
    return [(kind, 0, off, e) for _, kind, off, e in merged]


def _by_stage(examples):
    out: dict[tuple[str, str], bytes] = {}
    for e in examples:
        k = (e.key, e.stage)
        assert out.get(k, e.to_json()) == e.to_json(), f"{k} emitted with two contents"
        out[k] = e.to_json()
    return out


def _strip_stage(raw: bytes) -> str:
    d = json.loads(raw)
    d.pop("stage")
    return json.dumps(d, sort_keys=True)


def test_a_positive_goes_out_at_its_click_and_its_final_record_at_window_close():
    st = JoinState(30, 5, emit_at_click=True)
    st.add(IMPRESSION, 0, 0, imp("r1", 100.0))
    st.add(IMPRESSION, 0, 1, imp("r2", 100.5))
    st.advance()
    assert st.out.examples == []
    st.add(CLICK, 0, 0, clk("r1", 103.0))
    st.add(CONVERSION, 0, 0, Conversion(request_id="r1", event_time=110.0, ad_id="a", user_id="u1"))
    st.add(CLICK, 0, 1, clk("r1", 104.0))  # a second click: no second early record
    st.advance()
    [early] = st.out.examples
    assert (early.key, early.stage, early.clicked, early.converted, early.click_time) == ("r1:a", "click", 1, 0, 103.0)
    assert st.out.stats["positive_at_click"] == 1
    st.out.clear()
    st.add(IMPRESSION, 0, 2, imp("r3", 140.0))  # watermark 135: both windows close
    st.advance()
    final = {e.key: e for e in st.out.examples}
    assert (final["r1:a"].stage, final["r1:a"].clicked, final["r1:a"].converted) == ("close", 1, 1)
    assert (final["r2:a"].stage, final["r2:a"].clicked) == ("full", 0)
    assert st.out.stats["positive"] == 1 and st.out.stats["negative"] == 1


def test_final_records_equal_the_join_without_early_positives():
    recs = _records(_events(1))
    plain, dead = join_offline(recs, 30, 2)
    early, dead2 = join_offline(recs, 30, 2, emit_at_click=True)
    assert [d.error.reason for d in dead] == [d.error.reason for d in dead2]
    assert {e.stage for e in plain} == {"full"}
    final = [e for e in early if e.stage != "click"]
    assert sorted(_strip_stage(e.to_json()) for e in final) == sorted(_strip_stage(e.to_json()) for e in plain)
    clicked = {e.key for e in plain if e.clicked}
    at_click = [e for e in early if e.stage == "click"]
    assert sorted(e.key for e in at_click) == sorted(clicked)  # one per positive, none for a negative
    assert all(e.clicked == 1 and e.converted == 0 for e in at_click)
    assert {e.key for e in final if e.stage == "close"} == clicked
    # each early record comes out before its final one
    order = {(e.key, e.stage): i for i, e in enumerate(early)}
    assert all(order[(k, "click")] < order[(k, "close")] for k in clicked)


def test_the_same_input_gives_the_same_records_whatever_the_interleaving():
    events = _events(2)
    want = _by_stage(join_offline(_records(events), 30, 2, emit_at_click=True)[0])
    assert any(s == "click" for _, s in want)
    for jitter in range(5):
        got = _by_stage(join_offline(_records(events, jitter), 30, 2, emit_at_click=True)[0])
        assert got == want


def test_a_crash_anywhere_re_emits_nothing_with_other_content():
    """Crash at every point, restart from the committed offsets (with the done offsets as metadata):
    the union of the outputs per (key, stage) is the uninterrupted output, each with one content."""
    recs = _records(_events(3))
    want = _by_stage(join_offline(recs, 30, 2, emit_at_click=True)[0])
    for crash_at in range(0, len(recs), 17):
        st, st2 = crash_and_restart(recs, crash_at, emit_at_click=True)
        got = _by_stage(st.out.examples)
        for k, raw in _by_stage(st2.out.examples).items():
            assert got.get(k, raw) == raw, f"crash at {crash_at}: {k} re-emitted with other content"
            got[k] = raw
        assert got == want, f"crash at {crash_at}"
