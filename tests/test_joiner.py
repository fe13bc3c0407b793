"""The faust joiner against a real Kafka broker: end to end, crashes, bad input, scale-out.

Expected examples are computed here directly from the generated events (impression → clicked iff a
click of the same request and ad lies within the attribution window), not by the join code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.events import Click, Conversion, Impression
from streams.kafka_io import create_topics, make_producer, produce_json, read_topic
from streams.replay import replay
from streams.sources import synthetic_events
from tests.harness import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WINDOW, LATENESS = 60.0, 5.0
ROOT = Path(__file__).resolve().parents[1]


def world_slice(seed=11, duration=240.0, rps=4.0):
    start = time.time() - 3600.0
    return list(synthetic_events(seed=seed, duration_s=duration, rps=rps, drift="none", start_time=start))


def expected_examples(events, window=WINDOW):
    imps = {(e.request_id, e.ad_id): e for e in events if isinstance(e, Impression)}
    clicked, converted = {}, {}
    for e in events:
        if isinstance(e, (Click, Conversion)):
            imp = imps.get((e.request_id, e.ad_id))
            if imp is not None and 0 <= e.event_time - imp.event_time <= window:
                (clicked if isinstance(e, Click) else converted)[(e.request_id, e.ad_id)] = 1
    return {f"{r}:{a}": (clicked.get((r, a), 0), converted.get((r, a), 0)) for (r, a) in imps}


def setup_topics(bootstrap, topic_names, partitions=6):
    create_topics(bootstrap, topic_names.all(), partitions)


@pytest.fixture(params=["faust", "kafka"])
def runtime(request):
    """Both joiner runtimes (faust agent, confluent-kafka loop) run the same test body."""
    return request.param


def start_joiner(bootstrap, prefix, app_id, log_path, idle_flush=3.0, runtime="faust", env_extra=None, extra=()):
    cmd = [sys.executable, "-m", "streams.joiner", "--bootstrap", bootstrap, "--topic-prefix", prefix,
           "--app-id", app_id, "--window", str(WINDOW), "--lateness", str(LATENESS), "--runtime", runtime, *extra]
    if idle_flush is not None:
        cmd += ["--idle-flush", str(idle_flush)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.Popen(cmd, cwd=Path(log_path).parent, env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT)


def stop(proc, sig=signal.SIGTERM, timeout=30):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def collect_examples(bootstrap, topic, want_keys, timeout=120.0):
    """Read the examples topic until every wanted key is there (or time out). Returns
    (key -> list of distinct contents, total records)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_topic(bootstrap, topic, timeout_s=30, idle_s=0.3)
        by_key: dict[str, set] = {}
        for k, v, *_ in recs:
            by_key.setdefault(k.decode(), set()).add(v)
        if want_keys <= by_key.keys() or time.monotonic() > deadline:
            return by_key, len(recs)
        time.sleep(1.0)


def labels(by_key):
    out = {}
    for k, vals in by_key.items():
        assert len(vals) == 1, f"key {k} has {len(vals)} different contents"
        d = json.loads(next(iter(vals)))
        out[k] = (d["clicked"], d["converted"])
    return out


def test_end_to_end_every_example_exactly_once_in_effect(bootstrap, topic_names, unique_topic_prefix, tmp_path, runtime):
    events = world_slice()
    exp = expected_examples(events)
    assert sum(c for c, _ in exp.values()) > 20, "the slice must contain clicks"
    setup_topics(bootstrap, topic_names)
    replay(events, bootstrap, topic_names, progress=False)
    j = start_joiner(bootstrap, unique_topic_prefix, unique_topic_prefix + "joiner", tmp_path / "j.log", runtime=runtime)
    try:
        by_key, n = collect_examples(bootstrap, topic_names.examples, set(exp))
    finally:
        stop(j)
    assert set(by_key) == set(exp), f"missing {len(set(exp) - set(by_key))}, extra {len(set(by_key) - set(exp))}"
    assert labels(by_key) == exp
    dead = read_topic(bootstrap, topic_names.dead_letter, timeout_s=10)
    reasons = {json.loads(v)["reason"] for _, v, *_ in dead}
    assert not reasons & {"late", "malformed_json", "missing_field", "wrong_type"}, reasons


