"""Online service: the HTTP contract, ranking, hot swap, admin auth (in-process; no broker/Redis).

Dependencies that matter for outages (Redis, Kafka) are exercised in test_online_deps.py."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from core.events import Impression, decode
from core.ports import ListSink
from online.app import create_app, serve_in_thread
from online.index import AdIndex, CountsClassifier, IndexRewriter
from online.service import AdRequestData
from core.events import BidwordChange
from tests.test_online_common import publish, queries, settings, world, world_index


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry with two published versions (v000001 seed 0, v000002 seed 1); LATEST = v000001."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    from models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("registry")
    v1 = publish(root, 0)
    v2 = publish(root, 1)
    ModelRegistry(root, "ctr").promote(v1)
    torch.set_num_threads(n)
    return root, v1, v2


@pytest.fixture
def app_client(registry, one_torch_thread):
    from fastapi.testclient import TestClient

    root, _, _ = registry
    sink = ListSink()
    app = create_app(settings(), registry_root=root, sink=sink, index=world_index())
    with TestClient(app) as c:
        yield c, app, sink


def body(**kw):
    b = {"user_id": "u00001", "query": queries(1)[0], "slots": 4}
    b.update(kw)
    return b


def test_valid_request_returns_ranked_ads_with_creatives(app_client, registry):
    c, app, sink = app_client
    _, v1, _ = registry
    r = c.post("/v1/ads", json=body(request_id="req-1"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["request_id"] == "req-1"
    assert out["model_versions"]["ctr"] == v1 and out["model_versions"]["creative"]
    ads = out["ads"]
    assert len(ads) == 4
    assert [a["position"] for a in ads] == [0, 1, 2, 3]
    ecpms = [a["ecpm"] for a in ads]
    assert ecpms == sorted(ecpms, reverse=True)
    w = world()
    for a in ads:
        assert a["creative_id"] in {cr.id for cr in w.ad_by_id[a["ad_id"]].creatives}
        assert a["ecpm"] == pytest.approx(a["pctr"] * a["bid"])
        assert 0 < a["pctr"] < 1
    assert "ctr_model" not in out["degraded"] and "features" in out["degraded"]  # no store here
    # one impression per served ad, exactly what the joiner needs
    assert len(sink.records) == 4
    for (topic, key, value), a in zip(sink.records, ads):
        imp = decode(value, Impression)
        assert topic == "impressions" and key == "req-1"
        assert (imp.request_id, imp.ad_id, imp.creative_id, imp.position) == ("req-1", a["ad_id"],
                                                                               a["creative_id"], a["position"])
        assert imp.model_versions == out["model_versions"] and imp.features["match"]
        assert imp.user_id == "u00001" and imp.bid == a["bid"]


def test_request_id_generated_and_event_time_from_context(app_client):
    c, _, sink = app_client
    t = round(time.time() - 30.0, 3)
    r = c.post("/v1/ads", json=body(slots=1, context={"event_time": t, "page": "p1"}))
    assert r.status_code == 200
    rid = r.json()["request_id"]
    assert rid and decode(sink.records[-1][2]).request_id == rid
    assert decode(sink.records[-1][2]).event_time == t


@pytest.mark.parametrize("offset_s,sign", [(290.0, "+"), (6.0, "+"), (-3600.0, "-")])
def test_event_time_far_from_the_service_clock_is_refused(app_client, offset_s, sign):
    """A client-chosen event time in the future would move the joiner's watermark for every
    request; one far in the past would only be dead-lettered as late: both get a 422 that says why."""
    c, _, sink = app_client
    n = len(sink.records)
    r = c.post("/v1/ads", json=body(slots=2, context={"event_time": time.time() + offset_s}))
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "context", "event_time"] and f"s from the service clock" in err["msg"]
    assert err["msg"].split("is ")[1].startswith(sign)
    assert len(sink.records) == n  # nothing logged
    assert c.post("/v1/ads", json=body(slots=2, context={"event_time": time.time() + 2.0})).status_code == 200


def test_a_reused_request_id_is_refused(app_client):
    """Two pages with one request_id would share (request, ad) keys: the joiner would keep one."""
    c, _, sink = app_client
    assert c.post("/v1/ads", json=body(request_id="page-7", slots=2)).status_code == 200
    n = len(sink.records)
    r = c.post("/v1/ads", json=body(request_id="page-7", slots=2, query="garden hose"))
    assert r.status_code == 409 and "already used" in r.json()["detail"]
    assert len(sink.records) == n
    assert c.post("/v1/ads", json=body(request_id="page-8", slots=2)).status_code == 200


@pytest.mark.parametrize("payload,where", [
    ({"query": "x", "slots": 2}, "user_id"),
    ({"user_id": "u", "slots": 2}, "query"),
    ({"user_id": "u", "query": "shoes"}, "slots"),
    ({"user_id": "u", "query": "shoes", "slots": 0}, "slots"),
    ({"user_id": "u", "query": "shoes", "slots": -3}, "slots"),
    ({"user_id": "u", "query": "shoes", "slots": 10_000}, "slots"),
    ({"user_id": "u", "query": "shoes", "slots": "3"}, "slots"),
    ({"user_id": "u", "query": "shoes", "slots": 2.5}, "slots"),
    ({"user_id": 12, "query": "shoes", "slots": 2}, "user_id"),
    ({"user_id": "u", "query": ["shoes"], "slots": 2}, "query"),
    ({"user_id": "u", "query": "   ", "slots": 2}, "query"),
    ({"user_id": "", "query": "shoes", "slots": 2}, "user_id"),
    ({"user_id": "u", "query": "shoes", "slots": 2, "domain": "video"}, "domain"),
    ({"user_id": "u", "query": "shoes", "slots": 2, "colour": "red"}, "colour"),
    ({"user_id": "u", "query": "shoes", "slots": 2, "context": {"a": {"nested": 1}}}, "context"),
])
def test_invalid_requests_are_4xx_with_a_message(app_client, payload, where):
    c, _, sink = app_client
    r = c.post("/v1/ads", json=payload)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(where in map(str, d["loc"]) and d["msg"] for d in detail), detail
    assert sink.records == []


def test_malformed_and_oversized_bodies(app_client):
    c, app, _ = app_client
    r = c.post("/v1/ads", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]
    big = {"user_id": "u", "query": "shoes " * 5000, "slots": 1}
    r = c.post("/v1/ads", json=big)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    # a chunked body without Content-Length is counted while read
    r = c.post("/v1/ads", content=iter([b'{"user_id": "u", "query": "', b"x" * 20_000, b'", "slots": 1}']),
               headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert c.get("/v1/ads").status_code == 405


def test_health_ready_metrics(app_client):
    c, _, _ = app_client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"model_loader": True, "feature_store": False, "ads": True}
    assert r.json()["why"] == ["no feature store is configured (serve without --no-features)"]
    c.post("/v1/ads", json=body())
    c.post("/v1/ads", json=body(slots=0))
    text = c.get("/metrics").text
    for name in ("adstream_serve_stage_latency_seconds_bucket{le=\"0.005\",stage=\"features\"}",
                 "adstream_serve_requests_total{outcome=\"degraded\"} 1.0",
                 "adstream_serve_requests_total{outcome=\"invalid\"} 1.0",
                 "adstream_serve_candidates_count 1.0", "adstream_serve_degraded_total{component=\"features\"}",
                 "adstream_serve_feature_read_seconds_count", "adstream_serve_model_age_seconds{model=\"ctr\"}",
                 "adstream_serve_model_version{model=\"ctr\"} 1.0", "adstream_serve_impression_log_dropped_total 0.0"):
        assert name in text, name
    assert c.get("/openapi.json").json()["paths"]["/v1/ads"]["post"]


def test_openapi_fuzz_finds_no_server_error(app_client):
    """Property-based fuzz of the OpenAPI document (schemathesis): valid and invalid inputs for
    every operation; none gives a 5xx, and every 200 of POST /v1/ads has ads with creatives."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis.errors import Unsatisfiable
    from hypothesis import settings as hsettings

    c, app, _ = app_client
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    ops = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            ops += 1

            @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                resp = case.call()
                not_ready = case.path == "/readyz" and resp.status_code == 503  # by design here
                if resp.status_code >= 500 and not not_ready:
                    failures.append((case.method, case.path, case.body, resp.status_code, resp.text[:200]))
                if case.path == "/v1/ads" and resp.status_code == 200:
                    assert all(a["creative_id"] for a in resp.json()["ads"])

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (e.g. GET /healthz has no parameters)
                assert mode == schemathesis.GenerationMode.NEGATIVE
                ops -= 1
    assert ops >= 8
    assert not failures, failures[:5]


