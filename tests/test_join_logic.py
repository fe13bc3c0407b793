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


# -- InputProgress: when an input may stop holding the watermark back ---------------------------

def test_input_progress_needs_a_fresh_end_offset_and_quiet():
    from streams.join import InputProgress

    pr = InputProgress(quiet_s=2.0)
    pr.reset(100.0, {("impression", 0): 10, ("click", 0): 5})
    assert set(pr.idle_kinds(0, 200.0)) == set()  # no end offset asked yet: unknown, so not idle
    pr.end_offsets({("impression", 0): 10, ("click", 0): 9}, asked_at=101.0)
    assert set(pr.idle_kinds(0, 101.5)) == set()  # caught up but not quiet for 2 s since the assignment
    assert set(pr.idle_kinds(0, 103.0)) == {"impression"}  # clicks: 5 < 9, still records to read
    pr.arrived("click", 0, 8, now=104.0)
    assert set(pr.idle_kinds(0, 110.0)) == {"impression"}  # the end offset predates the last arrival
    pr.end_offsets({("click", 0): 9}, asked_at=105.0)
    assert set(pr.idle_kinds(0, 105.5)) == {"impression"}  # not quiet yet
    assert set(pr.idle_kinds(0, 106.5)) == {"impression", "click"}
    assert pr.lag("click", 0) == 0 and pr.lag("conversion", 0) is None


def test_input_progress_forgets_end_offsets_from_before_a_rebalance():
    from streams.join import InputProgress

    pr = InputProgress(quiet_s=0.0)
    pr.reset(0.0, {("impression", 3): 50})
    pr.end_offsets({("impression", 3): 50}, asked_at=1.0)
    assert set(pr.idle_kinds(3, 2.0)) == {"impression"}
    # a rebalance: the partition restarts at an older committed offset; the old answer is stale
    pr.reset(5.0, {("impression", 3): 20})
    assert set(pr.idle_kinds(3, 9.0)) == set()
    pr.end_offsets({("impression", 3): 80}, asked_at=4.0)  # asked before the reassignment
    assert set(pr.idle_kinds(3, 9.0)) == set()
    pr.end_offsets({("impression", 3): 80}, asked_at=6.0)
    assert set(pr.idle_kinds(3, 9.0)) == set()  # 20 < 80: a backlog to re-read
    pr.end_offsets({("impression", 3): 0}, asked_at=7.0)
    assert set(pr.idle_kinds(3, 9.0)) == {"impression"}  # an empty partition is always caught up


def test_an_idle_input_holds_the_watermark_at_its_horizon():
    """Both inputs pause; clicks resume far ahead in event time before the impressions written at
    the same moment arrive: the impressions must not be late (this lost examples on rebalances)."""
    st = JoinState(window_s=60.0, lateness_s=5.0, track_inputs=True)
    imp0 = imp("r0", "a0", 1000.0)
    st.add("impression", 0, 0, imp0)
    st.add("click", 0, 0, clk("r0", "a0", 1001.0))
    st.set_idle(0, {"impression": 1001.0, "click": 1001.0, "conversion": 1001.0})
    assert st.part(0).watermark == 996.0
    # the producer resumes with a backlog: clicks are delivered first, up to t=1150, before the
    # impression at t=1080 that was written with them (its window closes at 1140)
    st.add("click", 0, 1, clk("r1", "a1", 1085.0))
    st.add("click", 0, 2, clk("r2", "a2", 1150.0))
    st.set_idle(0, {"impression": 1001.0, "conversion": 1001.0})
    assert st.part(0).watermark == 996.0  # not 1145: the impressions input may still bring t >= 1001
    st.add("impression", 0, 1, imp("r1", "a1", 1080.0))
    st.advance()
    assert not st.out.dead and st.out.stats["click_matched"] == 2


# -- the faust runtime's output step: nothing leaves the queue before it is delivered -------------

