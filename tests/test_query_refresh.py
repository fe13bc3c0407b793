"""Query classification refreshed from the stream, on a real Kafka broker.

- the faust refresh agent turns ``examples`` into query snapshots, the shared model worker trains
  the classifier window by window, the registry + gate publish it and the generic online loader
  serves it: a query whose clicks move to another category is served with that category within
  the configured interval;
- a poisoned refresh (a window of shuffled labels) is rejected by the gate and never served;
- bad records on both topics are dead-lettered, never crash a worker.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.events import Example, encode
from core.settings import KafkaSettings, QuerySettings, Settings, TrainerSettings
from core.world import DriftConfig, World, WorldConfig
from models.query.stats import QueryClickStats
from models.query.stream import QueryStreamModel
from models.registry import ModelRegistry
from online.models import ModelLoader
from streams.broker import free_port
from streams.kafka_io import create_topics, make_producer, read_topic
from streams.query_refresh import decode_snapshot, encode_snapshot, query_worker

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parent.parent
NAME = "query-classifier"


def make_settings(bootstrap, topic_names, tmp_path, partitions=2, **query) -> Settings:
    base = dict(features="hash", checkpoint_dir=tmp_path / "qtrain", refresh_checkpoint_dir=tmp_path / "qrefresh",
                window_snapshots=40, min_window=5, finetune_steps=15, emit_interval_s=20.0, half_life_s=600.0,
                checkpoint_interval_s=0.5)
    return Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=partitions),
                    trainer=TrainerSettings(registry_dir=tmp_path / "registry"),
                    query=QuerySettings(**{**base, **query}), state_dir=tmp_path / "state")


def world_examples(duration_s: float, start: float, seed: int = 5) -> tuple[World, list[dict]]:
    w = World(WorldConfig(seed=3, n_users=400, drift=DriftConfig.none()))
    df = w.to_examples_frame(start_time=start, duration_s=duration_s, requests_per_s=6, seed=seed)
    return w, df.to_dict("records")


def example_of(r: dict) -> Example:
    return Example(request_id=r["request_id"], event_time=float(r["event_time"]), user_id=r["user_id"],
                   query=r["query"], ad_id=r["ad_id"], creative_id=r["creative_id"], bidword=r["bidword"],
                   category=r["category"], position=int(r["position"]), bid=float(r["bid"]), slot=r["slot"],
                   domain=r["domain"], clicked=int(r["clicked"]), converted=int(r["converted"]))


def produce(bootstrap, topic, items) -> None:
    p = make_producer(bootstrap)
    for key, value in items:
        p.produce(topic, value, key=key)
        p.poll(0)
    assert p.flush(30) == 0 and p.errors == 0


def windows(settings) -> list[dict]:
    f = Path(settings.query.checkpoint_dir) / "windows.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def served_versions_ok(registry_root, queries, gold, min_acc):
    """Every published version predicts most queries' gold category (top 1)."""
    reg = ModelRegistry(registry_root, NAME)
    out = {}
    for v in reg.versions():
        state, _ = reg.load(v)
        m = QueryStreamModel.from_state(state)
        pred = m.predict(queries)
        out[v] = sum(1 for q, p in zip(queries, pred) if p and p[0][0] == gold[q]) / len(queries)
    return {v: a for v, a in out.items() if a < min_acc}, out


