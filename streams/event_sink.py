"""A Kafka-backed :class:`core.ports.EventSink`: fire-and-forget, bounded, never blocks the caller.

The online service logs every served ad through it. ``send`` hands the record to librdkafka's
in-memory queue (bounded by ``buffer`` records) and returns at once; a background thread serves the
delivery reports. When the broker is down, records wait in the queue until ``timeout_ms`` and are
then dropped; when the queue is full, new records are dropped at once. Both count in ``dropped``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, Producer

log = logging.getLogger(__name__)


class KafkaEventSink:
    def __init__(self, bootstrap: str, buffer: int = 100_000, timeout_ms: int = 30_000,
                 linger_ms: int = 5, **overrides: Any) -> None:
        cfg: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "acks": "all",
            "enable.idempotence": False,  # idempotence makes librdkafka fail fatally on some timeouts
            "queue.buffering.max.messages": buffer,
            "message.timeout.ms": timeout_ms,
            "socket.timeout.ms": max(1000, min(timeout_ms, 60_000)),
            "reconnect.backoff.max.ms": 2000,
        }
        cfg.update({k.replace("_", "."): v for k, v in overrides.items()})
        self._p = Producer(cfg, logger=_QuietLogger())
        self.bootstrap = bootstrap
        self.sent = 0
        self.delivered = 0
        self._dropped_full = 0
        self._dropped_failed = 0
        self.last_latency_s = 0.0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="event-sink", daemon=True)
        self._thread.start()

    # ---- EventSink -----------------------------------------------------------------------------
    def send(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        try:
            self._p.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
            self.sent += 1
        except BufferError:
            self._dropped_full += 1
            if self._dropped_full in (1, 10, 100) or self._dropped_full % 10_000 == 0:
                log.warning("event sink buffer full: %d records dropped so far (broker %s)",
                            self._dropped_full, self.bootstrap)
        except Exception as e:  # noqa: BLE001 - e.g. KafkaException on a fatal producer: never raise
            self._dropped_full += 1
            self.last_error = str(e)

    def flush(self, timeout_s: float = 5.0) -> int:
        """Wait up to ``timeout_s`` for queued records; returns how many are still queued."""
        return self._p.flush(timeout_s)

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_failed

    # ---- extras --------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._p)

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            self.delivered += 1
            lat = msg.latency()
            if lat is not None:
                self.last_latency_s = lat
        else:
            self._dropped_failed += 1
            self.last_error = str(err)
            if self._dropped_failed in (1, 10, 100) or self._dropped_failed % 10_000 == 0:
                log.warning("impression records undelivered: %d so far (%s)", self._dropped_failed, err)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._p.poll(0.1)

    def close(self, timeout_s: float = 5.0) -> int:
        """Flush (bounded), stop the poll thread; returns records left undelivered."""
        left = self._p.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout=2)
        return left

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "delivered": self.delivered, "dropped": self.dropped,
                "pending": self.pending, "last_latency_s": self.last_latency_s, "last_error": self.last_error}


class _QuietLogger:
    """librdkafka logs every failed connection attempt; keep one line in a hundred."""

    def __init__(self) -> None:
        self.n = 0

    def log(self, level: int, fmt: str, *args: Any) -> None:
        self.n += 1
        if self.n <= 3 or self.n % 100 == 0:
            log.info("librdkafka: " + fmt, *args)