def test_a_positive_goes_out_at_its_click_while_its_window_is_open(bootstrap, topic_names, unique_topic_prefix,
                                                                    tmp_path, runtime):
    """``--emit-at-click``: the click-stage record is on the topic while the impression's window is
    still open (nothing else was emitted yet); the final records come when the window closes."""
    setup_topics(bootstrap, topic_names, partitions=2)
    now = time.time()
    imp = dict(event_time=now, user_id="u1", query="q", creative_id="c", bidword="b", category="cat",
               position=0, bid=1.0)
    p = make_producer(bootstrap)
    for rid, ad in (("r1", "a"), ("r2", "b")):
        e = Impression(request_id=rid, ad_id=ad, **imp)
        produce_json(p, topic_names.impressions, e.key, e.to_json())
    c = Click(request_id="r1", event_time=now + 1.0, ad_id="a", user_id="u1")
    produce_json(p, topic_names.clicks, c.key, c.to_json())
    p.flush(10)
    j = start_joiner(bootstrap, unique_topic_prefix, unique_topic_prefix + "joiner", tmp_path / "j.log",
                     idle_flush=20.0, runtime=runtime, extra=["--emit-at-click"])
    try:
        early, _ = collect_examples(bootstrap, topic_names.examples, {"r1:a"}, timeout=90)
        assert set(early) == {"r1:a"}, f"only the positive, at its click: {early}"
        [raw] = early["r1:a"]
        d = json.loads(raw)
        assert (d["stage"], d["clicked"], d["converted"], d["click_time"]) == ("click", 1, 0, now + 1.0)
        # the idle flush closes both windows: the final records follow
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            by_key, _ = collect_examples(bootstrap, topic_names.examples, {"r1:a", "r2:b"}, timeout=5)
            stages = {k: sorted(json.loads(v)["stage"] for v in vals) for k, vals in by_key.items()}
            if stages.get("r1:a") == ["click", "close"] and stages.get("r2:b") == ["full"]:
                break
            time.sleep(1.0)
        assert stages == {"r1:a": ["click", "close"], "r2:b": ["full"]}, stages
        final = {k: json.loads(v) for k, vals in by_key.items() for v in vals if json.loads(v)["stage"] != "click"}
        assert (final["r1:a"]["clicked"], final["r2:b"]["clicked"]) == (1, 0)
    finally:
        stop(j)


def committed_total(bootstrap, group, topic):
    from streams.kafka_io import group_offsets

    return sum(max(0, o) for o in group_offsets(bootstrap, group, topic).values())


def orphan_clicks(events):
    imps = {(e.request_id, e.ad_id) for e in events if isinstance(e, Impression)}
    return sum(1 for e in events if isinstance(e, Click) and (e.request_id, e.ad_id) not in imps)


