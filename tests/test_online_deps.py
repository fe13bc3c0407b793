"""Online service against real dependencies: Redis (Feast online store) stopped and restarted
mid-run, impressions on the real broker, the broker unreachable, the inventory feed, and
``adstream serve`` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.events import BidwordChange, Impression, decode
from core.settings import FeatureSettings, KafkaSettings, Settings
from features.aggregates import AggregateState
from online.app import create_app, serve_in_thread
from online.index import world_inventory
from tests.harness import RedisServer, free_port, wait_for
from tests.test_online_common import queries, settings, world, world_index

REPO = Path(__file__).resolve().parents[1]


def _post(h: httpx.Client, q: str, user: str = "u00001", slots: int = 3) -> httpx.Response:
    return h.post("/v1/ads", json={"user_id": user, "query": q, "slots": slots})


@pytest.mark.slow
@pytest.mark.redis
def test_feature_store_outage_degrades_then_recovers(tmp_path, one_torch_thread):
    """Redis is stopped mid-run: every response is still 200, flagged ``features``; when Redis is
    back (same port, empty) and the rows are pushed again (what the feature updater's refill does,
    tests/test_feature_updater.py), the served impressions carry the store's values again."""
    from core.ports import ListSink
    from features.store import FeatureStoreClient

    redis = RedisServer(tmp_path / "redis").start()
    sink = ListSink()

    def user_impressions(since: int) -> list:
        return [decode(v, Impression).features.get("user_impressions") for _t, _k, v in sink.records[since:]]

    try:
        fs = FeatureStoreClient(FeatureSettings(repo_dir=tmp_path / "repo", online_store="redis",
                                                redis_url=redis.address, half_lives_s=[3600.0]))
        q = queries(1)[0]
        app = create_app(settings(feature_retry_s=0.2), registry_root=tmp_path / "reg", feature_store=fs,
                         index=world_index(), sink=sink)
        ad_ids = [c.ad_id for c in app.state.index.candidates(app.state.service.rewriter.rewrite(q), None)]
        t0 = world().config.epoch
        state = AggregateState([3600.0])
        from core.events import Click

        for i, ad in enumerate(ad_ids[:5]):
            for j in range(10):
                imp = Impression(request_id=f"r{i}-{j}", event_time=t0 + j, user_id="u00001", query=q,
                                 ad_id=ad, creative_id=f"{ad}-c0", bidword="b", category="c", position=0, bid=1.0)
                state.apply_impression(imp)
            state.apply_click(Click(request_id=f"r{i}-0", event_time=t0 + 20, ad_id=ad, user_id="u00001",
                                    creative_id=f"{ad}-c0"))
        fs.push(state.dirty_rows(), to="online")
        srv = serve_in_thread(app)
        results: list[tuple[int, list[str]]] = []
        took: list[float] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=srv.url, timeout=10) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    r = _post(h, q)
                    took.append(time.perf_counter() - t)
                    results.append((r.status_code, r.json().get("degraded", []) if r.status_code == 200 else []))

        t = threading.Thread(target=load)
        try:
            t.start()
            wait_for(lambda: len(results) > 10, 30, what="first responses")
            assert all(code == 200 and "features" not in d for code, d in results), results[:5]
            assert set(user_impressions(0)) == {50}  # the user's row as pushed: 5 ads x 10
            redis.stop()
            n_stop = len(results)
            wait_for(lambda: len(results) > n_stop + 20, 30, what="responses while Redis is down")
            down = results[n_stop + 2:]
            assert all(code == 200 for code, _ in results), [c for c, _ in results if c != 200][:5]
            assert all("features" in d for _, d in down), down[:5]
            assert max(took[n_stop:]) < 2.0  # the read deadline bounds a request, however the store fails
            redis = RedisServer(tmp_path / "redis2", port=redis.port).start()  # empty
            n_back = len(results)
            wait_for(lambda: any("features" not in d for _, d in results[n_back:]), 30, what="store answers")
            fs.push(state.all_rows(), to="online")  # the refill
            n_sink = len(sink.records)
            wait_for(lambda: 50 in user_impressions(n_sink), 30, what="store values served again")
            with httpx.Client(base_url=srv.url, timeout=10) as h:
                text = h.get("/metrics").text
            assert 'adstream_serve_degraded_total{component="features"}' in text
        finally:
            stop.set()
            t.join(10)
            srv.stop()
        assert all(code == 200 for code, _ in results)
    finally:
        redis.stop()


