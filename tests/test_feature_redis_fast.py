"""The lean Redis path (``features.redis_online``) against Feast's own Redis store, on a real
redis-server from the harness: same bytes written, same values read (also through Feast's
``get_online_features``), newest event time wins inside Redis, a clear error when Redis is down."""

from __future__ import annotations

import random
import socket
import time
from datetime import datetime, timezone

import pytest

from core.events import Click, Impression
from core.settings import FeatureSettings
from features.aggregates import AggregateState

pytestmark = pytest.mark.redis

HL = [60.0, 3600.0]
T0 = 1_700_000_000.123456


@pytest.fixture
def rdb(redis_server):
    import redis as redis_py

    host, port = redis_server.address.rsplit(":", 1)
    r = redis_py.Redis(host=host, port=int(port))
    r.flushall()  # shared server: start from empty
    return r


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory, redis_server):
    """One Feast repository for the module, applied once (apply is the slow part)."""
    from features.store import FeatureStoreClient

    d = tmp_path_factory.mktemp("fast")
    FeatureStoreClient(FeatureSettings(repo_dir=d / "repo", online_store="redis",
                                       redis_url=redis_server.address, half_lives_s=HL))
    return d


def make(redis_server, tmp_path, fast: bool, apply: bool = False, url: str | None = None):
    from features.store import FeatureStoreClient

    settings = FeatureSettings(repo_dir=tmp_path / "repo", online_store="redis",
                               redis_url=url or redis_server.address, half_lives_s=HL,
                               fast_path=fast, redis_timeout_s=1.0)
    return FeatureStoreClient(settings, apply=apply)


def folded(n: int = 60) -> AggregateState:
    s = AggregateState(HL)
    for i in range(n):  # odd keys: non-ASCII, long, with separators
        ad = ["a1", "äd-2", "x" * 300, "a:4|5", ""][i % 5] or "a0"
        s.apply_impression(Impression(request_id=f"r{i}", event_time=T0 + i * 0.37, user_id=f"u{i % 3}",
                                      query="q é", ad_id=ad, creative_id=f"{ad}-c", bidword="bw",
                                      category="cat", position=1, bid=0.5))
    s.apply_click(Click(request_id="r1", event_time=T0 + 40, ad_id="a1", user_id="u1", query="q é"))
    return s


def dump(r) -> dict:
    return {k: r.hgetall(k) for k in r.keys()}


def test_fast_writer_writes_feasts_bytes(redis_server, rdb, tmp_path):
    rows = folded().dirty_rows()
    feast_path = make(redis_server, tmp_path, fast=False)
    assert feast_path.push(rows, to="online")["ad"] == 6
    by_feast = dump(rdb)
    rdb.flushall()
    fast = make(redis_server, tmp_path, fast=True)
    assert fast.fast_path and fast.push(rows, to="online")["ad"] == 6
    by_fast = dump(rdb)
    assert len(by_fast) == sum(len(c["event_time"]) for c in rows.values())
    assert by_fast == by_feast  # same keys, same hash fields, same serialised values and _ts


def test_fast_and_feast_reads_agree(redis_server, rdb, tmp_path):
    s = folded()
    fast = make(redis_server, tmp_path, fast=True)
    fast.push(s.dirty_rows(), to="online")
    slow = make(redis_server, tmp_path, fast=False)
    ads = ["a1", "äd-2", "x" * 300, "a:4|5", "a0", "never-seen"]
    kw = dict(creative_ids=[f"{a}-c" for a in ads], query="q é", categories=["cat"] * len(ads))
    a, b = fast.read_for_request("u1", ads, **kw), slow.read_for_request("u1", ads, **kw)
    assert a == b
    assert a["ads"][0]["ad"]["clicks"] == 1 and a["ads"][-1]["ad"]["impressions"] is None
    assert fast.read("ad", ads) == slow.read("ad", ads)
    for key in ads[:-1]:
        want = s.row_values("ad", key)
        assert a["ads"][ads.index(key)]["ad"]["event_time"] == want["event_time"]
    # Feast's public read API sees the rows the fast path wrote
    feats = ["ad_stats:impressions", "ad_stats:clicks", "ad_stats:imp_1m", "ad_stats:event_time"]
    got = slow.store.get_online_features(features=feats, entity_rows=[{"ad_id": k} for k in ads]).to_dict()
    for i, key in enumerate(ads[:-1]):
        want = s.row_values("ad", key)
        assert got["impressions"][i] == want["impressions"] and got["clicks"][i] == want["clicks"]
        assert got["imp_1m"][i] == want["imp_1m"] and got["event_time"][i] == want["event_time"]
    assert got["impressions"][-1] is None