def test_kill_9_mid_stream_and_restart_gives_same_examples(bootstrap, topic_names, unique_topic_prefix, tmp_path, runtime):
    events = world_slice(seed=12, duration=300.0, rps=5.0)
    exp = expected_examples(events)
    assert orphan_clicks(events) == 0
    setup_topics(bootstrap, topic_names)
    app_id = unique_topic_prefix + "joiner"
    log = tmp_path / "j.log"
    half = len(events) // 2
    replay(events[:half], bootstrap, topic_names, progress=False)
    j = start_joiner(bootstrap, unique_topic_prefix, app_id, log, idle_flush=None, runtime=runtime)
    # kill -9 only once it has emitted examples AND committed offsets past them
    wait_for(lambda: committed_total(bootstrap, app_id, topic_names.impressions) > 100, 90,
             interval_s=0.5, what="impression offsets committed")
    wait_for(lambda: committed_total(bootstrap, app_id, topic_names.clicks) > 0, 30,
             interval_s=0.5, what="click offsets committed")
    first = len(read_topic(bootstrap, topic_names.examples, 10, 0.2))
    assert first > 50
    j.send_signal(signal.SIGKILL)
    j.wait(10)
    replay(events[half:], bootstrap, topic_names, progress=False)
    j = start_joiner(bootstrap, unique_topic_prefix, app_id, log, runtime=runtime)
    before = committed_total(bootstrap, app_id, topic_names.impressions)
    wait_for(lambda: committed_total(bootstrap, app_id, topic_names.impressions) > before, 60,
             interval_s=0.5, what="the restarted joiner committing")
    j.send_signal(signal.SIGKILL)  # a second crash, possibly mid-batch
    j.wait(10)
    j = start_joiner(bootstrap, unique_topic_prefix, app_id, log, runtime=runtime)
    try:
        by_key, n = collect_examples(bootstrap, topic_names.examples, set(exp))
        dead = [json.loads(v) for _, v, *_ in read_topic(bootstrap, topic_names.dead_letter, 10, 0.3)]
    finally:
        stop(j)
    assert set(by_key) == set(exp), f"missing {len(set(exp) - set(by_key))}"
    assert labels(by_key) == exp
    # the restarts resumed from the committed offsets: only what was emitted after the last commit
    # before each kill comes out twice (same key, same content), never the whole stream
    assert n - len(exp) < len(exp) // 4, (n, len(exp))
    # the done offsets ride along as commit metadata: nothing is re-judged
    assert [d for d in dead if d["reason"] == "orphan_click"] == []


def test_bad_input_goes_to_dead_letter_and_the_rest_is_unaffected(bootstrap, topic_names, unique_topic_prefix, tmp_path, runtime):
    events = world_slice(seed=13, duration=120.0, rps=3.0)
    exp = expected_examples(events)
    setup_topics(bootstrap, topic_names)
    p = make_producer(bootstrap)
    now = time.time()
    good_click = {"v": 1, "type": "click", "request_id": "zz", "event_time": now - 3000, "ad_id": "a", "user_id": "u"}
    bad = {
        "malformed_json": b"{not json",
        "wrong_type": json.dumps({**good_click, "event_time": "yesterday"}).encode(),
        "missing_field": json.dumps({k: v for k, v in good_click.items() if k != "ad_id"}).encode(),
        "unknown_schema_version": json.dumps({**good_click, "v": 99}).encode(),
        "oversized": json.dumps({**good_click, "query": "x" * 100_000}).encode(),
        "clock_skew": json.dumps({**good_click, "event_time": now + 86400 * 30}).encode(),
        "orphan_click": json.dumps({**good_click, "request_id": "no-such-request"}).encode(),
    }
    for reason, raw in bad.items():
        produce_json(p, topic_names.clicks, reason.encode(), raw)
    p.flush(30)
    replay(events, bootstrap, topic_names, progress=False)
    j = start_joiner(bootstrap, unique_topic_prefix, unique_topic_prefix + "joiner", tmp_path / "j.log", runtime=runtime)
    try:
        by_key, _ = collect_examples(bootstrap, topic_names.examples, set(exp))
        deadline = time.monotonic() + 60
        while True:
            dead = [json.loads(v) for _, v, *_ in read_topic(bootstrap, topic_names.dead_letter, 10, 0.3)]
            got = {d["reason"] for d in dead}
            if set(bad) <= got or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert j.poll() is None, "the worker must survive bad records"
    finally:
        stop(j)
    assert set(bad) <= got, f"missing reasons: {set(bad) - got}"
    for d in dead:
        assert d["topic"] == topic_names.clicks and d["detail"]
    assert labels(by_key) == exp


