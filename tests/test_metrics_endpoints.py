"""Metrics by Prometheus conventions (core/metrics.py): ``promtool check metrics`` is clean on every
exposition, label sets stay the same across a worker restart (no process ids), and the joiner's
watermark gauge follows the watermark, not the commits.

The bring-up test (tests/test_readme_bringup.py) runs promtool on the four endpoints of a running
stack as well."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.events import Impression
from streams.broker import free_port
from streams.kafka_io import create_topics, make_producer, produce_json
from tests.harness import wait_for
from tests.promcheck import promtool_problems, scrape_text, series, values

ROOT = Path(__file__).resolve().parents[1]


def test_promtool_clean_on_every_registry(tmp_path) -> None:
    """Every metric family of every registry, with samples in it (in-process: fast, no services)."""
    from fastapi.testclient import TestClient
    from prometheus_client import generate_latest

    from core.metrics import WorkerMetrics
    from online.app import create_app
    from streams.worker_metrics import ModelWorkerMetrics
    from tests.test_online_common import queries, settings, world_index

    w = WorkerMetrics("joiner")
    w.records_in.labels("joiner", "impressions").inc(3)
    w.records_out.labels("joiner", "examples").inc()
    w.dead_letters.labels("joiner", "late").inc()
    w.join_outcomes.labels("joined").inc()
    w.late_records.labels("joiner", "all").inc()
    w.consumer_lag.labels("joiner", "impressions", "0").set(4)
    w.processing_latency.labels("joiner").observe(0.01)
    w.feature_freshness.observe(0.2)
    w.features_written.labels("ad").inc()
    w.export_watermarks({0: 1.7e9, 1: float("-inf")})
    m = ModelWorkerMetrics(worker="trainer")
    m.bind("ctr", ["ctr"])
    m.set_scores("ctr", "candidate", {"auc": 0.7, "logloss": 0.4, "calibration": 1.0})
    m.evicted_early("ctr", 3)
    app = create_app(settings(), registry_root=tmp_path / "registry", index=world_index(), start_loader=False)
    with TestClient(app) as c:
        c.post("/v1/ads", json={"user_id": "u1", "query": queries(1)[0], "slots": 2})
        c.post("/v1/ads", json={"user_id": "u1", "query": "!!!", "slots": 2})
        serve_text = c.get("/metrics").text
    for name, text in (("worker", generate_latest(w.registry).decode()),
                       ("trainer", generate_latest(m.registry).decode()), ("serve", serve_text)):
        assert promtool_problems(text) == "", f"{name}:\n{promtool_problems(text)}"
    assert "adstream_serve_inventory_changes_total" in serve_text
    assert "adstream_trainer_dedup_evicted_early_total" in generate_latest(m.registry).decode()
    assert values(generate_latest(w.registry).decode(), "adstream_watermark_seconds") == {
        (("partition", "0"), ("worker", "joiner")): 1.7e9}  # no series for a partition without a watermark


def _impressions(start: float, n: int, seed: str) -> list[Impression]:
    return [Impression(request_id=f"{seed}-{i}", event_time=start + i * 60.0 / n, ad_id=f"a{i % 7}",
                       user_id=f"u{i % 5}", creative_id=f"a{i % 7}-c0", query="red shoes", bidword="shoes",
                       category="shoes/running", position=i % 4, bid=1.0)
            for i in range(n)]


def _produce(bootstrap: str, topic: str, events: list[Impression]) -> None:
    p = make_producer(bootstrap)
    for e in events:
        produce_json(p, topic, e.request_id, e.to_json())
    assert p.flush(30) == 0


def _start_joiner(bootstrap: str, prefix: str, port: int, log: Path, runtime: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streams.joiner", "--bootstrap", bootstrap, "--topic-prefix", prefix,
           "--app-id", prefix + "joiner", "--window", "600", "--lateness", "0", "--runtime", runtime,
           "--partitions", "2", "--metrics-port", str(port)]
    return subprocess.Popen(cmd, cwd=log.parent, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _scrape(port: int) -> str:
    try:
        return scrape_text(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return ""


def _records_in(text: str) -> float:
    return sum(values(text, "adstream_records_in_total").values())


def _watermarks(text: str) -> dict[str, float]:
    return {dict(k)["partition"]: v for k, v in values(text, "adstream_watermark_seconds").items()}


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["kafka", "faust"])
def test_joiner_series_survive_a_restart_and_the_watermark_gauge_moves(bootstrap, topic_names, unique_topic_prefix,
                                                                       tmp_path, runtime) -> None:
    create_topics(bootstrap, topic_names.all(), 2)
    t0 = time.time() - 7200.0
    first, second = _impressions(t0, 40, "a"), _impressions(t0 + 300.0, 40, "b")
    log = tmp_path / "joiner.log"
    port = free_port()
    j = _start_joiner(bootstrap, unique_topic_prefix, port, log, runtime)
    try:
        _produce(bootstrap, topic_names.impressions, first)
        text = wait_for(lambda: (t := _scrape(port)) and _records_in(t) >= 40 and len(_watermarks(t)) == 2 and t,
                        60, 0.5, "the joiner reading the first batch")
        w1 = max(_watermarks(text).values())
        assert t0 + 50 <= w1 <= t0 + 60
        # every impression is still open (600 s window): nothing new to commit, yet the watermark moves
        _produce(bootstrap, topic_names.impressions, second)
        text = wait_for(lambda: (t := _scrape(port)) and max(_watermarks(t).values(), default=0) >= t0 + 350 and t,
                        60, 0.5, "the watermark gauge following the second batch")
        assert _records_in(text) >= 80
        before = series(text)
        assert promtool_problems(text) == "", promtool_problems(text)
        assert {v for _n, labels in before for k, v in labels if k == "worker"} == {"joiner"}  # a role, no pid
    finally:
        _stop(j)
    j = _start_joiner(bootstrap, unique_topic_prefix, port, log, runtime)  # same command, new process
    try:
        text = wait_for(lambda: (t := _scrape(port)) and _records_in(t) >= 80 and len(_watermarks(t)) == 2 and t,
                        60, 0.5, "the restarted joiner re-reading the open impressions")
        after = series(text)
    finally:
        _stop(j)
    assert after == before, f"new series: {sorted(after - before)[:5]}; gone: {sorted(before - after)[:5]}"
    assert "attribution window 600s + allowed lateness 0s" in log.read_text()
    assert "\x1b[" not in log.read_text()  # no terminal control codes (faust's spinner) in a log file
