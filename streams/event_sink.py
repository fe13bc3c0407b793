"""A Kafka-backed :class:`core.ports.EventSink`: fire-and-forget, bounded, never blocks the caller,
and loses nothing during a broker outage of minutes.

The online service logs every served ad through it. ``send`` hands the record to librdkafka's
in-memory queue (bounded by ``buffer`` records) and returns at once; a background thread serves
the delivery reports. A record that librdkafka could not deliver within ``timeout_ms`` (the broker
is away), or that did not fit in its queue, goes to a bounded on-disk spool
(:class:`streams.spool.DiskSpool`, ``spool_dir``, at most ``spool_max_bytes``). Once the broker
answers again the background thread drains the spool, one segment at a time, back through the
producer. Only when the spool is full too (or there is none) is a record dropped: counted in
``dropped``, logged as an error, exported as ``adstream_serve_impression_log_dropped_total``.

The producer is idempotent (no duplicates from its own retries). A record spooled and then
delivered twice (a crash between delivery and the segment's removal) is a byte-identical duplicate
with the same key: the joiner and the feature updater drop those.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from streams.client_log import client_config

log = logging.getLogger(__name__)

PROBE_EVERY_S = 2.0  # while records are spooled and the broker seemed down: ask it this often
SYNC_EVERY_S = 1.0


class KafkaEventSink:
    def __init__(self, bootstrap: str, buffer: int = 100_000, timeout_ms: int = 30_000,
                 linger_ms: int = 5, spool_dir: str | Path | None = None,
                 spool_max_bytes: int = 1 << 30, **overrides: Any) -> None:
        cfg: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "acks": "all",
            "enable.idempotence": True,  # a retried batch is not written twice
            "queue.buffering.max.messages": buffer,
            "message.timeout.ms": timeout_ms,
            "socket.timeout.ms": max(1000, min(timeout_ms, 60_000)),
            "reconnect.backoff.max.ms": 2000,
        }
        cfg.update({k.replace("_", "."): v for k, v in overrides.items()})
        self._cfg = cfg
        self._p = Producer(client_config(cfg))  # librdkafka's lines through the shared, rate-limited log
        self.bootstrap = bootstrap
        self.sent = 0
        self.delivered = 0
        self.spooled = 0  # records written to the spool (undelivered in time, or the queue was full)
        self.drained = 0  # spooled records handed back to the producer
        self._dropped = 0
        self.last_latency_s = 0.0
        self.last_error: str | None = None
        self._mu = threading.Lock()
        self._last_ok = 0.0
        self._last_fail = 0.0
        self._last_probe = 0.0
        self._draining: tuple[Path, int] | None = None  # segment in flight, records in it
        self._purge = False
        self._drain_left = 0
        self.spool = None
        if spool_dir is not None:
            from streams.spool import DiskSpool

            self.spool = DiskSpool(spool_dir, spool_max_bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="event-sink", daemon=True)
        self._thread.start()

    # ---- EventSink -----------------------------------------------------------------------------
    def send(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        if isinstance(key, str):
            key = key.encode()
        if self.spool is not None and self.spool.records:
            # earlier records wait in the spool: queue behind them, so the topic gets them in
            # order (the joiner's watermark follows the impressions it has read)
            self._to_spool(topic, key, value, "earlier records are spooled")
            return
        try:
            self._p.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
            self.sent += 1
        except BufferError:
            self._to_spool(topic, key, value, "the producer queue is full")
        except Exception as e:  # noqa: BLE001 - e.g. KafkaException on a fatal producer: never raise
            self.last_error = str(e)
            self._to_spool(topic, key, value, str(e))

    def flush(self, timeout_s: float = 5.0) -> int:
        """Wait up to ``timeout_s`` for queued and spooled records; returns how many are left."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = self._p.flush(min(0.2, max(0.0, deadline - time.monotonic())))
            left += self.spooled_records
            if left == 0 or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    @property
    def dropped(self) -> int:
        """Records lost for good (spool full, or no spool)."""
        return self._dropped

    # ---- extras --------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records waiting: in librdkafka's queue plus in the spool."""
        return len(self._p) + self.spooled_records

    @property
    def spooled_records(self) -> int:
        return len(self.spool) if self.spool is not None else 0

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes if self.spool is not None else 0

    def _to_spool(self, topic: str, key: bytes | None, value: bytes, why: str) -> None:
        if self.spool is not None and self.spool.append(topic, key, value):
            with self._mu:
                self.spooled += 1
                n = self.spooled
            if n in (1, 100) or n % 10_000 == 0:
                log.warning("impression log: %d records spooled to %s so far (%s); they are sent once "
                            "the broker %s answers", n, self.spool.dir, why, self.bootstrap)
            return
        with self._mu:
            self._dropped += 1
            n = self._dropped
        if n in (1, 10, 100) or n % 10_000 == 0:
            where = (f"the spool {self.spool.dir} is full ({self.spool.bytes} bytes)" if self.spool is not None
                     else "no spool is configured")
            log.error("IMPRESSIONS LOST: %d records dropped so far: %s and %s", n, why, where)

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            with self._mu:
                self.delivered += 1
            self._last_ok = time.monotonic()
            lat = msg.latency()
            if lat is not None:
                self.last_latency_s = lat
        else:
            self._last_fail = time.monotonic()
            self.last_error = str(err)
            self._to_spool(msg.topic(), msg.key(), msg.value(), str(err))
            if err.code() != KafkaError._PURGE_QUEUE:
                # the broker is away: what waits behind this record goes to the spool now, in order,
                # rather than timing out one by one while newer records are spooled before it
                self._purge = True

    def _on_drained(self, err: KafkaError | None, msg: Any) -> None:
        self._on_delivery(err, msg)
        with self._mu:
            self._drain_left -= 1
            finished = self._draining if self._drain_left == 0 else None
            if finished is not None:
                self._draining = None
        if finished is not None:
            self.spool.done(*finished)  # every record delivered, or spooled again

    # ---- background ----------------------------------------------------------------------------
    def _broker_up(self) -> bool:
        now = time.monotonic()
        if self._last_ok > self._last_fail:
            return True
        if now - self._last_probe < PROBE_EVERY_S:
            return False
        self._last_probe = now
        try:
            md = self._p.list_topics(timeout=1.0)
        except Exception:  # noqa: BLE001 - still away
            return False
        up = bool(md.brokers)
        if up:
            self._last_ok = now
        return up

    def _drain(self) -> None:
        if self.spool is None or self._draining is not None or not len(self.spool) or not self._broker_up():
            return
        got = self.spool.take()
        if got is None:
            return
        seg, records = got
        if not records:
            self.spool.done(seg, 0)
            return
        self._drain_left = len(records)
        self._draining = (seg, len(records))
        log.info("impression log: draining %d spooled records from %s", len(records), seg.name)
        for topic, key, value in records:
            while True:
                try:
                    self._p.produce(topic, value=value, key=key, on_delivery=self._on_drained)
                    self.drained += 1
                    break
                except BufferError:
                    self._p.poll(0.1)
                    if self._stop.is_set():
                        self._to_spool(topic, key, value, "closing")
                        with self._mu:
                            self._drain_left -= 1
                        break

    def _poll_loop(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.is_set():
            self._p.poll(0.1)
            try:
                if self._purge and self.spool is not None:
                    self._purge = False
                    self._p.purge(in_queue=True, in_flight=False, blocking=False)
                    self._p.poll(0)
                self._drain()
                if self.spool is not None and time.monotonic() - last_sync >= SYNC_EVERY_S:
                    self.spool.sync()
                    last_sync = time.monotonic()
            except Exception:  # noqa: BLE001 - the background thread must keep serving reports
                log.exception("impression log: background step failed")

    def close(self, timeout_s: float = 5.0) -> int:
        """Deliver what it can within ``timeout_s``; what is left is spooled (adopted and sent by
        the next process using the same spool directory). Returns the records left undelivered."""
        left = self.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout=5)
        if len(self._p):
            self._p.purge()  # undelivered: their reports (errors) spool them
            self._p.poll(0.5)
        if self.spool is not None:
            self.spool.close()
        return left

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "delivered": self.delivered, "dropped": self.dropped,
                "spooled": self.spooled, "drained": self.drained, "spool_bytes": self.spool_bytes,
                "pending": self.pending, "last_latency_s": self.last_latency_s, "last_error": self.last_error}
