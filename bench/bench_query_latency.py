"""Query classification latency on CPU: the classifier alone and inside ``POST /v1/ads``.

Setup: the synthetic world (seed 7) and its ad inventory; the SSUF query classifier (MiniLM
features + adapter, the stream model) trained on query snapshots from 20 minutes of the world's
examples and published to a temporary registry; the service under uvicorn in this process with a
null impression sink and no feature store (the query stage does not depend on it).

1. The classifier alone (one query per call, one torch thread): the served model on known queries
   (their features are in the version's table), on unseen queries (a MiniLM forward pass), through
   the service's per-version cache (hits), and the counts baseline.
2. Inside ``POST /v1/ads`` at the serving benchmark's load (wrk, ``--rate`` req/s paced over 2
   connections), queries drawn from the world's request distribution with ``--unseen`` of them
   made unique (never cached): the service's own ``query`` stage timing and the whole request, for
   ``query_classifier = model`` with the cache and each budget of ``--budgets`` (default: the
   setting's default ``serve.query_budget_ms``; a miss over budget is served by counts, degraded,
   and cached when the model answers), with the cache and no budget, without a cache, and
   ``counts``. ``query_degraded_share`` counts requests whose query stage fell back
   (``query_understanding``); ``degraded_share`` any degradation (no feature store here).

usage: python bench/bench_query_latency.py [--seconds 15] [--rate 100] [--unseen 0.05]
       [--budgets 3,5] [--out bench/results/query_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serve import NullSink, ms, pct, run_wrk  # noqa: E402

WRK_LUA = r"""
local queries = {%s}
local counter = 0
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "0")
request = function()
  counter = counter + 1
  local q = queries[(counter %% #queries) + 1]
  local body = string.format('{"user_id": "u%%05d", "query": "%%s", "slots": 4}', counter %% 500, q)
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
"""


def train(world, root: Path) -> tuple[str, object]:
    import torch

    from models.query.stats import QueryClickStats
    from models.query.stream import QueryStreamConfig, QueryStreamModel
    from models.registry import ModelRegistry

    torch.set_num_threads(1)
    recs = world.to_examples_frame(duration_s=1200, requests_per_s=10, seed=11).to_dict("records")
    stats, m = QueryClickStats(), QueryStreamModel(QueryStreamConfig())
    for k in range(4):
        chunk = recs[k * len(recs) // 4:(k + 1) * len(recs) // 4]
        m.learn([stats.snapshot(q) for q in sorted(stats.add_many(chunk))])
    v = ModelRegistry(root, "query-classifier").publish(m.state(), {"created_at": time.time()}).version
    return v, m


def timed(fn, items) -> dict:
    xs = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        xs.append(time.perf_counter() - t)
    return {"n": len(xs), "p50_ms": ms(pct(xs, 50)), "p99_ms": ms(pct(xs, 99)), "mean_ms": ms(statistics.fmean(xs))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--rate", type=int, default=100, help="paced req/s (the serving benchmark's load)")
    p.add_argument("--unseen", type=float, default=0.05, help="share of requests with a never-seen query")
    p.add_argument("--budgets", default="", help="comma-separated query budgets in ms (default: the setting's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "query_latency.json"))
    a = p.parse_args()
    import torch

    from core.settings import ServeSettings
    from core.world import World, WorldConfig
    from online.app import create_app, serve_in_thread
    from online.index import AdIndex, CountsClassifier, IndexRewriter, load_world_catalog, world_inventory
    from online.query import ModelQueryClassifier, query_loader

    torch.set_num_threads(1)
    world = World(WorldConfig(seed=7))

    def index() -> AdIndex:
        idx = AdIndex()
        load_world_catalog(idx, world)
        idx.apply_many(world_inventory(world))
        return idx

    tmp = Path(tempfile.mkdtemp(prefix="qlat-"))
    t0 = time.time()
    version, model = train(world, tmp)
    result: dict = {"machine": platform.node(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version(), "torch_threads": 1,
                    "version": version, "train_seconds": round(time.time() - t0, 1),
                    "labels": len(model.labels), "queries_in_version": len(model.buffer)}
    # 1. the classifier alone
    rng = random.Random(0)
    reqs = [world.sample_request(rng, world.config.epoch).query for _ in range(3000)]
    known = [q for q in reqs if q in model.buffer][:1000]
    unseen = [f"{q} zq{i}" for i, q in enumerate(reqs[:300])]
    lo = query_loader(tmp, "query-classifier")
    idx = index()
    rw = IndexRewriter(idx)
    cached = ModelQueryClassifier(lo, CountsClassifier(idx), cache_size=10_000, mode="model")
    lo.refresh()
    for q in known:
        cached.understand(q, [])  # fill the cache
    counts = CountsClassifier(idx)
    matched = {q: rw.rewrite(q) for q in set(known)}
    result["classifier"] = {
        "model_known_queries": timed(lambda q: lo.current.predict([q]), known),
        "model_unseen_queries": timed(lambda q: lo.current.predict([q]), unseen),
        "model_with_cache_hits": timed(lambda q: cached.understand(q, []), known),
        "counts_baseline": timed(lambda q: counts.classify(q, matched[q]), known),
    }
    lo.stop()
    print(json.dumps(result["classifier"], indent=1))
    # 2. inside POST /v1/ads
    seq = []
    for i, q in enumerate(reqs):
        seq.append(f"{q} zx{i}" if rng.random() < a.unseen else q)
    lua = tmp / "q.lua"
    lua.write_text(WRK_LUA % ", ".join(json.dumps(q) for q in seq))
    pace_ms = int(round(2 * 1000 / a.rate))
    result["serve"] = {"rate": a.rate, "seconds": a.seconds, "unseen_share": a.unseen}
    budgets = [float(x) for x in a.budgets.split(",") if x.strip()] or [ServeSettings().query_budget_ms]
    runs = tuple((f"model_cache_budget{b:g}ms", "model", 10_000, b) for b in budgets) + (
        ("model_cache_no_budget", "model", 10_000, None), ("model_no_cache_no_budget", "model", 0, None),
        ("counts", "counts", 0, None))
    for name, mode, cache, budget_ms in runs:
        s = ServeSettings(query_classifier=mode, query_cache_size=cache, query_budget_ms=budget_ms, registry_dir=tmp,
                          model_poll_s=1.0)
        app = create_app(s, registry_root=tmp, sink=NullSink(), index=index(), keep_stage_log=100_000)
        server = serve_in_thread(app, "127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{server.port}/v1/ads"
            run_wrk(url, 3, 2, pace_ms, lua)  # warm-up
            svc = app.state.service
            svc.stage_log.clear()
            w = run_wrk(url, a.seconds, 2, pace_ms, lua)
            logs = list(svc.stage_log)
            q = [x["query"] for x in logs]
            tot = [x["total"] for x in logs]
            deg = sum(1 for x in logs if x.get("degraded"))
            qdeg = sum(1 for x in logs if x.get("query_degraded"))
            result["serve"][name] = {"budget_ms": budget_ms, "load_avg_1m": round(os.getloadavg()[0], 2), "wrk": w, "query_stage": {"p50_ms": ms(pct(q, 50)), "p99_ms": ms(pct(q, 99))},
                                     "request_total": {"p50_ms": ms(pct(tot, 50)), "p99_ms": ms(pct(tot, 99))},
                                     "requests": len(logs), "degraded_share": round(deg / max(1, len(logs)), 3),
                                     "query_degraded_share": round(qdeg / max(1, len(logs)), 3)}
            if isinstance(svc.classifier, ModelQueryClassifier):
                result["serve"][name]["cache"] = svc.classifier.cache_stats()
            print(name, json.dumps(result["serve"][name]))
        finally:
            server.stop()
            app.state.close()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
