"""Online feature read latency: ``FeatureStoreClient.read_for_request`` for 1 user + N ads.

Three stores side by side, measured round-robin in one run (so machine load hits all alike):

* ``redis-fast``: Redis through the lean path (``features.redis_online``: one round trip of HMGETs);
* ``redis-feast``: the same Redis data through Feast's provider (``online_read`` per view);
* ``sqlite``: Feast's sqlite online store (a local file).

Two request shapes: ``user+ad`` (the user and N ad rows + field rows) and ``5 views`` (user, query,
ad, creative and category per ad). The rows come from folding ``--events`` synthetic impressions
(100k users, 5k ads) and pushing them to both stores.

    PYTHONPATH=. .venv/bin/python bench/bench_feature_read.py --out bench/results/feature_read.json

Starts its own redis-server on a free port unless --redis-url is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from core.events import Click, Impression
from core.settings import FeatureSettings


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def fold(n_events: int, seed: int = 0):
    from features.aggregates import AggregateState

    rng = random.Random(seed)
    s = AggregateState(FeatureSettings().half_lives_s)
    t0 = time.time() - 3600
    for i in range(n_events):
        a = rng.randrange(5000)
        imp = Impression(request_id=f"r{i}", event_time=t0 + i * 0.01, user_id=f"u{rng.randrange(100_000)}",
                         query=f"query{rng.randrange(2000)}", ad_id=f"a{a}", creative_id=f"a{a}-c{a % 3}",
                         bidword=f"bw{a % 800}", category=f"cat{a % 40}", position=1, bid=0.5)
        s.apply_impression(imp)
        if rng.random() < 0.05:
            s.apply_click(Click(request_id=imp.request_id, event_time=imp.event_time + 1, ad_id=imp.ad_id,
                                user_id=imp.user_id, creative_id=imp.creative_id, query=imp.query,
                                bidword=imp.bidword, category=imp.category))
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=50_000, help="impressions folded into the stores")
    p.add_argument("--ads", type=int, default=200, help="ads per request")
    p.add_argument("--requests", type=int, default=500, help="timed requests per store and shape")
    p.add_argument("--redis-url", help="existing Redis host:port (default: start redis-server)")
    p.add_argument("--out", default="bench/results/feature_read.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from features.store import FeatureStoreClient

    work = Path(tempfile.mkdtemp(prefix="adstream-bench-read-"))
    redis_proc = None
    try:
        url = args.redis_url
        if not url:
            from streams.broker import free_port

            port = free_port()
            redis_proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        print(f"folding {args.events} impressions ...", flush=True)
        rows = fold(args.events).dirty_rows()
        n_rows = sum(len(c["event_time"]) for c in rows.values())
        clients = {
            "redis-fast": FeatureStoreClient(FeatureSettings(repo_dir=work / "redis", online_store="redis",
                                                             redis_url=url)),
            "redis-feast": FeatureStoreClient(FeatureSettings(repo_dir=work / "redis", online_store="redis",
                                                              redis_url=url, fast_path=False), apply=False),
            "sqlite": FeatureStoreClient(FeatureSettings(repo_dir=work / "sqlite")),
        }
        push_s = {}
        for name in ("redis-fast", "sqlite"):
            t0 = time.perf_counter()
            clients[name].push(rows, to="online")
            push_s[name] = round(time.perf_counter() - t0, 3)
        print(f"pushed {n_rows} rows: {push_s}", flush=True)
        rng = random.Random(1)
        ads = [f"a{i}" for i in rng.sample(range(5000), args.ads)]
        shapes = {
            "user+ad": dict(),
            "5 views": dict(creative_ids=[f"{a}-c{int(a[1:]) % 3}" for a in ads], query="query7",
                            categories=[f"cat{int(a[1:]) % 40}" for a in ads]),
        }
        # same answers from every store
        for shape, kw in shapes.items():
            want = clients["sqlite"].read_for_request("u42", ads, **kw)
            for name in ("redis-fast", "redis-feast"):
                assert clients[name].read_for_request("u42", ads, **kw) == want, (name, shape)
        lat: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in clients}
        cpu: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in clients}
        for _ in range(20):  # warm-up
            for name, c in clients.items():
                c.read_for_request("u1", ads)
        for i in range(args.requests):
            user = f"u{rng.randrange(100_000)}"
            for shape, kw in shapes.items():
                for name, c in clients.items():
                    c0, t0 = time.thread_time(), time.perf_counter()
                    c.read_for_request(user, ads, **kw)
                    lat[name][shape].append(time.perf_counter() - t0)
                    cpu[name][shape].append(time.thread_time() - c0)
        res = {
            "what": f"read_for_request, 1 user + {args.ads} ads, {args.requests} requests per cell, round-robin",
            "rows_in_store": n_rows, "push_s": push_s,
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
            "latency_ms": {
                name: {shape: {"p50": round(pct(v, 0.5) * 1e3, 2), "p99": round(pct(v, 0.99) * 1e3, 2),
                               "mean": round(sum(v) / len(v) * 1e3, 2)} for shape, v in per.items()}
                for name, per in lat.items()
            },
            # CPU time of the calling thread: what the read costs the service, less sensitive to
            # other processes on a loaded machine than the wall-clock latency
            "client_cpu_ms": {
                name: {shape: {"p50": round(pct(v, 0.5) * 1e3, 2), "p99": round(pct(v, 0.99) * 1e3, 2)}
                       for shape, v in per.items()}
                for name, per in cpu.items()
            },
        }
        print(json.dumps(res, indent=2))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
