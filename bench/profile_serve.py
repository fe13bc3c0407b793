"""Where a request's CPU goes: ``AdService.handle`` in-process (no HTTP), 200 ads x 5 creatives, the
Redis fast path, a trained CTR model (the setup of ``bench/bench_serve.py``): wall and CPU per request,
then a cProfile of ``--requests`` requests.

    PYTHONPATH=. .venv/bin/python bench/profile_serve.py [--requests 100] [--top 25] [--threaded-read]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _InlinePool:
    """An executor that runs the task in the caller (the feature read's pool, for the profiler)."""

    def submit(self, fn, *args, **kw):
        from concurrent.futures import Future

        f: Future = Future()
        try:
            f.set_result(fn(*args, **kw))
        except Exception as e:  # noqa: BLE001
            f.set_exception(e)
        return f

    def shutdown(self, *a, **kw) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threaded-read", action="store_true",
                    help="keep the feature read on its pool thread (as served); by default the profile runs it in "
                         "the calling thread so cProfile sees its cost")
    ap.add_argument("--thread", choices=("main", "pool"), default="main",
                    help="where the timed requests run: this thread or a fresh pool thread (what FastAPI's worker "
                         "threads are; AdService.handle pins torch's threads there, online.models.pin_torch_threads)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from bench.bench_serve import QUERY, NullSink, build_inventory, push_features, train_model
    from core.settings import FeatureSettings, ServeSettings
    from features.store import FeatureStoreClient
    from online.app import create_app
    from online.service import AdRequestData
    from streams.broker import free_port

    work = Path(tempfile.mkdtemp(prefix="profile-serve-"))
    port = free_port()
    rp = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                           "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        fs = FeatureStoreClient(FeatureSettings(repo_dir=work / "repo", online_store="redis",
                                                redis_url=f"127.0.0.1:{port}"))
        push_features(fs, time.time() - 3600)
        train_model(work / "registry")
        app = create_app(ServeSettings(model_poll_s=5.0), registry_root=work / "registry", feature_store=fs,
                         sink=NullSink(), index=build_inventory(), keep_stage_log=1000)
        svc = app.state.service
        if not a.threaded_read:
            svc.features._pool = _InlinePool()
        for _ in range(30):
            svc.handle(AdRequestData("bu001", QUERY, 5))

        def timed() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            for i in range(a.requests):
                svc.handle(AdRequestData(f"bu{i % 100:03d}", QUERY, 5))
            return time.perf_counter() - t, time.process_time() - c

        if a.thread == "main":
            wall, cpu = timed()
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as ex:
                wall, cpu = ex.submit(timed).result()
        n = a.requests
        print(f"per request ({a.thread} thread): {wall / n * 1e3:.2f} ms wall, {cpu / n * 1e3:.2f} ms CPU "
              "(all threads of this process)")
        pr = cProfile.Profile()
        pr.enable()
        for i in range(a.requests):
            svc.handle(AdRequestData(f"bu{i % 100:03d}", QUERY, 5))
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(a.top)
        print(out.getvalue())
        svc.close()
    finally:
        rp.terminate()
        rp.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