def test_a_full_join_state_dead_letters_the_overflow_and_loses_nothing_else(bootstrap, topic_names, unique_topic_prefix,
                                                                           tmp_path, runtime):
    """join.max_pending far below the open impressions of the stream: the worker keeps running, each
    impression comes out exactly once as an example or as a ``state_full`` dead letter, and every
    input offset is committed to the end (the overflow never stalls the join)."""
    events = world_slice(seed=16, duration=120.0, rps=3.0)
    exp = expected_examples(events)
    n_imps = sum(1 for e in events if isinstance(e, Impression))
    assert len(exp) == n_imps > 200
    setup_topics(bootstrap, topic_names)
    replay(events, bootstrap, topic_names, progress=False)
    app_id = unique_topic_prefix + "joiner"
    j = start_joiner(bootstrap, unique_topic_prefix, app_id, tmp_path / "j.log", runtime=runtime,
                     env_extra={"ADSTREAM_JOIN__MAX_PENDING": "300"})

    def outcome():
        by_key = {}
        for k, v, *_ in read_topic(bootstrap, topic_names.examples, 10, 0.3):
            by_key.setdefault(k.decode(), []).append(v)
        dead = [json.loads(v) for _, v, *_ in read_topic(bootstrap, topic_names.dead_letter, 10, 0.3)]
        full = [d for d in dead if d["reason"] == "state_full"]
        full_imps = [d for d in full if d["topic"] == topic_names.impressions]
        return by_key, dead, full, full_imps

    def accounted():
        by_key, _, _, full_imps = outcome()
        keys = set(by_key) | {"{request_id}:{ad_id}".format(**json.loads(d["payload"])) for d in full_imps}
        return keys >= set(exp)

    try:
        wait_for(accounted, 120, interval_s=1.0, what="every impression an example or a state_full dead letter")
        wait_for(lambda: committed_total(bootstrap, app_id, topic_names.impressions) == n_imps, 60, interval_s=0.5,
                 what="every impression offset committed")
        assert j.poll() is None, "the worker must survive a full join state"
        by_key, dead, full, full_imps = outcome()
    finally:
        stop(j)
    dropped = ["{request_id}:{ad_id}".format(**json.loads(d["payload"])) for d in full_imps]
    assert full_imps, "the bound was never reached: the test proves nothing"
    assert len(dropped) == len(set(dropped)), "an impression dead-lettered twice"
    assert set(by_key).isdisjoint(dropped), "an impression both emitted and dead-lettered"
    assert set(by_key) | set(dropped) == set(exp)
    assert all(len(set(v)) == 1 for v in by_key.values())
    assert all(d["detail"] for d in full)
    # impressions whose clicks were all kept carry the label a recount of the events gives
    touched = {"{request_id}:{ad_id}".format(**json.loads(d["payload"])) for d in full if d["topic"] != topic_names.impressions}
    emitted = {k: (json.loads(v[0])["clicked"], json.loads(v[0])["converted"]) for k, v in by_key.items()}
    assert {k: x for k, x in emitted.items() if k not in touched} == {k: exp[k] for k in emitted if k not in touched}


