"""Latency and throughput of ``POST /v1/ads`` with 200 candidate ads x 5 creatives, measured with wrk.

Setup (all on 127.0.0.1): a redis-server (the Feast online store, fast path), features pushed for
every user, ad and creative of the benchmark; an index where the benchmark query matches 200 ads
with 5 creatives each (1,000 ad x creative pairs per request); a small trained CTRLearner published
to a temporary registry; the impression log goes to Kafka when ``--bootstrap`` is given, else to a
counting null sink. The service runs under uvicorn in this process; wrk drives it.

Runs, in one process and one go:

1. paced at ``--rate`` req/s (wrk ``delay()`` pacing over 2 connections), Peri-CR parallel ranking;
2. the same with sequential ranking (the creative ranker after the ad ranker): the ratio;
3. both again with ``creative_features = cache`` (creative rows from the in-memory cache, so the
   request reads 1 user + 200 ads instead of 1,000 pairs);
4. max throughput: wrk with ``--connections`` connections, no pacing (both creative modes);
5. the feature read alone: ``read_for_request`` for 1 user + 200 ads, and for 1 user + the 1,000
   (ad, creative) pairs the service reads.

Per-stage latencies come from the service's own per-request stage timings. Example::

    python bench/bench_serve.py --seconds 15 --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

N_ADS = 200
N_CREATIVES = 5
N_USERS = 100
QUERY = "bench running shoes"
CATEGORY = "bench/running-shoes"

WRK_LUA = r"""
local counter = 0
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "0")
request = function()
  counter = counter + 1
  local body = string.format('{"user_id": "bu%%03d", "query": "%s", "slots": 5}', counter %% %d)
  return wrk.format("POST", "/v1/ads", {["Content-Type"] = "application/json"}, body)
end
delay = function()
  return pace_ms
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_s": %%.3f, "socket_errors": %%d, "non_2xx": %%d, ' ..
    '"p50_ms": %%.3f, "p90_ms": %%.3f, "p99_ms": %%.3f, "max_ms": %%.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
