"""Feature freshness and feature-updater throughput: Redis through the lean path, Redis through
Feast's provider, and sqlite, one after the other in one run.

Phase 1 (freshness): a paced confluent-kafka producer sends impressions (+15% clicks) at ``--rate``
events/s for ``--seconds`` while the updater runs in-process. Two measures:

* ``worker``: for every event, push completed - Kafka append timestamp (what the updater exports
  as ``adstream_feature_freshness_seconds``);
* ``probe``: every 0.2 s an impression of a brand-new ad is produced and a separate reader polls
  the online store until that ad's row is readable: produce call -> readable, end to end.

Phase 2 (throughput): ``--backlog`` events are produced first, then a fresh updater (new repo and
checkpoint) drains them; events/s = backlog / drain time.

    PYTHONPATH=. .venv/bin/python bench/bench_feature_freshness.py --seconds 20 --rate 10000 \\
        --stores redis redis-feast sqlite --out bench/results/feature_freshness.json

Starts its own broker (embedded, free port) and redis-server unless --bootstrap / --redis-url.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from core.events import Click, Impression, encode
from core.settings import BrokerSettings, FeatureSettings, KafkaSettings, Settings, TopicNames
from core.metrics import WorkerMetrics

log = logging.getLogger("bench_feature_freshness")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_s": pct(xs, 0.5), "p99_s": pct(xs, 0.99), "max_s": max(xs) if xs else None}


class EventGen:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.i = 0

    def next(self, now: float) -> list:
        r = self.rng
        self.i += 1
        a = r.randrange(5000)
        imp = Impression(request_id=f"q{self.i}", event_time=now, user_id=f"u{r.randrange(100_000)}",
                         query=f"query{r.randrange(2000)}", ad_id=f"a{a}", creative_id=f"a{a}-c{r.randrange(3)}",
                         bidword=f"bw{a % 800}", category=f"cat{a % 40}", position=r.randrange(10), bid=0.5)
        out = [imp]
        if r.random() < 0.15:
            out.append(Click(request_id=imp.request_id, event_time=now, ad_id=imp.ad_id, user_id=imp.user_id,
                             creative_id=imp.creative_id, query=imp.query, bidword=imp.bidword,
                             category=imp.category))
        return out


def produce_paced(producer, topics: TopicNames, rate: float, seconds: float, gen: EventGen,
                  probe_cb=None) -> int:
    n, start = 0, time.time()
    next_probe = start
    probe_i = 0
    while True:
        now = time.time()
        if now - start >= seconds:
            break
        due = int((now - start) * rate)
        while n < due:
            for e in gen.next(now):
                producer.produce(topics.clicks if isinstance(e, Click) else topics.impressions, encode(e), key=e.key)
                n += 1
        if probe_cb and now >= next_probe:
            probe_i += 1
            ad = f"probe-{probe_i}-{uuid.uuid4().hex[:6]}"
            e = Impression(request_id=f"p{probe_i}", event_time=now, user_id="probe", query="probe", ad_id=ad,
                           creative_id=ad, bidword="probe", category="probe", position=0, bid=0.0)
            producer.produce(topics.impressions, encode(e), key=e.key)
            probe_cb(ad, time.time())
            n += 1
            next_probe += 0.2
        producer.poll(0)
        time.sleep(0.002)
    producer.flush(30)
    return n


def run_store(store: str, bootstrap: str, redis_url: str, args, work: Path) -> dict:
    from features.store import FeatureStoreClient
    from streams.feature_updater import run
    from streams.kafka_io import create_topics, make_producer

    prefix = f"bench-{store}-{uuid.uuid4().hex[:6]}-"
    topics = TopicNames(**{k: prefix + v for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics.all(), partitions=6)

    def settings(tag: str) -> Settings:
        return Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topics),
                        features=FeatureSettings(repo_dir=work / f"{store}-{tag}-repo",
                                                 checkpoint_dir=work / f"{store}-{tag}-ckpt",
                                                 online_store="redis" if store.startswith("redis") else store,
                                                 fast_path=store != "redis-feast", redis_url=redis_url,
                                                 flush_interval_s=args.flush_interval))

    # ---- phase 1: steady rate ----
    s1 = settings("fresh")
    reader = FeatureStoreClient(s1.features)  # also applies the repo before the worker starts
    worker_fresh: list[float] = []
    push_s: list[float] = []
    rows: list[int] = []

    def on_flush(st):
        worker_fresh.extend(st.freshness_s)
        push_s.append(st.push_s)
        rows.append(st.rows)

    stop = threading.Event()
    out: dict = {}
    wclient = FeatureStoreClient(s1.features, apply=False)  # opened outside the measured part
    t = threading.Thread(target=lambda: out.update(run(s1, stop, metrics=WorkerMetrics("feature_updater"),
                                                       metrics_port=0, on_flush=on_flush,
                                                       client=wclient)), daemon=True)
    t.start()
    time.sleep(args.warmup)
    probes: dict[str, float] = {}
    probe_lat: list[float] = []
    probe_lock = threading.Lock()
    read_errors: list[str] = []
    done_producing = threading.Event()

    def poll_probes():
        while not (done_producing.is_set() and not probes):
            with probe_lock:
                pending = list(probes.items())
            if pending:
                try:
                    got = reader.read("ad", [a for a, _ in pending], features=["impressions"])
                except Exception as e:  # e.g. sqlite busy: count it, try again
                    read_errors.append(repr(e)[:200])
                    time.sleep(0.05)
                    continue
                now = time.time()
                with probe_lock:
                    for a, t0 in pending:
                        if got[a]["impressions"]:
                            probe_lat.append(now - t0)
                            probes.pop(a, None)
                        elif now - t0 > 30:
                            probes.pop(a, None)
            time.sleep(0.01)

    pt = threading.Thread(target=poll_probes, daemon=True)
    pt.start()

    def add_probe(ad, t0):
        with probe_lock:
            probes[ad] = t0

    producer = make_producer(bootstrap, linger_ms=5)
    t0 = time.time()
    produced = produce_paced(producer, topics, args.rate, args.seconds, EventGen(1), add_probe)
    prod_s = time.time() - t0
    done_producing.set()
    pt.join(60)
    time.sleep(2.0)
    stop.set()
    t.join(120)
    # discard the warm-up (first 2 s of freshness samples may include the start-up backlog)
    res = {
        "produced": produced, "produce_s": round(prod_s, 2), "achieved_rate": round(produced / prod_s),
        "freshness_worker": summary(worker_fresh), "freshness_probe_end_to_end": summary(probe_lat),
        "push_s": summary(push_s), "rows_per_push_p50": pct(rows, 0.5), "pushes": len(push_s),
        "updater_records": out.get("records"), "probe_read_errors": len(read_errors),
    }
    # ---- phase 2: drain a backlog ----
    topics2 = TopicNames(**{k: prefix + "b-" + v for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics2.all(), partitions=6)
    gen = EventGen(2)
    n = 0
    now = time.time()
    while n < args.backlog:
        for e in gen.next(now + n * 1e-4):
            producer.produce(topics2.clicks if isinstance(e, Click) else topics2.impressions, encode(e), key=e.key)
            n += 1
        if n % 10000 == 0:
            producer.poll(0)
    producer.flush(60)
    s2 = settings("drain").model_copy(update={"kafka": KafkaSettings(bootstrap=bootstrap, topics=topics2)})
    c2 = FeatureStoreClient(s2.features)  # apply outside the timed part
    t0 = time.time()
    out2 = run(s2, max_idle_s=2.0, metrics_port=0, client=c2)
    drain = time.time() - t0 - 2.0
    res["throughput"] = {"events": out2["records"], "drain_s": round(drain, 2),
                         "events_per_s": round(out2["records"] / drain)}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=10_000.0, help="events/s (impressions + clicks)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--flush-interval", type=float, default=0.5)
    p.add_argument("--stores", nargs="+", default=["redis", "redis-feast", "sqlite"],
                   choices=["sqlite", "redis", "redis-feast"],
                   help="redis = Redis through the lean path (features.redis_online), redis-feast = the "
                        "same Redis through Feast's provider")
    p.add_argument("--bootstrap", help="existing Kafka (default: start an embedded broker)")
    p.add_argument("--redis-url", help="existing Redis host:port (default: start redis-server)")
    p.add_argument("--out", default="bench/results/feature_freshness.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="adstream-bench-features-"))
    broker = redis_proc = None
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            from streams.broker import EmbeddedBroker

            broker = EmbeddedBroker(BrokerSettings(), data_dir=work / "broker", port=0).start()
            bootstrap = broker.bootstrap
        redis_url = args.redis_url
        if any(s.startswith("redis") for s in args.stores) and not redis_url:
            from streams.broker import free_port

            port = free_port()
            redis_proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        import os

        results = {"load_avg_1m_at_start": os.getloadavg()[0], "rate_target": args.rate, "seconds": args.seconds, "flush_interval_s": args.flush_interval,
                   "bootstrap_kind": getattr(broker, "kind", "external"), "stores": {}}
        for store in args.stores:
            print(f"== {store}", flush=True)
            if store.startswith("redis") and redis_proc is not None:  # our own server: start empty
                import redis

                host, port = redis_url.rsplit(":", 1)
                redis.Redis(host=host, port=int(port)).flushall()
            results["stores"][store] = r = run_store(store, bootstrap, redis_url or "", args, work)
            print(json.dumps(r, indent=2), flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
