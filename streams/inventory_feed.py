"""Follows a changelog topic and hands every change to a callback: the ``bidword-inventory`` topic
(``BidwordChange``, the online index) by default, or any other event type (``expected``; the
``creatives`` catalogue: ``CreativeChange``).

The topic is a changelog: a serving process must see all of it, so the feed reads every partition
from the beginning without a consumer group (nothing is committed) and then keeps following it.
``caught_up`` is set once every partition was read up to the end seen at start. A record that does
not decode as a ``BidwordChange`` is counted and logged, never fatal.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from core.errors import InvalidRecord
from core.events import BidwordChange, Event, decode
from streams.kafka_io import client_config

log = logging.getLogger(__name__)


class InventoryFeed:
    def __init__(self, bootstrap: str, topic: str, apply: Callable[[BidwordChange], None],
                 poll_s: float = 0.2, batch: int = 500, expected: type[Event] = BidwordChange) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.apply = apply
        self.expected = expected
        self.poll_s = poll_s
        self.batch = batch
        self.applied = 0
        self.invalid = 0
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer = Consumer(client_config({
            "bootstrap.servers": bootstrap, "group.id": f"adstream-serve-inventory-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
        }))

    def start(self) -> "InventoryFeed":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inventory-feed", daemon=True)
            self._thread.start()
        return self

    def wait_caught_up(self, timeout_s: float = 30.0) -> bool:
        return self.caught_up.wait(timeout_s)

    def _assign(self) -> set[int]:
        while not self._stop.is_set():
            try:
                md = self._consumer.list_topics(self.topic, timeout=5.0)
                t = md.topics.get(self.topic)
                if t is not None and t.error is None and t.partitions:
                    parts = sorted(t.partitions)
                    self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
                    log.info("inventory feed: following %s (%d partitions) from the beginning",
                             self.topic, len(parts))
                    return set(parts)
                log.warning("inventory feed: topic %s not found yet; retrying", self.topic)
            except Exception as e:  # noqa: BLE001 - broker down at start: keep trying
                log.warning("inventory feed: cannot reach %s (%s); retrying", self.bootstrap, e)
            self._stop.wait(1.0)
        return set()

    def _run(self) -> None:
        pending = self._assign()
        try:
            while not self._stop.is_set():
                msgs = self._consumer.consume(self.batch, timeout=self.poll_s)
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())
                            if not pending and not self.caught_up.is_set():
                                log.info("inventory feed: caught up (%d changes applied)", self.applied)
                                self.caught_up.set()
                        else:
                            log.warning("inventory feed: %s", err)
                        continue
                    try:
                        change = decode(msg.value(), self.expected)
                    except InvalidRecord as e:
                        self.invalid += 1
                        log.warning("feed: skipped an invalid record at %s[%d]@%d: %s",
                                    self.topic, msg.partition(), msg.offset(), e)
                        continue
                    try:
                        self.apply(change)
                        self.applied += 1
                    except Exception:  # noqa: BLE001 - one bad change must not stop the feed
                        self.invalid += 1
                        log.exception("inventory feed: applying %s failed", change)
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._consumer.close()
