"""``adstream simulate-traffic``: progress while it sends, what it waits for afterwards, and clicks
that never reached Kafka counted in its report (and its exit code)."""

from __future__ import annotations

import json

import pytest

from core.ports import ListSink
from online.app import create_app, serve_in_thread
from streams.broker import free_port
from streams.kafka_io import create_topics, read_topic
from tests.test_online_common import settings, world_index

pytestmark = [pytest.mark.kafka]


@pytest.fixture(scope="module")
def service():
    app = create_app(settings(), registry_root="/nonexistent-registry", sink=ListSink(), index=world_index(),
                     start_loader=False)
    srv = serve_in_thread(app)
    yield srv.url
    srv.stop()


def _report(out: str) -> dict:
    return json.loads(out[out.index("\n{") + 1: out.rindex("}") + 1])


def _topic_env(monkeypatch, topic_names) -> None:
    for k, v in topic_names.model_dump().items():
        monkeypatch.setenv(f"ADSTREAM_KAFKA__TOPICS__{k.upper()}", v)


def test_progress_waiting_and_every_click_delivered(service, bootstrap, topic_names, monkeypatch, capsys):
    from adstream.cli import main

    create_topics(bootstrap, topic_names.all(), 2)
    _topic_env(monkeypatch, topic_names)
    rc = main(["--bootstrap", bootstrap, "simulate-traffic", "--url", service, "--duration", "4", "--rate", "25",
               "--click-delay", "4", "--world-seed", "7", "--max-wait", "60"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "simulate-traffic: 25 requests/s for 4s" in out and "t=   0s/4s" in out
    assert "requests done; waiting for" in out and "clicks and conversions dated in the future" in out
    rep = _report(out)
    assert rep["clicks"] > 0 and rep["delivery_failures"] == 0 and rep["delivery_error"] is None
    assert rep["clicks_produced"] == rep["clicks"] + rep["conversions"] == rep["clicks_delivered"]
    on_kafka = len(read_topic(bootstrap, topic_names.clicks)) + len(read_topic(bootstrap, topic_names.conversions))
    assert on_kafka == rep["clicks_produced"]


def test_clicks_that_never_reach_kafka_are_counted(service, topic_names, monkeypatch, capsys):
    from adstream.cli import main

    _topic_env(monkeypatch, topic_names)
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    rc = main(["--bootstrap", nowhere, "simulate-traffic", "--url", service, "--requests", "60", "--rate", "30",
               "--click-delay", "0.5", "--world-seed", "7", "--max-wait", "0", "--delivery-timeout", "2"])
    cap = capsys.readouterr()
    assert rc == 1
    rep = _report(cap.out)
    assert rep["ok"] == 60 and rep["clicks"] > 0
    assert rep["delivery_failures"] == rep["clicks_produced"] == rep["clicks"] + rep["conversions"]
    assert rep["clicks_delivered"] == 0 and rep["delivery_error"]
    assert f"did not reach Kafka at {nowhere}" in cap.err
