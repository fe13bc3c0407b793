"""The stream joiner: a faust-streaming worker that turns impressions, clicks and conversions into
labelled examples.

One agent consumes the three co-partitioned topics (keyed by ``request_id``) in batches
(``noack_take``), validates every record (bad ones go to the dead-letter topic with the reason), feeds
the rest to :class:`streams.join.JoinState`, produces closed examples to the ``examples`` topic keyed
``request_id:ad_id``, and commits each input partition up to the smallest offset the join still
needs, once the outputs that depend on it are delivered — so the committed offset is always a safe
restart point (see streams/join.py).

Run it with ``adstream joiner`` (or ``python -m streams.joiner``); several processes with the same
``--app-id`` form one consumer group and split the partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from core.errors import InvalidRecord
from core.codec import decode_mixed
from core.events import Click, Conversion, Impression, dead_letter_record
from core.logs import setup_logging, verbosity_from_env
from core.metrics import WorkerMetrics
from core.settings import Settings
from streams import join_offsets
from streams.join import CLICK, CONVERSION, IMPRESSION, DeadLetter, InputProgress, JoinOutput, JoinState

log = logging.getLogger(__name__)

BATCH_MAX = 5000
BATCH_WITHIN_S = 0.1
COMMIT_INTERVAL_S = 1.0
# An input partition counts as idle (and stops holding the watermark back) only when it is read up to
# an end offset asked of the broker after its last record arrived AND nothing arrived on it for this
# long (streams.join.InputProgress): a cached high watermark is stale while a producer keeps writing
# and, after a rebalance, can predate the partition's new start position.
IDLE_AFTER_S = 2.0


def build_app(
    settings: Settings,
    bootstrap: str,
    app_id: str = "adstream-joiner",
    metrics: WorkerMetrics | None = None,
    idle_flush_s: float | None = None,
):
    """Build the faust app. ``idle_flush_s``: when no record arrived for that long, close every open
    window (for finite replays and demos; leave it unset on an endless stream)."""
    import faust

    topics = settings.kafka.topics
    metrics = metrics or WorkerMetrics("joiner")
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(settings.state_dir / "faust" / app_id),
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_ms / 1000.0,
        stream_wait_empty=False,  # offsets are committed by the join, not by faust's acks
        web_enabled=False,
        producer_linger_ms=5,
        consumer_auto_offset_reset="earliest",
    )
    kind_of_topic = {topics.impressions: IMPRESSION, topics.clicks: CLICK, topics.conversions: CONVERSION}
    topic_of_kind = {v: k for k, v in kind_of_topic.items()}
    expected = {IMPRESSION: Impression, CLICK: Click, CONVERSION: Conversion}
    # acks=False: this worker commits its input offsets itself (see _commit), because faust would
    # also acknowledge records it skips around a rebalance, which could move the committed offset
    # past records whose join state was dropped.
    source = app.topic(
        topics.impressions, topics.clicks, topics.conversions,
        key_serializer="raw", value_serializer="raw", acks=False,
    )
    examples_topic = app.topic(topics.examples, key_serializer="raw", value_serializer="raw")
    dlq_topic = app.topic(topics.dead_letter, key_serializer="raw", value_serializer="raw")

    state = JoinState(settings.join.attribution_window_s, settings.join.allowed_lateness_s, track_inputs=True,
                      max_pending=settings.join.max_pending, emit_at_click=settings.join.emit_positives_at_click)
    max_future_s = settings.join.max_future_s
    progress = InputProgress(IDLE_AFTER_S)  # which inputs are read to their end
    committed: dict[tuple[str, int], tuple[int, str]] = {}  # (offset, metadata) this worker committed last
    # next offset to process per topic-partition; records off this sequence are ignored (neither
    # processed nor committed): they are stale copies fetched before a rebalance's seek.
    expected_next: dict[tuple[str, int], int | None] = {}
    clock = {"last_record": time.monotonic(), "last_commit": 0.0}
    gen = {"n": 0}  # bumped by every rebalance
    worker = metrics.worker
    records_in = {t: metrics.records_in.labels(worker, t) for t in kind_of_topic}
    latency = metrics.processing_latency.labels(worker)

    lock = asyncio.Lock()

    async def publish_and_commit() -> None:
        async with lock:  # the agent and the timer both publish; one at a time, in order
            await _publish_and_commit()

    async def _publish_and_commit() -> None:
        committable = state.committable()  # taken with the outputs it depends on
        generation = gen["n"]

        async def send_example(ex):
            return await examples_topic.send(key=ex.key.encode(), value=ex.to_json())

        async def send_dead(d):
            topic = topic_of_kind[d.kind]
            return await dlq_topic.send(key=dead_letter_key(topic, d),
                                        value=dead_letter_record(topic, d.partition, d.offset, d.raw, d.error))

        metrics.export_watermarks(state.watermarks())  # every time, not only when offsets are committed
        sent = await publish_outputs(state.out, send_example, send_dead)
        if sent is None:
            return  # kept in state.out and sent again next time; nothing committed meanwhile
        count_outputs(metrics, sent, topics.examples)
        if generation != gen["n"]:
            return  # a rebalance rebuilt the state meanwhile: these offsets are not ours to commit
        await _commit(committable)

    async def _commit(committable: dict[tuple[str, int], int]) -> None:
        from faust.types import TP

        now = time.monotonic()
        if now - clock["last_commit"] < COMMIT_INTERVAL_S:
            return
        assignment = app.consumer.assignment()
        offsets = {}
        for (kind, part), off in committable.items():
            tp = TP(topic_of_kind[kind], part)
            if tp not in assignment:
                continue
            meta = join_offsets.encode(off, state.done_runs(kind, part, off))
            last = committed.get((kind, part))
            if last is None or off > last[0] or (off == last[0] and meta != last[1]):
                offsets[tp] = (off, meta)
        if offsets and await commit_with_metadata(app, offsets):
            for tp, (off, meta) in offsets.items():
                committed[(kind_of_topic[tp.topic], tp.partition)] = (off, meta)
        clock["last_commit"] = now

    def update_idle(partitions) -> None:
        """Tell the join which inputs are read to their end (``streams.join.InputProgress``)."""
        now = time.monotonic()
        for part in partitions:
            state.set_idle(part, progress.idle_kinds(part, now))

    async def ask_ends() -> None:
        """Ask the broker for the end offset of every assigned input (not the cached highwater)."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic in kind_of_topic]
        if not tps:
            return
        asked_at = time.monotonic()
        horizons = state.horizons()
        generation = gen["n"]
        try:
            ends = await app.consumer.highwaters(*tps)
        except Exception as e:  # broker busy or a rebalance: try again next tick
            log.debug("end offsets unavailable: %s", e)
            return
        if generation == gen["n"]:
            progress.end_offsets({(kind_of_topic[tp.topic], tp.partition): off for tp, off in ends.items()},
                                  asked_at, horizons)

    def decode_accepted(accepted: list[tuple[str, Any, float]]) -> list[Any]:
        """Every accepted record of a batch decoded at once (``core.codec``: the same events and
        dead letters as ``core.events.decode``): an event or its InvalidRecord."""
        return decode_mixed([m.value for _k, m, _t in accepted], [expected[k] for k, _m, _t in accepted],
                            [t for _k, _m, t in accepted], max_future_s)

    @app.agent(source)
    async def join(stream):
        async for batch in stream.noack_take(BATCH_MAX, within=BATCH_WITHIN_S):
            now = time.time()
            mono = time.monotonic()
            touched = set()
            accepted: list[tuple[str, Any, float]] = []  # (kind, message, clock of its skew check)
            n_in = dict.fromkeys(records_in, 0)
            for event in batch:
                msg = event.message
                key = (msg.topic, msg.partition)
                exp = expected_next.get(key, -1)
                if exp == -1 or (exp is not None and msg.offset != exp):
                    continue  # not ours any more, or a stale copy from before the seek
                expected_next[key] = msg.offset + 1
                kind = kind_of_topic[msg.topic]
                progress.arrived(kind, msg.partition, msg.offset, mono)
                n_in[msg.topic] += 1
                if msg.timestamp:
                    latency.observe(max(0.0, now - msg.timestamp))
                # the record's own timestamp is the clock: the same answer when it is read again
                accepted.append((kind, msg, msg.timestamp if msg.timestamp and msg.timestamp > 0 else now))
            for topic, n in n_in.items():
                if n:
                    records_in[topic].inc(n)
            for (kind, msg, _t), dec in zip(accepted, decode_accepted(accepted)):
                if state.told_done and state.is_done(kind, msg.partition, msg.offset):
                    # done by an earlier owner: only its position and event time count
                    state.skip_done(kind, msg.partition, msg.offset,
                                    None if isinstance(dec, InvalidRecord) else dec.event_time)
                    continue
                if isinstance(dec, InvalidRecord):
                    state.skip(kind, msg.partition, msg.offset)
                    state.out.dead.append(DeadLetter(kind, msg.partition, msg.offset, bytes(msg.value or b""), dec))
                    continue
                state.add(kind, msg.partition, msg.offset, dec)
                touched.add(msg.partition)
            update_idle(touched)
            state.advance(touched)
            clock["last_record"] = time.monotonic()
            await publish_and_commit()

    @app.timer(interval=0.5)
    async def housekeeping():
        if lock.locked():
            return
        if idle_flush_s is not None and state.pending and time.monotonic() - clock["last_record"] > idle_flush_s:
            log.info("idle for %.1fs: closing %d open impressions", idle_flush_s, state.pending)
            state.advance(flush_all=True)
            await publish_and_commit()
        elif state.partitions:
            await ask_ends()
            update_idle(list(state.partitions))
            state.advance()
            await publish_and_commit()
        for tp in app.consumer.assignment():
            lag = progress.lag(kind_of_topic.get(tp.topic, ""), tp.partition)
            if lag is not None:
                metrics.consumer_lag.labels(worker, tp.topic, str(tp.partition)).set(lag)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_, assigned=(), **kwargs):
        # Every rebalance rebuilds the join state from the committed offsets, exactly like a
        # restart: drop it, seek every assigned partition back to its committed offset, and
        # process each partition strictly in offset order from there.
        gen["n"] += 1
        state.revoke(list(state.partitions))
        progress.reset(time.monotonic(), {})
        committed.clear()
        seeked = await app.consumer.seek_to_committed()
        expected_next.clear()
        start = {}
        for tp in assigned:
            if tp.topic in kind_of_topic:
                off = seeked.get(tp)
                # nothing committed yet: accept the first record delivered (the log start)
                expected_next[(tp.topic, tp.partition)] = off if off is not None and off >= 0 else None
                start[(kind_of_topic[tp.topic], tp.partition)] = expected_next[(tp.topic, tp.partition)]
        skipped = 0
        for tp, (off, meta) in (await committed_metadata(app, [tp for tp in assigned
                                                                if tp.topic in kind_of_topic])).items():
            if meta and off is not None and off >= 0 and seeked.get(tp) == off:
                runs = join_offsets.decode(off, meta)
                state.set_done(kind_of_topic[tp.topic], tp.partition, runs)
                skipped += sum(b - a for a, b in runs)
        progress.reset(time.monotonic(), start)
        log.info("assigned partitions %s; state rebuilt from committed offsets (%d records above them "
                 "already done)", sorted({tp.partition for tp in assigned if tp.topic in kind_of_topic}), skipped)

    return app


