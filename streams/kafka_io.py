"""Thin Kafka helpers shared by every worker, the CLI and the tests.

Built on confluent-kafka (librdkafka: the fastest client here). Topics are always created explicitly
(the embedded broker has ``auto.create.topics.enable=false``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.errors import AdstreamError
from core.settings import KafkaSettings
from streams.client_log import RDKAFKA_LOG, client_config  # noqa: F401 - client_config is part of this API

log = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes | None, int, int, int]  # key, value, partition, offset, timestamp_ms


class KafkaIOError(AdstreamError):
    """A Kafka operation that failed (topic creation, metadata, delivery)."""


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient(client_config({"bootstrap.servers": bootstrap}))


def list_topics(bootstrap: str, timeout_s: float = 10.0, internal: bool = False) -> dict[str, int]:
    """Topic name -> partition count."""
    try:
        md = _admin(bootstrap).list_topics(timeout=timeout_s)
    except KafkaException as e:
        raise KafkaIOError(f"cannot read metadata from {bootstrap}: {e}") from None
    return {n: len(t.partitions) for n, t in md.topics.items()
            if internal or not n.startswith("__")}


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create ``names`` (idempotent: existing topics are fine) and wait until metadata shows every one
    with a leader on each partition. Returns the names that were newly created."""
    names = list(dict.fromkeys(names))
    if not names:
        return []
    admin = _admin(bootstrap)
    new = [NewTopic(n, num_partitions=partitions, replication_factor=replication, config=dict(configs or {}))
           for n in names]
    created: list[str] = []
    for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as e:
            err = e.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise KafkaIOError(f"creating topic {name!r} on {bootstrap} failed: {err}") from None
    _wait_topics(admin, names, timeout_s)
    if created:  # metadata may name a leader before it serves the partition: wait until it does
        c = _plain_consumer(bootstrap)
        try:
            for n in created:
                _watermarks(c, n, list(range(partitions)), timeout_s)
        finally:
            c.close()
    existing = list_topics(bootstrap, timeout_s)
    for n in names:
        if n not in created and existing.get(n, partitions) < partitions:
            log.warning("topic %s exists with %d partitions (< %d requested); left as is", n, existing[n], partitions)
    if created:
        log.info("created topics %s (%d partitions) on %s", created, partitions, bootstrap)
    return created


