"""Query classification kept fresh from the stream (docs/query.md, "Stream refresh").

Two workers:

``adstream query-refresh`` (faust agent, :func:`build_app`)
    consumes the ``examples`` topic and keeps, per query, exponentially decayed click counts per
    category, clicked bidwords and impressions (:class:`models.query.stats.QueryClickStats`). When a
    query's click labels or posterior knowledge change (or its click mass moves, or an interval of
    event time passes while it keeps getting traffic) it produces a *query snapshot* to
    ``query-labels`` (keyed by query). Bad records go to the dead-letter topic with their reason.
    The statistics and the next offset per partition are checkpointed atomically every
    ``query.checkpoint_interval_s``; offsets are committed only after the checkpoint holding them,
    and a restart seeks to the checkpoint's offsets (nothing counted twice, nothing skipped).

``adstream query-train`` (the shared stream model worker, :func:`query_worker`)
    runs :class:`models.query.stream.QueryStreamModel` on windows of snapshots: the gate compares
    each candidate with the serving version on the next window of fresh clicks, versions go to the
    registry under ``query.model_name`` and the online loader hot-swaps them.

Prometheus (refresh agent): records in, snapshots out, dead letters, refresh lag (wall clock minus
the event time of the newest example processed), queries tracked. The model worker exports its
windows, gate decisions and per-version window scores (``streams.worker_metrics``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from core import atomic
from core.errors import InvalidRecord
from core.events import Example, dead_letter_record, decode
from core.metrics import NS, WorkerMetrics
from core.settings import Settings
from models.query.stats import QueryClickStats, SnapshotEmitter, StatsConfig

log = logging.getLogger(__name__)

BATCH_MAX = 2000
BATCH_WITHIN_S = 0.2
CHECKPOINT_FILE = "refresh.pkl"
CHECKPOINT_VERSION = 1
MAX_SNAPSHOT_BYTES = 32 * 1024


# --------------------------------------------------------------------------- metrics
class RefreshMetrics:
    """The refresh agent's metrics (on the worker's registry)."""

    def __init__(self, worker: str = "query-refresh") -> None:
        from prometheus_client import Counter, Gauge

        self.worker = WorkerMetrics(worker)
        r = self.worker.registry
        p = f"{NS}_query_refresh"
        self.snapshots = Counter(f"{p}_snapshots", "Query snapshots produced", registry=r)
        self.queries = Gauge(f"{p}_queries", "Queries with click statistics", registry=r)
        self.lag = Gauge(f"{p}_lag_seconds", "Wall clock minus the event time of the newest example processed",
                         registry=r)
        self.checkpoints = Counter(f"{p}_checkpoints", "Checkpoints written", registry=r)
        self.newest_event_time = math.nan
        self.lag.set_function(lambda: time.time() - self.newest_event_time)


def stats_config(settings: Settings) -> StatsConfig:
    q = settings.query
    return StatsConfig(half_life_s=q.half_life_s, label_share=q.label_share, min_clicks=q.min_clicks,
                       top_k=q.knowledge_top_k)


class RefreshState:
    """What the refresh agent checkpoints: statistics, emitter and next offset per partition."""

    def __init__(self, settings: Settings) -> None:
        self.dir = Path(settings.query.refresh_checkpoint_dir)
        self.path = self.dir / CHECKPOINT_FILE
        self.topic = settings.kafka.topics.examples
        self.stats = QueryClickStats(stats_config(settings))
        self.emitter = SnapshotEmitter(settings.query.emit_interval_s)
        self.offsets: dict[int, int] = {}
        self.snapshots = 0

    def load(self) -> bool:
        data = atomic.load_checkpoint(self.path, CHECKPOINT_VERSION, "query-refresh checkpoint",
                                      "move it away to rebuild the statistics from the topic")
        if data is None:
            return False
        if data.get("topic") != self.topic:
            from core.errors import ConfigError

            raise ConfigError(f"query-refresh checkpoint {self.path} belongs to topic {data.get('topic')!r}, "
                              f"not {self.topic!r}; use another query.refresh_checkpoint_dir")
        self.stats = QueryClickStats.from_state(data["stats"])
        self.emitter = SnapshotEmitter.from_state(data["emitter"])
        self.offsets = {int(p): int(o) for p, o in data["offsets"].items()}
        self.snapshots = int(data.get("snapshots", 0))
        return True

    def save(self) -> None:
        atomic.save_checkpoint(self.path, {"version": CHECKPOINT_VERSION, "topic": self.topic,
                                           "stats": self.stats.state(), "emitter": self.emitter.state(),
                                           "offsets": dict(self.offsets), "snapshots": self.snapshots})

    def process(self, value: bytes | None, now: float | None) -> tuple[list[dict[str, Any]], InvalidRecord | None]:
        """One ``examples`` record -> the snapshots it makes due (or the reason it is bad)."""
        try:
            ex = decode(value, Example, now=now)
        except InvalidRecord as e:
            return [], e
        if ex.stage == "click":  # the same impression comes again at window close (stage "close")
            return [], None
        q = self.stats.add(ex.to_dict())
        if q is None:
            return [], None
        snap = self.stats.snapshot(q)
        if not self.emitter.due(snap):
            return [], None
        self.snapshots += 1
        return [snap], None


def encode_snapshot(snap: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "type": "query_snapshot", **snap}, separators=(",", ":"), sort_keys=True).encode()


def decode_snapshot(raw: bytes | None, now: float) -> tuple[str, float, dict[str, Any]]:
    """Decoder of the ``query-labels`` topic for the model worker: (key, event time, record).
    Anything malformed raises :class:`InvalidRecord` (the worker dead-letters it)."""
    if raw is None:
        raise InvalidRecord("malformed_json", "empty record value")
    if len(raw) > MAX_SNAPSHOT_BYTES:
        raise InvalidRecord("oversized", f"{len(raw)} bytes > {MAX_SNAPSHOT_BYTES}")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRecord("malformed_json", str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise InvalidRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("type") != "query_snapshot":
        raise InvalidRecord("unknown_event_type", f"type={obj.get('type')!r} on the query-labels topic")
    q, labels, t = obj.get("query"), obj.get("labels"), obj.get("event_time")
    if not isinstance(q, str) or not q.strip():
        raise InvalidRecord("missing_field", "query_snapshot.query must be a non-empty string")
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                               and not isinstance(v, bool) for k, v in labels.items()):
        raise InvalidRecord("wrong_type", "query_snapshot.labels must map category -> number")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise InvalidRecord("invalid_value", f"query_snapshot.event_time={t!r}")
    kn = obj.get("knowledge") or []
    if not isinstance(kn, list) or not all(isinstance(x, str) for x in kn):
        raise InvalidRecord("wrong_type", "query_snapshot.knowledge must be a list of strings")
    for k in ("clicks", "impressions"):
        v = obj.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InvalidRecord("invalid_value", f"query_snapshot.{k}={v!r}")
    rec = {"query": q, "labels": labels, "knowledge": kn, "clicks": float(obj.get("clicks", 0.0)),
           "impressions": float(obj.get("impressions", 0.0)), "event_time": float(t)}
    return f"{q}@{float(t):.6f}", float(t), rec


# --------------------------------------------------------------------------- the faust agent
def build_app(settings: Settings, bootstrap: str, app_id: str = "adstream-query-refresh",
              metrics: RefreshMetrics | None = None):
    """The faust app of the refresh agent (see the module docstring)."""
    import faust
    from faust.types import TP

    topics = settings.kafka.topics
    metrics = metrics or RefreshMetrics()
    wm = metrics.worker
    state = RefreshState(settings)
    state.load()
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id, broker=f"kafka://{bootstrap}", store="memory://",
        datadir=str(settings.state_dir / "faust" / app_id),
        topic_partitions=settings.kafka.partitions, topic_replication_factor=settings.kafka.replication_factor,
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_ms / 1000.0,
        stream_wait_empty=False, web_enabled=False, producer_linger_ms=5,
        consumer_auto_offset_reset="earliest",
    )
    # acks=False: offsets are committed by this agent after the checkpoint that holds them
    source = app.topic(topics.examples, key_serializer="raw", value_serializer="raw", acks=False)
    out = app.topic(topics.query_labels, key_serializer="raw", value_serializer="raw")
    dlq = app.topic(topics.dead_letter, key_serializer="raw", value_serializer="raw")
    lock = {"dirty": False, "last": 0.0}
    interval = settings.query.checkpoint_interval_s
    expected: dict[int, int | None] = {}
    records_in = wm.records_in.labels(wm.worker, topics.examples)

    async def checkpoint(force: bool = False) -> None:
        now = time.monotonic()
        if not lock["dirty"] or (not force and now - lock["last"] < interval):
            return
        state.save()  # statistics + next offsets, atomically ...
        offsets = {TP(topics.examples, p): o for p, o in state.offsets.items()
                   if TP(topics.examples, p) in app.consumer.assignment()}
        if offsets:
            await app.consumer._commit(offsets)  # ... then the offsets (a restart seeks to the file's)
        lock["dirty"], lock["last"] = False, now
        metrics.checkpoints.inc()
        metrics.queries.set(len(state.stats))

    @app.agent(source)
    async def refresh(stream):
        async for batch in stream.noack_take(BATCH_MAX, within=BATCH_WITHIN_S):
            now = time.time()
            futs = []
            for event in batch:
                msg = event.message
                exp = expected.get(msg.partition, -1)
                if exp == -1 or (exp is not None and msg.offset != exp):
                    continue  # not ours, or a stale copy from before the seek
                expected[msg.partition] = msg.offset + 1
                records_in.inc()
                snaps, err = state.process(msg.value, now)
                if err is not None:
                    wm.dead_letters.labels(wm.worker, err.reason).inc()
                    futs.append(await dlq.send(key=f"{msg.topic}:{msg.partition}:{msg.offset}".encode(),
                                               value=dead_letter_record(msg.topic, msg.partition, msg.offset,
                                                                        bytes(msg.value or b""), err)))
                for s in snaps:
                    futs.append(await out.send(key=s["query"].encode(), value=encode_snapshot(s)))
                    metrics.snapshots.inc()
                state.offsets[msg.partition] = msg.offset + 1
                lock["dirty"] = True
            if futs:
                import asyncio

                await asyncio.gather(*futs)  # delivered before the offsets that produced them are committed
                wm.records_out.labels(wm.worker, topics.query_labels).inc(len(futs))
            if state.stats.max_event_time > -math.inf:
                metrics.newest_event_time = state.stats.max_event_time
            await checkpoint()

    @app.timer(interval=max(0.5, interval))
    async def housekeeping():
        await checkpoint(force=True)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_, assigned=(), **kwargs):
        committed = await app.consumer.seek_to_committed()
        expected.clear()
        for tp in assigned:
            if tp.topic != topics.examples:
                continue
            off = state.offsets.get(tp.partition)
            if off is not None:
                await app.consumer.seek(tp, off)
                expected[tp.partition] = off
            else:
                c = committed.get(tp)
                expected[tp.partition] = c if c is not None and c >= 0 else None
        log.info("query-refresh: partitions %s from %s", sorted(tp.partition for tp in assigned
                                                                 if tp.topic == topics.examples), dict(expected))

    return app


def run_refresh(settings: Settings, bootstrap: str, app_id: str = "adstream-query-refresh",
                metrics_port: int | None = None, loglevel: str = "info") -> None:
    """Run the refresh agent until stopped (SIGTERM/SIGINT). Blocks."""
    import faust

    metrics = RefreshMetrics()
    if metrics_port:
        metrics.worker.serve(metrics_port, settings.metrics.host)
        log.info("query-refresh metrics on http://%s:%d/metrics", settings.metrics.host, metrics_port)
    app = build_app(settings, bootstrap, app_id, metrics)
    faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=False).execute_from_commandline()


# --------------------------------------------------------------------------- the model worker
def query_model(settings: Settings, features=None):
    """The query classifier StreamModel configured by ``settings.query``."""
    from models.query.encoder import EncoderSpec
    from models.query.stream import QueryStreamConfig, QueryStreamModel

    q = settings.query
    cfg = QueryStreamConfig(name=q.model_name, variant=q.variant,
                            encoder=EncoderSpec(kind=q.encoder, features=q.features).to_dict(),
                            threshold=q.threshold, max_labels=q.max_labels, finetune_every=q.finetune_every,
                            finetune_steps=q.finetune_steps, replay_size=q.replay_size, fresh_share=q.fresh_share,
                            lr=q.lr, soft_labels=q.soft_labels, seed=q.seed)
    return QueryStreamModel(cfg, features=features)


def worker_config(settings: Settings):
    from streams.model_worker import WorkerConfig

    q = settings.query
    return WorkerConfig(topic=settings.kafka.topics.query_labels, dead_letter_topic=settings.kafka.topics.dead_letter,
                        registry_dir=settings.trainer.registry_dir, checkpoint_dir=q.checkpoint_dir,
                        window_examples=q.window_snapshots, window_seconds=q.window_seconds, min_window=q.min_window,
                        on_reject=q.on_reject, gate_margins={"f1": q.gate_f1_margin},
                        dedup_horizon_s=max(3600.0, 4 * q.emit_interval_s), max_windows=q.max_windows,
                        idle_exit_s=q.idle_exit_s, group_id="adstream-query-trainer", worker="query-trainer",
                        decoder=decode_snapshot)


def query_worker(settings: Settings, bootstrap: str, features=None, **kw: Any):
    """The shared stream model worker running the query classifier on ``query-labels``."""
    from streams.model_worker import ModelWorker
    from streams.worker_metrics import ModelWorkerMetrics

    kw.setdefault("metrics", ModelWorkerMetrics(worker="query-trainer"))
    return ModelWorker(query_model(settings, features), worker_config(settings), bootstrap, settings.kafka, **kw)


def run_query_trainer(settings: Settings, bootstrap: str, stop_event: threading.Event | None = None,
                      metrics_port: int | None = None, **kw: Any) -> dict[str, Any]:
    """Run the query model worker in this thread (it restores its checkpoint); returns its summary."""
    import torch

    from streams.model_worker import run_worker

    torch.set_num_threads(settings.query.threads)
    worker = query_worker(settings, bootstrap, **kw)
    return run_worker(worker, stop_event, metrics_port, host=settings.metrics.host)


# --------------------------------------------------------------------------- command line
def settings_with_prefix(config: str | None, topic_prefix: str = "", **over: Any) -> Settings:
    from core.settings import TopicNames, load_settings

    if topic_prefix:
        over.setdefault("kafka", {})["topics"] = {k: topic_prefix + v for k, v in TopicNames().model_dump().items()}
    return load_settings(config, **over)


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.query_refresh refresh|train --bootstrap H:P [--config F] [--topic-prefix P]``."""
    import argparse

    from core.logs import setup_logging, verbosity_from_env

    ap = argparse.ArgumentParser(prog="python -m streams.query_refresh", description=__doc__.split("\n\n")[0])
    ap.add_argument("worker", choices=("refresh", "train"))
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--config")
    ap.add_argument("--topic-prefix", default="", help="prefix every topic name (tests)")
    ap.add_argument("--app-id", default="adstream-query-refresh")
    ap.add_argument("--metrics-port", type=int)
    a = ap.parse_args(argv)
    s = settings_with_prefix(a.config, a.topic_prefix)
    setup_logging(verbosity_from_env())
    if a.worker == "refresh":
        run_refresh(s, a.bootstrap, a.app_id, a.metrics_port)
    else:
        import signal

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(json.dumps(run_query_trainer(s, a.bootstrap, stop, a.metrics_port), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