async def commit_with_metadata(app, offsets) -> bool:
    """Commit ``{TP: (offset, metadata)}`` through faust's aiokafka consumer (faust's own commit
    writes no metadata); False when the commit failed (the next one tries again)."""
    from aiokafka.structs import OffsetAndMetadata
    from aiokafka.structs import TopicPartition as AioTP

    thread = app.consumer._thread
    aio = thread._ensure_consumer()

    async def do() -> bool:
        await aio.commit({AioTP(tp.topic, tp.partition): OffsetAndMetadata(off, meta)
                          for tp, (off, meta) in offsets.items()})
        return True

    try:
        return await thread.call_thread(do)
    except Exception as e:  # noqa: BLE001 - a rebalance in progress: the next owner re-reads, harmlessly
        log.warning("commit failed: %s", e)
        return False


async def committed_metadata(app, tps) -> dict:
    """``{TP: (offset, metadata)}`` committed for ``tps`` (empty when it cannot be read: the join is
    then correct, only noisier, see streams/join_offsets.py)."""
    from aiokafka.structs import TopicPartition as AioTP

    if not tps:
        return {}
    thread = app.consumer._thread
    aio = thread._ensure_consumer()

    async def do():
        return await aio._coordinator.fetch_committed_offsets({AioTP(tp.topic, tp.partition) for tp in tps})

    try:
        got = await thread.call_thread(do)
    except Exception as e:  # noqa: BLE001
        log.warning("committed offset metadata unavailable (%s): records above the committed offsets are "
                    "read again", e)
        return {}
    by_key = {(tp.topic, tp.partition): tp for tp in tps}
    return {by_key[(a.topic, a.partition)]: (om.offset, om.metadata) for a, om in got.items()
            if (a.topic, a.partition) in by_key}


