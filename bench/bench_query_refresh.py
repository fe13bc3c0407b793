"""Click -> served version delay of the query classifier, on a real broker.

The chain: examples (Kafka) -> the faust refresh agent (decayed click statistics, query snapshots)
-> the shared model worker (windows of ``--window`` snapshots, gate on the next window, registry)
-> the generic online loader (polls every 0.5 s). After 15 minutes of the world's examples have
been learned (the worker has worked through that backlog) and a version is served, ``--moves`` times one query's clicks move to another
category while the rest of the traffic goes on; the delay is wall time from producing the moved
clicks to the first served version whose top category for that query is the new one. The
background traffic is produced at ``--rate`` examples/s of wall time (it fills the windows).

usage: python bench/bench_query_refresh.py [--bootstrap H:P] [--moves 3] [--window 40]
       [--features minilm] [--out bench/results/query_refresh.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", help="an existing Kafka cluster (default: start the embedded broker)")
    p.add_argument("--moves", type=int, default=3)
    p.add_argument("--window", type=int, default=40, help="snapshots per window of the model worker")
    p.add_argument("--rate", type=float, default=200.0, help="background examples per second of wall time")
    p.add_argument("--features", choices=["minilm", "hash"], default="minilm")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on one move after this many seconds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "query_refresh.json"))
    a = p.parse_args()
    import torch
    import yaml

    from core.events import encode
    from core.settings import BrokerSettings, KafkaSettings, QuerySettings, Settings, TopicNames, TrainerSettings
    from core.world import DriftConfig, World, WorldConfig
    from models.query.stream import QueryStreamModel
    from online.models import ModelLoader
    from streams.broker import EmbeddedBroker
    from streams.kafka_io import create_topics, make_producer
    from streams.query_refresh import query_worker
    from tests.test_query_refresh import example_of

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="qrefresh-"))
    broker = None
    if a.bootstrap:
        bootstrap = a.bootstrap
    else:
        broker = EmbeddedBroker(BrokerSettings(), data_dir=tmp / "broker", port=0)
        broker.start()
        bootstrap = broker.bootstrap
    prefix = f"qb-{uuid.uuid4().hex[:6]}-"
    topics = TopicNames(**{k: prefix + v for k, v in TopicNames().model_dump().items()})
    s = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topics, partitions=2),
                 trainer=TrainerSettings(registry_dir=tmp / "registry"),
                 query=QuerySettings(features=a.features, checkpoint_dir=tmp / "qtrain", refresh_checkpoint_dir=tmp / "qref",
                                     window_snapshots=a.window, min_window=5, emit_interval_s=20.0, half_life_s=600.0,
                                     checkpoint_interval_s=0.5),
                 state_dir=tmp / "state")
    cfg = tmp / "settings.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(s.model_dump_json())))
    create_topics(bootstrap, topics.all(), 2)
    world = World(WorldConfig(seed=3, n_users=400, drift=DriftConfig.none()))
    now = time.time()
    hist = world.to_examples_frame(start_time=now - 7200, duration_s=900, requests_per_s=6, seed=5).to_dict("records")
    gold = {q.text: q.category for q in world.queries}
    prod = make_producer(bootstrap)

    def send(rows) -> None:
        for r in rows:
            prod.produce(topics.examples, encode(example_of(r)), key=f"{r['request_id']}:{r['ad_id']}")
            prod.poll(0)
        prod.flush(30)

    send(hist)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    agent = subprocess.Popen([sys.executable, "-m", "streams.query_refresh", "refresh", "--bootstrap", bootstrap,
                              "--config", str(cfg), "--app-id", prefix + "refresh"], cwd=ROOT, env=env,
                             stdout=open(tmp / "refresh.log", "wb"), stderr=subprocess.STDOUT)
    stop = threading.Event()
    worker = query_worker(s, bootstrap)
    th = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    th.start()
    loader = ModelLoader(s.trainer.registry_dir, "query-classifier", poll_s=0.5, build=QueryStreamModel.from_state).start()
    result: dict = {"machine": platform.node(), "features": a.features, "window_snapshots": a.window,
                    "background_rate": a.rate, "moves": []}
    t_start = time.monotonic()
    try:
        while loader.current is None and time.monotonic() - t_start < 600:
            time.sleep(1)
        result["first_version_s"] = round(time.monotonic() - t_start, 1)
        hist_end = max(r["event_time"] for r in hist)
        wfile = tmp / "qtrain" / "windows.jsonl"
        while time.monotonic() - t_start < 900:  # the worker works through the history backlog first
            lines = wfile.read_text().splitlines() if wfile.is_file() else []
            if lines and json.loads(lines[-1])["event_time_max"] >= hist_end - 120:
                break
            time.sleep(1)
        result["history_caught_up_s"] = round(time.monotonic() - t_start, 1)
        counts: dict[str, int] = {}
        for r in hist:
            counts[r["query"]] = counts.get(r["query"], 0) + r["clicked"]
        movers = sorted(counts, key=lambda q: -counts[q])[: a.moves]
        targets = ["home/sofas", "kitchen/kettles", "beauty/perfume", "shoes/sandals", "electronics/cameras"]
        t_ev = now - 7200 + 900
        for i, q in enumerate(movers):
            target = next(t for t in targets[i:] + targets if not gold[q] == t)
            bg = world.to_examples_frame(start_time=t_ev, duration_s=300, requests_per_s=6, seed=20 + i).to_dict("records")
            t_ev += 300
            moved = []
            for j, r in enumerate(bg):
                if r["query"] == q:
                    continue
                moved.append(r)
                if j % 3 == 0:
                    moved.append(dict(r, query=q, category=target, bidword="moved", clicked=1,
                                      request_id=f"mv{i}-{j}", ad_id="a9999", creative_id="a9999-c0"))
            t0 = time.monotonic()
            step = max(1, int(a.rate))
            done = None
            k = 0
            while time.monotonic() - t0 < a.timeout:
                if k < len(moved):
                    send(moved[k:k + step])
                    k += step
                cur = loader.current
                top = cur.predict([q])[0] if cur is not None else []
                if top and top[0][0] == target:
                    done = time.monotonic() - t0
                    break
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
            rec = {"query": q, "from": gold[q], "to": target, "delay_s": round(done, 1) if done else None,
                   "served_version": loader.current.version if loader.current else None}
            result["moves"].append(rec)
            print(json.dumps(rec), flush=True)
    finally:
        loader.stop()
        stop.set()
        th.join(120)
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        if broker is not None:
            broker.stop()
    ws = [json.loads(x) for x in (tmp / "qtrain" / "windows.jsonl").read_text().splitlines()] \
        if (tmp / "qtrain" / "windows.jsonl").is_file() else []
    result["windows"] = len(ws)
    result["gate"] = {g: sum(1 for w in ws if w.get("gate") == g) for g in ("publish", "reject", "none")}
    result["train_seconds_mean"] = round(sum(w.get("train_seconds") or 0 for w in ws) / max(1, len(ws)), 2)
    delays = [m["delay_s"] for m in result["moves"] if m["delay_s"] is not None]
    result["delay_s"] = {"mean": round(sum(delays) / len(delays), 1) if delays else None,
                         "max": max(delays) if delays else None, "followed": len(delays), "moves": len(result["moves"])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("first_version_s", "delay_s", "windows", "gate")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
