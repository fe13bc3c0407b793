"""The feature updater end to end against the real broker (and Feast on sqlite / Redis):
known input -> online features equal an independent pandas recomputation; bad records go to the
dead-letter topic with their reason; kill -9 mid-stream and restart -> the same final features."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from core.events import Click, Impression, encode
from core.settings import FeatureSettings, KafkaSettings, Settings
from streams.kafka_io import create_topics, make_producer, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

HL = [60.0, 3600.0]
T0 = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[1]
KEYS = {"user": "user_id", "ad": "ad_id", "creative": "creative_id", "query": "query",
        "bidword": "bidword", "category": "category"}


def make_events(n: int, seed: int) -> tuple[list[Impression], list[Click]]:
    rng = random.Random(seed)
    imps, clicks = [], []
    for i in range(n):
        t = T0 + i * 0.5 + rng.uniform(-30, 30)  # out of event-time order
        a = rng.randrange(40)
        imp = Impression(request_id=f"r{i}", event_time=round(t, 3), user_id=f"u{rng.randrange(25)}",
                         query=f"q{rng.randrange(8)}", ad_id=f"a{a}", creative_id=f"a{a}-c{rng.randrange(2)}",
                         bidword=f"b{a % 11}", category=f"cat{a % 4}", position=rng.randrange(5), bid=1.0)
        imps.append(imp)
        if rng.random() < 0.15:
            full = rng.random() < 0.5  # half of the clicks carry only ad and user
            clicks.append(Click(request_id=imp.request_id, event_time=round(t + rng.uniform(1, 90), 3),
                                ad_id=imp.ad_id, user_id=imp.user_id,
                                creative_id=imp.creative_id if full else "",
                                query=imp.query if full else "", bidword=imp.bidword if full else "",
                                category=imp.category if full else ""))
    return imps, clicks


BAD_IMPRESSIONS = [
    (b"{not json", "malformed_json"),
    (b'{"v":1,"type":"impression","request_id":"x"}', "missing_field"),
    (json.dumps({"v": 1, "type": "click", "request_id": "x", "event_time": T0, "ad_id": "a",
                 "user_id": "u"}).encode(), "unknown_event_type"),
    (b"[1,2]", "not_an_object"),
]
BAD_CLICKS = [(json.dumps({"v": 1, "type": "click", "request_id": "y", "event_time": "soon", "ad_id": "a",
                           "user_id": "u"}).encode(), "wrong_type"),
              (b'{"v":7,"type":"click"}', "unknown_schema_version")]


def expected_features(imps: list[Impression], clicks: list[Click]) -> dict[str, pd.DataFrame]:
    """Independent recomputation with pandas: one frame per entity type, indexed by key."""
    rows = [{**{e: getattr(x, k) for e, k in KEYS.items()}, "t": x.event_time, "click": 0} for x in imps]
    rows += [{**{e: getattr(x, k) for e, k in KEYS.items()}, "t": x.event_time, "click": 1} for x in clicks]
    ev = pd.DataFrame(rows)
    out = {}
    for etype in KEYS:
        df = ev[ev[etype] != ""].copy()
        field = df.assign(**{etype: "__all__"})
        df = pd.concat([df, field])
        df["t_ref"] = df.groupby(etype)["t"].transform("max")
        g = df.groupby(etype)
        res = pd.DataFrame({"impressions": g["click"].apply(lambda c: int((c == 0).sum())),
                            "clicks": g["click"].sum(), "event_time": g["t"].max()})
        for h in HL:
            w = np.power(2.0, -(df["t_ref"] - df["t"]) / h)
            tag = "1m" if h == 60 else "1h"
            res[f"imp_{tag}"] = (w * (df["click"] == 0)).groupby(df[etype]).sum()
            res[f"clk_{tag}"] = (w * (df["click"] == 1)).groupby(df[etype]).sum()
        res["last_impression_time"] = df[df.click == 0].groupby(etype)["t"].max()
        res["last_click_time"] = df[df.click == 1].groupby(etype)["t"].max()
        res = res.fillna({"last_impression_time": 0.0, "last_click_time": 0.0})
        out[etype] = res
    return out


def assert_store_matches(client, expected: dict[str, pd.DataFrame]) -> None:
    for etype, exp in expected.items():
        got = client.read(etype, list(exp.index))
        for key, row in exp.iterrows():
            g = got[key]
            assert g["impressions"] == row["impressions"] and g["clicks"] == row["clicks"], (etype, key)
            for col in ("event_time", "last_impression_time", "last_click_time", "imp_1m", "imp_1h",
                        "clk_1m", "clk_1h"):
                assert g[col] == pytest.approx(row[col], rel=1e-9, abs=1e-9), (etype, key, col)


def produce_all(bootstrap: str, topics, imps, clicks, bad=True) -> None:
    p = make_producer(bootstrap)
    for x in imps:
        p.produce(topics.impressions, encode(x), key=x.key)
        p.poll(0)
    for x in clicks:
        p.produce(topics.clicks, encode(x), key=x.key)
        p.poll(0)
    if bad:
        for raw, _ in BAD_IMPRESSIONS:
            p.produce(topics.impressions, raw, key="bad")
        for raw, _ in BAD_CLICKS:
            p.produce(topics.clicks, raw, key="bad")
    assert p.flush(30) == 0 and p.errors == 0


def make_settings(bootstrap, topic_names, tmp_path, online_store="sqlite", redis_url="127.0.0.1:6379"):
    return Settings(
        kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=3),
        features=FeatureSettings(repo_dir=tmp_path / "repo", checkpoint_dir=tmp_path / "ckpt",
                                 online_store=online_store, redis_url=redis_url, half_lives_s=HL,
                                 flush_interval_s=0.2),
    )


def _flush(address: str) -> None:
    import redis

    host, port = address.rsplit(":", 1)
    redis.Redis(host=host, port=int(port)).flushall()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def online_store(request):
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        _flush(server.address)  # the Redis server is shared by the session: start from empty
        return "redis", server.address
    return "sqlite", "127.0.0.1:6379"


def test_end_to_end_matches_recomputation_and_dead_letters(bootstrap, topic_names, tmp_path, online_store):
    from core.metrics import WorkerMetrics
    from features.store import FeatureStoreClient
    from streams.feature_updater import run

    create_topics(bootstrap, topic_names.all(), partitions=3)
    imps, clicks = make_events(1500, seed=1)
    produce_all(bootstrap, topic_names, imps, clicks)
    settings = make_settings(bootstrap, topic_names, tmp_path, *online_store)
    metrics = WorkerMetrics("feature_updater")
    out = run(settings, max_idle_s=2.0, metrics=metrics, metrics_port=0)
    assert out["records"] == len(imps) + len(clicks) + len(BAD_IMPRESSIONS) + len(BAD_CLICKS)
    assert out["dead_letters"] == len(BAD_IMPRESSIONS) + len(BAD_CLICKS)

    client = FeatureStoreClient(settings.features, apply=False)
    assert_store_matches(client, expected_features(imps, clicks))

    dl = read_topic(bootstrap, topic_names.dead_letter)
    reasons = Counter(json.loads(v)["reason"] for _k, v, *_ in dl)
    assert reasons == Counter(r for _, r in BAD_IMPRESSIONS + BAD_CLICKS)
    assert all(json.loads(v)["topic"] in (topic_names.impressions, topic_names.clicks) for _k, v, *_ in dl)
    reg = metrics.registry
    assert reg.get_sample_value("adstream_dead_letters_total",
                                {"worker": "feature_updater", "reason": "malformed_json"}) == 1
    assert reg.get_sample_value("adstream_records_in_total",
                                {"worker": "feature_updater", "topic": topic_names.clicks}) == len(clicks) + 2
    assert reg.get_sample_value("adstream_feature_freshness_seconds_count") == len(imps) + len(clicks)
    assert reg.get_sample_value("adstream_features_written_total", {"view": "ad_stats"}) >= 41
    # the history (offline store) holds the final version of every row
    hist = pd.read_parquet(Path(settings.features.repo_dir) / "data" / "ad_stats")
    last = hist.sort_values(["event_timestamp", "created"]).groupby("ad_id").last()
    exp = expected_features(imps, clicks)["ad"]
    assert (last.loc[exp.index, "impressions"] == exp["impressions"]).all()

    # a restart with nothing new is a no-op (resumes from the checkpoint, not from the beginning)
    out2 = run(settings, max_idle_s=1.0, metrics_port=0)
    assert out2["records"] == 0 and out2["events_applied"] == len(imps) + len(clicks)


def test_kill_9_mid_stream_gives_the_same_features(bootstrap, topic_names, tmp_path):
    """The updater is kill -9'd at random moments after a checkpoint while events keep arriving; a last
    run to the end gives exactly the features of a recount. A producer thread feeds the stream while
    the kills go on, so a fast updater cannot finish before it is killed."""
    import threading

    from features.store import FeatureStoreClient

    create_topics(bootstrap, topic_names.all(), partitions=3)
    imps, clicks = make_events(120000, seed=2)
    clicks_of: dict[str, list[Click]] = {}
    for c in clicks:
        clicks_of.setdefault(c.request_id, []).append(c)
    sent_imps: list[Impression] = []
    sent_clicks: list[Click] = []
    killing = threading.Event()
    killing.set()

    def feed() -> None:  # ~1,200 impressions/s while the kills go on, then the bad records
        p = make_producer(bootstrap)
        i, chunk = 0, 300
        while killing.is_set() and i < len(imps):
            for x in imps[i:i + chunk]:
                p.produce(topic_names.impressions, encode(x), key=x.key)
                sent_imps.append(x)
                for c in clicks_of.get(x.request_id, ()):
                    p.produce(topic_names.clicks, encode(c), key=c.key)
                    sent_clicks.append(c)
            p.poll(0)
            i += chunk
            time.sleep(0.25)
        for raw, _ in BAD_IMPRESSIONS:
            p.produce(topic_names.impressions, raw, key="bad")
        for raw, _ in BAD_CLICKS:
            p.produce(topic_names.clicks, raw, key="bad")
        assert p.flush(30) == 0 and p.errors == 0

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    settings = make_settings(bootstrap, topic_names, tmp_path)
    cfg = tmp_path / "adstream.yaml"
    cfg.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "streams.feature_updater", "--config", str(cfg), "--metrics-port", "0",
           "--checkpoint-every", "0.3", "--max-idle", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpt = Path(settings.features.checkpoint_dir) / "checkpoint.pkl"
    rng = random.Random(5)
    kills = 0
    try:
        for attempt in range(3):
            log = open(tmp_path / f"run{attempt}.log", "wb")
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
            before = ckpt.stat().st_mtime if ckpt.exists() else 0.0
            deadline = time.monotonic() + 90
            # wait for a new checkpoint, then kill at a random moment shortly after
            while time.monotonic() < deadline and proc.poll() is None:
                if ckpt.exists() and ckpt.stat().st_mtime > before:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(10)
            log.close()
    finally:
        killing.clear()
        feeder.join(60)
    assert not feeder.is_alive()
    assert kills >= 2, "the updater stopped by itself before it could be killed: " + \
        (tmp_path / "run0.log").read_text(errors="replace")[-2000:]
    assert len(sent_imps) < len(imps), "the stream ran out while the kills went on; make more events"
    final = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stdout.decode()[-3000:]
    client = FeatureStoreClient(settings.features, apply=False)
    assert_store_matches(client, expected_features(sent_imps, sent_clicks))
    dl = read_topic(bootstrap, topic_names.dead_letter)
    # at-least-once: every bad record is there, possibly more than once after a kill
    assert {json.loads(v)["reason"] for _k, v, *_ in dl} == {r for _, r in BAD_IMPRESSIONS + BAD_CLICKS}


def test_online_store_outage_keeps_rows_for_the_next_flush(tmp_path):
    """A push that finds the store unavailable neither crashes the worker nor loses rows: they stay
    dirty and go out with the first push after the store is back (unit test, no broker)."""
    from features.store import FeatureStoreUnavailable
    from streams.feature_updater import FeatureUpdater

    class FlakyClient:
        def __init__(self):
            self.down = True
            self.pushed: list[dict] = []

        def push(self, rows, to="online_and_offline", part=None):
            if self.down:
                raise FeatureStoreUnavailable("online feature store (redis at 127.0.0.1:1) unavailable")
            self.pushed.append(rows)
            return {e: len(c["event_time"]) for e, c in rows.items()}

    settings = Settings(kafka=KafkaSettings(bootstrap="127.0.0.1:1"),
                        features=FeatureSettings(repo_dir=tmp_path / "repo", checkpoint_dir=tmp_path / "ck"))
    client = FlakyClient()
    upd = FeatureUpdater(settings, client=client)  # type: ignore[arg-type]
    imps, clicks = make_events(50, seed=11)
    for e in imps:
        upd.state.apply_impression(e)
    assert upd.flush() is None and upd.push_failures == 1
    assert upd.state.has_dirty()
    upd._retry_push_at = 0.0  # skip the backoff
    client.down = False
    for c in clicks:
        upd.state.apply_click(c)
    stats = upd.flush()
    assert stats is not None and upd.push_failures == 0 and not upd.state.has_dirty()
    (rows,) = client.pushed
    users = {e.user_id for e in imps} | {c.user_id for c in clicks if c.user_id}
    assert set(rows["user"]["user_id"]) == users | {"__all__"}
    i = rows["ad"]["ad_id"].index("__all__")
    assert rows["ad"]["impressions"][i] == len(imps)


def test_dead_letters_whose_delivery_fails_are_resent_before_the_checkpoint(bootstrap, topic_names, tmp_path,
                                                                           monkeypatch):
    """The first dead letters' deliveries fail (as after a broker outage longer than the message
    timeout): the checkpoint must wait for them, and every one reaches the topic."""
    import streams.delivery
    import streams.kafka_io
    from streams.feature_updater import run
    from tests.faults import flaky_factory

    create_topics(bootstrap, topic_names.all(), partitions=3)
    imps, clicks = make_events(100, seed=3)
    produce_all(bootstrap, topic_names, imps, clicks, bad=True)
    flaky = flaky_factory(fail_first=3)  # the worker's producers from here on
    monkeypatch.setattr(streams.kafka_io, "Producer", flaky)
    monkeypatch.setattr(streams.delivery, "Producer", flaky)
    settings = make_settings(bootstrap, topic_names, tmp_path)
    out = run(settings, max_idle_s=2.0, metrics_port=0)
    assert out["dead_letters"] == len(BAD_IMPRESSIONS) + len(BAD_CLICKS)
    assert sum(len(p.failed) for p in flaky.instances) == 3  # the faults did happen
    dl = read_topic(bootstrap, topic_names.dead_letter)
    reasons = Counter(json.loads(v)["reason"] for _k, v, *_ in dl)
    assert reasons == Counter(r for _, r in BAD_IMPRESSIONS + BAD_CLICKS)


def test_duplicate_events_are_counted_once_across_restarts(bootstrap, topic_names, tmp_path):
    """Byte-identical copies of impressions and clicks (producer retries, a spool delivered twice),
    some arriving after a restart: the features equal a recount of the distinct events."""
    from features.store import FeatureStoreClient
    from streams.feature_updater import run

    create_topics(bootstrap, topic_names.all(), partitions=3)
    imps, clicks = make_events(800, seed=7)
    rng = random.Random(7)
    dup_imps = rng.sample(imps, 80)
    dup_clicks = rng.sample(clicks, max(1, len(clicks) // 5))
    produce_all(bootstrap, topic_names, imps + dup_imps[:40], clicks + dup_clicks[:5], bad=False)
    settings = make_settings(bootstrap, topic_names, tmp_path)
    out = run(settings, max_idle_s=2.0, metrics_port=0)
    produce_all(bootstrap, topic_names, dup_imps[40:], dup_clicks[5:], bad=False)  # after the restart
    out2 = run(settings, max_idle_s=2.0, metrics_port=0)
    assert_store_matches(FeatureStoreClient(settings.features, apply=False), expected_features(imps, clicks))
    assert out2["events_applied"] == len(imps) + len(clicks)
    assert out["duplicates"] == 45
    assert out2["duplicates"] == 40 + len(dup_clicks) - 5 and out2["records"] == out2["duplicates"]


def test_a_second_updater_on_the_same_state_directory_is_refused(bootstrap, topic_names, tmp_path):
    import threading

    from core.errors import ConfigError
    from streams.feature_updater import FeatureUpdater

    create_topics(bootstrap, topic_names.all(), partitions=3)
    settings = make_settings(bootstrap, topic_names, tmp_path)
    first = FeatureUpdater(settings)
    stop = threading.Event()
    t = threading.Thread(target=first.run, args=(stop,), daemon=True)
    t.start()
    try:
        from tests.harness import wait_for

        wait_for(lambda: first._consumer is not None, 30, what="the first updater running")
        with pytest.raises(ConfigError, match="another feature updater .* uses the state directory"):
            FeatureUpdater(settings).run(max_idle_s=1.0)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    # once the first one stopped, the directory is free again
    out = FeatureUpdater(settings).run(max_idle_s=0.5)
    assert out["records"] == 0


@pytest.mark.redis
def test_an_online_store_that_comes_back_empty_is_refilled(bootstrap, topic_names, tmp_path):
    """Redis restarts empty (no persistence) under a running updater: every row is readable again
    within seconds, without any new event."""
    import threading

    from features.store import FeatureStoreClient
    from streams.feature_updater import FeatureUpdater
    from tests.harness import RedisServer, wait_for

    redis = RedisServer(tmp_path / "redis").start()
    try:
        create_topics(bootstrap, topic_names.all(), partitions=3)
        imps, clicks = make_events(600, seed=8)
        produce_all(bootstrap, topic_names, imps, clicks, bad=False)
        settings = make_settings(bootstrap, topic_names, tmp_path, "redis", redis.address)
        upd = FeatureUpdater(settings)
        stop = threading.Event()
        t = threading.Thread(target=upd.run, args=(stop,), daemon=True)
        t.start()
        exp = expected_features(imps, clicks)
        reader = FeatureStoreClient(settings.features, apply=False)
        users = list(exp["user"].index)

        def all_users_there():
            try:
                got = reader.read("user", users)
            except Exception:  # noqa: BLE001 - Redis restarting
                return False
            return all(got[u] is not None and got[u]["impressions"] == exp["user"].loc[u, "impressions"]
                       for u in users)

        try:
            wait_for(all_users_there, 60, what="features pushed")
            redis.stop()
            time.sleep(1.5)  # the updater keeps running against a store that is gone
            redis = RedisServer(tmp_path / "redis2", port=redis.port).start()  # no persistence: empty
            wait_for(all_users_there, 15, what="every row refilled within seconds, without a new event")
        finally:
            stop.set()
            t.join(30)
        assert upd.refills >= 1
        assert_store_matches(reader, exp)
    finally:
        redis.stop()


@pytest.mark.redis
@pytest.mark.parametrize("shards", [2, 3])
def test_n_sharded_updaters_give_the_same_rows_as_one(bootstrap, topic_names, tmp_path, redis_server, shards):
    """Scale-out: n updaters running at once, each owning the entity rows of its shard, leave the
    online store exactly as one updater does (every row, field rows included), and the dead
    letters are written once."""
    import threading

    from features.aggregates import ENTITY_TYPES, FIELD_KEY, owner
    from features.store import FeatureStoreClient
    from streams.feature_updater import run, with_overrides

    _flush(redis_server.address)
    create_topics(bootstrap, topic_names.all(), partitions=3)
    imps, clicks = make_events(1200, seed=7)
    produce_all(bootstrap, topic_names, imps, clicks)
    base = make_settings(bootstrap, topic_names, tmp_path, "redis", redis_server.address)
    FeatureStoreClient(base.features)  # apply the repo once, before the workers start
    outs: dict[int, dict] = {}

    def one(i: int) -> None:
        s = with_overrides(base, shard=f"{i}/{shards}")
        outs[i] = run(s, max_idle_s=2.0, metrics_port=0, client=FeatureStoreClient(s.features, apply=False))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(outs) == list(range(shards))
    n_bad = len(BAD_IMPRESSIONS) + len(BAD_CLICKS)
    assert all(o["records"] == len(imps) + len(clicks) + n_bad for o in outs.values())  # each reads all
    client = FeatureStoreClient(base.features, apply=False)
    expected = expected_features(imps, clicks)
    assert_store_matches(client, expected)
    # the rows really were split: each shard's state holds exactly the keys it owns (field rows: shard 0)
    from streams.feature_updater import load_checkpoint

    keys = [(e, k) for e in ENTITY_TYPES for k in expected[e].index if k != FIELD_KEY]
    owners = Counter(owner(e, k, shards) for e, k in keys)
    assert len(owners) == shards and min(owners.values()) > len(keys) / (3 * shards)
    for i in range(shards):
        snap = load_checkpoint(tmp_path / "ckpt" / f"shard-{i}-of-{shards}" / "checkpoint.pkl")["state"]
        held = {(e, k) for e, rows in snap["rows"].items() for k in rows}
        want = {(e, k) for e, k in keys if owner(e, k, shards) == i}
        if i == 0:
            want |= {(e, FIELD_KEY) for e in ENTITY_TYPES}
        assert held == want, i
    dl = read_topic(bootstrap, topic_names.dead_letter)
    assert len(dl) == n_bad  # once, by shard 0

    # the same store from one updater (fresh checkpoint, fresh Redis): identical rows
    got_sharded = {e: client.read(e, list(expected[e].index)) for e in ENTITY_TYPES}
    _flush(redis_server.address)
    one_s = base.model_copy(update={"features": base.features.model_copy(
        update={"checkpoint_dir": tmp_path / "ckpt-one"})})
    run(one_s, max_idle_s=2.0, metrics_port=0, client=FeatureStoreClient(one_s.features, apply=False))
    got_one = {e: client.read(e, list(expected[e].index)) for e in ENTITY_TYPES}
    # equal up to float rounding (the order partitions interleave in differs from run to run)
    for e in ENTITY_TYPES:
        assert got_one[e].keys() == got_sharded[e].keys()
        for k, row in got_one[e].items():
            assert row.keys() == got_sharded[e][k].keys()
            for col, v in row.items():
                assert got_sharded[e][k][col] == pytest.approx(v, rel=1e-9, abs=1e-9), (e, k, col)