async def publish_outputs(out: JoinOutput, send_example, send_dead) -> JoinOutput | None:
    """Send every output queued in ``out`` and wait until each is delivered; only then remove them
    from ``out``. ``send_*`` are coroutines returning a delivery future (faust's ``topic.send``).
    Returns what was delivered, or None when a send failed: everything stays queued (sent again
    with the next batch; duplicates carry the same key and content), so the caller commits no
    offset that depends on an output not on the broker. Outputs appended to ``out`` while this
    waits stay queued for the next call."""
    n_ex, n_dead = len(out.examples), len(out.dead)
    sent = JoinOutput(out.examples[:n_ex], out.dead[:n_dead], out.stats.copy())
    try:
        futs = [await send_example(ex) for ex in sent.examples]
        futs += [await send_dead(d) for d in sent.dead]
        if futs:
            await asyncio.gather(*futs)  # delivered before the offsets they depend on are committed
    except Exception as e:  # noqa: BLE001 - a broker error: keep everything, try again
        log.warning("%d outputs not delivered (%s: %s): kept and sent again; offsets not committed",
                    n_ex + n_dead, type(e).__name__, e)
        return None
    del out.examples[:n_ex]
    del out.dead[:n_dead]
    for k, v in sent.stats.items():
        left = out.stats[k] - v
        if left > 0:
            out.stats[k] = left
        else:
            del out.stats[k]
    return sent


