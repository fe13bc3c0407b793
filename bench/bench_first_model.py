"""``POST /v1/ads`` latency while a service started without torch gets its first CTR model.

`adstream serve` starts without torch (the CLI and Feast never import it). With an empty registry
it serves the stream-CTR prior; when the first CTR model is published, its loader thread imports
torch, torchrec and fbgemm (seconds of Python under the GIL) while requests are served. The
serving CTR loader now does that import before its first look at the registry (``preload``,
``online.models.preload_ctr``), which ``create_app`` makes before it returns: before the heap is
frozen and before ``/readyz`` says ready. This benchmark measures both in
one run, alternating, each in a fresh service process (the setup of ``bench/bench_serve.py``: Redis
fast path, 200 candidate ads x 5 creatives, null impression sink):

- **ours**: the service as built by ``create_app`` (preload on);
- **baseline**: the same service with a loader without preload (the import happens at the swap).

For each: seconds from process start to ``/readyz`` 200; then a paced open-loop load
(``bench_serve_paced``'s generator: latency from each request's scheduled time) during which a
trained CTR model is promoted in the served registry; the latency of the whole load and of the
requests due in the 10 s after the promotion, and seconds from the promotion to the first response
served by the model.

    PYTHONPATH=. .venv/bin/python bench/bench_first_model.py --rate 20 --seconds 15 --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(xs: list[float], q: float) -> float | None:
    """``bench_serve_paced.pct`` of latencies in seconds, in ms."""
    from bench.bench_serve_paced import pct

    v = pct(xs, q)
    return None if v is None else round(v * 1e3, 2)


async def _load(url: str, rate: float, seconds: float, swap_at: float, promote) -> dict:
    """Open-loop load; ``promote()`` is called ``swap_at`` s in. Returns latencies with due times."""
    import aiohttp

    from bench.bench_serve import N_USERS, QUERY

    n = int(rate * seconds)
    rows: list[tuple[float, float, str]] = []  # (due - t0, latency, ctr version)
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        swap = {}

        async def one(i: int) -> None:
            nonlocal errors
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with s.post(url + "/v1/ads", json={"user_id": f"bu{i % N_USERS:03d}", "query": QUERY,
                                                         "slots": 5}) as r:
                    body = await r.json()
                    if r.status != 200:
                        errors += 1
                        return
            except Exception:  # noqa: BLE001
                errors += 1
                return
            rows.append((due - t0, loop.time() - due, body["model_versions"].get("ctr", "")))

        async def swapper() -> None:
            await asyncio.sleep(max(0.0, t0 + swap_at - loop.time()))
            swap["at"] = loop.time() - t0
            await loop.run_in_executor(None, promote)

        await asyncio.gather(swapper(), *(one(i) for i in range(n)))
    at = swap["at"]
    after = [lat for due, lat, _ in rows if at <= due < at + 10]
    served = [due for due, _, v in rows if v.startswith("v")]
    return {"requests": n, "ok": len(rows), "errors": errors,
            "p50_ms": _pct([r[1] for r in rows], 50), "p99_ms": _pct([r[1] for r in rows], 99),
            "max_ms": _pct([r[1] for r in rows], 100),
            "after_swap_p99_ms": _pct(after, 99), "after_swap_max_ms": _pct(after, 100),
            "swap_to_first_served_s": round(min(served) - at, 2) if served else None,
            "before_swap_p99_ms": _pct([lat for due, lat, _ in rows if due < at], 99),
            "slowest": [(round(due, 2), round(lat * 1e3, 1)) for due, lat, _ in sorted(rows, key=lambda r: -r[1])[:5]]}


def _serve(registry: str, redis_url: str, preload: bool) -> None:
    """The service process: no torch until its loader loads it."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from bench.bench_serve import NullSink, build_inventory
    from core.settings import FeatureSettings, ServeSettings
    from features.store import FeatureStoreClient
    from online.app import create_app, serve_in_thread
    from online.models import ModelLoader

    settings = ServeSettings(model_poll_s=0.5)
    fs = FeatureStoreClient(FeatureSettings(repo_dir=Path(registry).parent / "repo", online_store="redis",
                                            redis_url=redis_url))
    loader = None if preload else ModelLoader(registry, settings.model_name, settings.model_poll_s)
    app = create_app(settings, registry_root=registry, feature_store=fs, sink=NullSink(), index=build_inventory(),
                     loader=loader)
    if settings.gc_freeze:  # as `adstream serve` does: after the app is built, before serving
        from online.hotpath import freeze_startup_heap

        freeze_startup_heap()
    srv = serve_in_thread(app)
    print(f"URL {srv.url} torch_loaded={'torch' in sys.modules}", flush=True)
    while True:
        time.sleep(3600)