@pytest.mark.redis
@pytest.mark.parametrize("creative_features", ["request", "cache"])
def test_served_features_come_from_the_store(tmp_path, redis_server, one_torch_thread, creative_features):
    """The impression carries what the store held for the served ad, creative and user (creative
    rows read per request, or from the refreshed in-memory cache)."""
    import redis as redis_py

    from core.ports import ListSink
    from features.store import FeatureStoreClient

    redis_py.Redis(host=redis_server.host, port=redis_server.port).flushall()
    fs = FeatureStoreClient(FeatureSettings(repo_dir=tmp_path / "repo", online_store="redis",
                                            redis_url=redis_server.address, half_lives_s=[3600.0]))
    q = queries(1)[0]
    sink = ListSink()
    app = create_app(settings(creative_features=creative_features, creative_cache_refresh_s=0.1),
                     registry_root=tmp_path / "reg", feature_store=fs, index=world_index(), sink=sink)
    svc = app.state.service
    ad_ids = [c.ad_id for c in svc.index.candidates(svc.rewriter.rewrite(q), svc.classifier.classify(q, svc.rewriter.rewrite(q)))]
    state = AggregateState([3600.0])
    t0 = world().config.epoch
    for i, ad in enumerate(ad_ids):
        state.apply_impression(Impression(request_id=f"r{i}", event_time=t0 + i, user_id="u9", query=q, ad_id=ad,
                                          creative_id=f"{ad}-c1", bidword="b", category="c", position=0, bid=1.0))
    fs.push(state.dirty_rows(), to="online")
    from online.service import AdRequestData

    if svc.creative_cache is not None:
        wait_for(lambda: svc.creative_cache.get(f"{ad_ids[0]}-c1"), 10, what="creative cache refreshed")

    out = svc.handle(AdRequestData(user_id="u9", query=q, slots=3))
    assert "features" not in out["degraded"]
    assert len(sink.records) == len(out["ads"]) == 3  # the loop below checks every served ad
    for _topic, _key, value in sink.records:
        imp = decode(value, Impression)
        assert imp.features["ad_impressions"] == 1 and imp.features["user_impressions"] == len(ad_ids)
        assert imp.features["query_impressions"] == len(ad_ids)
        want_cr = 1 if imp.creative_id.endswith("-c1") else None
        assert imp.features["creative_impressions"] == want_cr
    app.state.close()


