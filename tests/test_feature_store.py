"""Feast store tests: the same bodies run on the sqlite and on the Redis online store (real
redis-server on 127.0.0.1 from the harness), with the parquet offline history."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from core.events import Click, Impression
from core.settings import FeatureSettings
from features.aggregates import FIELD_KEY, AggregateState, half_life_tag, smoothed_ctr

HL = [60.0, 3600.0]
T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("redis-feast", marks=pytest.mark.redis)])
def client(request, tmp_path):
    """sqlite; Redis through the fast path (``features.redis_online``); Redis through Feast."""
    from features.store import FeatureStoreClient

    if request.param.startswith("redis"):
        redis = request.getfixturevalue("redis_server")
        import redis as redis_py

        host, port = redis.address.rsplit(":", 1)
        redis_py.Redis(host=host, port=int(port)).flushall()  # shared server: start from empty
        settings = FeatureSettings(repo_dir=tmp_path / "repo", online_store="redis",
                                   redis_url=redis.address, half_lives_s=HL,
                                   fast_path=request.param == "redis")
    else:
        settings = FeatureSettings(repo_dir=tmp_path / "repo", half_lives_s=HL)
    c = FeatureStoreClient(settings)
    assert c.fast_path == (request.param == "redis")
    return c


def imp(i, t, user="u1", ad="a1"):
    return Impression(request_id=f"r{i}", event_time=t, user_id=user, query="q", ad_id=ad,
                      creative_id=f"{ad}-cr", bidword="bw", category="cat", position=1, bid=0.5)


def test_push_then_read_back(client):
    s = AggregateState(HL)
    for i in range(30):
        s.apply_impression(imp(i, T0 + i, user=f"u{i % 3}", ad=f"a{i % 5}"))
    s.apply_click(Click(request_id="r1", event_time=T0 + 40, ad_id="a1", user_id="u1"))
    written = client.push(s.dirty_rows(), to="online_and_offline")
    assert written["ad"] == 6 and written["user"] == 4  # 5 ads / 3 users + field rows
    got = client.read("ad", ["a1", "a2", "nope"])
    for ad in ("a1", "a2"):
        want = s.row_values("ad", ad)
        for name, v in want.items():
            assert got[ad][name] == pytest.approx(v), (ad, name)
    assert got["a1"]["clicks"] == 1 and got["nope"]["impressions"] is None
    field = s.row_values("ad", FIELD_KEY)
    for h in HL:
        tag = half_life_tag(h)
        p0 = field[f"clk_{tag}"] / field[f"imp_{tag}"]
        want = smoothed_ctr(got["a1"][f"clk_{tag}"], got["a1"][f"imp_{tag}"], p0, client.settings.ctr_prior_strength)
        assert got["a1"][f"ctr_{tag}"] == pytest.approx(want)
        assert got["nope"][f"ctr_{tag}"] == pytest.approx(p0)  # unknown ad: the prior
    assert client.read("ad", ["a1"], features=["clicks"]) == {"a1": {"clicks": 1}}


def test_newest_event_time_wins(client):
    def rows(t, n):
        return {"ad": {"ad_id": ["x"], **{c: [n if k == "int" else float(t)] for c, k in client.schema}}}

    client.push(rows(T0 + 100, 5), to="online")
    client.push(rows(T0 + 50, 1), to="online")  # older: ignored
    assert client.read("ad", ["x"])["x"]["impressions"] == 5
    client.push(rows(T0 + 100, 7), to="online")  # same newest time, more events (late event): written
    assert client.read("ad", ["x"])["x"]["impressions"] == 7
    # a fresh client (e.g. after a restart) learns the stored time from the store itself
    from features.store import FeatureStoreClient

    fresh = FeatureStoreClient(client.settings, apply=False)
    fresh.push(rows(T0 + 10, 2), to="online")
    assert fresh.read("ad", ["x"])["x"]["impressions"] == 7
    fresh.push(rows(T0 + 200, 9), to="online")
    assert client.read("ad", ["x"])["x"]["impressions"] == 9


def test_read_for_request_one_user_200_ads(client):
    s = AggregateState(HL)
    for i in range(1000):
        s.apply_impression(imp(i, T0 + i, user=f"u{i % 10}", ad=f"a{i % 200}"))
    client.push(s.dirty_rows(), to="online")
    ads = [f"a{i}" for i in range(200)]
    # one batched read; its speed is measured in bench/bench_feature_read.py, not asserted here
    out = client.read_for_request("u3", ads, creative_ids=[f"{a}-cr" for a in ads], query="q",
                                  categories=["cat"] * 200)
    assert out["user"]["impressions"] == 100
    assert out["query"]["impressions"] == 1000
    assert len(out["ads"]) == 200
    for a, row in zip(ads, out["ads"]):
        assert row["ad"]["impressions"] == 5 and row["ad"]["event_time"] == s.row_values("ad", a)["event_time"]
        assert row["creative"]["impressions"] == 5 and row["category"]["impressions"] == 1000
        assert 0.0 <= row["ad"][f"ctr_{half_life_tag(60.0)}"] <= 1.0


def test_historical_point_in_time(client):
    s = AggregateState(HL)
    s.apply_impression(imp(1, T0, ad="h1"))
    client.push(s.dirty_rows(), to="online_and_offline")
    s.apply_impression(imp(2, T0 + 100, ad="h1"))
    s.apply_click(Click(request_id="r2", event_time=T0 + 110, ad_id="h1", user_id="u1"))
    client.push(s.dirty_rows(), to="online_and_offline")
    ts = pd.to_datetime([T0 - 10, T0 + 50, T0 + 105, T0 + 500], unit="s", utc=True)
    edf = pd.DataFrame({"ad_id": ["h1"] * 4, "event_timestamp": ts})
    out = client.historical(edf, entity_type="ad")
    assert len(out) == 4
    assert pd.isna(out["ad_stats__impressions"][0])  # before the first event
    # a version is visible from its newest event time on: the push that carried the impression at
    # T0+100 also carried the click at T0+110, so at T0+105 the first version is still the newest
    assert list(out["ad_stats__impressions"][1:]) == [1, 1, 2]
    assert list(out["ad_stats__clicks"][1:]) == [0, 0, 1]
    tag = half_life_tag(60.0)
    assert out[f"ad_stats__imp_{tag}"][3] == pytest.approx(2 ** (-110 / 60) + 2 ** (-10 / 60))
    assert out[f"ad_stats__ctr_{tag}"].between(0, 1).all()


def test_feast_does_not_switch_our_metrics_to_multiprocess_mode(client):
    """Feast's reads import ``feast.metrics``, which sets PROMETHEUS_MULTIPROC_DIR process-wide;
    ``features.store`` undoes it, so two workers' metrics in one process stay separate."""
    import os

    from core.metrics import WorkerMetrics

    client.read("ad", ["a1"])
    client.store.get_online_features(features=["ad_stats:clicks"], entity_rows=[{"ad_id": "a1"}])
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    a, b = WorkerMetrics("feature_updater"), WorkerMetrics("feature_updater")
    a.dead_letters.labels("feature_updater", "malformed_json").inc()
    b.dead_letters.labels("feature_updater", "malformed_json").inc()
    assert a.registry.get_sample_value("adstream_dead_letters_total",
                                       {"worker": "feature_updater", "reason": "malformed_json"}) == 1


