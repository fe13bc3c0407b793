"""Replay a stream of events into Kafka, in order, paced or as fast as possible.

:func:`replay` takes any iterable of :mod:`core.events` (or ``(kind, event)`` pairs, as some sources
yield) and produces each one to its topic — impressions, clicks, conversions, bidword-inventory
changes, examples — as the JSON of :func:`core.events.encode`, keyed by ``event.key`` (the request
id, so the events of one request share a partition in every topic). Pacing:

* ``rate``: at most N events per second (wall clock);
* ``time_scale``: event time runs X times faster than the wall clock (1.0 = real time);
* neither: as fast as the producer goes.

Delivery is at-least-once: the producer retries, delivery reports are counted, and the function
flushes before it returns. It returns the counts per topic, the delivery errors, seconds and events/s.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator

from core.errors import AdstreamError, ConfigError
from core.events import BidwordChange, Click, Conversion, CreativeChange, Event, Example, Impression, encode
from core.settings import TopicNames

log = logging.getLogger(__name__)

# event type -> attribute of TopicNames
TOPIC_FIELD: dict[type[Event], str] = {
    Impression: "impressions",
    Click: "clicks",
    Conversion: "conversions",
    BidwordChange: "bidword_inventory",
    Example: "examples",
    CreativeChange: "creatives",
}


class ReplayError(AdstreamError):
    """The replay could not deliver its events (broker down, queue stuck, delivery failures)."""


def topic_for(event: Event, topics: TopicNames) -> str:
    field = TOPIC_FIELD.get(type(event))
    if field is None:
        raise ConfigError(f"no topic for events of type {type(event).__name__}")
    return getattr(topics, field)


def replay_topics(topics: TopicNames) -> list[str]:
    """The topics a replay writes to."""
    return list(dict.fromkeys(getattr(topics, f) for f in TOPIC_FIELD.values()))


def _events(items: Iterable[Any], limit: int | None) -> Iterator[Event]:
    n = 0
    for item in items:
        if limit is not None and n >= limit:
            return
        ev = item[1] if isinstance(item, tuple) else item
        if not isinstance(ev, Event):
            raise ConfigError(f"replay expects core.events objects, got {type(ev).__name__}")
        yield ev
        n += 1


class Pacer:
    """Sleeps so that events go out at ``rate`` per second or at ``time_scale`` × event time.
    While waiting it calls ``idle(timeout)`` (the producer's poll) instead of sleeping blindly."""

    def __init__(self, rate: float | None, time_scale: float | None, idle: Any) -> None:
        if rate is not None and rate <= 0:
            raise ConfigError(f"--rate must be > 0, got {rate}")
        if time_scale is not None and time_scale <= 0:
            raise ConfigError(f"--time-scale must be > 0, got {time_scale}")
        if rate is not None and time_scale is not None:
            raise ConfigError("use either --rate or --time-scale, not both")
        self.rate, self.time_scale, self.idle = rate, time_scale, idle
        self.start = time.perf_counter()
        self.t0: float | None = None
        self.n = 0

    def wait(self, event_time: float) -> None:
        if self.rate is None and self.time_scale is None:
            return
        if self.rate is not None:
            due = self.start + self.n / self.rate
        else:
            if self.t0 is None:
                self.t0 = event_time
            due = self.start + max(0.0, event_time - self.t0) / self.time_scale  # type: ignore[operator]
        self.n += 1
        while True:
            ahead = due - time.perf_counter()
            if ahead <= 0.0005:
                return
            self.idle(min(ahead, 0.1))


def replay(
    events: Iterable[Any],
    bootstrap: str,
    topics: TopicNames | None = None,
    rate: float | None = None,
    time_scale: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    producer_config: dict[str, Any] | None = None,
    total: int | None = None,
    flush_timeout_s: float = 60.0,
    max_blocked_s: float = 60.0,
) -> dict[str, Any]:
    """Produce ``events`` to Kafka at ``bootstrap`` (topics must exist; see
    :func:`streams.kafka_io.create_topics`). Returns ``{"counts": {topic: n}, "events": n,
    "delivered": n, "delivery_errors": n, "seconds": s, "events_per_s": r}``.
    ``producer_config``: librdkafka settings with ``_`` for ``.`` (e.g. ``enable_idempotence=False``
    for a broker without idempotent producers)."""
    from streams.kafka_io import KafkaIOError, make_producer, produce_json

    topics = topics or TopicNames()
    producer = make_producer(bootstrap, **(producer_config or {}))
    pacer = Pacer(rate, time_scale, producer.poll)
    counts: dict[str, int] = {t: 0 for t in replay_topics(topics)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=limit if total is None else min(total, limit or total), unit="ev",
                   desc="replay", mininterval=0.5, smoothing=0.1)
    n = 0
    pending_bar = 0
    start = time.perf_counter()
    try:
        for ev in _events(events, limit):
            pacer.wait(ev.event_time)
            topic = topic_for(ev, topics)
            value = encode(ev)
            key = ev.key
            try:
                produce_json(producer, topic, key, value, max_wait_s=max_blocked_s)
            except KafkaIOError:
                raise ReplayError(
                    f"producer queue stayed full for {max_blocked_s:.0f}s; is {bootstrap} up?"
                ) from None
            counts[topic] += 1
            n += 1
            if n & 1023 == 0:
                producer.poll(0)
                if bar is not None:
                    bar.update(n - pending_bar)
                    pending_bar = n
        producer.poll(0)
        left = producer.flush(flush_timeout_s)
    finally:
        if bar is not None:
            bar.update(n - pending_bar)
            bar.close()
    seconds = time.perf_counter() - start
    errors = producer.errors + left
    if left:
        log.error("%d events still undelivered after %.0fs flush", left, flush_timeout_s)
    return {
        "counts": counts,
        "events": n,
        "delivered": producer.delivered,
        "delivery_errors": errors,
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1) if seconds > 0 else 0.0,
    }


def write_jsonl(events: Iterable[Any], path: str, limit: int | None = None, topics: TopicNames | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Write the events as JSON lines instead of producing them (to inspect a source). Same summary
    as :func:`replay`."""
    from pathlib import Path

    topics = topics or TopicNames()
    counts: dict[str, int] = {t: 0 for t in replay_topics(topics)}
    start = time.perf_counter()
    n = 0
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    it: Iterable[Event] = _events(events, limit)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=limit, unit="ev", desc="write", mininterval=0.5)
    with p.open("wb") as f:
        for ev in it:
            f.write(encode(ev))
            f.write(b"\n")
            counts[topic_for(ev, topics)] += 1
            n += 1
    seconds = time.perf_counter() - start
    return {"counts": counts, "events": n, "delivered": n, "delivery_errors": 0,
            "seconds": round(seconds, 3), "events_per_s": round(n / seconds, 1) if seconds > 0 else 0.0}


def summary_line(result: dict[str, Any]) -> str:
    parts = ", ".join(f"{t}={c:,}" for t, c in result["counts"].items() if c)
    return (f"replayed {result['events']:,} events in {result['seconds']:.2f}s "
            f"({result['events_per_s']:,.0f} events/s): {parts or 'nothing'}; "
            f"delivery errors={result['delivery_errors']}")
