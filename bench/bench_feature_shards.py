"""Feature updaters scaled out by entity key: 1 process vs ``--shards`` processes, same input, one run.

For each configuration (1, then N updater processes: ``python -m streams.feature_updater --shard i/N``,
Redis fast path) on fresh topics and a fresh Redis database:

* ``drain``: a backlog of ``--backlog`` events is produced after the updaters are up; one sentinel
  ad per shard (an ad id that shard owns) closes it; drain seconds = produce start -> every
  sentinel readable in the online store;
* ``freshness``: then ``--rate`` events/s for ``--seconds`` with a probe impression of a new ad every
  0.2 s; freshness = probe produced -> its row readable (end to end, across whichever shard owns it).

    PYTHONPATH=. .venv/bin/python bench/bench_feature_shards.py --shards 2 --out bench/results/shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def run_config(n: int, bootstrap: str, redis_url: str, args, work: Path) -> dict:
    from bench.bench_feature_freshness import EventGen
    from core.events import Click, Impression, encode
    from core.settings import FeatureSettings, TopicNames
    from features.aggregates import owner
    from features.store import FeatureStoreClient
    from streams.kafka_io import create_topics, make_producer

    prefix = f"bench-shards{n}-{uuid.uuid4().hex[:6]}-"
    topics = TopicNames(**{k: prefix + v for k, v in TopicNames().model_dump().items()})
    create_topics(bootstrap, topics.all(), partitions=6)
    repo = work / f"repo-{n}"
    fs = FeatureSettings(repo_dir=repo, online_store="redis", redis_url=redis_url, flush_interval_s=0.2)
    reader = FeatureStoreClient(fs)  # applies the repository once
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update({f"ADSTREAM_KAFKA__TOPICS__{k.upper()}": v for k, v in topics.model_dump().items()})
    procs = [subprocess.Popen([sys.executable, "-m", "streams.feature_updater", "--bootstrap", bootstrap,
                               "--online-store", "redis", "--redis-url", redis_url, "--repo-dir", str(repo),
                               "--checkpoint-dir", str(work / f"ckpt-{n}"), "--flush-interval", "0.2",
                               "--metrics-port", "0", "--shard", f"{i}/{n}"],
                              env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(n)]
    try:
        p = make_producer(bootstrap, linger_ms=5)
        # warm-up: wait until every shard folded and wrote a marker ad it owns
        def impression(ad: str, t: float) -> Impression:
            return Impression(request_id=f"p-{ad}", event_time=t, user_id="probe", query="probe", ad_id=ad,
                              creative_id=ad, bidword="probe", category="probe", position=0, bid=0.0)

        def owned_ads(tag: str) -> list[str]:
            out, i = {}, 0
            while len(out) < n:
                ad = f"{tag}-{i}"
                out.setdefault(owner("ad", ad, n), ad)
                i += 1
            return [out[s] for s in range(n)]

        def wait_readable(ads: list[str], timeout: float) -> float | None:
            deadline = time.time() + timeout
            while time.time() < deadline:
                got = reader.read("ad", ads, features=["impressions"])
                if all(got[a] and got[a]["impressions"] for a in ads):
                    return time.time()
                time.sleep(0.02)
            return None

        warm = owned_ads(f"warm-{uuid.uuid4().hex[:4]}")
        for ad in warm:
            p.produce(topics.impressions, encode(impression(ad, time.time())), key=ad)
        p.flush(30)
        if wait_readable(warm, args.startup_timeout) is None:
            raise RuntimeError(f"{n} updater(s) not up within {args.startup_timeout}s")
        # drain a backlog
        gen = EventGen(3)
        t0 = time.time()
        k = 0
        while k < args.backlog:
            for e in gen.next(t0):
                p.produce(topics.clicks if isinstance(e, Click) else topics.impressions, encode(e), key=e.key)
                k += 1
            if k % 5000 == 0:
                p.poll(0)
        sentinels = owned_ads(f"sentinel-{uuid.uuid4().hex[:4]}")
        for ad in sentinels:
            p.produce(topics.impressions, encode(impression(ad, time.time())), key=ad)
        p.flush(60)
        done = wait_readable(sentinels, 600)
        drain_s = (done - t0) if done else None
        # paced traffic with probes
        lat: list[float] = []
        pending: dict[str, float] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def poll():
            while not (stop.is_set() and not pending):
                with lock:
                    items = list(pending.items())
                if items:
                    got = reader.read("ad", [a for a, _ in items], features=["impressions"])
                    now = time.time()
                    with lock:
                        for a, ts in items:
                            if got[a] and got[a]["impressions"]:
                                lat.append(now - ts)
                                pending.pop(a, None)
                            elif now - ts > 60:
                                pending.pop(a, None)
                time.sleep(0.01)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        start = time.time()
        sent, next_probe, probe_i = 0, start, 0
        while time.time() - start < args.seconds:
            now = time.time()
            due = int((now - start) * args.rate)
            while sent < due:
                for e in gen.next(now):
                    p.produce(topics.clicks if isinstance(e, Click) else topics.impressions, encode(e), key=e.key)
                    sent += 1
            if now >= next_probe:
                probe_i += 1
                ad = f"probe-{probe_i}-{uuid.uuid4().hex[:6]}"
                p.produce(topics.impressions, encode(impression(ad, now)), key=ad)
                with lock:
                    pending[ad] = time.time()
                next_probe += 0.2
            p.poll(0)
            time.sleep(0.002)
        p.flush(30)
        stop.set()
        th.join(90)
        return {"updaters": n, "backlog": args.backlog, "drain_s": round(drain_s, 2) if drain_s else None,
                "drain_events_per_s": round(args.backlog / drain_s) if drain_s else None,
                "paced_rate": args.rate, "achieved_rate": round(sent / args.seconds),
                "freshness_probe_s": {"n": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                                      "max": pct(lat, 1.0)}}
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(30)
            except subprocess.TimeoutExpired:
                pr.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--backlog", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=3000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--bootstrap")
    ap.add_argument("--redis-url")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shards.json"))
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    broker = redis_proc = None
    try:
        b = a.bootstrap
        if not b:
            broker = EmbeddedBroker(BrokerSettings(), data_dir=work / "broker", port=0).start()
            b = broker.bootstrap
        url = a.redis_url
        if not url:
            port = free_port()
            redis_proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                           "--appendonly", "no", "--dir", str(work)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        res = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "runs": {}}
        for n in (1, a.shards):
            r = run_config(n, b, url, a, work)
            res["runs"][str(n)] = r
            print(json.dumps(r), flush=True)
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