def row(client, key: str, t: float, n: int) -> dict:
    return {"ad": {"ad_id": [key], **{c: [n if k == "int" else float(t)] for c, k in client.schema}}}


def test_newest_event_time_wins_across_writers(redis_server, rdb, tmp_path):
    a = make(redis_server, tmp_path, fast=True)
    b = make(redis_server, tmp_path, fast=True)  # a second writer: no shared cache
    assert a.push(row(a, "x", T0 + 100, 5), to="online") == {"ad": 1}
    assert b.push(row(b, "x", T0 + 50, 1), to="online") == {"ad": 0}  # older: dropped in Redis
    assert a.read("ad", ["x"])["x"]["impressions"] == 5
    assert b.push(row(b, "x", T0 + 100, 7), to="online") == {"ad": 1}  # equal time: written
    assert a.read("ad", ["x"])["x"]["impressions"] == 7
    # a row written by Feast's path is respected too, and shuffled batches end at the newest
    slow = make(redis_server, tmp_path, fast=False)
    slow.push(row(slow, "y", T0 + 300, 3), to="online")
    assert a.push(row(a, "y", T0 + 299.999999, 9), to="online") == {"ad": 0}
    versions = [(T0 + i * 0.5, i) for i in range(40)]
    random.Random(4).shuffle(versions)
    for t, n in versions:
        (a if n % 2 else b).push(row(a, "z", t, n), to="online")
    assert a.read("ad", ["z"])["z"]["impressions"] == 39
    # replaying the same write is idempotent
    before = dump(rdb)
    a.push(row(a, "z", T0 + 39 * 0.5, 39), to="online")
    assert dump(rdb) == before


def test_script_and_connection_recovered_after_redis_lost_them(redis_server, rdb, tmp_path):
    fast = make(redis_server, tmp_path, fast=True)
    fast.push(row(fast, "x", T0, 1), to="online")
    rdb.script_flush()  # what a Redis restart does
    assert fast.push(row(fast, "x", T0 + 1, 2), to="online") == {"ad": 1}
    assert fast.read("ad", ["x"])["x"]["impressions"] == 2
    rdb.client_kill_filter(_type="normal", skipme=True)  # the pooled connection dies
    assert fast.read("ad", ["x"])["x"]["impressions"] == 2  # replaced once, no error


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "feast"])
def test_redis_down_raises_feature_store_unavailable(redis_server, rdb, tmp_path, fast):
    from features.store import FeatureStoreUnavailable

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    down = make(redis_server, tmp_path, fast=fast, apply=False, url=dead)
    t0 = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable, match=dead):
        down.read_for_request("u1", ["a1", "a2"])
    if fast:  # no retries with backoff on the fast path: a request fails at once
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(FeatureStoreUnavailable):
            down.read("ad", ["a1"])
        with pytest.raises(FeatureStoreUnavailable):
            down.push(row(down, "x", T0, 1), to="online")
    else:  # Feast's client retries with backoff (seconds): one write is enough
        with pytest.raises(FeatureStoreUnavailable):
            down.push(row(down, "x", T0, 1), to="online")


def test_timestamp_bytes_match_feast_rounding():
    from google.protobuf.timestamp_pb2 import Timestamp

    from features.redis_online import timestamp_bytes

    rng = random.Random(7)
    times = [rng.uniform(0, 4e9) for _ in range(20000)]
    times += [T0, 0.0, 1.0, 1e9 + 0.9999995, 1_700_000_000.0000005, 1_700_000_000.5]
    for t in times:
        ts = Timestamp()
        ts.FromDatetime(datetime.fromtimestamp(round(t, 6), tz=timezone.utc))
        assert timestamp_bytes(t) == ts.SerializeToString(), t