def _wait_topics(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    missing = list(names)
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        missing = [n for n in names if n not in md.topics or md.topics[n].error is not None
                   or any(p.leader < 0 for p in md.topics[n].partitions.values())]
        if not missing:
            return
        time.sleep(0.1)
    raise KafkaIOError(f"topics {missing} did not appear in the metadata within {timeout_s:.0f}s")


def ensure_project_topics(bootstrap: str, kafka_settings: KafkaSettings, partitions: int | None = None) -> list[str]:
    """Create every project topic (``KafkaSettings.topics``, dead-letter included)."""
    return create_topics(bootstrap, kafka_settings.topics.all(), partitions or kafka_settings.partitions,
                         kafka_settings.replication_factor)


def delete_topics(bootstrap: str, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Delete topics; unknown ones are ignored."""
    names = list(names)
    if not names:
        return
    admin = _admin(bootstrap)  # kept alive until the futures resolve (destroying it fails them)
    for name, fut in admin.delete_topics(names, request_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as e:
            err = e.args[0]
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                raise KafkaIOError(f"deleting topic {name!r} failed: {err}") from None


# --------------------------------------------------------------------------- producing


class CountingProducer:
    """A confluent-kafka Producer that counts delivery reports (``delivered``, ``errors``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self._p = Producer(client_config(self.config))
        self.delivered = 0
        self.errors = 0
        self.last_error: KafkaError | None = None

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.errors += 1
            self.last_error = err
            if self.errors <= 10 or self.errors % 1000 == 0:
                log.error("delivery failed (%d so far): %s", self.errors, err)

    def produce(self, topic: str, value: bytes | None, key: bytes | str | None = None, **kw: Any) -> None:
        self._p.produce(topic, value=value, key=key, on_delivery=self._on_delivery, **kw)

    def poll(self, timeout: float = 0.0) -> int:
        return self._p.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still in flight (0 = all done)."""
        return self._p.flush(timeout)

    def __len__(self) -> int:
        return len(self._p)

    @property
    def raw(self) -> Producer:
        return self._p


def make_producer(bootstrap: str, **overrides: Any) -> CountingProducer:
    """A producer with a small linger and delivery counting. ``overrides`` are librdkafka settings with
    ``_`` for ``.`` (``linger_ms=20``, ``enable_idempotence=False``)."""
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                           "enable.idempotence": True, "queue.buffering.max.messages": 500_000}
    cfg.update({k.replace("_", "."): v for k, v in overrides.items()})
    return CountingProducer(cfg)


def produce_json(producer: CountingProducer, topic: str, key: bytes | str | None, value_bytes: bytes,
                 max_wait_s: float = 30.0) -> None:
    """Produce one already-encoded record, waiting (by polling) while the local queue is full."""
    deadline = None
    while True:
        try:
            producer.produce(topic, value_bytes, key=key)
            break
        except BufferError:
            deadline = deadline or time.monotonic() + max_wait_s
            if time.monotonic() > deadline:
                raise KafkaIOError(f"producer queue stayed full for {max_wait_s:.0f}s (is the broker up?)") from None
            producer.poll(0.05)
    producer.poll(0)


# --------------------------------------------------------------------------- reading


def _partitions(bootstrap: str, topic: str, timeout_s: float) -> list[int]:
    md = _admin(bootstrap).list_topics(topic=topic, timeout=timeout_s)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise KafkaIOError(f"topic {topic!r} does not exist on {bootstrap}")
    return sorted(t.partitions)


def _plain_consumer(bootstrap: str, **extra: Any) -> Consumer:
    cfg = {"bootstrap.servers": bootstrap, "group.id": f"adstream-reader-{uuid.uuid4().hex[:8]}",
           "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"}
    cfg.update(extra)
    return Consumer(client_config(cfg))


def checkpointed_consumer(bootstrap: str, group_id: str, kafka: KafkaSettings) -> Consumer:
    """A consumer for workers that keep their offsets in their own checkpoint and assign partitions
    explicitly (:func:`assign_from`): no auto-commit, no offset store; the group id only names the
    client on the broker."""
    return Consumer(client_config({
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        "fetch.wait.max.ms": 50,
        "statistics.interval.ms": 2000,  # lets get_watermark_offsets(cached=True) answer locally
        "stats_cb": lambda _s: None,
    }))


def assign_from(consumer: Consumer, bootstrap: str, topics: Iterable[str],
                offset_of: Callable[[str, int], int | None], timeout_s: float = 30.0) -> list[TopicPartition]:
    """Assign every partition of ``topics`` at ``offset_of(topic, partition)`` (None = the log
    start), waiting up to ``timeout_s`` for topics that do not exist yet."""
    from confluent_kafka import OFFSET_BEGINNING

    from core.errors import ConfigError

    deadline = time.monotonic() + timeout_s
    tps: list[TopicPartition] = []
    for topic in topics:
        while True:
            t = consumer.list_topics(topic=topic, timeout=10).topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"topic {topic!r} does not exist on {bootstrap}; "
                                  "create it with `adstream topics create`")
            time.sleep(0.5)
        for p in sorted(t.partitions):
            off = offset_of(topic, p)
            tps.append(TopicPartition(topic, p, OFFSET_BEGINNING if off is None else off))
    consumer.assign(tps)
    return tps


def export_lag(consumer: Consumer, tps: Iterable[TopicPartition], position_of: Callable[[str, int], int],
               gauge: Any, worker: str) -> None:
    """Set ``gauge{worker, topic, partition}`` to the records between each position and the (cached)
    end of the log."""
    for tp in tps:
        try:
            _lo, hi = consumer.get_watermark_offsets(tp, cached=True)
        except Exception:  # lag is best effort
            continue
        if hi is None or hi < 0:
            continue
        gauge.labels(worker, tp.topic, str(tp.partition)).set(max(0, hi - position_of(tp.topic, tp.partition)))


class BatchPoller:
    """``consumer.consume(batch, timeout)`` for a worker loop; :meth:`poll` returns the messages that
    are not error events. librdkafka returns early only when the batch is full, otherwise it waits
    the whole timeout, so the next timeout is 0 after a full batch (a backlog), 10 ms after a
    partial one (records are flowing) and ``idle_s`` after an empty one."""

    def __init__(self, consumer: Consumer, batch: int, idle_s: float) -> None:
        self.consumer, self.batch, self.idle_s = consumer, batch, idle_s
        self.wait = idle_s

    def poll(self) -> list[Any]:
        raw = self.consumer.consume(self.batch, self.wait)
        n = len(raw)
        self.wait = 0.0 if n >= self.batch else (min(0.01, self.idle_s) if n else self.idle_s)
        return [m for m in raw if not is_error(m)]


def is_error(msg: Any) -> bool:
    """Whether a consumed message is an error event (logged unless it is the end of a partition)."""
    err = msg.error()
    if err is None:
        return False
    if err.code() != KafkaError._PARTITION_EOF:
        RDKAFKA_LOG.warning("consumer error: %s", err)  # repeats are rate-limited (core/logs.py)
    return True


_RETRIABLE = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
              KafkaError.REQUEST_TIMED_OUT}


def _watermarks(c: Consumer, topic: str, parts: list[int], timeout_s: float) -> dict[int, tuple[int, int]]:
    """Partition -> (low, high), retrying while a fresh partition has no leader yet."""
    deadline = time.monotonic() + timeout_s
    out: dict[int, tuple[int, int]] = {}
    for p in parts:
        while True:
            try:
                out[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=max(1.0, deadline - time.monotonic()))
                break
            except KafkaException as e:
                err = e.args[0]
                if not (isinstance(err, KafkaError) and err.code() in _RETRIABLE) or time.monotonic() > deadline:
                    raise KafkaIOError(f"offsets of {topic}[{p}]: {err}") from None
                time.sleep(0.1)
    return out


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> high watermark (the offset the next record will get)."""
    c = _plain_consumer(bootstrap)
    try:
        return {p: hw for p, (_, hw) in _watermarks(c, topic, _partitions(bootstrap, topic, timeout_s), timeout_s).items()}
    finally:
        c.close()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0, idle_s: float = 0.5) -> list[Record]:
    """Every record of ``topic`` from the beginning, without a consumer group.

    Reads until each partition reached the high watermark seen at the start and then no record came
    for ``idle_s`` (which also covers brokers that under-report the watermark). Sorted by
    (partition, offset)."""
    parts = _partitions(bootstrap, topic, timeout_s)
    c = _plain_consumer(bootstrap)
    out: list[Record] = []
    try:
        highs = {p: hw for p, (_, hw) in _watermarks(c, topic, parts, timeout_s).items()}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        pos = {p: -1 for p in parts}
        deadline = time.monotonic() + timeout_s
        last_msg = time.monotonic()
        while time.monotonic() < deadline:
            caught_up = all(pos[p] + 1 >= highs[p] for p in parts)
            if caught_up and time.monotonic() - last_msg >= idle_s:
                break
            for m in c.consume(num_messages=10_000, timeout=0.1 if caught_up else 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaIOError(f"reading {topic!r}: {err}")
                part, off = int(m.partition() or 0), int(m.offset() or 0)
                pos[part] = off
                out.append((m.key(), m.value(), part, off, m.timestamp()[1]))
                last_msg = time.monotonic()
        else:
            log.warning("read_topic(%s) hit the %.0fs timeout after %d records", topic, timeout_s, len(out))
    finally:
        c.close()
    out.sort(key=lambda r: (r[2], r[3]))
    return out


def group_offsets(bootstrap: str, group: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> committed offset of ``group`` (-1 where nothing is committed)."""
    parts = _partitions(bootstrap, topic, timeout_s)
    c = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}))
    try:
        committed = c.committed([TopicPartition(topic, p) for p in parts], timeout=timeout_s)
    finally:
        c.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in committed}


def group_lag(bootstrap: str, group: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> records not yet committed by ``group`` (everything since the log start when it has
    committed nothing). ``sum(group_lag(...).values())`` is the total lag."""
    committed = group_offsets(bootstrap, group, topic, timeout_s)
    c = _plain_consumer(bootstrap)
    try:
        marks = _watermarks(c, topic, sorted(committed), timeout_s)
        return {p: max(0, high - (off if off >= 0 else low)) for p, off in committed.items()
                for low, high in [marks[p]]}
    finally:
        c.close()


# --------------------------------------------------------------------------- delivery-checked output

# the producers that keep every record until the broker acknowledged it (re-exported: one import
# place for Kafka helpers); defined in streams/delivery.py, which imports nothing from this module
from streams.delivery import DeadLetterWriter, DeliveryError, ReliableProducer  # noqa: E402,F401