_OPEN_CLIENT = """
import sys, time
from core.settings import FeatureSettings
print("imported", flush=True)
time.sleep(float(sys.argv[2]))
from features.store import FeatureStoreClient
c = FeatureStoreClient(FeatureSettings(repo_dir=sys.argv[1]))
print("ok", sorted(c._views), flush=True)
"""


def _open_client(repo, delay: float = 0.0):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-c", _OPEN_CLIENT, str(repo), str(delay)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.slow
def test_processes_opening_one_fresh_repository_at_once_all_get_the_views(tmp_path):
    """The demo's feature updater and service open (and apply) the same fresh repository at the
    same moment; unserialised, one could wipe the other's views ("serve exited with 1" on a first
    `make demo`; reproduced here in 1 of about 10 such rounds). Three processes, two rounds, small
    random head starts."""
    import random

    rng = random.Random(5)
    for r in range(2):
        procs = [_open_client(tmp_path / f"repo{r}", rng.uniform(0, 0.6)) for _ in range(3)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0 and "ok" in out, out[-2000:]


def test_a_client_waits_while_another_process_holds_the_repository(tmp_path):
    from features.store import repo_lock

    repo = tmp_path / "repo"
    with repo_lock(repo):
        p = _open_client(repo)
        assert p.stdout.readline().strip() == "imported"
        time.sleep(3.0)
        assert p.poll() is None  # blocked on the lock, not failing on a half-applied registry
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "ok" in out, out[-2000:]
