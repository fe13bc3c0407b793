"""The feature updater: impressions + clicks from Kafka -> streaming aggregates -> Feast.

Each process reads every partition of the impressions and clicks topics (explicit ``assign()``, no
group rebalancing). Scale-out by entity key: ``--shard I/N`` folds and writes only the rows shard I
owns (``features.aggregates.owner``), so N processes write disjoint rows whose union is what one
process writes.

Loop
    consume -> ``core.codec.decode_mixed`` per consumed batch (bad record -> dead-letter topic with the reason, counted,
    never a crash) -> :class:`features.aggregates.AggregateState` -> every
    ``features.flush_interval_s`` the dirty rows are pushed to the online store, one write per entity
    type.

Crash safety
    After a successful push, at most every ``checkpoint_every_s``, the history rows pushed since the
    last checkpoint are written as ``part-<seq>`` parquet files, the dead-letter producer is flushed,
    and ONE file holding the aggregate state, the next offset of every topic-partition and ``seq`` is
    written atomically (tmp + fsync + ``os.replace``) under ``features.checkpoint_dir``. On start the
    checkpoint is restored and each partition is assigned at its checkpointed offset (the beginning
    when there is none), so after a ``kill -9`` anywhere the same records are folded into the same
    state exactly once more; re-pushes write the same rows (idempotent) and ``part-<seq>`` files are
    replaced, not duplicated. Offsets are also committed to the consumer group, for lag monitoring
    only: the checkpoint, not the group, decides where reading resumes.

Metrics (``core.metrics.WorkerMetrics``, ``/metrics`` on 127.0.0.1)
    records in per topic, dead letters per reason, features written per view, freshness (push done
    - Kafka append time of each event), processing latency (folded - append time), consumer lag.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from confluent_kafka import Consumer, TopicPartition

from core import atomic
from core.errors import AdstreamError, ConfigError, InvalidRecord
from core.codec import decode_mixed
from core.events import Click, Impression, record_time
from core.logs import setup_logging, verbosity_from_env
from core.metrics import WorkerMetrics
from core.settings import Settings, load_settings
from features.aggregates import JOIN_KEYS, AggregateState
from features.repo import view_name
from features.store import FeatureStoreClient, FeatureStoreUnavailable
from streams.broker import resolve_bootstrap
from streams.dedup import EventTimeDedup
from streams.kafka_io import BatchPoller, DeadLetterWriter, assign_from, checkpointed_consumer, export_lag

log = logging.getLogger(__name__)

WORKER = "feature_updater"
GROUP_ID = "adstream-feature-updater"
CHECKPOINT_FILE = "checkpoint.pkl"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY_S = 5.0


# --------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    atomic.save_checkpoint(path, data)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    return atomic.load_checkpoint(path, CHECKPOINT_VERSION, "checkpoint",
                                  "move it away to rebuild the features from the beginning of the topics")


def event_id(rec: dict[str, Any]) -> str:
    """What makes two records the same event (``rec``: a decoded impression or click dict): an
    impression is one ad on one page; a click also carries its time (two clicks on one ad are two
    events, a retried record is one)."""
    if rec["type"] == "impression":
        return f"i:{rec['request_id']}:{rec['ad_id']}"
    return f"c:{rec['request_id']}:{rec['ad_id']}:{rec['event_time']!r}"


# --------------------------------------------------------------------------- worker


@dataclass
class FlushStats:
    rows: int
    push_s: float
    freshness_s: list[float]
    written: dict[str, int] = field(default_factory=dict)


class FeatureUpdater:
    """See the module docstring. Use :meth:`run` (blocking) from a thread or a process."""

    def __init__(
        self,
        settings: Settings,
        metrics: WorkerMetrics | None = None,
        client: FeatureStoreClient | None = None,
        checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
        on_flush: Callable[[FlushStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.fs = settings.features
        self.topics = settings.kafka.topics
        self.bootstrap = resolve_bootstrap(settings)
        self.metrics = metrics or WorkerMetrics(WORKER)
        self.client = client or FeatureStoreClient(settings.features)
        self.checkpoint_every_s = max(checkpoint_every_s, 0.0)
        self.on_flush = on_flush
        self.shard, self.shards = self.fs.shard, self.fs.shards
        sub = f"shard-{self.shard}-of-{self.shards}" if self.shards > 1 else ""
        self.ckpt_path = Path(self.fs.checkpoint_dir) / sub / CHECKPOINT_FILE
        self.expected = {self.topics.impressions: Impression, self.topics.clicks: Click}
        self.state = AggregateState(self.fs.half_lives_s, self.shard, self.shards)
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to read per topic-partition
        self.seq = 0
        self._pending_append_ts: list[float] = []
        self._history: dict[str, dict[str, list[Any]]] = {}
        self.dead_letters = DeadLetterWriter(self.bootstrap, self.topics.dead_letter, self.metrics, WORKER)
        self._consumer: Consumer | None = None
        self.records = 0
        self.dead = 0
        self.push_failures = 0  # consecutive online pushes that found the store unavailable
        self._retry_push_at = 0.0  # monotonic time before which no push is tried (backoff)
        self._records_in: dict[str, Any] = {}
        self._processing_latency = self.metrics.processing_latency.labels(WORKER)
        # event ids already folded (a producer retry or a spooled record delivered twice is the
        # same event): counted once; checkpointed with the state
        self.dedup = EventTimeDedup(self.fs.dedup_horizon_s, self.fs.dedup_max_keys)
        self.duplicates = 0
        self._duplicates: dict[str, Any] = {}
        # the marker this process left in the online store; a store without it lost the rows
        self.marker = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._marker_ok = False  # the store holds every row this state has (checked every store_check_s)
        self.refills = 0
        self._lock_fd: int | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def _restore(self) -> None:
        data = load_checkpoint(self.ckpt_path)
        if data is None:
            log.info("no checkpoint in %s: reading the topics from the beginning", self.ckpt_path.parent)
            return
        if list(data["state"].get("shard", (0, 1))) != [self.shard, self.shards]:
            raise ConfigError(f"checkpoint {self.ckpt_path} belongs to shard {data['state'].get('shard')}, "
                              f"settings say {self.shard} of {self.shards}")
        if [float(h) for h in data["state"]["half_lives"]] != [float(h) for h in self.fs.half_lives_s]:
            raise ConfigError(f"checkpoint {self.ckpt_path} was made with half-lives "
                              f"{data['state']['half_lives']}, settings say {self.fs.half_lives_s}")
        self.state = AggregateState.restore(data["state"])
        if data.get("dedup") is not None:
            self.dedup = EventTimeDedup.from_state(data["dedup"], self.fs.dedup_horizon_s, self.fs.dedup_max_keys)
        self.offsets = {tuple(k): v for k, v in data["offsets"]}
        self.seq = int(data["seq"])
        log.info("restored checkpoint #%d: %d events, offsets %s", self.seq,
                 self.state.events_applied, sorted(self.offsets.items()))

    # ---- per record ----------------------------------------------------------------------------
    def _decode_batch(self, msgs: list[Any], now: float) -> list[Any]:
        """Every record of a consumed batch decoded at once, per topic (``core.codec``: the same
        records and dead letters as ``core.events.decode``): a dict or its InvalidRecord."""
        return decode_mixed([m.value() for m in msgs], [self.expected[m.topic()] for m in msgs],
                            [record_time(m.timestamp(), now) for m in msgs], as_events=False)

    def _handle(self, msg: Any, now: float, dec: Any = None, fold: list[dict[str, Any]] | None = None) -> None:
        """One record; ``fold``: collect the accepted record there (the caller folds the batch at
        once with ``AggregateState.apply_records``) instead of folding it now."""
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        raw = msg.value()
        self.offsets[(topic, part)] = off + 1
        self.records += 1
        counter = self._records_in.get(topic)
        if counter is None:  # labelled children cached: .labels() costs more than the fold
            counter = self._records_in[topic] = self.metrics.records_in.labels(WORKER, topic)
        counter.inc()
        ts_type, ts_ms = msg.timestamp()
        if dec is None:  # the record's own timestamp is the clock: the same answer when it is read again
            dec = self._decode_batch([msg], now)[0]
        if isinstance(dec, InvalidRecord):
            self._dead_letter(topic, part, off, raw, dec)
            return
        if self.dedup.seen_or_add(event_id(dec), dec["event_time"]):
            self.duplicates += 1
            c = self._duplicates.get(topic)
            if c is None:
                c = self._duplicates[topic] = self.metrics.duplicates.labels(WORKER, topic)
            c.inc()
            return
        if fold is None:
            self.state.apply_record(dec)
        else:
            fold.append(dec)
        if ts_type != 0 and ts_ms > 0:  # 0 = TIMESTAMP_NOT_AVAILABLE
            t = ts_ms / 1000.0
            self._pending_append_ts.append(t)
            self._processing_latency.observe(max(0.0, now - t))

    def _update_lag(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        export_lag(consumer, tps,
                   lambda t, p: self.offsets.get((t, p), 0), self.metrics.consumer_lag, WORKER)

    def _dead_letter(self, topic: str, part: int, off: int, raw: bytes | None, err: InvalidRecord) -> None:
        self.dead += 1
        if self.shard != 0:  # every shard reads every record: shard 0 alone writes the dead letters
            return
        self.dead_letters.write(topic, part, off, raw, err)
        log.debug("dead letter %s:%d:%d %s", topic, part, off, err)

    # ---- flush and checkpoint ------------------------------------------------------------------
    def flush(self) -> FlushStats | None:
        if not self.state.has_dirty() or time.monotonic() < self._retry_push_at:
            return None
        rows = self.state.dirty_rows(clear=True)
        t0 = time.perf_counter()
        try:
            written = self.client.push(rows, to="online")
        except FeatureStoreUnavailable as e:
            # keep consuming and folding; the rows stay dirty and go out with the next flush (no
            # checkpoint is taken while rows are unpushed, so a crash meanwhile loses nothing)
            for etype, cols in rows.items():
                self.state.dirty[etype].update(cols[JOIN_KEYS[etype]])
            self.push_failures += 1
            self._retry_push_at = time.monotonic() + min(5.0, 0.25 * 2 ** min(self.push_failures, 5))
            if self.push_failures == 1 or self.push_failures % 20 == 0:
                log.warning("online push failed (%d in a row), retrying at the next flush: %s",
                            self.push_failures, e)
            return None
        if self.push_failures:
            log.info("online store back after %d failed pushes", self.push_failures)
            self.push_failures = 0
        done = time.time()
        push_s = time.perf_counter() - t0
        fresh = [max(0.0, done - t) for t in self._pending_append_ts]
        self._pending_append_ts = []
        observe = self.metrics.feature_freshness.observe
        for f in fresh:
            observe(f)
        for etype, n in written.items():
            self.metrics.features_written.labels(view_name(etype)).inc(n)
        for etype, cols in rows.items():
            hist = self._history.setdefault(etype, {c: [] for c in cols})
            for c, vals in cols.items():
                hist[c].extend(vals)
        stats = FlushStats(rows=sum(len(next(iter(c.values()))) for c in rows.values()),
                           push_s=push_s, freshness_s=fresh, written=written)
        if self.on_flush:
            self.on_flush(stats)
        return stats

    def checkpoint(self, timeout_s: float = 30.0) -> bool:
        """History part file, dead letters delivered, then state + offsets in one atomic write.
        False (nothing written) while a dead letter is not acknowledged: it is kept and re-sent, and
        the next checkpoint tries again."""
        seq = self.seq + 1
        if not self.dead_letters.confirm(timeout_s):
            log.warning("%d dead letters not delivered yet: checkpoint postponed", self.dead_letters.outstanding)
            return False
        if self._history:
            part = f"{seq:012d}" if self.shards == 1 else f"s{self.shard}of{self.shards}-{seq:012d}"
            self.client.write_history(self._history, part=part)
            self._history = {}
        save_checkpoint(self.ckpt_path, {
            "version": CHECKPOINT_VERSION,
            "seq": seq,
            "offsets": sorted([list(k), v] for k, v in self.offsets.items()),
            "state": self.state.snapshot(),
            "dedup": self.dedup.state(),
            "written_at": time.time(),
        })
        self.seq = seq
        if self._consumer is not None and self.offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]
            try:
                self._consumer.commit(offsets=tps, asynchronous=True)
            except Exception as e:  # monitoring only; the checkpoint is the source of truth
                log.warning("offset commit failed: %s", e)
        return True

    # ---- main loop -----------------------------------------------------------------------------
    def run(self, stop_event: threading.Event | None = None, max_idle_s: float | None = None) -> dict[str, Any]:
        """Consume until ``stop_event`` is set, or until nothing arrived for ``max_idle_s`` seconds
        (after a final flush and checkpoint). Returns counters."""
        stop_event = stop_event or threading.Event()
        self._lock_state_dir()
        try:
            return self._run(stop_event, max_idle_s)
        finally:
            self._unlock_state_dir()

    def _run(self, stop_event: threading.Event, max_idle_s: float | None) -> dict[str, Any]:
        self._restore()
        # the store may have lost rows while no updater ran (a Redis restarted meanwhile): the
        # first check finds no marker and pushes every row once
        group = GROUP_ID if self.shards == 1 else f"{GROUP_ID}-shard-{self.shard}-of-{self.shards}"
        consumer = self._consumer = checkpointed_consumer(self.bootstrap, group, self.settings.kafka)
        try:
            tps = assign_from(consumer, self.bootstrap, self.expected, lambda t, p: self.offsets.get((t, p)))
            log.info("feature updater on %s: %d partitions, online store %s, flush every %.2fs",
                     self.bootstrap, len(tps), self.fs.online_store, self.fs.flush_interval_s)
            last_msg = last_flush = last_ckpt = last_lag = time.monotonic()
            last_check = -math.inf
            unsaved = False  # something pushed or consumed since the last checkpoint
            poller = BatchPoller(consumer, 5000, 0.05)
            while not stop_event.is_set():
                msgs = poller.poll()
                now = time.time()
                batch: list[dict[str, Any]] = []
                for m, dec in zip(msgs, self._decode_batch(msgs, now)):
                    self._handle(m, now, dec, batch)
                self.state.apply_records(batch)
                mono = time.monotonic()
                if msgs:
                    last_msg = mono
                    unsaved = True
                if mono - last_check >= self.fs.store_check_s:
                    self.check_store()
                    last_check = mono
                if self.state.has_dirty() and mono - last_flush >= self.fs.flush_interval_s:
                    self.flush()
                    last_flush = mono
                    if not self._marker_ok and not self.state.has_dirty():
                        self._mark_store()
                if unsaved and not self.state.has_dirty() and mono - last_ckpt >= self.checkpoint_every_s:
                    if self.checkpoint(timeout_s=2.0):
                        unsaved = False
                    last_ckpt = mono
                if mono - last_lag >= 2.0:
                    self._update_lag(consumer, tps)
                    last_lag = mono
                if max_idle_s is not None and mono - last_msg >= max_idle_s:
                    log.info("idle for %.1fs: stopping", max_idle_s)
                    break
            self.flush()
            if unsaved or self._history:
                self.checkpoint()
            self._update_lag(consumer, tps)
        finally:
            try:
                consumer.close()
            except Exception:
                pass
            self._consumer = None
            left = self.dead_letters.close(10)
            if left:
                log.error("%d dead letters undelivered at exit: not in the checkpoint, so the next run "
                          "reads their records again", left)
        return {"records": self.records, "dead_letters": self.dead, "checkpoint_seq": self.seq,
                "events_applied": self.state.events_applied, "duplicates": self.duplicates,
                "refills": self.refills}

    # ---- the online store lost its rows? ---------------------------------------------------------
    def check_store(self) -> None:
        """If the online store does not hold this process's marker (a Redis that restarted empty or
        was flushed, or the first check after a start), mark every row dirty: the next flush pushes
        them all and then writes the marker. A store that does not answer is left to the push's
        retry."""
        try:
            marker = self.client.store_marker()
        except FeatureStoreUnavailable:
            return
        if marker is not None:
            if not self._marker_ok:  # at start: the store still holds what the last updater pushed
                self.marker, self._marker_ok = marker, True
            elif marker == self.marker or marker == "sqlite":
                pass
            else:
                log.warning("online store marker %r is not this updater's %r: is another updater writing "
                            "to the same store?", marker, self.marker)
            return
        n = self.state.mark_all_dirty()
        self._retry_push_at = 0.0  # at once, not after the outage backoff
        if n:
            log.warning("online store (%s) does not hold this updater's rows (restarted empty, flushed or "
                        "new): pushing all %d rows again", self.fs.online_store, n)
            self.refills += 1
            self.metrics.store_refills.inc()
        self._marker_ok = False

    def _mark_store(self) -> None:
        try:
            self.client.set_store_marker(self.marker)
        except FeatureStoreUnavailable:
            return
        self._marker_ok = True

    # ---- one updater per state directory ---------------------------------------------------------
    def _lock_state_dir(self) -> None:
        """An exclusive lock on the checkpoint directory: a second updater on it would overwrite
        this one's checkpoints (and both push the same rows)."""
        import fcntl

        d = self.ckpt_path.parent  # per shard
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another feature updater (pid {holder}) uses the state directory {d}; "
                              "give each updater its own --checkpoint-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _unlock_state_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


