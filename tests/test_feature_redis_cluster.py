"""The Redis fast path against a real 3-node Redis Cluster (Feast's ``redis_type: redis_cluster``),
started by the harness, and Feast's ``key_ttl_seconds`` honoured by the fast path on a cluster and on
a standalone Redis: the fast path and Feast's own provider read the same rows, the rows are spread
over every node, the newest event time wins inside the cluster, and every written row gets the TTL."""

from __future__ import annotations

import pytest

from core.events import Click, Impression
from core.settings import FeatureSettings
from features.aggregates import AggregateState
from tests.harness import RedisClusterServer, RedisUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.slow]

HL = [60.0, 3600.0]
T0 = 1_700_000_000.25


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"))
        c.start()
    except RedisUnavailable as e:
        pytest.fail(str(e))  # a missing service is a failure, not a skip
    try:
        yield c
    finally:
        c.stop()


def folded(n: int, t0: float = T0) -> AggregateState:
    s = AggregateState(HL)
    for i in range(n):
        ad = f"ad-{i % 37}-ä"
        s.apply_impression(Impression(request_id=f"r{i}", event_time=t0 + i * 0.5, user_id=f"u{i % 53}",
                                      query=f"q{i % 11}", ad_id=ad, creative_id=f"{ad}-c{i % 2}", bidword=f"b{i % 7}",
                                      category=f"cat{i % 3}", position=i % 4, bid=0.5))
        if i % 6 == 0:
            s.apply_click(Click(request_id=f"r{i}", event_time=t0 + i * 0.5 + 2, ad_id=ad, user_id=f"u{i % 53}"))
    return s


def client(repo, url, fast, apply=False, redis_type="redis_cluster", ttl=None):
    from features.store import FeatureStoreClient

    return FeatureStoreClient(FeatureSettings(repo_dir=repo, online_store="redis", redis_url=url, half_lives_s=HL,
                                              fast_path=fast, redis_type=redis_type, redis_key_ttl_s=ttl),
                              apply=apply)


def _nodes(cluster):
    import redis as redis_py

    return [redis_py.Redis(host=n.host, port=n.port) for n in cluster.nodes]


def test_fast_path_on_a_cluster_reads_what_feast_reads(cluster, tmp_path):
    for r in _nodes(cluster):
        r.flushall()
    repo = tmp_path / "repo"
    fast = client(repo, cluster.address, True, apply=True, ttl=900)
    feast = client(repo, cluster.address, False)
    state = folded(400)
    rows = state.dirty_rows()
    written = fast.push(rows, to="online")
    assert sum(written.values()) == sum(len(c["event_time"]) for c in rows.values())
    # spread over every node (16384 slots split three ways)
    sizes = [r.dbsize() for r in _nodes(cluster)]
    assert all(s > 20 for s in sizes), sizes
    for etype, cols in rows.items():
        keys = list(cols[next(iter(cols))])
        a, b = fast.read(etype, keys), feast.read(etype, keys)
        assert a == b, etype
        for k in keys:
            want = state.row_values(etype, k)
            assert a[k]["impressions"] == want["impressions"] and a[k]["event_time"] == pytest.approx(want["event_time"])
    # the request read (one user + many ads) through both paths
    ads = list(rows["ad"]["ad_id"])
    assert fast.read_for_request("u1", ads, query="q1") == feast.read_for_request("u1", ads, query="q1")
    # an older write does not replace a newer row, inside the cluster
    old = folded(400, t0=T0 - 10_000).dirty_rows()
    assert sum(fast.push(old, to="online").values()) == 0
    assert fast.read("ad", ads) == feast.read("ad", ads)
    assert fast.read("ad", ads)[ads[0]]["event_time"] == pytest.approx(state.row_values("ad", ads[0])["event_time"])
    # key_ttl_seconds: every key the fast path wrote expires
    ttls = [r.ttl(k) for r in _nodes(cluster) for k in r.scan_iter(count=1000)]
    assert ttls and all(0 < t <= 900 for t in ttls), sorted(set(ttls))[:5]


def test_key_ttl_on_standalone_redis_matches_feast(redis_server, tmp_path):
    import redis as redis_py

    host, port = redis_server.address.rsplit(":", 1)
    r = redis_py.Redis(host=host, port=int(port))
    r.flushall()
    repo = tmp_path / "repo"
    fast = client(repo, redis_server.address, True, apply=True, redis_type="redis", ttl=600)
    fast.push(folded(50).dirty_rows(), to="online")
    ttls = [r.ttl(k) for k in r.scan_iter(count=1000)]
    assert ttls and all(0 < t <= 600 for t in ttls)
    # Feast's own writer, same settings: the same TTL
    r.flushall()
    client(repo, redis_server.address, False, redis_type="redis", ttl=600).push(folded(50).dirty_rows(), to="online")
    ttls = [r.ttl(k) for k in r.scan_iter(count=1000)]
    assert ttls and all(0 < t <= 600 for t in ttls)
    # without a TTL, rows do not expire
    r.flushall()
    client(repo, redis_server.address, True, redis_type="redis").push(folded(50).dirty_rows(), to="online")
    assert all(r.ttl(k) == -1 for k in r.scan_iter(count=1000))
