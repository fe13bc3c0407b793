"""Query rewriting and generative retrieval (issue 12): quality per stage and source, latency on CPU.

``quality``: the rewriter's metrics per stage (index rewriter, SFT-only, SFT + post-pre-training,
aligned; free / trie / served decoding) and Recall@K per source (bidword index, GRAM, union), mean ±
std over seeds, from ``adstream evaluate-rewrite`` / ``evaluate-retrieval`` reports (``--from``) or
computed here (``--seeds``).

``latency``: a MoBGM rewriter and GRAM (the default model sizes; epochs scaled down: latency does not
depend on how well they are trained) bootstrapped on the synthetic world's stream, then requests of
the world's own query mix (Zipf popularity, tail queries included) paced at ``--rate`` req/s through

1. the rewrite stage alone — the index rewriter (baseline), then index + rewriter + GRAM with the
   head-query cache and without it — per-query latency p50/p95/p99;
2. the whole ``AdService.handle`` (no feature store, null impression sink) with and without the
   stage: the stage's share of the request p99; with ``--serve-report`` (bench_serve's JSON) also
   its share of the measured ``POST /v1/ads`` p99 at that benchmark's load (100 req/s).

Examples::

    python bench/bench_rewrite.py quality --from out/rewrite out/retrieval --out bench/results/rewrite_quality.json
    python bench/bench_rewrite.py latency --rate 100 --seconds 20 --out bench/results/rewrite_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(pct(xs, 50) * 1000, 3), "p95_ms": round(pct(xs, 95) * 1000, 3),
            "p99_ms": round(pct(xs, 99) * 1000, 3), "max_ms": round(max(xs) * 1000, 3) if xs else None,
            "mean_ms": round(sum(xs) / len(xs) * 1000, 3) if xs else None}


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_avg": list(os.getloadavg())}


# --------------------------------------------------------------------------- quality
def quality(args) -> dict:
    from models.rewrite.report import summarize_retrieval, summarize_rewrite

    rw_runs, rt_runs = [], []
    for d in args.from_dirs or []:
        rep = json.loads((Path(d) / "report.json").read_text())
        (rw_runs if rep["command"] == "evaluate-rewrite" else rt_runs).extend(rep["runs"])
    if not args.from_dirs:
        import torch

        from models.rewrite.experiments import (run_retrieval, run_rewrite, synthetic_retrieval_data,
                                                synthetic_rewrite_data)

        torch.set_num_threads(1)
        for seed in range(1, args.seeds + 1):
            rw_runs.append(run_rewrite(synthetic_rewrite_data(seed)))
            rt_runs.append(run_retrieval(synthetic_retrieval_data(seed)))
    out: dict = {"machine": machine()}
    keep = ("relevance_rate", "relevance_at_1", "authenticity_rate", "expected_revenue", "coverage", "distinct_2",
            "combined", "combined_at_1")
    if rw_runs:
        s = summarize_rewrite(rw_runs)
        out["rewrite"] = {"seeds": len(rw_runs), "data": rw_runs[0]["data"], "stages": {
            m: {mode: {sl: {k: v[k] for k in keep if k in v} for sl, v in by_sl.items()} for mode, by_sl in by_mode.items()}
            for m, by_mode in s.items()}}
    if rt_runs:
        out["retrieval"] = {"seeds": len(rt_runs), "data": rt_runs[0]["data"], "sources": summarize_retrieval(rt_runs)}
    return out


# --------------------------------------------------------------------------- latency
def latency(args) -> dict:
    import torch

    from core.ports import ListSink
    from core.settings import ServeSettings
    from models.rewrite.synthetic import bootstrap_models, rewrite_world, world_records
    from online.index import AdIndex, load_world_catalog, world_inventory
    from online.models import LoadedModel
    from online.rewrite import RewriteSettings, RewriteStage
    from online.service import AdRequestData, AdService

    torch.set_num_threads(1)
    from dataclasses import replace

    from models.rewrite.gram import GramConfig
    from models.rewrite.mobgm import MoBGMConfig

    t0 = time.perf_counter()
    w = rewrite_world(args.world_seed)
    recs = world_records(w, args.train_seconds, 5.0, seed=args.world_seed)
    mc = MoBGMConfig(seed=1)
    mc = replace(mc, ppt_epochs=1, sft_epochs=3, dpo_epochs=1, disc=replace(mc.disc, epochs=5))
    gc = replace(GramConfig(seed=1), epochs=2, coalign=False)
    rw, gr = bootstrap_models(w, recs, mc, gc)
    train_s = time.perf_counter() - t0
    print(f"models bootstrapped in {train_s:.0f}s (rewriter {rw.m.gen.n_params} parameters, GRAM "
          f"{gr.g.gen.n_params})", file=sys.stderr)

    def loader_of(model, version):
        class Fixed:
            def __init__(self):
                self.current = LoadedModel(version, model, 0.0, 0.0, name=version)

        return Fixed()

    def new_index():
        idx = AdIndex()
        load_world_catalog(idx, w)
        idx.apply_many(world_inventory(w))
        return idx

    rng = random.Random(args.seed)
    t = w.config.epoch
    queries = []
    for _ in range(args.requests):
        t += 1.0 / args.rate
        queries.append(w.sample_request(rng, t))
    tail_share = sum(1 for r in queries if w.query_by_text[r.query].kind != "base") / len(queries)

    def paced(fn) -> list[float]:
        lat = []
        period = 1.0 / args.rate
        nxt = time.perf_counter()
        for r in queries:
            now = time.perf_counter()
            if now < nxt:
                time.sleep(nxt - now)
            nxt += period
            a = time.perf_counter()
            fn(r)
            lat.append(time.perf_counter() - a)
        return lat

    out: dict = {"machine": machine(), "rate": args.rate, "requests": len(queries), "tail_share": tail_share,
                 "distinct_queries": len({r.query for r in queries}), "train_seconds": round(train_s, 1),
                 "budget_ms": args.budget_ms, "params": {"rewriter": rw.m.gen.n_params, "gram": gr.g.gen.n_params}}
    stage_runs = {}
    # cold: every query's first request misses the cache (277 distinct queries in 1,000 requests);
    # warm: the cache already holds the world's queries (a service that has run a while)
    configs = [("index_only", None, None, 0, False), ("rewrite_gram_cached_warm", rw, gr, 10_000, True),
               ("rewrite_gram_cached_cold", rw, gr, 10_000, False), ("rewrite_gram_no_cache", rw, gr, 0, False),
               ("rewriter_only_no_cache", rw, None, 0, False), ("gram_only_no_cache", None, gr, 0, False)]
    for name, m_rw, m_gr, cache, warm in configs:
        idx = new_index()
        stage = RewriteStage(idx, loader_of(m_rw, "v1") if m_rw else None, loader_of(m_gr, "v1") if m_gr else None,
                             RewriteSettings(budget_ms=1e9 if warm else args.budget_ms, cache_size=cache))
        for r in (queries if warm else queries[:20]):  # warm-up (first-use allocations, the live trie)
            stage.run(r.query, [])
        stage.s.budget_ms = args.budget_ms
        if cache and not warm:
            stage.cache.clear()
            stage.gram_cache.clear()
        stage.cache.hits = stage.cache.misses = 0
        degraded: list[str] = []
        lat = paced(lambda r: stage.run(r.query, degraded))
        s = summary_ms(lat)
        s.update(degraded=len(degraded), cache_hits=stage.cache.hits, cache_misses=stage.cache.misses,
                 timeouts=dict(stage.timeouts))
        stage_runs[name] = s
        print(f"{name:>24}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, degraded {len(degraded)}",
              file=sys.stderr)
    out["rewrite_stage"] = stage_runs
    handle = {}
    for name, with_stage in (("service_index_only", False), ("service_with_rewrite", True)):
        idx = new_index()
        stage = RewriteStage(idx, loader_of(rw, "v1"), loader_of(gr, "v1"),
                             RewriteSettings(budget_ms=1e9)) if with_stage else None
        if stage is not None:  # a warm cache, as in a service that has run a while
            for r in queries:
                stage.run(r.query, [])
            stage.s.budget_ms = args.budget_ms
        svc = AdService(ServeSettings(), index=idx, sink=ListSink(), rewrite_stage=stage, keep_stage_log=len(queries))
        try:
            lat = paced(lambda r: svc.handle(AdRequestData(user_id=r.user_id, query=r.query, slots=4)))
            log = list(svc.stage_log)
        finally:
            svc.close()
        s = summary_ms(lat)
        if with_stage:
            rw_lat = [x.get("rewrite", 0.0) for x in log]
            s["rewrite_stage"] = summary_ms(rw_lat)
            s["rewrite_share_of_p99"] = round(pct(rw_lat, 99) / pct(lat, 99), 3)
        handle[name] = s
        print(f"{name:>24}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms", file=sys.stderr)
    out["service"] = handle
    p99 = args.serve_p99_ms
    if p99 is None and args.serve_report and Path(args.serve_report).is_file():
        p99 = _find_p99(json.loads(Path(args.serve_report).read_text()))
    if p99:
        out["serve_benchmark_p99_ms"] = p99
        for k in ("rewrite_gram_cached_warm", "rewrite_gram_cached_cold", "rewrite_gram_no_cache"):
            out[f"{k}_p99_share_of_serve_p99"] = round(stage_runs[k]["p99_ms"] / p99, 3)
    return out


def _find_p99(rep: dict) -> float | None:
    """The paced parallel run's p99 of a bench_serve.py report (its layout may vary)."""
    for key in ("paced_parallel", "paced", "parallel"):
        v = rep.get(key)
        if isinstance(v, dict) and isinstance(v.get("p99_ms"), (int, float)):
            return float(v["p99_ms"])
    for v in rep.values():
        if isinstance(v, dict) and isinstance(v.get("p99_ms"), (int, float)):
            return float(v["p99_ms"])
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="metrics per stage and Recall@K per source")
    q.add_argument("--from", dest="from_dirs", nargs="*", metavar="DIR", help="evaluate-* output directories")
    q.add_argument("--seeds", type=int, default=1, help="seeds to compute when --from is not given")
    q.add_argument("--out", default="bench/results/rewrite_quality.json")
    lt = sub.add_parser("latency", help="rewrite latency per query and its share of the request p99")
    lt.add_argument("--rate", type=float, default=100.0, help="requests per second (bench_serve's paced load)")
    lt.add_argument("--requests", type=int, default=2000)
    lt.add_argument("--budget-ms", type=float, default=15.0)
    lt.add_argument("--world-seed", type=int, default=7)
    lt.add_argument("--train-seconds", type=float, default=3600.0, help="stream seconds the models learn from")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--serve-report", default="bench/results/serve.json", help="bench_serve.py's JSON, if any")
    lt.add_argument("--serve-p99-ms", type=float, help="the POST /v1/ads p99 of bench_serve.py at its load, "
                    "when its JSON is not at hand (docs/online.md: 49 ms, paced, quiet machine)")
    lt.add_argument("--out", default="bench/results/rewrite_latency.json")
    args = p.parse_args()
    out = quality(args) if args.what == "quality" else latency(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1, default=str)[:4000])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
