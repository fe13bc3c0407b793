"""``adstream demo``: the whole streaming backbone on one machine, embedded defaults, no Docker.

Starts the embedded broker, replays a few minutes (event time) of the synthetic world, runs the
joiner and the feature updater as worker processes, prints a summary (events, examples, features
written, freshness) and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("adstream.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the streaming backbone end to end on embedded defaults and print a summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=300.0, help="event-time seconds of synthetic traffic")
    p.add_argument("--rps", type=float, default=10.0, help="synthetic search requests per second")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--window", type=float, default=60.0, help="attribution window, seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the demo state directory afterwards")
    p.set_defaults(func=_run)


def _scrape(port: int) -> dict[str, float]:
    """Prometheus text format → {name{labels}: value} (enough for a summary)."""
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            try:
                out[name] = float(val)
            except ValueError:
                pass
    return out


def _quantile_from_buckets(metrics: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), v)
        for k, v in metrics.items() if k.startswith(name + "_bucket") and 'le="+Inf"' not in k
    )
    total = metrics.get(name + "_count", 0.0)
    if not total:
        return None
    for le, cum in buckets:
        if cum >= q * total:
            return le
    return float("inf")


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from core.events import Click, Impression
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker, free_port
    from streams.kafka_io import ensure_project_topics, read_topic
    from streams.replay import replay
    from streams.sources import synthetic_events

    s = settings_from_args(args)
    root = Path(s.state_dir) / "demo"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    broker = None
    t0 = time.monotonic()
    try:
        if s.kafka.bootstrap:
            bootstrap = s.kafka.bootstrap
            print(f"using the Kafka cluster at {bootstrap}")
        else:
            broker = EmbeddedBroker(BrokerSettings(**{**s.broker.model_dump(), "data_dir": root / "broker"}),
                                    port=0, controller_port=0)
            broker.start()
            bootstrap = broker.bootstrap
            print(f"broker: {broker.kind} on {bootstrap} (started in {time.monotonic() - t0:.1f}s)")
        ensure_project_topics(bootstrap, s.kafka)

        start = time.time() - args.duration - 120.0
        events = list(synthetic_events(seed=args.seed, duration_s=args.duration, rps=args.rps,
                                       drift="all", start_time=start))
        n_imp = sum(isinstance(e, Impression) for e in events)
        n_clk = sum(isinstance(e, Click) for e in events)
        print(f"synthetic world: {args.duration:.0f}s of traffic, {n_imp} impressions, {n_clk} clicks")
        res = replay(events, bootstrap, s.kafka.topics, progress=True)
        print(f"replayed {res['events']} events in {res['seconds']:.1f}s ({res['events_per_s']:.0f}/s)")

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        jport, fport = free_port(), free_port()
        logs = root / "logs"
        logs.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streams.joiner", "--bootstrap", bootstrap, "--window", str(args.window),
             "--lateness", "5", "--idle-flush", "3", "--metrics-port", str(jport)],
            env=env, stdout=open(logs / "joiner.log", "wb"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streams.feature_updater", "--bootstrap", bootstrap,
             "--repo-dir", str(root / "feature_repo"), "--checkpoint-dir", str(root / "feature_updater"),
             "--metrics-port", str(fport), "--max-idle", "8"],
            env=env, stdout=open(logs / "feature_updater.log", "wb"), stderr=subprocess.STDOUT))
        print(f"workers: joiner (/metrics on 127.0.0.1:{jport}), feature updater (127.0.0.1:{fport}); "
              f"logs in {logs}")

        from tqdm import tqdm

        bar = tqdm(total=n_imp, unit="ex", desc="examples", mininterval=0.5)
        deadline = time.monotonic() + args.timeout
        examples, fmetrics = [], {}
        while time.monotonic() < deadline:
            examples = read_topic(bootstrap, s.kafka.topics.examples, timeout_s=20, idle_s=0.2)
            bar.n = min(len({k for k, *_ in examples}), n_imp)
            bar.refresh()
            fm = _scrape(fport)
            fmetrics = fm or fmetrics
            updater_done = procs[1].poll() is not None
            if bar.n >= n_imp and updater_done:
                break
            for p in procs:
                if p.poll() not in (None, 0):
                    raise SystemExit(f"a worker exited with {p.returncode}; see {logs}")
            time.sleep(1.0)
        bar.close()

        keys = {}
        for k, v, *_ in examples:
            keys[k] = json.loads(v)
        pos = sum(e["clicked"] for e in keys.values())
        dead = read_topic(bootstrap, s.kafka.topics.dead_letter, timeout_s=10, idle_s=0.2)
        jm = _scrape(jport)
        written = sum(v for k, v in fmetrics.items() if k.startswith("adstream_features_written_total"))
        p50 = _quantile_from_buckets(fmetrics, "adstream_feature_freshness_seconds", 0.5)
        p99 = _quantile_from_buckets(fmetrics, "adstream_feature_freshness_seconds", 0.99)
        print("\n== adstream demo summary ==")
        print(f"events produced      : {res['counts']}")
        print(f"examples             : {len(keys)} distinct ({len(examples)} records), "
              f"{pos} clicked, CTR {pos / max(1, len(keys)):.3%}")
        print(f"dead letters         : {len(dead)}")
        outcomes = {k.split('outcome="')[1].split('"')[0]: int(v) for k, v in jm.items()
                    if k.startswith("adstream_join_outcomes_total")}
        print(f"join outcomes        : {outcomes}")
        print(f"feature rows written : {int(written)}")
        if p50 is not None:
            print(f"feature freshness    : p50 <= {p50:g}s, p99 <= {p99:g}s (event in Kafka -> online store)")
        print(f"wall time            : {time.monotonic() - t0:.1f}s")
        ok = len(keys) >= n_imp
        if not ok:
            print(f"incomplete: {n_imp - len(keys)} examples missing after {args.timeout:.0f}s", file=sys.stderr)
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
