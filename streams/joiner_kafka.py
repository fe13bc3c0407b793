"""The joiner on a plain confluent-kafka consumer loop (``adstream joiner --runtime kafka``).

Same join (:class:`streams.join.JoinState`), same topics, keys, dead letters, metrics and offset
rule as the faust worker in :mod:`streams.joiner`; it trades faust's agent machinery for librdkafka's
batch consume, which is several times faster per worker. Rebalances are eager: on revoke, outputs
are flushed, the committable offsets committed and the state of every partition dropped; on assign,
consumption restarts from the committed offsets and the state is rebuilt, exactly like a restart.
Each commit carries, as offset metadata, the offsets above it that are already done
(:mod:`streams.join_offsets`); the next owner skips them, so a restart or a hand-over re-emits no
example and dead-letters no click a second time.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from core.errors import InvalidRecord
from core.codec import decode_mixed
from core.events import Click, Conversion, Impression, dead_letter_record, record_time
from core.metrics import WorkerMetrics
from core.settings import Settings
from streams import join_offsets
from streams.join import CLICK, CONVERSION, IMPRESSION, DeadLetter, InputProgress, JoinState
from streams.joiner import COMMIT_INTERVAL_S, IDLE_AFTER_S, count_outputs, dead_letter_key
from streams.kafka_io import BatchPoller, ReliableProducer, client_config

log = logging.getLogger(__name__)

BATCH_MAX = 10_000
POLL_S = 0.1
HOUSEKEEPING_S = 0.5
ENDS_TIMEOUT_S = 10.0  # an end-offset request not answered by then is asked again


class KafkaJoiner:
    """One joiner worker. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT via :func:`run_worker`)."""

    def __init__(self, settings: Settings, bootstrap: str, app_id: str = "adstream-joiner",
                 metrics: WorkerMetrics | None = None, idle_flush_s: float | None = None) -> None:
        t = settings.kafka.topics
        self.topics = t
        self.kind_of_topic = {t.impressions: IMPRESSION, t.clicks: CLICK, t.conversions: CONVERSION}
        self.topic_of_kind = {v: k for k, v in self.kind_of_topic.items()}
        self.expected = {IMPRESSION: Impression, CLICK: Click, CONVERSION: Conversion}
        self.metrics = metrics or WorkerMetrics("joiner")
        self.idle_flush_s = idle_flush_s
        self.state = JoinState(settings.join.attribution_window_s, settings.join.allowed_lateness_s,
                               track_inputs=True, max_pending=settings.join.max_pending,
                               emit_at_click=settings.join.emit_positives_at_click)
        self.max_future_s = settings.join.max_future_s
        self.progress = InputProgress(IDLE_AFTER_S)
        self.committed: dict[tuple[str, int], tuple[int, str]] = {}  # (offset, metadata) committed last
        self.assigned: set[int] = set()
        self.start_offsets: dict[tuple[str, int], int | None] = {}
        self._stop = threading.Event()
        # keeps every example and dead letter until the broker acknowledged it (re-sends failures);
        # offsets are committed only when nothing is outstanding (_commit)
        self.producer = ReliableProducer(bootstrap, name="joiner outputs")
        # end offsets of the inputs (InputProgress), asked on a connection of their own
        self.admin = AdminClient(client_config({"bootstrap.servers": bootstrap}))
        self._ends_pending: tuple[dict, float, dict] | None = None
        self.consumer = Consumer(client_config({
            "bootstrap.servers": bootstrap,
            "group.id": app_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.kafka.session_timeout_ms,
            "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
            "partition.assignment.strategy": "range",  # co-partitioned topics: same index, same worker
        }))

    # -- rebalance ----------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.assigned = {p.partition for p in parts}
        # where reading restarts (the committed offsets): the position of inputs not read yet
        committed = consumer.committed(parts, timeout=10)
        start = {(self.kind_of_topic[tp.topic], tp.partition): (tp.offset if tp.offset >= 0 else None)
                 for tp in committed}
        skipped = 0
        for tp in committed:
            if tp.offset >= 0 and tp.metadata:
                done = join_offsets.decode(tp.offset, tp.metadata)
                self.state.set_done(self.kind_of_topic[tp.topic], tp.partition, done)
                skipped += sum(b - a for a, b in done)
        self.progress.reset(time.monotonic(), start)
        self._ends_pending = None  # asked before this assignment: it says nothing now
        log.info("assigned partitions %s; state rebuilt from committed offsets (%d records above them "
                 "already done)", sorted(self.assigned), skipped)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._publish()
        self._commit(force=True)
        self.state.revoke(list(self.state.partitions))
        self.progress.reset(time.monotonic(), {})
        self._ends_pending = None
        self.committed.clear()
        self.assigned = set()

    # -- loop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        c = self.consumer
        c.subscribe(list(self.kind_of_topic), on_assign=self._on_assign, on_revoke=self._on_revoke)
        worker = self.metrics.worker
        records_in = {t: self.metrics.records_in.labels(worker, t) for t in self.kind_of_topic}
        latency = self.metrics.processing_latency.labels(worker)
        last_record = last_house = time.monotonic()
        poller = BatchPoller(c, BATCH_MAX, POLL_S)
        try:
            while not self._stop.is_set():
                msgs = poller.poll()
                now = time.time()
                mono_now = time.monotonic()
                touched = set()
                n_in = dict.fromkeys(records_in, 0)
                decoded = self._decode_batch(msgs, now)
                for m, dec in zip(msgs, decoded):
                    topic, part, off = m.topic(), m.partition(), m.offset()
                    kind = self.kind_of_topic[topic]
                    self.progress.arrived(kind, part, off, mono_now)
                    n_in[topic] += 1
                    ts_type, ts = m.timestamp()
                    if ts > 0:
                        latency.observe(max(0.0, now - ts / 1000.0))
                    value = m.value()
                    if self.state.told_done and self.state.is_done(kind, part, off):
                        # done by an earlier owner: only its position and event time count
                        self.state.skip_done(kind, part, off, None if isinstance(dec, InvalidRecord) else dec.event_time)
                        continue
                    if isinstance(dec, InvalidRecord):
                        self.state.skip(kind, part, off)
                        self.state.out.dead.append(DeadLetter(kind, part, off, value or b"", dec))
                        continue
                    ev = dec
                    self.state.add(kind, part, off, ev)
                    touched.add(part)
                for topic, n in n_in.items():
                    if n:
                        records_in[topic].inc(n)
                mono = time.monotonic()
                if msgs:
                    last_record = mono
                    self._update_idle(touched)
                    self.state.advance(touched)
                elif (self.idle_flush_s is not None and self.state.pending
                      and mono - last_record > self.idle_flush_s):
                    log.info("idle for %.1fs: closing %d open impressions", self.idle_flush_s, self.state.pending)
                    self.state.advance(flush_all=True)
                if mono - last_house > HOUSEKEEPING_S:
                    last_house = mono
                    self._ask_ends()
                    self._update_idle(list(self.state.partitions))
                    self.state.advance()
                    self._lag()
                self._publish()
                self.metrics.export_watermarks(self.state.watermarks())  # every pass, not only on commits
                self._commit()
        finally:
            self._publish()
            self._commit(force=True)
            c.close()  # leaves the group: the others take the partitions over at once
            self.producer.close(30)

    # -- helpers ------------------------------------------------------------------------------
    def _decode_batch(self, msgs: list, now: float) -> list:
        """Every record of a consumed batch decoded at once, per input topic (``core.codec``: the
        same events and dead letters as ``core.events.decode``): an event or its InvalidRecord."""
        return decode_mixed([m.value() for m in msgs], [self.expected[self.kind_of_topic[m.topic()]] for m in msgs],
                            [record_time(m.timestamp(), now) for m in msgs], self.max_future_s)

    def _publish(self) -> None:
        out = self.state.out
        if not (out.examples or out.dead or out.stats):
            return
        p = self.producer
        for ex in out.examples:
            p.produce(self.topics.examples, ex.to_json(), key=ex.key.encode())
        for d in out.dead:
            topic = self.topic_of_kind[d.kind]
            p.produce(self.topics.dead_letter, dead_letter_record(topic, d.partition, d.offset, d.raw, d.error),
                      key=dead_letter_key(topic, d))
        count_outputs(self.metrics, out, self.topics.examples)
        out.clear()  # the producer keeps them until they are acknowledged
        p.poll(0)

    def _commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - getattr(self, "_last_commit", 0.0) < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        offsets = []
        for (kind, part), off in self.state.committable().items():
            if part not in self.assigned:
                continue
            meta = join_offsets.encode(off, self.state.done_runs(kind, part, off))
            last = self.committed.get((kind, part))
            if last is None or off > last[0] or (off == last[0] and meta != last[1]):
                offsets.append(TopicPartition(self.topic_of_kind[kind], part, off, metadata=meta))
        if not offsets:
            return
        # every output produced so far, not only since the last commit: a delivery that failed
        # earlier is still outstanding (kept and re-sent) and holds the commit back
        if not self.producer.confirm(30 if force else 10):
            log.error("%d outputs not acknowledged yet (kept, re-sent): offsets not committed",
                      self.producer.outstanding)
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as e:  # a rebalance in progress: the next owner re-reads, harmlessly
            log.warning("commit failed: %s", e)
            return
        for tp in offsets:
            self.committed[(self.kind_of_topic[tp.topic], tp.partition)] = (tp.offset, tp.metadata or "")

    def _ask_ends(self) -> None:
        """Ask the broker for the end offset of every assigned input (not the cached value), without
        waiting: one batched ListOffsets request on the admin client's own connection, whose answer
        is taken on a later pass. (The consumer's own ``get_watermark_offsets(cached=False)`` queues
        behind its long-polling fetch on the same connection: ~0.5 s per partition, which held the
        loop for seconds per pass.)"""
        pending = self._ends_pending
        if pending is not None:
            futures, asked_at, horizons = pending
            if not all(f.done() for f in futures.values()):
                if time.monotonic() - asked_at < ENDS_TIMEOUT_S:
                    return
                log.debug("end offsets not answered in %.0fs: asking again", ENDS_TIMEOUT_S)
            else:
                ends = {}
                for key, f in futures.items():
                    try:
                        ends[key] = f.result().offset
                    except Exception as e:  # broker busy or a rebalance: try again next time
                        log.debug("end offset of %s unavailable: %s", key, e)
                self.progress.end_offsets(ends, asked_at, horizons)
            self._ends_pending = None
        if not self.assigned:
            return
        asked_at = time.monotonic()
        horizons = self.state.horizons()
        request = {TopicPartition(topic, part): OffsetSpec.latest()
                   for part in self.assigned for topic in self.kind_of_topic}
        try:
            futures = self.admin.list_offsets(request, request_timeout=ENDS_TIMEOUT_S)
        except Exception as e:
            log.debug("end offsets not asked: %s", e)
            return
        self._ends_pending = ({(self.kind_of_topic[tp.topic], tp.partition): f for tp, f in futures.items()},
                              asked_at, horizons)

    def _update_idle(self, partitions) -> None:
        """Tell the join which inputs are read to their end (``streams.join.InputProgress``)."""
        now = time.monotonic()
        for part in partitions:
            self.state.set_idle(part, self.progress.idle_kinds(part, now))

    def _lag(self) -> None:
        for part in self.assigned:
            for topic, kind in self.kind_of_topic.items():
                lag = self.progress.lag(kind, part)
                if lag is not None:
                    self.metrics.consumer_lag.labels(self.metrics.worker, topic, str(part)).set(lag)


def run_worker(settings: Settings, bootstrap: str, app_id: str = "adstream-joiner",
               metrics: WorkerMetrics | None = None, idle_flush_s: float | None = None) -> None:
    """Run until SIGTERM/SIGINT; then flush, commit and leave the group."""
    j = KafkaJoiner(settings, bootstrap, app_id, metrics, idle_flush_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: j.stop())
    j.run()