def test_impressions_reach_the_topic_and_inventory_feeds_the_index(bootstrap, kafka_settings, tmp_path,
                                                                  one_torch_thread):
    """``build_app`` (what ``adstream serve`` runs): the index is built from the bidword-inventory
    topic; every served ad is one valid Impression on the impressions topic."""
    from adstream.cmd_serve import build_app
    from streams.kafka_io import create_topics, make_producer, produce_json, read_topic

    topics = kafka_settings.topics
    create_topics(bootstrap, [topics.impressions, topics.bidword_inventory], 2)
    changes = world_inventory(world())
    p = make_producer(bootstrap)
    for c in changes:
        produce_json(p, topics.bidword_inventory, c.key, c.to_json())
    produce_json(p, topics.bidword_inventory, b"bad", b'{"v":1,"type":"bidword_change","ad_id":"x"}')
    assert p.flush(30) == 0
    s = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topics), serve=settings())
    wired = build_app(s, bootstrap=bootstrap, world=world(), feature_store=None, registry_root=tmp_path / "reg",
                      wait_inventory_s=60)
    srv = serve_in_thread(wired.app)
    served = []
    try:
        assert wired.feed.caught_up.is_set() and wired.feed.invalid == 1
        assert wired.feed.applied == len(changes) and len(wired.app.state.index) == len(world().ads) - 20
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert h.get("/readyz").json()["checks"]["inventory"] is True
            for i, q in enumerate(queries(10)):
                r = _post(h, q, user=f"u{i:05d}", slots=3)
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["ads"]
                served += [(out["request_id"], a["ad_id"], a["creative_id"], a["position"]) for a in out["ads"]]
            # a new ad goes live through the topic
            new = BidwordChange(event_time=1.0, ad_id="a9999", bidword="zebra lamp", action="add", bid=5.0,
                                category="home/desk-lamps")
            produce_json(p, topics.bidword_inventory, new.key, new.to_json())
            p.flush(10)
            wait_for(lambda: _post(h, "zebra lamp").json()["ads"][:1] and
                     _post(h, "zebra lamp").json()["ads"][0]["ad_id"] == "a9999", 30, what="new ad served")
        assert wired.sink.flush(30) == 0
        recs = read_topic(bootstrap, topics.impressions)
        imps = [decode(value, Impression) for _k, value, *_ in recs]
        got = {(i.request_id, i.ad_id, i.creative_id, i.position) for i in imps}
        assert set(served) <= got
        for imp, rec in zip(imps, recs):
            assert rec[0].decode() == imp.request_id and imp.model_versions["ctr"] == "prior"
            assert imp.features["match"] and "ad_ctr_1h" in imp.features
        assert wired.sink.dropped == 0
    finally:
        srv.stop()
        wired.close()


def test_broker_down_still_serves_spools_and_counts_what_overflows(tmp_path, one_torch_thread):
    """No broker: every request is answered at once; impressions go to the on-disk spool until it
    is full, then count as lost (a counter, and an error in the log)."""
    from streams.event_sink import KafkaEventSink

    sink = KafkaEventSink(f"127.0.0.1:{free_port()}", buffer=5, timeout_ms=500, spool_dir=tmp_path / "spool",
                          spool_max_bytes=8 * 1024)
    app = create_app(settings(), registry_root=tmp_path / "reg", sink=sink, index=world_index())
    srv = serve_in_thread(app)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            t0 = time.perf_counter()
            codes = [_post(h, q, slots=3).status_code for q in queries(10)]
            elapsed = time.perf_counter() - t0
            assert codes == [200] * 10 and elapsed < 5
            wait_for(lambda: sink.spooled + sink.dropped == 30, 20, what="every impression spooled or dropped")
            assert sink.spooled > 0 and sink.dropped > 0  # 8 KiB hold a few impressions, not 30
            text = h.get("/metrics").text
            assert f"adstream_serve_impression_log_dropped_total {float(sink.dropped)}" in text
            assert f"adstream_serve_impression_log_spooled_total {float(sink.spooled)}" in text
            assert "adstream_serve_impressions_logged_total 30.0" in text
    finally:
        srv.stop()
        sink.close(timeout_s=0.5)


@pytest.mark.slow
def test_adstream_serve_process(tmp_path):
    """``adstream serve --port P`` as a process: answers, then stops on SIGTERM."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "ADSTREAM_SERVE__ADMIN_TOKEN": "t0ken"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adstream", "serve", "--port", str(port), "--no-kafka", "--no-features",
         "--world-seed", "7", "--initial-inventory", "world", "--registry-dir", str(tmp_path / "reg")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_for(up, 120, what="adstream serve up")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        r = httpx.post(url + "/v1/ads", json={"user_id": "u1", "query": queries(1)[0], "slots": 2}, timeout=10)
        assert r.status_code == 200 and len(r.json()["ads"]) == 2
        assert set(r.json()["degraded"]) == {"features", "ctr_model"}
        r = httpx.post(url + "/v1/admin/models/ctr/rollback", headers={"Authorization": "Bearer t0ken"}, timeout=10)
        assert r.status_code == 409 and "roll back" in r.json()["detail"]
    finally:
        proc.terminate()
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_serve_rejects_a_bad_port(tmp_path):
    r = subprocess.run([sys.executable, "-m", "adstream", "serve", "--port", "70000", "--no-kafka",
                        "--no-features"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "70000" in r.stderr