def test_parallel_and_sequential_rankings_agree(app_client):
    c, app, _ = app_client
    svc = app.state.service
    before = svc.parallel_calls
    threads: list[tuple[str, str]] = []
    rank_ads, rank_creatives = svc.rank_ads, svc.rank_creatives
    svc.rank_ads = lambda *a: (threads.append(("ad", threading.current_thread().name)), rank_ads(*a))[1]
    svc.rank_creatives = lambda *a: (threads.append(("creative", threading.current_thread().name)),
                                     rank_creatives(*a))[1]
    for q in queries(8):
        req = AdRequestData(user_id="u00002", query=q, slots=5, request_id="r")
        par = svc.handle(req, parallel=True)
        seq = svc.handle(req, parallel=False)
        key = lambda out: [(a["ad_id"], a["creative_id"], round(a["pctr"], 9)) for a in out["ads"]]  # noqa: E731
        assert key(par) == key(seq) and par["ads"]
    assert svc.parallel_calls - before == 8
    par_threads = {k: name for k, name in threads[0:2]}  # the first request ran in parallel
    assert par_threads["creative"].startswith("creative-rank") and par_threads["ad"] == threading.current_thread().name
    assert {k: name for k, name in threads[2:4]} == {"ad": par_threads["ad"], "creative": par_threads["ad"]}
    c.post("/v1/ads", json=body())  # the HTTP path ranks sequentially (serve.parallel_ranking, default false)
    assert svc.parallel_calls - before == 8


