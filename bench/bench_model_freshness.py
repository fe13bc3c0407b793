"""Click -> served model version, measured in the loop: joiner -> trainer -> registry -> online loader.

One process runs the kafka joiner, the stream trainer and the online ``ModelLoader`` (each in its
own thread, against one broker) while a paced producer writes impressions (event time = now) and
clicks on 10 % of them 1-5 s later. Clicks are measured once the loop is in a steady state (the
first attribution window has passed, ``--settle`` seconds more), for ``--seconds``, and the traffic
goes on for ``--tail`` seconds after them (plus the attribution window when positives wait for it),
so their windows fill as they would in a running system. The trainer writes the keys of every window it trains
(``windows.jsonl``) and every loader swap is recorded with the window its version was trained
through (``trained_through_window`` in its registry metadata). A click is served when the first
version trained on the window that holds its example is swapped in: latency = that swap - the
click's produce time. Clicks no version reached by the end are counted (``unserved``), not hidden.

Configurations, one after the other, same traffic:

- ``demo``: attribution window 30 s, lateness 5 s, windows of 1,500 examples, positives emitted when
  the attribution window closes (the baseline: what the loop did before positives at the click);
- ``demo-click``: the same, with positives emitted at the click (``join.emit_positives_at_click``,
  the trainer takes them: ``trainer.train_at_click``) — what ``adstream demo`` runs;
- ``fast-click``: positives at the click and windows of 300 examples (the path to <= 5 s).

    PYTHONPATH=. .venv/bin/python bench/bench_model_freshness.py --seconds 30 --out bench/results/model_freshness.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"demo": dict(window=30.0, lateness=5.0, examples=1500, at_click=False),
           "demo-click": dict(window=30.0, lateness=5.0, examples=1500, at_click=True),
           "fast-click": dict(window=30.0, lateness=5.0, examples=300, at_click=True)}


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def run_config(name: str, cfg: dict, bootstrap: str, a, work: Path) -> dict:
    import torch

    from core.events import Click, Impression, encode
    from core.settings import JoinSettings, KafkaSettings, Settings, TopicNames, TrainerSettings
    from online.models import ModelLoader
    from streams.joiner_kafka import KafkaJoiner
    from streams.kafka_io import create_topics, make_producer
    from streams.trainer import run_trainer

    torch.set_num_threads(1)
    topics = TopicNames(**{k: f"bench-mf-{name}-{uuid.uuid4().hex[:6]}-{v}" for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics.all(), partitions=3)
    root = work / name
    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topics, partitions=3),
                        join=JoinSettings(attribution_window_s=cfg["window"], allowed_lateness_s=cfg["lateness"],
                                          emit_positives_at_click=cfg["at_click"]),
                        trainer=TrainerSettings(registry_dir=root / "registry", checkpoint_dir=root / "trainer",
                                                window_examples=cfg["examples"], min_window=50, compare=None))
    stop = threading.Event()
    joiner = KafkaJoiner(settings, bootstrap, app_id=f"bench-mf-{name}-{uuid.uuid4().hex[:4]}")
    jt = threading.Thread(target=joiner.run, daemon=True)
    tt = threading.Thread(target=lambda: run_trainer(settings, stop, metrics_port=0, record_keys=True), daemon=True)
    swaps: list[tuple[float, int]] = []  # (swap time, window the version was trained through)

    def on_swap(_old, new):
        k = new.meta.get("trained_through_window")
        if k is not None:
            swaps.append((time.time(), int(k)))

    (root / "registry").mkdir(parents=True, exist_ok=True)
    loader = ModelLoader(root / "registry", "ctr", poll_s=0.5, on_swap=on_swap)
    jt.start()
    tt.start()
    loader.start()
    rng = random.Random(5)
    p = make_producer(bootstrap, linger_ms=5)
    clicks: list[tuple[float, str]] = []  # (click produce time, example key)
    due: list[tuple[float, Impression]] = []
    try:
        time.sleep(a.warmup)
        # steady state first: the attribution window has passed once and windows flow; clicks are
        # measured in [measure_from, measure_to); traffic goes on for the tail so their windows fill
        # (longer when positives wait for the window to close)
        start = time.time()
        measure_from = start + cfg["window"] + cfg["lateness"] + a.settle
        measure_to = measure_from + a.seconds
        stop_at = measure_to + a.tail + (0.0 if cfg["at_click"] else cfg["window"] + cfg["lateness"])
        i = 0
        while time.time() < stop_at or due:
            now = time.time()
            if now < stop_at:
                while i < int((now - start) * a.rate):
                    ad = f"a{rng.randrange(300)}"
                    imp = Impression(request_id=f"{name}-r{i}", event_time=now, user_id=f"u{rng.randrange(2000)}",
                                     query=f"q{rng.randrange(50)}", ad_id=ad, creative_id=f"{ad}-c{rng.randrange(3)}",
                                     bidword=f"b{rng.randrange(80)}", category=f"c{rng.randrange(10)}",
                                     position=rng.randrange(4), bid=1.0)
                    p.produce(topics.impressions, encode(imp), key=imp.key)
                    if rng.random() < 0.1:
                        due.append((now + rng.uniform(1, 5), imp))
                    i += 1
            keep = []
            for t_click, imp in due:
                if t_click <= now:
                    c = Click(request_id=imp.request_id, event_time=now, ad_id=imp.ad_id, user_id=imp.user_id)
                    p.produce(topics.clicks, encode(c), key=c.key)
                    if measure_from <= now < measure_to:
                        clicks.append((now, f"{imp.request_id}:{imp.ad_id}"))
                else:
                    keep.append((t_click, imp))
            due = keep
            p.poll(0)
            time.sleep(0.005)
        p.flush(30)
    finally:
        stop.set()
        joiner.stop()
        loader.stop()
        jt.join(60)
        tt.join(120)
    window_of: dict[str, int] = {}
    wpath = root / "trainer" / "windows.jsonl"
    for line in (wpath.read_text().splitlines() if wpath.exists() else []):
        row = json.loads(line)
        for k in row.get("keys") or ():
            window_of.setdefault(k, int(row["window"]))
    swaps.sort()
    lat, unserved, untrained = [], 0, 0
    for t_click, key in clicks:
        w = window_of.get(key)
        if w is None:
            untrained += 1
            continue
        served = next((s for s, k in swaps if k >= w), None)
        if served is None:
            unserved += 1
        else:
            lat.append(max(0.0, served - t_click))
    return {"config": cfg, "rate_impressions_per_s": a.rate, "seconds": a.seconds, "clicks": len(clicks),
            "served": len(lat), "unserved": unserved, "untrained": untrained, "swaps": len(swaps),
            "click_to_served_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": pct(lat, 1.0)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of traffic whose clicks are measured")
    ap.add_argument("--rate", type=float, default=150.0, help="impressions per second")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds for the workers to start")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds of traffic after the first attribution window before clicks are measured")
    ap.add_argument("--tail", type=float, default=30.0,
                    help="seconds of traffic after the measured span (plus the attribution window and "
                    "lateness when positives wait for it)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--bootstrap")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_freshness.json"))
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker

    work = Path(tempfile.mkdtemp(prefix="bench-model-fresh-"))
    broker = None
    try:
        b = a.bootstrap
        if not b:
            broker = EmbeddedBroker(BrokerSettings(), data_dir=work / "broker", port=0).start()
            b = broker.bootstrap
        res = {"load_avg_start": os.getloadavg(), "runs": {}}
        for name in a.configs:
            r = run_config(name, CONFIGS[name], b, a, work)
            res["runs"][name] = r
            print(name, json.dumps(r), flush=True)
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