def run(settings: Settings, stop_event: threading.Event | None = None, max_idle_s: float | None = None,
        metrics: WorkerMetrics | None = None, metrics_port: int | None = -1, **kw: Any) -> dict[str, Any]:
    """Run the feature updater in this thread. ``metrics_port``: -1 = settings'
    ``metrics.feature_updater_port``, 0 or None = no ``/metrics`` endpoint."""
    metrics = metrics or WorkerMetrics(WORKER)
    port = settings.metrics.feature_updater_port if metrics_port == -1 else metrics_port
    server = metrics.serve(port, host=settings.metrics.host) if port else None
    try:
        return FeatureUpdater(settings, metrics=metrics, **kw).run(stop_event, max_idle_s)
    finally:
        if server is not None:
            server.shutdown()


# --------------------------------------------------------------------------- command line


def with_overrides(settings: Settings, *, online_store: str | None = None, redis_url: str | None = None,
                   repo_dir: str | None = None, checkpoint_dir: str | None = None,
                   flush_interval_s: float | None = None, shard: str | None = None) -> Settings:
    """A copy of ``settings`` with the feature options given on a command line."""
    upd = {k: v for k, v in {"online_store": online_store, "redis_url": redis_url, "repo_dir": repo_dir,
                             "checkpoint_dir": checkpoint_dir, "flush_interval_s": flush_interval_s}.items()
           if v is not None}
    if shard is not None:
        i, _, n = shard.partition("/")
        try:
            upd["shard"], upd["shards"] = int(i), int(n)
        except ValueError:
            raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {shard!r}") from None
    if not upd:
        return settings
    try:
        feats = type(settings.features).model_validate({**settings.features.model_dump(), **upd})
    except Exception as e:
        raise ConfigError(f"invalid feature options: {e}") from None
    return settings.model_copy(update={"features": feats})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's options (shared by ``python -m streams.feature_updater`` and the CLI)."""
    p.add_argument("--online-store", choices=["sqlite", "redis"], help="online store (default: settings)")
    p.add_argument("--redis-url", metavar="HOST:PORT", help="Redis for --online-store redis")
    p.add_argument("--repo-dir", metavar="DIR", help="Feast repository directory")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where the checkpoint file lives")
    p.add_argument("--flush-interval", type=float, metavar="S", help="seconds between pushes")
    p.add_argument("--checkpoint-every", type=float, default=DEFAULT_CHECKPOINT_EVERY_S, metavar="S",
                   help="seconds between checkpoints (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=-1, metavar="PORT",
                   help="/metrics port on 127.0.0.1 (default: settings; 0 = off)")
    p.add_argument("--max-idle", type=float, metavar="S", help="exit after S seconds without records")
    p.add_argument("--shard", metavar="I/N", help="run as shard I of N updaters: fold and write only the "
                   "entity rows this shard owns (each reads every input partition)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    return with_overrides(settings, online_store=args.online_store, redis_url=args.redis_url,
                          repo_dir=args.repo_dir, checkpoint_dir=args.checkpoint_dir,
                          flush_interval_s=args.flush_interval, shard=getattr(args, "shard", None))


def run_from_args(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    settings = settings_for(args, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        out = run(settings, stop, max_idle_s=args.max_idle, metrics_port=args.metrics_port,
                  checkpoint_every_s=args.checkpoint_every)
    except KeyboardInterrupt:
        return 130
    print(f"feature updater: {out['records']} records, {out['dead_letters']} dead letters, "
          f"checkpoint #{out['checkpoint_seq']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.feature_updater",
                                description="Keep the Feast feature store fresh from impressions and clicks.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers")
    add_arguments(p)
    args = p.parse_args(argv)
    setup_logging(verbosity_from_env())
    try:
        over = {"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {}
        return run_from_args(args, load_settings(args.config, **over))
    except AdstreamError as e:
        print(f"feature updater: error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
