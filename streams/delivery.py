"""Producers that never lose a record they were given: the outputs a worker commits offsets for.

A worker may move its input offsets (or write a checkpoint) only once everything it produced from
those inputs is on the broker. librdkafka reports each delivery in a callback, possibly long after
``produce`` returned, and a full local queue raises ``BufferError``. Counting errors around one
``flush`` misses failures reported earlier, and a record whose delivery failed is gone unless
someone keeps it. So:

* :class:`ReliableProducer` keeps every record until the broker acknowledged it. A failed delivery
  (message timeout after a broker outage, a broker error) is re-sent, a full queue is waited for
  (bounded) and then backlogged, and a producer that hit a fatal error is replaced and everything
  unacknowledged re-sent. :meth:`ReliableProducer.confirm` says whether *every* record given so
  far is acknowledged: commit offsets or checkpoint only when it returns True.
* :class:`DeadLetterWriter` writes ``core.events.dead_letter_record`` values keyed
  ``<topic>:<partition>:<offset>`` (so re-processing repeats the key), counts them, and has the
  same guarantee (:meth:`DeadLetterWriter.confirm`, :meth:`DeadLetterWriter.confirm_or_raise`).

Delivery is at-least-once: a record whose acknowledgement was lost can be written twice (same key,
same value); consumers de-duplicate by key.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from core.errors import AdstreamError, InvalidRecord
from core.events import dead_letter_record
from streams.client_log import client_config

log = logging.getLogger(__name__)


class DeliveryError(AdstreamError):
    """Records that could not be delivered in time (they are kept and re-sent)."""


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for a worker's output producer: acks=all, idempotent, small linger.
    ``overrides`` use ``_`` for ``.`` (``linger_ms=20``, ``message_timeout_ms=5000``)."""
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                           "enable.idempotence": True, "queue.buffering.max.messages": 500_000}
    cfg.update({k.replace("_", "."): v for k, v in overrides.items()})
    return cfg