def test_outputs_stay_queued_until_their_sends_complete():
    """A send whose delivery fails leaves every output of the batch queued (sent again with the
    next one); outputs queued while a batch is in flight stay for the next call."""
    import asyncio

    from core.events import Example
    from streams.joiner import publish_outputs

    st = JoinState(window_s=30, lateness_s=5)
    for i in range(5):
        st.add(IMPRESSION, 0, i, imp(f"r{i}", "a", 100.0 + i))
    st.advance(flush_all=True)
    out = st.out
    assert len(out.examples) == 5
    delivered: list[str] = []
    fail = {"left": 1}
    extra: list = []

    async def run():
        loop = asyncio.get_running_loop()

        async def send_example(ex):
            fut = loop.create_future()
            if ex.request_id == "r0" and fail["left"] == 0 and not extra:
                extra.append(imp("r9", "a", 200.0))  # queued while this batch is in flight
                out.examples.append(Example.from_impression(extra[0], False, False, None))
            if fail["left"] and ex.request_id == "r3":
                fail["left"] -= 1
                fut.set_exception(RuntimeError("delivery timed out"))
            else:
                delivered.append(ex.key)
                fut.set_result(None)
            return fut

        async def send_dead(d):
            fut = loop.create_future()
            fut.set_result(None)
            return fut

        first = await publish_outputs(out, send_example, send_dead)
        assert first is None  # one failed: nothing is taken off the queue
        assert [e.request_id for e in out.examples] == [f"r{i}" for i in range(5)]
        assert out.stats["negative"] == 5
        # the next call delivers everything that was queued when it started, and only that
        second = await publish_outputs(out, send_example, send_dead)
        assert second is not None and len(second.examples) == 5 and second.stats["negative"] == 5
        assert [e.request_id for e in out.examples] == ["r9"] and not out.stats

    asyncio.run(run())
    assert {f"r{i}:a" for i in range(5)} <= set(delivered)


# -- restarts with the done offsets committed as metadata ----------------------------------------

def _stream(seed: int, n: int = 300):
    rng = random.Random(seed)
    imps, outcomes = [], []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(1.0)
        imps.append(imp(f"r{i}", "a", t))
        if rng.random() < 0.3:
            outcomes.append(clk(f"r{i}", "a", t + rng.uniform(0, 20)))
        if rng.random() < 0.1:
            outcomes.append(Conversion(request_id=f"r{i}", event_time=t + rng.uniform(0, 25), ad_id="a", user_id="u1"))
    merged = sorted([(e.event_time, IMPRESSION, e) for e in imps] +
                    [(e.event_time, CLICK if isinstance(e, Click) else CONVERSION, e) for e in outcomes],
                    key=lambda x: (x[0], x[1]))
    counters = {IMPRESSION: 0, CLICK: 0, CONVERSION: 0}
    recs = []
    for _, kind, e in merged:
        recs.append((kind, 0, counters[kind], e))
        counters[kind] += 1
    return recs


def crash_and_restart(recs, crash_at: int, **state_kw) -> tuple[JoinState, JoinState]:
    """A worker that read ``recs[:crash_at]`` and died, and the next owner: it restarts from the
    committed offsets with the done offsets committed as metadata, reads to the end and flushes.
    Returns both states (their outputs in ``.out``)."""
    from streams import join_offsets

    st = JoinState(30, 2, **state_kw)
    for r in recs[:crash_at]:
        st.add(*r)
        st.part(0).advance(st.out)
    commit = st.committable()
    meta = {k: join_offsets.encode(off, st.done_runs(k, 0, off)) for (k, _), off in commit.items()}
    st2 = JoinState(30, 2, **state_kw)
    for k, off in commit.items():
        st2.set_done(k[0], 0, join_offsets.decode(off, meta[k[0]]))
    for kind, part, off, ev in recs:
        if off < commit.get((kind, 0), 0):
            continue
        if st2.is_done(kind, part, off):
            st2.skip_done(kind, part, off, ev.event_time)
            continue
        st2.add(kind, part, off, ev)
        st2.part(0).advance(st2.out)
    st2.advance(flush_all=True)
    return st, st2


def test_a_restart_with_done_offsets_emits_no_duplicate_and_no_spurious_orphan():
    """Crash at every point, restart from the committed offsets plus the done offsets committed as
    metadata: the union of the outputs is the uninterrupted output, no example comes out twice and
    no click is dead-lettered as an orphan (this stream has none)."""
    recs = _stream(3)
    full, full_dead = join_offline(recs, 30, 2)
    assert not full_dead
    expected = {e.key: e.to_json() for e in full}
    orphans = duplicates = 0
    for crash_at in range(0, len(recs), 23):
        st, st2 = crash_and_restart(recs, crash_at)
        got = {e.key: e.to_json() for e in st.out.examples}
        for e in st2.out.examples:
            assert got.get(e.key, e.to_json()) == e.to_json(), "same key must carry the same content"
            duplicates += e.key in got
            got[e.key] = e.to_json()
        orphans += sum(d.error.reason.startswith("orphan") for d in st2.out.dead)
        assert got == expected
    assert orphans == 0 and duplicates == 0, (orphans, duplicates)