def count_outputs(metrics: WorkerMetrics, out: JoinOutput, examples_topic: str) -> None:
    """Export one batch of join output as metrics (both runtimes)."""
    worker = metrics.worker
    for d in out.dead:
        metrics.dead_letters.labels(worker, d.error.reason).inc()
    if out.examples:
        metrics.records_out.labels(worker, examples_topic).inc(len(out.examples))
    for name, n in out.stats.items():
        metrics.join_outcomes.labels(name).inc(n)
        if name == "late":
            metrics.late_records.labels(worker, "all").inc(n)


def dead_letter_key(topic: str, d: DeadLetter) -> bytes:
    """Dead letters are keyed by where the record came from, so re-processing repeats the key."""
    return f"{topic}:{d.partition}:{d.offset}".encode()


def run_worker(
    settings: Settings,
    bootstrap: str,
    app_id: str = "adstream-joiner",
    metrics_port: int | None = None,
    idle_flush_s: float | None = None,
    loglevel: str = "info",
    runtime: str = "faust",
) -> None:
    """Run a joiner worker until stopped (SIGTERM/SIGINT). Blocks. ``runtime``: ``faust`` (the
    faust-streaming agent) or ``kafka`` (a confluent-kafka loop, :mod:`streams.joiner_kafka`)."""
    metrics = WorkerMetrics("joiner")  # a role, never a process id (core/metrics.py)
    log.info("joiner: %s", settings.join.delay_note())
    if metrics_port is not None:
        metrics.serve(metrics_port, settings.metrics.host)
        log.info("metrics on http://%s:%d/metrics", settings.metrics.host, metrics_port)
    if runtime == "kafka":
        from streams import joiner_kafka

        joiner_kafka.run_worker(settings, bootstrap, app_id, metrics, idle_flush_s)
        return
    if runtime != "faust":
        raise ValueError(f"unknown joiner runtime {runtime!r} (faust or kafka)")
    import faust

    app = build_app(settings, bootstrap, app_id, metrics, idle_flush_s)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=False)  # core.logs setup stays
    if not worker.stdout.isatty():
        worker.spinner = None  # its cursor codes would end up in log files
    worker.execute_from_commandline()


def main(argv: list[str] | None = None) -> int:
    from core.settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m streams.joiner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--config")
    ap.add_argument("--app-id", default="adstream-joiner")
    ap.add_argument("--topic-prefix", default="", help="prefix every topic name (tests)")
    ap.add_argument("--partitions", type=int)
    ap.add_argument("--window", type=float, help="attribution window, seconds")
    ap.add_argument("--lateness", type=float, help="allowed lateness, seconds")
    ap.add_argument("--idle-flush", type=float, help="close all windows after this many idle seconds")
    ap.add_argument("--emit-at-click", action="store_true",
                    help="emit each positive at its first click (join.emit_positives_at_click)")
    ap.add_argument("--metrics-port", type=int)
    ap.add_argument("--runtime", choices=("faust", "kafka"), default="faust")
    a = ap.parse_args(argv)
    over: dict[str, Any] = {}
    if a.partitions:
        over.setdefault("kafka", {})["partitions"] = a.partitions
    if a.topic_prefix:
        from core.settings import TopicNames

        over.setdefault("kafka", {})["topics"] = {
            k: a.topic_prefix + v for k, v in TopicNames().model_dump().items()
        }
    if a.window is not None:
        over.setdefault("join", {})["attribution_window_s"] = a.window
    if a.lateness is not None:
        over.setdefault("join", {})["allowed_lateness_s"] = a.lateness
    if a.emit_at_click:
        over.setdefault("join", {})["emit_positives_at_click"] = True
    s = load_settings(a.config, **over)
    setup_logging(verbosity_from_env())
    run_worker(s, a.bootstrap, a.app_id, a.metrics_port, a.idle_flush, runtime=a.runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