class ReliableProducer:
    """A producer that keeps every record until it is acknowledged (see the module docstring).

    ``block_s``: how long :meth:`produce` polls while librdkafka's queue is full before it keeps
    the record in its own backlog (sent by later calls). ``raw_factory`` builds the underlying
    ``confluent_kafka.Producer`` from a config dict (tests inject faults through it)."""

    def __init__(self, bootstrap: str, name: str = "producer", block_s: float = 5.0,
                 raw_factory: Any = None, **overrides: Any) -> None:
        self.config = producer_config(bootstrap, **overrides)
        self.name = name
        self.block_s = block_s
        self._factory = raw_factory or Producer
        self._p = self._factory(client_config(self.config))
        self._seq = 0
        self._unacked: dict[int, tuple[str, bytes | None, bytes | None]] = {}
        self._to_send: list[int] = []  # failed or backlogged, not in librdkafka's queue
        self.produced = 0
        self.delivered = 0
        self.failures = 0  # delivery reports with an error (each such record is re-sent)
        self.resent = 0
        self.recreated = 0
        self.last_error: KafkaError | None = None

    # ---- producing -------------------------------------------------------------------------
    def produce(self, topic: str, value: bytes | None, key: bytes | str | None = None) -> None:
        """Hand one record over; it is kept until acknowledged. Never raises ``BufferError``."""
        if isinstance(key, str):
            key = key.encode()
        self._seq += 1
        seq = self._seq
        self._unacked[seq] = (topic, key, value)
        self.produced += 1
        if self._to_send:
            self._to_send.append(seq)  # keep the order behind what is waiting already
            self._send_waiting()
            return
        if not self._send(seq, block_s=self.block_s):
            self._to_send.append(seq)

    def _send(self, seq: int, block_s: float = 0.0) -> bool:
        topic, key, value = self._unacked[seq]
        deadline = None
        while True:
            try:
                self._p.produce(topic, value=value, key=key, on_delivery=functools.partial(self._on_delivery, seq))
                return True
            except BufferError:
                deadline = deadline or time.monotonic() + block_s
                if time.monotonic() >= deadline:
                    return False
                self._p.poll(0.05)
            except KafkaException as e:
                err = e.args[0] if e.args else None
                if isinstance(err, KafkaError) and err.fatal():
                    self._recreate(err)
                    return False
                raise

    def _send_waiting(self) -> None:
        """Re-send failed and backlogged records, in order, while librdkafka takes them."""
        waiting, self._to_send = self._to_send, []
        for i, seq in enumerate(waiting):
            if seq not in self._unacked:
                continue
            if not self._send(seq):
                # still full (or the producer was replaced, which queues everything again)
                self._to_send = list(dict.fromkeys(waiting[i:] + self._to_send))
                return
            self.resent += 1

    def _on_delivery(self, seq: int, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            if self._unacked.pop(seq, None) is not None:
                self.delivered += 1
            return
        self.failures += 1
        self.last_error = err
        if seq in self._unacked:
            self._to_send.append(seq)
        if self.failures <= 5 or self.failures % 1000 == 0:
            log.warning("%s: delivery failed (%d so far), the record is kept and re-sent: %s",
                        self.name, self.failures, err)
        if err.fatal():
            self._recreate(err)

    def _recreate(self, err: KafkaError) -> None:
        """A fatal producer error (e.g. an idempotence sequence gap): start a new producer and
        re-send everything that is not acknowledged."""
        log.error("%s: fatal producer error, replacing the producer and re-sending %d records: %s",
                  self.name, len(self._unacked), err)
        self.recreated += 1
        self._p = self._factory(client_config(self.config))
        self._to_send = sorted(self._unacked)

    # ---- waiting ---------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        n = self._p.poll(timeout)
        if self._to_send:
            self._send_waiting()
        return n

    def confirm(self, timeout_s: float = 30.0) -> bool:
        """True when every record produced so far is acknowledged by the broker; waits up to
        ``timeout_s`` (re-sending failed records meanwhile). False leaves them kept for later."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._to_send:
                self._send_waiting()
            if not self._unacked:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._p.flush(min(left, 1.0))
            self._p.poll(0)

    @property
    def outstanding(self) -> int:
        """Records not acknowledged yet (in flight, failed or backlogged)."""
        return len(self._unacked)

    def __len__(self) -> int:
        return len(self._unacked)

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is left (bounded); returns how many records are still unacknowledged."""
        self.confirm(timeout_s)
        if self._unacked:
            log.error("%s: %d records undelivered at close", self.name, len(self._unacked))
        return len(self._unacked)


class DeadLetterWriter:
    """Dead letters for one worker, never lost (see the module docstring).

    ``write`` keys each record ``<source topic>:<partition>:<offset>`` and counts it in
    ``metrics.dead_letters{worker, reason}`` and ``metrics.records_out{worker, topic}`` when
    ``metrics`` (a ``core.metrics.WorkerMetrics``) is given. A worker calls :meth:`confirm` (or
    :meth:`confirm_or_raise`) before it checkpoints or commits the offsets of the bad records.
    ``producer``: share the worker's :class:`ReliableProducer` (one ``confirm`` then covers both);
    by default one is made on the first write."""

    def __init__(self, bootstrap: str, topic: str, metrics: Any = None, worker: str | None = None,
                 producer: ReliableProducer | None = None, **producer_overrides: Any) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.metrics = metrics
        self.worker = worker or (metrics.worker if metrics is not None else "worker")
        self._producer = producer
        self._overrides = {"linger_ms": 20, **producer_overrides}
        self.written = 0

    @property
    def producer(self) -> ReliableProducer:
        if self._producer is None:
            self._producer = ReliableProducer(self.bootstrap, name=f"{self.worker} dead letters", **self._overrides)
        return self._producer

    def write(self, source_topic: str, partition: int | None, offset: int | None, raw: bytes | None,
              err: InvalidRecord) -> None:
        self.producer.produce(self.topic, dead_letter_record(source_topic, partition, offset, raw, err),
                              key=f"{source_topic}:{partition}:{offset}")
        self.producer.poll(0)
        self.written += 1
        if self.metrics is not None:
            self.metrics.dead_letters.labels(self.worker, err.reason).inc()
            self.metrics.records_out.labels(self.worker, self.topic).inc()

    def confirm(self, timeout_s: float = 30.0) -> bool:
        """True when every dead letter written so far is on the broker (nothing written: True)."""
        return self._producer is None or self._producer.confirm(timeout_s)

    def confirm_or_raise(self, timeout_s: float = 30.0) -> None:
        if not self.confirm(timeout_s):
            raise DeliveryError(f"{self.outstanding} dead letters not delivered to {self.topic!r} within "
                                f"{timeout_s:.0f}s (kept, re-sent later); not checkpointing")

    @property
    def outstanding(self) -> int:
        return 0 if self._producer is None else self._producer.outstanding

    def close(self, timeout_s: float = 10.0) -> int:
        return 0 if self._producer is None else self._producer.close(timeout_s)
