"""Stream-trainer throughput and model freshness, against a real broker.

Phase 1 (throughput): ``--examples`` synthetic-world examples are produced to a fresh ``examples``
topic first. Then, in the same run:

* ``raw_consume``: a plain confluent-kafka consumer reads the backlog (no decoding): the ceiling;
* ``consume_decode``: the same plus the worker's batch decode of every consumed batch
  (``streams.model_worker.decode_examples``, as the trainer does);
* ``trainer``: ``streams.trainer`` drains the backlog (windows of ``--window`` examples, gate,
  training, registry writes, checkpoint per window). Examples/s = examples / (last window done -
  start of the trainer; torch imports excluded), plus the time spent training and gating. A second
  trainer run with the ``--compare`` shadow learner gives next-window AUC/LogLoss of both
  strategies on the same windows.

Phase 2 (freshness): a paced producer writes examples whose event time is "now" at ``--rate``
examples/s for ``--seconds`` while a trainer runs in a thread. For every published version:
publish time - event time of the newest example the version trained on (``newest``), and of
the oldest example of the newest window in it (``oldest``). The gate publishes the model trained
through window k-1 when window k is complete, so freshness is about one to two windows of traffic
plus the training time.

    PYTHONPATH=. .venv/bin/python bench/bench_trainer.py --examples 40000 --window 5000 \\
        --out bench/results/trainer.json

Starts its own broker (embedded, free port) unless --bootstrap.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from core.events import Example, encode
from core.settings import BrokerSettings, KafkaSettings, Settings, TopicNames, TrainerSettings

log = logging.getLogger("bench_trainer")


def world_examples(n: int, seed: int, drift: str = "all") -> list[Example]:
    """``n`` examples of the synthetic world; its drift (``all``, ``none``, ...) happens inside them."""
    from core.world import DriftConfig, World, WorldConfig

    duration = n / 30.0 + 60  # about 30 examples per second of event time
    world = World(WorldConfig(seed=seed, drift=DriftConfig.parse(drift, horizon_s=duration)))
    df = world.to_examples_frame(duration_s=duration, requests_per_s=10.0, seed=seed).head(n)
    return [Example(request_id=r.request_id, event_time=float(r.event_time), user_id=r.user_id, query=r.query,
                    ad_id=r.ad_id, creative_id=r.creative_id, bidword=r.bidword, category=r.category,
                    position=int(r.position), bid=float(r.bid), slot=r.slot, domain=r.domain,
                    clicked=int(r.clicked), converted=int(r.converted),
                    features={"segment": r.segment, "match": r.match, "top_category": r.top_category,
                              "advertiser": r.advertiser, "query_len": int(r.query_len)})
            for r in df.itertuples(index=False)]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def consume_all(bootstrap: str, topic: str, n: int, do_decode: bool) -> float:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    md = c.list_topics(topic=topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    from streams.model_worker import decode_examples

    got = 0
    t0 = time.perf_counter()
    while got < n:
        msgs = [m for m in c.consume(num_messages=1000, timeout=1.0) if m.error() is None]
        got += len(msgs)
        if do_decode and msgs:
            decode_examples([m.value() for m in msgs], time.time())
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def settings_for(bootstrap: str, topics: TopicNames, root: Path, args: argparse.Namespace, **kw) -> Settings:
    tr = dict(registry_dir=root / "registry", checkpoint_dir=root / "ckpt", window_examples=args.window,
              strategy=args.strategy, compare=args.compare, min_window=100, threads=args.threads)
    tr.update(kw)
    return Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topics, partitions=args.partitions),
                    trainer=TrainerSettings(**tr))


def phase_throughput(bootstrap: str, args: argparse.Namespace, root: Path, compare: str | None) -> dict:
    import models.ctr  # noqa: F401  (torchrec takes seconds to import: not part of the measurement)
    import models.evaluation  # noqa: F401
    import models.registry  # noqa: F401
    from streams.kafka_io import create_topics, make_producer
    from streams.trainer import run_trainer

    topics = TopicNames(**{k: f"bench-tr-{uuid.uuid4().hex[:6]}-{v}" for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics.all(), partitions=args.partitions)
    exs = world_examples(args.examples, args.seed, args.drift)
    p = make_producer(bootstrap, linger_ms=20)
    for ex in exs:
        while True:
            try:
                p.produce(topics.examples, encode(ex), key=ex.key)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(60) == 0
    n = len(exs)
    raw_rate = consume_all(bootstrap, topics.examples, n, False)
    dec_rate = consume_all(bootstrap, topics.examples, n, True)
    rows: list[dict] = []
    started = time.time()
    out = run_trainer(settings_for(bootstrap, topics, root / f"tp-{compare}", args, idle_exit_s=3.0,
                                   compare=compare), metrics_port=0, on_window=rows.append)
    last = max(r["wall_time"] for r in rows)
    wall = last - started
    train_s = sum(r["train_seconds"] for r in rows)
    auc = [r["auc"] for r in rows if r.get("auc") is not None]
    sh = [r["shadow_auc"] for r in rows if r.get("shadow_auc") is not None]
    return {
        "examples": n, "drift": args.drift, "windows": out["windows"], "window_examples": args.window, "partitions": args.partitions,
        "strategy": args.strategy, "compare": compare,
        "raw_consume_examples_per_s": round(raw_rate), "consume_decode_examples_per_s": round(dec_rate),
        "trainer_examples_per_s": round(out["examples_trained"] / wall),
        "trainer_wall_s": round(wall, 2), "train_seconds": round(train_s, 2),
        "gate_seconds": round(sum(r["gate_seconds"] for r in rows), 2),
        "trainer_over_raw": round(out["examples_trained"] / wall / raw_rate, 4),
        "published": out["published"], "rejected": out["rejected"],
        "auc_per_window": auc, "shadow_auc_per_window": sh,
        "mean_auc": round(sum(auc) / len(auc), 4) if auc else None,
        "mean_shadow_auc": round(sum(sh) / len(sh), 4) if sh else None,
        "logloss_per_window": [r.get("logloss") for r in rows if r.get("logloss") is not None],
        "shadow_logloss_per_window": [r.get("shadow_logloss") for r in rows if r.get("shadow_logloss") is not None],
        "gate": [r["gate"] for r in rows],
    }


def phase_freshness(bootstrap: str, args: argparse.Namespace, root: Path) -> dict:
    from streams.kafka_io import create_topics, make_producer
    from streams.trainer import run_trainer

    topics = TopicNames(**{k: f"bench-fr-{uuid.uuid4().hex[:6]}-{v}" for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics.all(), partitions=args.partitions)
    pool = world_examples(int(max(args.rate * args.seconds, 1000)), args.seed + 1, args.drift)
    rows: list[dict] = []
    stop = threading.Event()
    settings = settings_for(bootstrap, topics, root / "fr", args, window_examples=args.fresh_window, compare=None)
    th = threading.Thread(target=lambda: run_trainer(settings, stop, metrics_port=0, on_window=rows.append),
                          daemon=True)
    th.start()
    time.sleep(args.warmup)
    p = make_producer(bootstrap, linger_ms=5)
    start = time.time()
    sent = 0
    while time.time() - start < args.seconds:
        due = int((time.time() - start) * args.rate)
        while sent < due and sent < len(pool):
            ex = pool[sent]
            ex.event_time = time.time()
            p.produce(topics.examples, encode(ex), key=ex.key)
            sent += 1
        p.poll(0)
        time.sleep(0.005)
    p.flush(30)
    time.sleep(args.tail)
    stop.set()
    th.join(120)
    by_window = {r["window"]: r for r in rows}
    newest, oldest = [], []
    for r in rows:
        if r.get("gate") == "publish" and (r["window"] - 1) in by_window:
            prev = by_window[r["window"] - 1]
            pub = r["published_at"]
            newest.append(pub - prev["event_time_max"])
            oldest.append(pub - prev["event_time_min"])
    return {"rate_examples_per_s": args.rate, "seconds": args.seconds, "sent": sent,
            "window_examples": args.fresh_window, "windows": len(rows),
            "published": sum(1 for r in rows if r.get("gate") == "publish"),
            "freshness_newest_s": {"n": len(newest), "p50": pct(newest, 0.5), "p99": pct(newest, 0.99),
                                   "max": pct(newest, 1.0)},
            "freshness_oldest_s": {"n": len(oldest), "p50": pct(oldest, 0.5), "p99": pct(oldest, 0.99),
                                   "max": pct(oldest, 1.0)},
            "publish_freshness_append_s": [r.get("publish_freshness_s") for r in rows if r.get("gate") == "publish"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    ap.add_argument("--examples", type=int, default=40000)
    ap.add_argument("--window", type=int, default=5000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--compare", default="finetune", help="shadow strategy ('' = none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--drift", default="all", help="world drift within the examples: all, none, or kinds")
    ap.add_argument("--rate", type=int, default=1000, help="phase 2: examples/s")
    ap.add_argument("--seconds", type=float, default=20.0, help="phase 2: seconds of paced traffic")
    ap.add_argument("--fresh-window", type=int, default=2000, help="phase 2: window size")
    ap.add_argument("--warmup", type=float, default=12.0, help="phase 2: seconds before producing")
    ap.add_argument("--tail", type=float, default=5.0, help="phase 2: seconds after producing")
    ap.add_argument("--skip-freshness", action="store_true")
    ap.add_argument("--out", default="bench/results/trainer.json")
    args = ap.parse_args()
    args.compare = args.compare or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    broker = None
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            from streams.broker import EmbeddedBroker

            broker = EmbeddedBroker(BrokerSettings(), data_dir=root / "broker", port=0)
            broker.start()
            bootstrap = broker.bootstrap
        result = {"throughput": phase_throughput(bootstrap, args, root, None)}
        log.info("throughput: %s", json.dumps(result["throughput"]))
        if args.compare:
            result["with_shadow"] = phase_throughput(bootstrap, args, root, args.compare)
            log.info("with shadow %s: %s", args.compare, json.dumps(result["with_shadow"]))
        if not args.skip_freshness:
            result["freshness"] = phase_freshness(bootstrap, args, root)
            log.info("freshness: %s", json.dumps(result["freshness"]))
        result["note"] = "measured on the shared development machine; other jobs were running"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
