"""The API's own promises (docs/online.md): every malformed body gets the documented status, a query
needs a word, readiness says why it is not ready, and the OpenAPI document holds under
``schemathesis --checks all``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.events import BidwordChange
from core.ports import ListSink
from online.app import create_app, serve_in_thread
from online.index import AdIndex
from tests.test_online_common import publish, queries, settings, world_index

GOOD = b'{"user_id": "u00001", "query": "red shoes", "slots": 2}'


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    sink = ListSink()
    app = create_app(settings(), registry_root=Path("/nonexistent-registry"), sink=sink, index=world_index(),
                     start_loader=False)
    with TestClient(app) as c:
        yield c, sink


def _invalid_count(c) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('adstream_serve_requests_total{outcome="invalid"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


MALFORMED = {
    "invalid UTF-8 in a string": b'{"user_id": "u1", "query": "red \xff shoes", "slots": 2}',
    "Latin-1 instead of UTF-8": '{"user_id": "u1", "query": "caf\xe9", "slots": 2}'.encode("latin-1"),
    "invalid UTF-8 in a key": b'{"user_id": "u1", "q\xc3\x28": "x", "slots": 2}',
    "truncated UTF-8 at the end": b'{"user_id": "u1", "query": "x", "slots": 2}\xe2\x82',
    "an integer of 5,000 digits": b'{"user_id": "u1", "query": "x", "slots": 1' + b"0" * 5000 + b"}",
    "not JSON": b"hello",
    "truncated JSON": GOOD[:-3],
    "trailing garbage": GOOD + b"xx",
    "an array": b"[1, 2]",
    "a string": b'"x"',
    "null": b"null",
    "empty": b"",
    "NaN": b'{"user_id": "u1", "query": "x", "slots": NaN}',
    "a lone surrogate": b'{"user_id": "u1", "query": "\\ud800", "slots": 2}',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_every_malformed_body_is_a_422_with_a_message(client, name):
    c, sink = client
    before, n_sent = _invalid_count(c), len(sink.records)
    r = c.post("/v1/ads", content=MALFORMED[name], headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail and all(d["msg"] and "loc" in d for d in detail), detail
    assert _invalid_count(c) == before + 1  # counted as invalid, not as an error
    assert len(sink.records) == n_sent  # nothing served, nothing logged


def test_invalid_utf8_says_so(client):
    c, _ = client
    r = c.post("/v1/ads", content=MALFORMED["invalid UTF-8 in a string"], headers={"content-type": "application/json"})
    assert r.json()["detail"] == [{"loc": ["body"], "msg": "body is not valid UTF-8", "type": "json_invalid"}]


@pytest.mark.parametrize("query", ["!!!", "___", "   ", "-- ?", "\u3000", "…"])
def test_a_query_without_a_word_is_refused(client, query):
    c, _ = client
    r = c.post("/v1/ads", json={"user_id": "u1", "query": query, "slots": 2})
    assert r.status_code == 422, r.text
    assert any("query" in map(str, d["loc"]) and "word" in d["msg"] for d in r.json()["detail"])


@pytest.mark.parametrize("query", ["shoes", "été", "跑步鞋", "a!", "42", "x_y"])
def test_a_query_with_a_word_is_served(client, query):
    c, _ = client
    assert c.post("/v1/ads", json={"user_id": "u1", "query": query, "slots": 2}).status_code == 200


def test_slots_is_a_json_schema_integer(client):
    """3.0 is the integer 3 in JSON Schema (the OpenAPI document says "integer"); 2.5, "3", true are not."""
    c, _ = client
    q = queries(1)[0].encode()
    r = c.post("/v1/ads", content=b'{"user_id": "u1", "query": "' + q + b'", "slots": 3.0}',
               headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["ads"]) == 3, r.text
    for bad in (b"2.5", b'"3"', b"true", b"1e400"):
        r = c.post("/v1/ads", content=b'{"user_id": "u1", "query": "' + q + b'", "slots": ' + bad + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 422, (bad, r.text)


def test_not_ready_while_there_are_no_ads(tmp_path):
    from fastapi.testclient import TestClient

    index = AdIndex()
    app = create_app(settings(), registry_root=tmp_path / "registry", index=index, feature_store=object())
    with TestClient(app) as c:
        r = c.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["checks"]["ads"] is False and body["index_ads"] == 0
        assert len(body["why"]) == 1 and "no ads to serve" in body["why"][0] and "--initial-inventory" in body["why"][0]
        index.apply(BidwordChange(event_time=1.0, ad_id="a1", bidword="red shoes", bid=1.0, action="add",
                                  category="shoes/running"))
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["ads"] is True and r.json()["why"] == []


@pytest.mark.slow
def test_schemathesis_checks_all(tmp_path, one_torch_thread):
    """The schemathesis command line, every check (``--checks all``), against a ready service with a
    model, a real (sqlite) feature store and the world's ads."""
    from core.settings import FeatureSettings
    from features.store import FeatureStoreClient

    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis (`st`) is in requirements/base.txt"
    root = tmp_path / "registry"
    publish(root, 0)
    fs = FeatureStoreClient(FeatureSettings(repo_dir=tmp_path / "repo"), apply=True)
    app = create_app(settings(admin_token="fuzz-token"), registry_root=root, sink=ListSink(), index=world_index(),
                     feature_store=fs)
    srv = serve_in_thread(app)
    try:
        import httpx

        assert httpx.get(srv.url + "/readyz").status_code == 200
        r = subprocess.run([st, "run", srv.url + "/openapi.json", "--checks", "all", "--max-examples", "30",
                            "--seed", "7", "--no-color", "-H", "Authorization: Bearer fuzz-token"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        srv.stop()
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "6/6" in r.stdout and "passed" in r.stdout