def test_creative_ranker_prefers_the_better_creative():
    from online.models import BetaCreativeRanker

    r = BetaCreativeRanker(strength=20)
    rows = [{"impressions": 1000, "clicks": 10}, {"impressions": 1000, "clicks": 50}, None]
    s = r.score(rows, ad_prior=0.02)
    assert s[1] > s[2] > s[0] and s[2] == pytest.approx(0.02)


def test_no_model_ranks_by_prior_and_says_so(tmp_path, one_torch_thread):
    from fastapi.testclient import TestClient

    app = create_app(settings(), registry_root=tmp_path / "empty", sink=ListSink(), index=world_index())
    with TestClient(app) as c:
        out = c.post("/v1/ads", json=body()).json()
    assert out["model_versions"]["ctr"] == "prior" and "ctr_model" in out["degraded"] and out["ads"]


def test_index_follows_inventory_changes():
    idx = AdIndex()
    idx.set_catalog("a1", ["a1-c0", "a1-c1"], "adv1")
    idx.apply(BidwordChange(event_time=1.0, ad_id="a1", bidword="Running Shoes", action="add", bid=1.5,
                            category="shoes/running-shoes"))
    idx.apply(BidwordChange(event_time=1.0, ad_id="a2", bidword="buy running shoes", action="add", bid=0.5,
                            category="shoes/running-shoes"))
    idx.apply(BidwordChange(event_time=1.0, ad_id="a3", bidword="sandals", action="add", bid=0.9,
                            category="shoes/sandals"))
    rw, cl = IndexRewriter(idx), CountsClassifier(idx)
    m = rw.rewrite("buy running shoes")
    assert m == [("buy running shoes", "exact"), ("running shoes", "broad")]
    assert cl.classify("buy running shoes", m) == "shoes/running-shoes"
    got = idx.candidates(m, "shoes/running-shoes")
    assert [(c.ad_id, c.match) for c in got] == [("a2", "exact"), ("a1", "broad"), ("a3", "related")]
    assert got[1].creatives == ("a1-c0", "a1-c1") and got[0].creatives == ("a2-c0",)
    idx.apply(BidwordChange(event_time=2.0, ad_id="a1", bidword="running shoes", action="update", bid=3.0))
    assert idx.candidates(rw.rewrite("running shoes"), None)[0].bid == 3.0
    idx.apply(BidwordChange(event_time=3.0, ad_id="a1", bidword="running shoes", action="remove"))
    assert "a1" not in {c.ad_id for c in idx.candidates(rw.rewrite("buy running shoes"), "shoes/running-shoes")}
    assert len(idx) == 2 and cl.classify("nothing here", rw.rewrite("nothing here")) is None