def test_done_offsets_metadata_round_trip_and_bounds():
    from streams import join_offsets

    runs = join_offsets.gaps(3, 101, [3, 4, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 22, 23] + list(range(24, 100)))
    assert join_offsets.offsets(runs) == [5, 6, 7, 9, 20, 21, 100]
    meta = join_offsets.encode(3, [(1, 3)] + runs)  # below the committed offset: ignored
    assert meta.startswith("j1:") and join_offsets.decode(3, meta) == runs
    done = join_offsets.DoneRuns(runs)
    assert [o for o in range(0, 110) if o in done] == [5, 6, 7, 9, 20, 21, 100]
    assert join_offsets.encode(3, []) == "" and join_offsets.decode(3, "") == []
    assert join_offsets.decode(3, "garbage") == [] and join_offsets.decode(3, "j1:zz,") == []
    many = [(i, i + 1) for i in range(0, 100_000, 2)]  # 50k runs: only a prefix fits
    short = join_offsets.encode(0, many, max_chars=200)
    back = join_offsets.decode(0, short)
    assert len(short) <= 200 and back == many[:len(back)] and len(back) > 10
    assert join_offsets.decode(0, "j1:0,zzzzzzzz") == []  # absurd: not ours
    # the worker's runs: only up to the offsets it considered when there are more needed ones
    st = JoinState(window_s=1000, lateness_s=5)
    n = join_offsets.MAX_RUNS * 3
    for i in range(n):  # every other impression stays open, the others are duplicates (done)
        st.add(IMPRESSION, 0, 2 * i, imp(f"r{i}", "a", 100.0 + i))
        st.add(IMPRESSION, 0, 2 * i + 1, imp(f"r{i}", "a", 100.0 + i))
    runs = st.done_runs(IMPRESSION, 0, 0)
    assert len(runs) == join_offsets.MAX_RUNS and all(b - a == 1 and a % 2 == 1 for a, b in runs)


def test_join_state_is_bounded_and_overflow_is_dead_lettered():
    st = JoinState(window_s=30, lateness_s=5, max_pending=3)
    for i in range(3):
        st.add(IMPRESSION, 0, i, imp(f"r{i}", "a", 100.0 + i))
    st.add(IMPRESSION, 1, 0, imp("r3", "a", 103.0))  # another partition: same worker budget
    st.add(CLICK, 0, 0, clk("zz", "a", 104.0))  # would wait for an impression
    assert st.pending == 3 and st.size == 3
    assert [(d.kind, d.error.reason) for d in st.out.dead] == [(IMPRESSION, "state_full"), (CLICK, "state_full")]
    st.add(IMPRESSION, 0, 3, imp("r9", "a", 200.0))  # closes the three; itself refused (still full)
    st.advance()
    assert {e.key for e in st.out.examples} == {"r0:a", "r1:a", "r2:a"} and st.size == 0
    st.add(IMPRESSION, 0, 4, imp("r10", "a", 201.0))
    assert st.pending == 1  # room again


def test_a_reused_request_id_is_dead_lettered_and_a_retry_is_dropped():
    st = JoinState(window_s=30, lateness_s=5)
    first = imp("r1", "a", 100.0)
    st.add(IMPRESSION, 0, 0, first)
    st.add(IMPRESSION, 0, 1, imp("r1", "a", 100.0))  # a producer retry: same content
    st.add(IMPRESSION, 0, 2, imp("r1", "a", 117.0, user="u2"))  # another page with the same id
    st.add(IMPRESSION, 0, 3, imp("r9", "a", 140.0))  # watermark 135: r1 (closes at 130) is emitted
    st.advance()
    st.add(IMPRESSION, 0, 4, imp("r1", "a", 120.0, user="u3"))  # after the first was emitted, not late
    assert st.out.stats["duplicate_impression"] == 1
    assert [(d.offset, d.error.reason) for d in st.out.dead] == [(2, "duplicate_request_id"), (4, "duplicate_request_id")]
    assert [e.key for e in st.out.examples] == ["r1:a"] and st.out.examples[0].user_id == "u1"
