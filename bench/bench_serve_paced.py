"""``POST /v1/ads`` latency at constant request rates, free of coordinated omission.

The service is set up as in ``bench/bench_serve.py`` (Redis fast path, 200 candidate ads x 5
creatives, a trained CTR model, null impression sink) and runs under uvicorn in this process. The
load comes from a separate process (``--loadgen``): an open-loop asyncio generator that schedules
request ``i`` at ``t0 + i / rate`` whatever happened to the earlier ones, and measures each latency
from that *scheduled* time to the response, so a stall delays every request due during it and
shows in the tail (a closed-loop client such as wrk without pacing would wait instead and hide
it). For each rate in ``--rates`` the service runs twice, alternating: as configured ("ours": the
settings' ``parallel_ranking``, sequential by default) and with the other ranking mode (the
baseline: Peri-CR parallel ranking, the creative ranker in a thread beside the ad ranker), and the
stage timings the service records are kept with each run.

    PYTHONPATH=. .venv/bin/python bench/bench_serve_paced.py --rates 50 100 200 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


# --------------------------------------------------------------------------- the load generator


async def _load(url: str, rate: float, seconds: float, users: int, query: str, max_conns: int) -> dict:
    import aiohttp

    n = int(rate * seconds)
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=max_conns)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2

        async def one(i: int) -> None:
            nonlocal errors
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"user_id": f"bu{i % users:03d}", "query": query, "slots": 5}
            try:
                async with s.post(url + "/v1/ads", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except Exception:  # noqa: BLE001
                errors += 1
                return
            lat.append(loop.time() - due)

        await asyncio.gather(*(one(i) for i in range(n)))
        wall = loop.time() - t0
    return {"requests": n, "ok": len(lat), "errors": errors, "achieved_rps": round(len(lat) / wall, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 2) if lat else None,
            "p90_ms": round(pct(lat, 90) * 1e3, 2) if lat else None,
            "p99_ms": round(pct(lat, 99) * 1e3, 2) if lat else None,
            "max_ms": round(max(lat) * 1e3, 2) if lat else None}


def run_loadgen(url: str, rate: float, seconds: float) -> dict:
    from bench.bench_serve import N_USERS, QUERY

    cmd = [sys.executable, __file__, "--loadgen", url, "--rate", str(rate), "--seconds", str(seconds),
           "--users", str(N_USERS), "--query", QUERY]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LOADJSON ")), None)
    if line is None:
        raise RuntimeError(f"load generator failed: {p.stdout[-800:]} {p.stderr[-800:]}")
    return json.loads(line[len("LOADJSON "):])


# --------------------------------------------------------------------------- the service side


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--redis-url", help="existing Redis host:port (default: start redis-server)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a serve setting for this run (repeatable; VALUE as JSON, else a string), e.g. "
                         "request_threads=40")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_paced.json"))
    ap.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--users", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--query", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loadgen:
        res = asyncio.run(_load(a.loadgen, a.rate, a.seconds, a.users, a.query, 256))
        print("LOADJSON " + json.dumps(res), flush=True)
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    from bench.bench_serve import NullSink, build_inventory, push_features, stage_summary, train_model
    from core.settings import FeatureSettings, ServeSettings
    from features.store import FeatureStoreClient
    from online.app import create_app, serve_in_thread
    from streams.broker import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-serve-paced-"))
    redis_proc = srv = None
    try:
        url = a.redis_url
        if not url:
            port = free_port()
            redis_proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        fs = FeatureStoreClient(FeatureSettings(repo_dir=work / "repo", online_store="redis", redis_url=url))
        push_features(fs, time.time() - 3600)
        version = train_model(work / "registry")
        overrides = {}
        for kv in a.overrides:
            k, _, v = kv.partition("=")
            try:
                overrides[k] = json.loads(v)
            except ValueError:
                overrides[k] = v
        settings = ServeSettings(**{"model_poll_s": 5.0, **overrides})
        app = create_app(settings, registry_root=work / "registry", feature_store=fs, sink=NullSink(),
                         index=build_inventory(), keep_stage_log=100_000)
        svc = app.state.service
        assert app.state.loader.current is not None and app.state.loader.current.version == version
        srv = serve_in_thread(app)
        run_loadgen(srv.url, 20, 3)  # warm-up
        if settings.gc_freeze:  # as `adstream serve` does before it serves
            from online.hotpath import freeze_startup_heap

            freeze_startup_heap()
        res: dict = {"load_avg_start": os.getloadavg(), "seconds_per_run": a.seconds, "settings": overrides,
                     "setup": "200 candidate ads x 5 creatives, Redis fast path, CTR model, null sink",
                     "ours": f"parallel_ranking={settings.parallel_ranking}, creative_features="
                             f"{settings.creative_features}",
                     "baseline_name": "same service, parallel ranking (creative ranker in a thread beside the ad "
                                      "ranker)",
                     "paced": {}}
        for rate in a.rates:
            cell = {}
            for name, parallel in (("ours", settings.parallel_ranking), ("baseline", not settings.parallel_ranking)):
                svc.parallel = parallel
                svc.stage_log.clear()
                r = run_loadgen(srv.url, rate, a.seconds)
                r["stages"] = stage_summary(svc.stage_log)
                cell[name] = r
                print(f"{rate:g} req/s {name}: {json.dumps({k: v for k, v in r.items() if k != 'stages'})}",
                      flush=True)
            res["paced"][f"{rate:g}"] = cell
        svc.parallel = settings.parallel_ranking
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.out}")
    finally:
        if srv is not None:
            srv.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