# ---- the gate -----------------------------------------------------------------------------------
def test_a_poisoned_refresh_is_rejected_and_never_served(bootstrap, topic_names, tmp_path):
    s = make_settings(bootstrap, topic_names, tmp_path, partitions=1, window_snapshots=60)
    create_topics(bootstrap, topic_names.all(), 1)  # one partition: windows follow the production order
    w, recs = world_examples(1800, start=1.7e9)
    stats = QueryClickStats()
    chunks = [recs[i * len(recs) // 7:(i + 1) * len(recs) // 7] for i in range(7)]
    items, poisoned_keys = [], set()
    for k, chunk in enumerate(chunks):
        touched = sorted(stats.add_many(chunk))
        snaps = [stats.snapshot(q) for q in touched if stats.labels(q)][:60]
        assert len(snaps) == 60
        if k == 3:  # the poisoned refresh: every query gets another query's labels
            labels = [x["labels"] for x in snaps]
            random.Random(1).shuffle(labels)
            snaps = [dict(x, labels=ls) for x, ls in zip(snaps, labels)]
        for x in snaps:
            key, _, _ = decode_snapshot(encode_snapshot(x), time.time())
            if k == 3:
                poisoned_keys.add(key)
            items.append((x["query"].encode(), encode_snapshot(x)))
    items.insert(100, (b"bad", b"{not json"))
    items.insert(200, (b"bad", json.dumps({"type": "query_snapshot", "query": "x", "labels": [1],
                                           "event_time": 1.0}).encode()))
    produce(bootstrap, topic_names.query_labels, items)
    worker = query_worker(s, bootstrap, record_keys=True)
    worker.cfg.max_windows = 7
    summary = worker.run()
    assert summary is not None
    ws = windows(s)
    assert len(ws) == 7
    poisoned = next(x["window"] for x in ws if set(x["keys"]) == poisoned_keys)
    after = next(x for x in ws if x["window"] == poisoned + 1)
    assert after["gate"] == "reject", after
    assert all(x["gate"] == "publish" for x in ws if x["window"] not in (0, poisoned + 1)), \
        [(x["window"], x["gate"]) for x in ws]
    reg = ModelRegistry(s.trainer.registry_dir, NAME)
    assert len(reg.versions(rejected=True)) == 1
    gold = {q.text: q.category for q in w.queries}
    queries = sorted({r["query"] for r in recs})[:80]
    bad, accs = served_versions_ok(s.trainer.registry_dir, queries, gold, 0.6)
    assert not bad, accs
    rej = reg.versions(rejected=True)[0]
    assert rej not in [h["version"] for h in reg.history()]  # LATEST never pointed at it
    dead = [json.loads(v) for _k, v, *_ in read_topic(bootstrap, topic_names.dead_letter, timeout_s=20)]
    assert {d["reason"] for d in dead} >= {"malformed_json", "wrong_type"}
    # Prometheus: versions by gate outcome and the per-version quality on the latest window
    r = worker.metrics.registry
    assert r.get_sample_value("adstream_trainer_gate_decisions_total", {"name": NAME, "outcome": "reject"}) == 1
    assert r.get_sample_value("adstream_trainer_gate_decisions_total", {"name": NAME, "outcome": "publish"}) >= 5
    for model in ("candidate", "serving"):
        f1 = r.get_sample_value("adstream_trainer_window_score", {"name": NAME, "model": model, "metric": "f1"})
        assert f1 is not None and 0.5 < f1 <= 1.0, (model, f1)


# ---- the full chain -----------------------------------------------------------------------------
def start_refresh(bootstrap, config: Path, log_path: Path, metrics_port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "streams.query_refresh", "refresh", "--bootstrap", bootstrap,
                             "--config", str(config), "--app-id", f"qr-{config.parent.name}",
                             "--metrics-port", str(metrics_port)],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def stop(proc, timeout=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_served_version_follows_a_moved_query(bootstrap, topic_names, tmp_path):
    interval_s = 120.0  # the configured bound: two windows of snapshots + the loader's poll
    s = make_settings(bootstrap, topic_names, tmp_path, window_snapshots=40)
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(s.model_dump_json())))
    create_topics(bootstrap, topic_names.all(), 2)
    now = time.time()
    w, recs = world_examples(600, start=now - 4000)
    hist_end = max(r["event_time"] for r in recs)
    gold = {q.text: q.category for q in w.queries}
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["query"]] = counts.get(r["query"], 0) + r["clicked"]
    q = max((x for x in counts if gold[x].startswith("outdoor/")), key=counts.get)
    target = "home/sofas"
    bad = [(b"bad", b"\xff\xfe not json"), (b"bad", encode(example_of(recs[0])).replace(b'"clicked":', b'"clicked":"x","c":'))]
    produce(bootstrap, topic_names.examples, [(f"{r['request_id']}:{r['ad_id']}", encode(example_of(r))) for r in recs] + bad)
    metrics_port = free_port()
    agent = start_refresh(bootstrap, cfg, tmp_path / "refresh.log", metrics_port)
    stop_ev = threading.Event()
    worker = query_worker(s, bootstrap)
    th = threading.Thread(target=worker.run, args=(stop_ev,), daemon=True)
    th.start()
    loader = ModelLoader(s.trainer.registry_dir, NAME, poll_s=0.5, build=QueryStreamModel.from_state).start()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            cur = loader.current
            if cur is not None and cur.predict([q])[0] and cur.predict([q])[0][0][0] == gold[q]:
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"no served version classifies {q!r} as {gold[q]} ({loader.last_error}); "
                        f"windows {windows(s)[-3:]}; log {(tmp_path / 'refresh.log').read_text()[-2000:]}")
        # the worker has caught up with the history: from here on the delay is the refresh's own
        while time.monotonic() < deadline + 150:
            ws = windows(s)
            if ws and ws[-1]["event_time_max"] >= hist_end - 120:
                break
            time.sleep(1.0)
        # the query's clicks move to another category (a new intent), traffic on other queries goes on
        t0 = now - 4000 + 600
        _, more = world_examples(600, start=t0, seed=9)
        moved = []
        for i, r in enumerate(more):
            if r["query"] == q:
                continue
            moved.append(r)
            if i % 3 == 0:
                moved.append(dict(r, query=q, category=target, bidword="leather sofas", clicked=1,
                                  request_id=f"mv-{i}", ad_id="a9999", creative_id="a9999-c0"))
        t_move = time.monotonic()
        produce(bootstrap, topic_names.examples, [(f"{r['request_id']}:{r['ad_id']}", encode(example_of(r))) for r in moved])
        while time.monotonic() - t_move < interval_s:
            cur = loader.current
            top = cur.predict([q])[0] if cur is not None else []
            if top and top[0][0] == target:
                break
            time.sleep(0.5)
        delay = time.monotonic() - t_move
        assert delay < interval_s, f"served version still says {top} after {delay:.0f}s; windows {windows(s)[-3:]}"
        assert agent.poll() is None, "the refresh agent died"
        # the refresh agent's Prometheus metrics: snapshots produced, queries held, refresh lag
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        samples = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                   if ln.startswith("adstream_query_refresh_")}
        assert samples.get("adstream_query_refresh_snapshots_total", 0) > 0, samples
        assert samples.get("adstream_query_refresh_queries", 0) > 0, samples
        assert math.isfinite(samples.get("adstream_query_refresh_lag_seconds", math.nan)), samples
    finally:
        loader.stop()
        stop_ev.set()
        th.join(60)
        stop(agent)
    dead = [json.loads(v) for _k, v, *_ in read_topic(bootstrap, topic_names.dead_letter, timeout_s=20)]
    assert len(dead) >= 2 and all(d["topic"] == topic_names.examples for d in dead)
