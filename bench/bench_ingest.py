"""Ingest benchmark: events/s through the joiner and the feature updater, side by side with the raw
consume rate of the fastest Python Kafka client (confluent-kafka) on the same topics, in one run.

    python bench/bench_ingest.py --events 60000 --out bench/results/ingest.json

Starts its own embedded broker, produces a synthetic backlog once, then measures (each on the same
backlog): raw confluent-kafka consume of impressions+clicks+conversions, the faust joiner draining
it (time to the last example), and the feature updater draining it (until idle).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def raw_consume(bootstrap: str, topics: list[str], total: int) -> float:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{time.time()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "session.timeout.ms": 6000})
    c.subscribe(topics)
    n, t0 = 0, None
    deadline = time.monotonic() + 120
    while n < total and time.monotonic() < deadline:
        for m in c.consume(10_000, 0.5):
            if m.error():
                continue
            if t0 is None:
                t0 = time.perf_counter()
            n += 1
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return n / dt if dt > 0 else 0.0


def _records_in(port: int) -> float | None:
    """The joiner's ``records_in`` counter summed over its input topics (its /metrics)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("adstream_records_in_total{"))


def _joiner_seconds(b, topics, n_imp, runtime, env, tmp, n_in: int) -> tuple[float, float | None]:
    """Seconds from the joiner's first example to its last (start-up and the idle flush excluded),
    and from its first record read to its last (its ``records_in`` counter, scraped every 50 ms:
    the rate it reads, joins and publishes a backlog, without the wait for idle inputs at the end).
    Each runtime uses its own consumer group and its own examples topic."""
    from streams.broker import free_port
    from streams.kafka_io import create_topics, end_offsets

    ex_topic = f"{topics.examples}-{runtime}"
    create_topics(b, [ex_topic], 6)
    prefix_env = dict(env, ADSTREAM_KAFKA__TOPICS__EXAMPLES=ex_topic)
    t0 = time.perf_counter()
    port = free_port()
    j = subprocess.Popen([sys.executable, "-m", "streams.joiner", "--bootstrap", b, "--window", "60",
                          "--lateness", "5", "--idle-flush", "2", "--app-id", f"bench-joiner-{runtime}",
                          "--runtime", runtime, "--metrics-port", str(port)],
                         env=prefix_env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = read_from = read_to = None
    try:
        while time.perf_counter() - t0 < 600:
            if read_to is None:
                n = _records_in(port)
                if n and read_from is None:
                    read_from = time.perf_counter()
                if n is not None and n >= n_in:
                    read_to = time.perf_counter()
            got = sum(end_offsets(b, ex_topic).values())  # cheap: no re-reading of the output
            if got and first is None:
                first = time.perf_counter()
            if got >= n_imp:
                break
            time.sleep(0.05)
        start = first or t0
        read_s = None if read_from is None or read_to is None else max(read_to - read_from, 0.05)
        return time.perf_counter() - start - 2.0, read_s
    finally:
        j.terminate()
        j.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000, help="approximate number of events in the backlog")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest.json"))
    ap.add_argument("--bootstrap", help="existing Kafka (default: start an embedded broker)")
    ap.add_argument("--runtimes", nargs="+", default=["faust", "kafka"], choices=["faust", "kafka"])
    ap.add_argument("--skip-updater", action="store_true", help="joiners only")
    a = ap.parse_args()

    from core.events import Impression
    from core.settings import BrokerSettings, TopicNames
    from streams.broker import EmbeddedBroker
    from streams.kafka_io import create_topics
    from streams.replay import replay
    from streams.sources import synthetic_events

    import uuid

    tmp = Path(tempfile.mkdtemp(prefix="adstream-bench-"))
    broker = None
    if not a.bootstrap:
        broker = EmbeddedBroker(BrokerSettings(kind="kafka"), data_dir=tmp / "broker", port=0)
        broker.start()
    try:
        b = a.bootstrap or broker.bootstrap
        prefix = f"bench-ingest-{uuid.uuid4().hex[:6]}-"
        topics = TopicNames(**{k: prefix + v for k, v in TopicNames().model_dump().items()})
        create_topics(b, topics.all(), 6)
        rps = 20.0
        duration = a.events / (rps * 4.2)
        events = list(synthetic_events(seed=3, duration_s=duration, rps=rps, drift="none",
                                       start_time=time.time() - duration - 600))
        n_imp = sum(isinstance(e, Impression) for e in events)
        replay(events, b, topics, progress=False)
        inputs = [topics.impressions, topics.clicks, topics.conversions]
        n_in = sum(1 for e in events if type(e).__name__ in ("Impression", "Click", "Conversion"))
        raw = raw_consume(b, inputs, n_in)

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.update({f"ADSTREAM_KAFKA__TOPICS__{k.upper()}": v for k, v in topics.model_dump().items()})
        joiner_rates, joiner_to_last = {}, {}
        for runtime in a.runtimes:
            to_last, read_s = _joiner_seconds(b, topics, n_imp, runtime, env, tmp, n_in)
            joiner_to_last[runtime] = round(n_in / max(to_last, 1e-6))
            joiner_rates[runtime] = None if read_s is None else round(n_in / read_s)

        f, updater_s = None, float("nan")
        if not a.skip_updater:
            t1 = time.perf_counter()
            f = subprocess.run([sys.executable, "-m", "streams.feature_updater", "--bootstrap", b,
                                "--repo-dir", str(tmp / "repo"), "--checkpoint-dir", str(tmp / "ckpt"),
                                "--metrics-port", "0", "--max-idle", "3"],
                               env=env, cwd=tmp, capture_output=True, timeout=900)
            updater_s = time.perf_counter() - t1 - 3.0
        res = {
            "events": n_in,
            "impressions": n_imp,
            "raw_consume_events_per_s": round(raw),
            "joiner_events_per_s": joiner_rates,
            "joiner_events_per_s_to_last_example": joiner_to_last,
            "feature_updater_events_per_s": round(n_in / max(updater_s, 1e-6)) if f is not None else None,
            "joiner_vs_raw": {k: round(v / raw, 3) for k, v in joiner_rates.items()} if raw else None,
            "note": "joiner_events_per_s: input events / time from the joiner's first record read to its "
                    "last (its records_in counter; start-up and the wait for idle inputs excluded); "
                    "..._to_last_example: first example to the very last one, including the wait until the "
                    "inputs count as idle (2 s quiet), minus the 2 s idle flush; updater time includes "
                    "start-up (Feast apply) minus the idle wait",
            "updater_rc": f.returncode if f is not None else None,
            "load_avg_1m": os.getloadavg()[0],
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
