"""The creative ranking stage's share of ``POST /v1/ads`` at 200 candidate ads x 5 creatives.

Setup (in this process, 127.0.0.1): an index where the benchmark query matches 200 ads with 5
creatives each (1,000 ad x creative pairs; every creative with content in the catalog); a JAC job
(AR+ and CR+) trained on made-up examples of these ids and published to a temporary registry; no
feature store (creative statistics empty: the stage's cost is the model, not the read); a null sink.

Variants, one after the other in one run (same machine, same load):

- ``beta``: AR+ ∥ Beta ranker (the baseline creative ranker);
- ``cr+ parallel``: AR+ ∥ CR+ (Peri-CR, the default);
- ``cr+ sequential``: AR+ then CR+;
- ``cr+ parallel thompson``: AR+ ∥ CR+ with Thompson-sampling exploration.

Each: ``--requests`` HTTP requests through uvicorn (client latency) after a warm-up, sent in
``--rounds`` interleaved rounds (every variant sees the same machine load), and the
service's own per-request stage timings (``ad_rank``, ``creative_rank``, ``rank`` = the wall time of
the ranking stage, ``total``). "Hidden" means ``rank`` stays at ``ad_rank``: the creative stage costs
the request nothing extra. Example::

    python bench/bench_creative_serve.py --requests 300 --out bench/results/creative_serve.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

N_ADS, N_CREATIVES, N_USERS = 200, 5, 100
QUERY, CATEGORY = "bench running shoes", "bench/running-shoes"
LAYOUTS, COLOURS = ("grid", "banner", "carousel", "video"), ("red", "blue", "green", "black", "white")


def content(rng: random.Random) -> dict:
    return {"cr_layout": rng.choice(LAYOUTS), "cr_colour": rng.choice(COLOURS), "cr_text_len": rng.randint(2, 16),
            "cr_price_badge": str(rng.randint(0, 1))}


def build_index():
    from core.events import BidwordChange
    from online.index import AdIndex

    rng = random.Random(1)
    idx = AdIndex()
    catalog = {}
    for i in range(N_ADS):
        ad = f"b{i:04d}"
        crs = {f"{ad}-c{j}": content(rng) for j in range(N_CREATIVES)}
        catalog.update(crs)
        idx.set_catalog(ad, list(crs), f"adv{i % 30:02d}", CATEGORY, crs)
        for w in (["running shoes", "bench running shoes"] if i % 2 else ["running shoes"]):
            idx.apply(BidwordChange(event_time=0.0, ad_id=ad, bidword=w, action="add",
                                    bid=round(rng.uniform(0.3, 3.0), 3), category=CATEGORY))
    return idx, catalog


def train_jac(root: Path, catalog: dict) -> None:
    import torch

    from models.creative.config import JACConfig
    from models.creative.stream import JACStreamModel
    from models.registry import ModelRegistry
    from models.stream_model import parts_of

    torch.set_num_threads(1)
    rng = random.Random(3)
    rows = []
    for k in range(8192):
        ad = f"b{rng.randrange(N_ADS):04d}"
        cr = f"{ad}-c{rng.randrange(N_CREATIVES)}"
        rows.append({"user_id": f"bu{rng.randrange(N_USERS):03d}", "query": QUERY, "ad_id": ad, "creative_id": cr,
                     "bidword": "running shoes", "category": CATEGORY, "position": k % 5, "bid": 1.0,
                     "domain": "search", "slot": "top", "event_time": float(k), "clicked": int(rng.random() < 0.05),
                     "features": {"segment": f"s{rng.randrange(4)}", "match": "exact", "query_len": 3,
                                  "advertiser": f"adv{int(ad[1:]) % 30:02d}", **catalog[cr]}})
    job = JACStreamModel(JACConfig())
    job.learn(rows)
    for name, part in parts_of(job).items():
        ModelRegistry(root, name).publish(part.state(), {"created_at": time.time()})


class _NullSink:
    """Counts the impression records and drops them (the log is not what is measured)."""

    sent = 0

    def send(self, topic, key, value) -> None:
        self.sent += 1

    def flush(self, timeout_s: float = 5.0) -> int:
        return 0


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


def summary(xs: list[float]) -> dict:
    return {"mean_ms": round(statistics.fmean(xs) * 1000, 3), "p50_ms": round(pct(xs, 50) * 1000, 3),
            "p90_ms": round(pct(xs, 90) * 1000, 3), "p99_ms": round(pct(xs, 99) * 1000, 3)}


def start_variant(root: Path, idx, name: str, creative_model: str, parallel: bool, exploration: str, keep: int):
    from core.settings import ServeSettings
    from online.app import create_app, serve_in_thread

    s = ServeSettings(registry_dir=root, model_name="jac-ar", creative_model=creative_model,
                      parallel_ranking=parallel, creative_exploration=exploration)
    app = create_app(s, registry_root=root, sink=_NullSink(), index=idx, keep_stage_log=keep)
    return {"name": name, "app": app, "server": serve_in_thread(app), "latency": [], "versions": None}


def request(c, v: dict, i: int, record: bool) -> None:
    body = {"user_id": f"bu{i % N_USERS:03d}", "query": QUERY, "slots": 5, "request_id": f"q{i}",
            "context": {"segment": f"s{i % 4}"}}
    t0 = time.perf_counter()
    r = c.post(v["server"].url + "/v1/ads", json=body)
    dt = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    v["versions"] = r.json()["model_versions"]
    if record:
        v["latency"].append(dt)
    else:
        v["app"].state.service.stage_log.clear()


def result(v: dict) -> dict:
    stages = list(v["app"].state.service.stage_log)
    res = {"variant": v["name"], "model_versions": v["versions"], "requests": len(v["latency"]),
           "http": summary(v["latency"])}
    for k in ("ad_rank", "creative_rank", "rank", "total"):
        res[k] = summary([st[k] for st in stages if k in st])
    ad, cr, rank, total = (statistics.fmean(st[k] for st in stages) for k in ("ad_rank", "creative_rank", "rank",
                                                                               "total"))
    res["creative_share_of_total"] = round(cr / total, 4)
    res["rank_over_ad_rank"] = round(rank / ad, 3)  # 1.0 = the creative stage is hidden in the ad ranker's time
    res["extra_ms_over_ad_rank"] = round((rank - ad) * 1000, 3)
    res["extra_share_of_total"] = round((rank - ad) / total, 4)
    return res


def alone(app, idx, n: int = 50) -> dict:
    """AR+ on the 200 candidates and CR+ on their 1000 creatives, each called alone (no other thread),
    min and median over ``n`` calls: the cost of each model without contention."""
    svc = app.state.service
    cands = idx.candidates(idx.match_bidwords(QUERY), CATEGORY, N_ADS)
    exs = [svc.example(_req(), c, c.creatives[0], 0, {"segment": "s1"}, 0.0) for c in cands]
    batch = svc.creative.batch("bu001", "search", {"segment": "s1"}, cands, 0, 0.0)
    ar, cr = svc.loader.current, svc.creative.current()

    def timed(fn) -> dict:
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return {"min_ms": round(min(xs) * 1000, 3), "p50_ms": round(pct(xs, 50) * 1000, 3)}

    return {"ar_plus_200_ads": timed(lambda: ar.predict(exs)), "cr_plus_1000_creatives": timed(lambda: cr.predict(batch))}


def _req():
    from online.service import AdRequestData

    return AdRequestData(user_id="bu001", query=QUERY, slots=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=10, help="the requests are split into rounds over the variants")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "creative_serve.json"))
    args = p.parse_args(argv)
    import httpx

    idx, catalog = build_index()
    variants = [("beta", "", True, "off"), ("cr+ parallel", "jac-cr", True, "off"),
                ("cr+ sequential", "jac-cr", False, "off"), ("cr+ parallel thompson", "jac-cr", True, "thompson")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_jac(root, catalog)
        vs = [start_variant(root, idx, *v, keep=args.requests) for v in variants]
        try:
            with httpx.Client(timeout=10) as c:
                for v in vs:  # warm-up, then the stage logs start empty
                    for i in range(args.warmup):
                        request(c, v, i, record=False)
                per = max(1, args.requests // args.rounds)
                for r in range(args.rounds):  # interleaved: every variant sees the same load
                    for v in vs:
                        for i in range(per):
                            request(c, v, r * per + i, record=True)
            results = [result(v) for v in vs]
            isolated = alone(vs[1]["app"], idx)
        finally:
            for v in vs:
                v["server"].stop()
    for r in results:
        print(f"{r['variant']:<24} http p50 {r['http']['p50_ms']:7.2f} ms  ad_rank {r['ad_rank']['mean_ms']:6.2f}  "
              f"creative_rank {r['creative_rank']['mean_ms']:6.2f}  rank {r['rank']['mean_ms']:6.2f}  "
              f"total {r['total']['mean_ms']:6.2f} ms  creative share {r['creative_share_of_total']:.1%}  "
              f"rank/ad_rank {r['rank_over_ad_rank']:.2f}", flush=True)
    print(f"alone: {isolated}")
    import os

    out = {"command": "python bench/bench_creative_serve.py " + " ".join(argv or []),
           "setup": {"ads": N_ADS, "creatives_per_ad": N_CREATIVES, "requests": args.requests,
                     "feature_store": "none (creative statistics empty)", "cpu_count": os.cpu_count(),
                     "load_avg": os.getloadavg(), "python": platform.python_version()},
           "variants": results, "alone": isolated}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
