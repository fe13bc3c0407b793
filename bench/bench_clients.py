"""Kafka clients side by side: confluent-kafka, aiokafka (faust's client) and kafka-python, producing
and consuming the same records on the same broker in one run.

For each client: produce ``--messages`` impression-sized JSON records (acks=all, idempotence off
for all three so they do the same work; linger 5 ms) to a fresh 6-partition topic, then consume
all of them from the beginning with a fresh group (no decoding). Rates are messages/s.

    PYTHONPATH=. .venv/bin/python bench/bench_clients.py --messages 100000 --out bench/results/clients.json

Starts its own broker unless ``--bootstrap``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def payloads(n: int) -> list[tuple[bytes, bytes]]:
    from core.events import Impression

    t = time.time()
    out = []
    for i in range(n):
        e = Impression(request_id=f"r{i}", event_time=t, user_id=f"u{i % 9973}", query="running shoes",
                       ad_id=f"a{i % 5000}", creative_id=f"a{i % 5000}-c1", bidword="running shoes",
                       category="sports/running", position=i % 5, bid=1.25)
        out.append((e.key.encode(), e.to_json()))
    return out


def ck_produce(b: str, topic: str, msgs) -> float:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": b, "linger.ms": 5, "acks": "all", "enable.idempotence": False,
                  "queue.buffering.max.messages": 1_000_000})
    t = time.perf_counter()
    for k, v in msgs:
        while True:
            try:
                p.produce(topic, v, k)
                break
            except BufferError:
                p.poll(0.01)
    p.flush(60)
    return len(msgs) / (time.perf_counter() - t)


def ck_consume(b: str, topic: str, n: int) -> float:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": b, "group.id": f"bc-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    got, t0 = 0, None
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        ms = c.consume(10_000, 0.5)
        if ms and t0 is None:
            t0 = time.perf_counter()
        got += sum(1 for m in ms if m.error() is None)
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return got / dt if dt > 0 else 0.0


def kp_produce(b: str, topic: str, msgs) -> float:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=b, linger_ms=5, acks="all", enable_idempotence=False,
                      batch_size=64 * 1024)
    t = time.perf_counter()
    for k, v in msgs:
        p.send(topic, key=k, value=v)
    p.flush()
    r = len(msgs) / (time.perf_counter() - t)
    p.close()
    return r


def kp_consume(b: str, topic: str, n: int) -> float:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=b, group_id=f"bk-{uuid.uuid4().hex[:6]}",
                      auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=10_000,
                      session_timeout_ms=6000, heartbeat_interval_ms=2000)
    got, t0 = 0, None
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        batch = c.poll(timeout_ms=500)
        if batch and t0 is None:
            t0 = time.perf_counter()
        got += sum(len(v) for v in batch.values())
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return got / dt if dt > 0 else 0.0


async def _aio_produce(b: str, topic: str, msgs) -> float:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=b, linger_ms=5, acks="all", enable_idempotence=False)
    await p.start()
    try:
        t = time.perf_counter()
        futs = [await p.send(topic, value=v, key=k) for k, v in msgs]
        await asyncio.gather(*futs)
        return len(msgs) / (time.perf_counter() - t)
    finally:
        await p.stop()


async def _aio_consume(b: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=b, group_id=f"ba-{uuid.uuid4().hex[:6]}",
                         auto_offset_reset="earliest", enable_auto_commit=False,
                         session_timeout_ms=6000, heartbeat_interval_ms=2000)
    await c.start()
    try:
        got, t0 = 0, None
        deadline = time.monotonic() + 120
        while got < n and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=500, max_records=10_000)
            if batch and t0 is None:
                t0 = time.perf_counter()
            got += sum(len(v) for v in batch.values())
        dt = time.perf_counter() - (t0 or time.perf_counter())
        return got / dt if dt > 0 else 0.0
    finally:
        await c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--bootstrap", help="existing Kafka (default: start an embedded broker)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "clients.json"))
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker
    from streams.kafka_io import create_topics

    broker = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    try:
        if not a.bootstrap:
            broker = EmbeddedBroker(BrokerSettings(), data_dir=tmp / "broker", port=0).start()
        b = a.bootstrap or broker.bootstrap
        msgs = payloads(a.messages)
        size = sum(len(v) for _, v in msgs) / len(msgs)
        res: dict = {"messages": a.messages, "mean_value_bytes": round(size), "load_avg_start": os.getloadavg(),
                     "produce": {}, "consume": {}}
        clients = {
            "confluent-kafka": (ck_produce, ck_consume),
            "aiokafka": (lambda b, t, m: asyncio.run(_aio_produce(b, t, m)),
                         lambda b, t, n: asyncio.run(_aio_consume(b, t, n))),
            "kafka-python": (kp_produce, kp_consume),
        }
        try:
            import kafka  # noqa: F401  (requirements/bench.txt: the project itself does not use it)
        except ImportError:
            del clients["kafka-python"]
            res["kafka-python"] = "not installed (pip install -r requirements/bench.txt)"
        for name, (prod, cons) in clients.items():
            topic = f"bench-clients-{name}-{uuid.uuid4().hex[:6]}"
            create_topics(b, [topic], 6)
            res["produce"][name] = round(prod(b, topic, msgs))
            res["consume"][name] = round(cons(b, topic, len(msgs)))
            print(f"{name}: produce {res['produce'][name]:,} msg/s, consume {res['consume'][name]:,} msg/s",
                  flush=True)
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