""" % (QUERY, N_USERS)


class NullSink:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, topic, key, value) -> None:
        self.sent += 1

    def flush(self, timeout_s: float = 5.0) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return 0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 3)


def build_inventory():
    from core.events import BidwordChange
    from online.index import AdIndex

    rng = random.Random(1)
    idx = AdIndex()
    for i in range(N_ADS):
        ad = f"b{i:04d}"
        idx.set_catalog(ad, [f"{ad}-c{j}" for j in range(N_CREATIVES)], f"adv{i % 30:02d}")
        words = ["running shoes", "bench running shoes"] if i % 2 else ["running shoes"]
        for w in words:
            idx.apply(BidwordChange(event_time=0.0, ad_id=ad, bidword=w, action="add",
                                    bid=round(rng.uniform(0.3, 3.0), 3), category=CATEGORY))
    # other ads that must not match
    for i in range(300):
        idx.apply(BidwordChange(event_time=0.0, ad_id=f"o{i:04d}", bidword=f"lamp {i % 20}", action="add",
                                bid=1.0, category=f"home/l{i % 7}"))
    return idx


def push_features(fs, t0: float) -> int:
    from core.events import Click, Impression
    from features.aggregates import AggregateState

    rng = random.Random(2)
    st = AggregateState(fs.half_lives)
    n = 0
    for k in range(20_000):
        ad = f"b{rng.randrange(N_ADS):04d}"
        cr = f"{ad}-c{rng.randrange(N_CREATIVES)}"
        user = f"bu{rng.randrange(N_USERS):03d}"
        imp = Impression(request_id=f"w{k}", event_time=t0 + k * 0.01, user_id=user, query=QUERY, ad_id=ad,
                         creative_id=cr, bidword="running shoes", category=CATEGORY, position=k % 5, bid=1.0)
        st.apply_impression(imp)
        n += 1
        if rng.random() < 0.05:
            st.apply_click(Click(request_id=imp.request_id, event_time=imp.event_time + 1, ad_id=ad,
                                 user_id=user, creative_id=cr, query=QUERY, bidword="running shoes",
                                 category=CATEGORY))
    fs.push(st.dirty_rows(), to="online")
    return n


def train_model(root: Path) -> str:
    import torch

    from models.ctr import CTRConfig, CTRLearner, FieldConfig
    from models.registry import ModelRegistry

    torch.set_num_threads(1)
    fields = ("user_id", "query", "ad_id", "creative_id", "bidword", "category")
    cfg = CTRConfig(fields=[FieldConfig(f, capacity=1 << 14) for f in fields],
                    numeric=["ad_ctr_1h", "user_ctr_1h", "creative_ctr_1h", "query_len"],
                    embedding_dim=16, hidden=(64, 32))
    learner = CTRLearner(cfg)
    rng = random.Random(3)
    rows = []
    for k in range(8192):
        ad = f"b{rng.randrange(N_ADS):04d}"
        rows.append({"user_id": f"bu{rng.randrange(N_USERS):03d}", "query": QUERY, "ad_id": ad,
                     "creative_id": f"{ad}-c{rng.randrange(N_CREATIVES)}", "bidword": "running shoes",
                     "category": CATEGORY, "position": k % 5, "bid": 1.0, "event_time": float(k),
                     "clicked": int(rng.random() < 0.05), "features": {"ad_ctr_1h": rng.random() * 0.1}})
    learner.train_window([rows[i:i + 512] for i in range(0, len(rows), 512)])
    return ModelRegistry(root, "ctr").publish(learner.state_dict(), {"created_at": time.time()}).version


def run_wrk(url: str, seconds: int, connections: int, pace_ms: int, script: Path) -> dict:
    env = {**os.environ, "BENCH_PACE_MS": str(pace_ms)}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                          url], capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    r = json.loads(line[len("WRKJSON "):])
    r["throughput_rps"] = round(r["requests"] / r["duration_s"], 1)
    return r


def stage_summary(stage_log) -> dict:
    logs = list(stage_log)
    out = {"requests": len(logs)}
    for k in ("query", "retrieve", "features", "assemble", "ad_rank", "creative_rank", "rank", "log", "total"):
        xs = [s[k] for s in logs if k in s]
        out[k] = {"p50_ms": ms(pct(xs, 50)), "p99_ms": ms(pct(xs, 99)), "mean_ms": ms(statistics.fmean(xs)) if xs else None}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=15, help="seconds per wrk run")
    p.add_argument("--rate", type=int, default=100, help="target req/s of the paced runs")
    p.add_argument("--connections", type=int, default=4, help="connections of the max-throughput run")
    p.add_argument("--bootstrap", help="log impressions to this Kafka cluster (default: a null sink)")
    p.add_argument("--redis-url", help="existing Redis host:port (default: start redis-server)")
    p.add_argument("--feature-reads", type=int, default=500, help="iterations of the feature-read loop")
    p.add_argument("--out", default="bench/results/serve.json")
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from core.settings import FeatureSettings, ServeSettings
    from features.store import FeatureStoreClient
    from online.app import create_app, serve_in_thread
    from online.service import CreativeStatsCache
    from streams.broker import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis_proc = None
    srv = None
    sink = None
    topic = "impressions"
    try:
        redis_url = args.redis_url
        if not redis_url:
            port = free_port()
            redis_proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        print("setting up: feature store, features, model", flush=True)
        fs = FeatureStoreClient(FeatureSettings(repo_dir=work / "repo", online_store="redis", redis_url=redis_url))
        n_events = push_features(fs, time.time() - 3600)
        version = train_model(work / "registry")
        if args.bootstrap:
            from streams.event_sink import KafkaEventSink
            from streams.kafka_io import create_topics

            topic = f"bench-impressions-{int(time.time())}"
            create_topics(args.bootstrap, [topic], 6)
            sink = KafkaEventSink(args.bootstrap)
        else:
            topic, sink = "impressions", NullSink()
        settings = ServeSettings(model_poll_s=5.0, creative_features="request")  # the runs switch the cache
        app = create_app(settings, registry_root=work / "registry", feature_store=fs, sink=sink,
                         index=build_inventory(), impressions_topic=topic, keep_stage_log=100_000)
        svc = app.state.service
        assert app.state.loader.current is not None and app.state.loader.current.version == version
        srv = serve_in_thread(app)
        script = work / "bench.lua"
        script.write_text(WRK_LUA)
        import httpx

        probe = httpx.post(srv.url + "/v1/ads", json={"user_id": "bu001", "query": QUERY, "slots": 5}).json()
        assert not probe["degraded"], probe
        n_cands = len(svc.index.candidates(svc.rewriter.rewrite(QUERY), svc.classifier.classify(QUERY, svc.rewriter.rewrite(QUERY)), 1000))
        print(f"candidates per request: {n_cands} ads x {N_CREATIVES} creatives", flush=True)
        run_wrk(srv.url, 3, 2, 0, script)  # warm-up
        results: dict = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                        "note": "shared machine; other jobs ran at the same time (see load averages)"},
            "setup": {"candidate_ads": n_cands, "creatives_per_ad": N_CREATIVES, "pairs_read": n_cands * N_CREATIVES,
                      "online_store": "redis (fast path)" if fs.fast_path else "redis (feast provider)",
                      "feature_events": n_events, "model_version": version,
                      "impression_sink": "kafka" if args.bootstrap else "null", "rate_target": args.rate,
                      "seconds_per_run": args.seconds},
            "runs": {},
        }
        pace = int(round(2 * 1000 / args.rate))  # 2 connections, each one request per pace
        cache = CreativeStatsCache(fs, svc.index, 5.0)
        cache.refresh()
        cache.start()
        runs = [("paced_parallel", True, False, pace), ("paced_sequential", False, False, pace),
                ("paced_parallel_creative_cache", True, True, pace),
                ("paced_sequential_creative_cache", False, True, pace),
                ("max_throughput", True, False, 0), ("max_throughput_creative_cache", True, True, 0)]
        for name, parallel, cached, pace_ms in runs:
            svc.parallel = parallel
            svc.creative_cache = cache if cached else None
            svc.stage_log.clear()
            conns = 2 if pace_ms else args.connections
            print(f"== {name}: {conns} connections, pace {pace_ms} ms, {args.seconds}s", flush=True)
            r = run_wrk(srv.url, args.seconds, conns, pace_ms, script)
            r["stages"] = stage_summary(svc.stage_log)
            r["degraded_responses"] = sum(1 for s in svc.stage_log if s.get("degraded"))
            results["runs"][name] = r
            print(json.dumps({k: v for k, v in r.items() if k != "stages"}), flush=True)
        svc.parallel, svc.creative_cache = True, None
        cache.stop()
        results["parallel_vs_sequential"] = {}
        for suffix in ("", "_creative_cache"):
            par = results["runs"]["paced_parallel" + suffix]
            seq = results["runs"]["paced_sequential" + suffix]
            results["parallel_vs_sequential"]["request" if not suffix else "cache"] = {
                "rank_stage_p50_ratio": round(par["stages"]["rank"]["p50_ms"] / seq["stages"]["rank"]["p50_ms"], 3),
                "rank_stage_p99_ratio": round(par["stages"]["rank"]["p99_ms"] / seq["stages"]["rank"]["p99_ms"], 3),
                "pipeline_p50_ratio": round(par["stages"]["total"]["p50_ms"] / seq["stages"]["total"]["p50_ms"], 3),
                "http_p99_ratio": round(par["p99_ms"] / seq["p99_ms"], 3),
            }
        # the feature read alone (server idle)
        print("== feature read", flush=True)
        ads = [f"b{i:04d}" for i in range(N_ADS)]
        pair_ads = [a for a in ads for _ in range(N_CREATIVES)]
        pair_crs = [f"{a}-c{j}" for a in ads for j in range(N_CREATIVES)]
        fr: dict = {}
        for name, kw in (("user_plus_200_ads", {"ad_ids": ads}),
                         ("user_plus_1000_ad_creative_pairs", {"ad_ids": pair_ads, "creative_ids": pair_crs})):
            xs = []
            for i in range(args.feature_reads):
                t = time.perf_counter()
                fs.read_for_request(f"bu{i % N_USERS:03d}", query=QUERY, **kw)
                xs.append(time.perf_counter() - t)
            fr[name] = {"p50_ms": ms(pct(xs, 50)), "p99_ms": ms(pct(xs, 99)), "n": len(xs)}
        results["feature_read"] = fr
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["goals"] = {
            "p99_at_rate_ms": 20, "p99_at_rate_met": results["runs"]["paced_parallel"]["p99_ms"] <= 20,
            "p99_at_rate_met_creative_cache": results["runs"]["paced_parallel_creative_cache"]["p99_ms"] <= 20,
            "feature_read_200_ads_p99_ms": 5, "feature_read_met": fr["user_plus_200_ads"]["p99_ms"] <= 5,
        }
        if args.bootstrap:
            sink.flush(30)
            results["setup"]["impressions_dropped"] = sink.dropped
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results["parallel_vs_sequential"]), json.dumps(fr), json.dumps(results["goals"]))
        print(f"wrote {out}")
    finally:
        if srv is not None:
            srv.stop()
        if sink is not None and hasattr(sink, "close"):
            sink.close(2)
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": args.bootstrap})  # held while the futures resolve
            for fut in admin.delete_topics([topic], request_timeout=30).values():
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001
                    print(f"could not delete the benchmark topic {topic}: {e}")
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