@pytest.mark.parametrize("leave", [False, True])
def test_two_workers_split_partitions_and_one_leaving_loses_nothing(bootstrap, topic_names, unique_topic_prefix, tmp_path, runtime, leave):
    events = world_slice(seed=14, duration=300.0, rps=5.0)
    exp = expected_examples(events)
    setup_topics(bootstrap, topic_names)
    app_id = unique_topic_prefix + "joiner"
    a = start_joiner(bootstrap, unique_topic_prefix, app_id, tmp_path / "a.log", idle_flush=None, runtime=runtime)
    b = start_joiner(bootstrap, unique_topic_prefix, app_id, tmp_path / "b.log", idle_flush=None, runtime=runtime)
    def shares(name):
        return [set(json.loads(m)) for m in re.findall(
            r"assigned partitions (\[[\d, ]*\])", (tmp_path / f"{name}.log").read_text(errors="replace"))]

    def both_hold_a_share():
        sa, sb = shares("a"), shares("b")
        return sa and sb and 0 < len(sa[-1]) < 6 and 0 < len(sb[-1]) < 6

    try:
        wait_for(both_hold_a_share, 90, interval_s=0.5, what="both workers in the group, each with a share")
        half = len(events) // 2
        replay(events[:half], bootstrap, topic_names, progress=False)
        wait_for(lambda: committed_total(bootstrap, app_id, topic_names.impressions) > 0, 60, interval_s=0.5,
                 what="the group committing the first half")
        before = committed_total(bootstrap, app_id, topic_names.impressions)
        if leave:
            stop(b)  # a worker leaves mid-stream: its partitions go to the other one
        replay(events[half:], bootstrap, topic_names, progress=False)
        wait_for(lambda: committed_total(bootstrap, app_id, topic_names.impressions) > before, 60, interval_s=0.5,
                 what="the group committing the second half")
        stop(a)
        stop(b)
        # the survivor's open windows are closed by a final worker with idle flush
        c = start_joiner(bootstrap, unique_topic_prefix, app_id, tmp_path / "c.log", runtime=runtime)
        by_key, _ = collect_examples(bootstrap, topic_names.examples, set(exp))
        stop(c)
        dead = [json.loads(v) for _, v, *_ in read_topic(bootstrap, topic_names.dead_letter, 10, 0.3)]
    finally:
        for p in (a, b):
            stop(p, signal.SIGKILL)
    assert set(by_key) == set(exp), (
        f"missing {len(set(exp) - set(by_key))}; dead letters: {[(d['reason'], d['detail']) for d in dead][:10]}"
    )
    assert labels(by_key) == exp
    # the two workers really split the partitions (checked before the replay: both held a share)
    assert shares("a") and shares("b")


def test_kafka_joiner_loses_no_example_when_deliveries_fail(bootstrap, topic_names, unique_topic_prefix, monkeypatch):
    """Every 4th example's first delivery fails (what librdkafka reports after a broker outage
    longer than the message timeout): each must still reach the topic, and no offset may be
    committed past an example that is not on the broker."""
    import threading

    import streams.delivery
    import streams.kafka_io
    from core.settings import JoinSettings, KafkaSettings, Settings
    from streams.joiner_kafka import KafkaJoiner
    from tests.faults import flaky_factory

    events = world_slice(seed=15, duration=150.0, rps=3.0)
    exp = expected_examples(events)
    setup_topics(bootstrap, topic_names)
    replay(events, bootstrap, topic_names, progress=False)
    seen: set = set()

    def first_delivery_of_every_4th_example(topic, key, _value):
        if topic != topic_names.examples or key in seen:
            return False
        seen.add(key)
        return len(seen) % 4 == 0

    flaky = flaky_factory(fail=first_delivery_of_every_4th_example)
    monkeypatch.setattr(streams.kafka_io, "Producer", flaky)
    monkeypatch.setattr(streams.delivery, "Producer", flaky)
    s = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names),
                 join=JoinSettings(attribution_window_s=WINDOW, allowed_lateness_s=LATENESS))
    j = KafkaJoiner(s, bootstrap, unique_topic_prefix + "joiner", idle_flush_s=2.0)
    t = threading.Thread(target=j.run, daemon=True)
    t.start()
    try:
        by_key, _ = collect_examples(bootstrap, topic_names.examples, set(exp), timeout=90)
    finally:
        j.stop()
        t.join(60)
    failed = sum(len(p.failed) for p in flaky.instances)
    assert failed >= len(exp) // 4 - 1, failed  # the faults happened
    assert set(by_key) == set(exp), f"missing {len(set(exp) - set(by_key))} of {len(exp)} examples"
    assert labels(by_key) == exp