def _wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - 503 until ready
            pass
        time.sleep(0.05)
    raise RuntimeError("service never ready")


def one_run(work: Path, staged: Path, version: str, redis_url: str, preload: bool, rate: float,
            seconds: float, swap_at: float) -> dict:
    from models.registry import ModelRegistry

    registry = work / ("reg-" + ("ours" if preload else "base") + f"-{time.monotonic_ns()}")
    (registry / "ctr").mkdir(parents=True)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, __file__, "--serve", str(registry), "--redis", redis_url]
                         + ([] if preload else ["--no-preload"]), stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = p.stdout.readline()
        if not line.startswith("URL "):
            raise RuntimeError(f"service failed to start: {line}")
        url = line.split()[1]
        _wait_ready(url)
        ready_s = time.monotonic() - t0

        def promote() -> None:  # the version as the trainer leaves it, then LATEST (no torch in this step)
            shutil.copytree(staged / "ctr" / "versions" / version, registry / "ctr" / "versions" / version)
            ModelRegistry(registry, "ctr").promote(version)

        res = asyncio.run(_load(url, rate, seconds, swap_at, promote))
        res["ready_s"] = round(ready_s, 2)
        return res
    finally:
        p.kill()
        p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=20, help="requests per second (default 20)")
    ap.add_argument("--seconds", type=float, default=15, help="load per run (default 15)")
    ap.add_argument("--swap-at", type=float, default=3, help="promote the model this many s into the load")
    ap.add_argument("--runs", type=int, default=2, help="runs of each, alternating (default 2)")
    ap.add_argument("--redis-url", help="existing Redis host:port (default: start redis-server)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "first_model.json"))
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--redis", help=argparse.SUPPRESS)
    ap.add_argument("--no-preload", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        _serve(a.serve, a.redis, not a.no_preload)
        return 0

    from adstream.drill import RedisProcess
    from bench.bench_serve import push_features, train_model
    from core.settings import FeatureSettings
    from features.store import FeatureStoreClient

    work = Path(tempfile.mkdtemp(prefix="bench-first-model-"))
    redis = None if a.redis_url else RedisProcess(work / "redis").start()
    url = a.redis_url or redis.address
    try:
        fs = FeatureStoreClient(FeatureSettings(repo_dir=work / "repo", online_store="redis", redis_url=url))
        push_features(fs, time.time() - 3600)
        version = train_model(work / "staged")
        res: dict = {"load_avg_start": os.getloadavg(), "rate": a.rate, "seconds": a.seconds, "swap_at": a.swap_at,
                     "ours": "the CTR loader imports torch before its first look (preload_ctr)",
                     "baseline_name": "same service, the import at the first model's swap", "runs": []}
        for i in range(a.runs):
            for name, preload in (("ours", True), ("baseline", False)):
                r = one_run(work, work / "staged", version, url, preload, a.rate, a.seconds, a.swap_at)
                r["name"] = name
                res["runs"].append(r)
                print(f"run {i + 1} {name}: {json.dumps(r)}", flush=True)
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.out}")
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