def test_hot_swap_under_load_and_admin(registry, tmp_path, one_torch_thread):
    """Continuous requests from 3 clients while LATEST moves v1 -> v2 -> (rollback) v1: no failed
    request, responses switch version; admin calls need the configured bearer token."""
    import shutil

    from models.registry import ModelRegistry

    src, v1, v2 = registry
    root = tmp_path / "reg"
    shutil.copytree(src, root)
    reg = ModelRegistry(root, "ctr")
    assert reg.latest() == v1
    app = create_app(settings(admin_token="s3cret"), registry_root=root, sink=ListSink(), index=world_index())
    srv = serve_in_thread(app)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def client(k: int) -> None:
        qs = queries(10)
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            i = 0
            while not stop.is_set():
                try:
                    r = h.post("/v1/ads", json=body(query=qs[i % len(qs)], user_id=f"u{k}"))
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:100]}")
                    else:
                        seen.append(r.json()["model_versions"]["ctr"])
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: len(seen) > 20)
        assert set(seen) == {v1}
        reg.promote(v2)  # what the trainer's publish does: move LATEST
        _wait(lambda: seen[-1] == v2 and seen[-5:] == [v2] * 5)
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert h.post("/v1/admin/models/ctr/rollback").status_code == 401
            r = h.post("/v1/admin/models/ctr/rollback", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403
            r = h.post("/v1/admin/models/ctr/promote/v000001", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403
            r = h.post("/v1/admin/models/other/rollback", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 404
            r = h.post("/v1/admin/models/ctr/rollback", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.json() == {"model": "ctr", "version": v1, "serving": v1}
            n_back = len(seen)
        _wait(lambda: len(seen) > n_back + 10)
        assert seen[-1] == v1 and reg.latest() == v1
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            r = h.post(f"/v1/admin/models/ctr/promote/{v2}", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.json()["serving"] == v2
            r = h.post("/v1/admin/models/ctr/promote/v000099", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 409 and "v000099" in r.json()["detail"]
            assert h.get("/readyz").json()["model"]["version"] == v2
            metrics = h.get("/metrics").text
            assert 'adstream_serve_model_swaps_total{model="ctr"} 4.0' in metrics
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        srv.stop()
    assert not failures, failures[:5]
    i2 = seen.index(v2)
    assert set(seen[:i2]) == {v1} and len(seen) > 40


def test_admin_refused_when_no_token_configured(registry, one_torch_thread):
    from fastapi.testclient import TestClient

    root, _, _ = registry
    app = create_app(settings(admin_token=None), registry_root=root, index=world_index())
    with TestClient(app) as c:
        assert c.post("/v1/admin/models/ctr/rollback").status_code == 401
        r = c.post("/v1/admin/models/ctr/rollback", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "disabled" in r.json()["detail"]
        r = c.post("/v1/admin/models/ctr/promote/v000001", headers={"Authorization": "Bearer "})
        assert r.status_code in (401, 403)


def test_admin_on_a_read_only_registry_is_a_503_that_says_why(registry, monkeypatch, one_torch_thread):
    """The registry mounted read-only into the service (as docker-compose once did): a clear 503, not a
    500, and the served version does not move."""
    import errno

    from fastapi.testclient import TestClient

    import models.registry as registry_mod

    root, _, _ = registry
    app = create_app(settings(admin_token="s3cret"), registry_root=root, index=world_index())

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    with TestClient(app) as c:
        latest = registry_mod.ModelRegistry(root, "ctr").latest()
        monkeypatch.setattr(registry_mod, "atomic_write", read_only)
        auth = {"Authorization": "Bearer s3cret"}
        for path in ("/v1/admin/models/ctr/rollback", "/v1/admin/models/ctr/promote/v000002"):
            r = c.post(path, headers=auth)
            assert r.status_code == 503, r.text
            assert "not writable" in r.json()["detail"]
        assert registry_mod.ModelRegistry(root, "ctr").latest() == latest


def _wait(pred, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_columnar_examples_match_the_model_conversion(registry, one_torch_thread):
    """The serving path's columnar RawBatch gives the model exactly what raw_from_examples gives."""
    import numpy as np

    from models.ctr import raw_from_examples
    from models.registry import ModelRegistry
    from online.models import build_learner, examples_to_raw

    root, v1, _ = registry
    learner = build_learner(ModelRegistry(root, "ctr").load(v1)[0])
    exs = [{"user_id": f"u{i}", "query": "q", "ad_id": f"a{i:04d}", "creative_id": None, "bidword": "b",
            "category": "c", "position": i % 3, "bid": 1.0, "event_time": 5.0,
            "features": {"ad_ctr_1h": [0.1, None, "x", float("nan"), True, 3][i % 6],
                         # plain numbers, None, bool and inf only: the one-conversion path
                         "user_ctr_1h": [i, None, float("inf"), False, 0.25, -float("inf")][i % 6]}}
           for i in range(12)]
    fields, numeric = learner.fields, learner.config.numeric
    a, b = examples_to_raw(exs, fields, numeric), raw_from_examples(exs, fields, numeric)
    for f in fields:
        assert list(a.cats[f]) == list(b.cats[f])
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_allclose(learner.predict(a), learner.predict(exs))
