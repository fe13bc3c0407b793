"""One stream worker for every model the stream refreshes: windows from a topic -> gated versions.

It runs any :class:`models.stream_model.StreamModel` (the CTR model is one plug-in,
``streams.trainer``); the model needs no Kafka knowledge. One process owns every partition of the
input topic (explicit ``assign()``).

Loop
    consume -> ``decoder(raw, now)`` -> ``(key, event_time, record)`` (a bad record goes to the
    dead-letter topic with its reason, never a crash) -> de-duplicate by key over an event-time
    horizon (``streams.dedup``) -> append to the open window. A window closes after
    ``window_examples`` unique records, or (``window_seconds``) when a record of a later event-time
    bucket arrives; that record opens the next window.

Per closed window k
    1. Gate (progressive validation): every published part (``parts()``, or the model itself under
       ``name``) scores window k as trained through k-1, and so does that name's serving version
       (registry ``LATEST``). ``gate_decision`` per part, combined by ``joint`` (``all``: published
       together or not at all). Publish or reject each part (one version per name); after a
       rejection with ``on_reject=reset`` the model goes back to the serving versions.
    2. Shadow models (optional): scored on window k, then learn it; never published.
    3. ``model.learn(window k)``.
    4. One line in ``windows.jsonl``, then ONE atomic checkpoint (model state, shadows, next offset per
       partition, de-dup keys, gate counters, serving versions): a restart continues with window
       k+1, so no window is trained twice and none is skipped. The checkpoint waits for every dead
       letter to be acknowledged (postponed, never skipped past one).

A crash after a gate decision but before the checkpoint: the restarted run finds the versions of
window k by ``run_id`` and reuses that decision and its figures (no second version).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from confluent_kafka import Consumer, TopicPartition

from core import atomic
from core.errors import ConfigError, InvalidRecord
from core.events import Example, decode
from core.settings import KafkaSettings
from models.stream_model import fingerprint_of, parts_of, problems_of
from streams.dedup import EventTimeDedup
from streams.delivery import DeadLetterWriter
from streams.kafka_io import BatchPoller, assign_from, checkpointed_consumer, export_lag
from streams.window_gate import WindowGate, f_or_none
from streams.worker_metrics import ModelWorkerMetrics

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pkl"
WINDOWS_FILE = "windows.jsonl"
CHECKPOINT_VERSION = 1

Decoded = tuple[str, float, dict[str, Any]]  # key, event time, record


def decode_example(raw: bytes | None, now: float) -> Decoded:
    """The ``examples`` topic: ``core.events.Example`` -> (``request_id:ad_id``, event time, dict)."""
    ex = decode(raw, Example, now=now)
    assert isinstance(ex, Example)
    return ex.key, ex.event_time, ex.to_dict()


def decode_examples(raws: list[bytes | None], now: float) -> list[Decoded | InvalidRecord]:
    """:func:`decode_example` for a whole consumed batch at once (``core.codec``: one C pass per
    record, no dataclass; the same records and dead letters, tested in tests/test_codec.py)."""
    from core.codec import decode_batch

    recs, errors = decode_batch(raws, Example, now)
    out: list[Decoded | InvalidRecord] = [
        (f"{d['request_id']}:{d['ad_id']}", d["event_time"], d) if d is not None else None  # type: ignore[misc]
        for d in recs]
    for i, err in errors:
        out[i] = err
    return out  # type: ignore[return-value]


@dataclass
class WorkerConfig:
    """Everything the worker needs besides the model (``streams.trainer`` builds it from settings)."""

    topic: str
    dead_letter_topic: str
    registry_dir: Path
    checkpoint_dir: Path
    window_examples: int = 5000
    window_seconds: float | None = None
    min_window: int = 200
    on_reject: str = "reset"  # reset | continue
    joint: str = "all"  # all | each: how the parts of one job are decided
    gate_margins: dict[str, float] = field(default_factory=dict)  # score key -> margin
    dedup_horizon_s: float = 780.0
    dedup_max_keys: int = 2_000_000
    max_windows: int | None = None
    idle_exit_s: float | None = None
    group_id: str = "adstream-trainer"
    worker: str = "trainer"
    decoder: Callable[[bytes | None, float], Decoded] = decode_example
    # a whole consumed batch at once: raws, clock -> per record a Decoded or its InvalidRecord;
    # used instead of ``decoder`` when set (the default decoder's batch twin is ``decode_examples``)
    batch_decoder: Callable[[list[bytes | None], float], list[Decoded | InvalidRecord]] | None = None
    dead_letter_wait_s: float = 5.0  # per checkpoint, for dead-letter acknowledgements before postponing
    # records whose ``stage`` is one of these are passed over (``core.events.Example``: take ``full``
    # plus ``close`` — final labels — or ``full`` plus ``click`` — positives at the click, never both)
    skip_stages: tuple[str, ...] = ("click",)


class _Stop(Exception):
    pass


class ModelWorker:
    """See the module docstring. :meth:`run` blocks (use a thread or a process).

    Args:
        model: the StreamModel (a job with ``parts()`` publishes one version per part per window).
        config: :class:`WorkerConfig`.
        bootstrap / kafka: the broker and the consumer settings.
        shadows: label -> StreamModel scored and trained beside the model, never published.
        on_window: called with each window's record (the windows.jsonl line) before the checkpoint.
        record_keys: also write each window's record keys into windows.jsonl (tests, audits).
        clock: wall clock (``created_at``, freshness, the decoder's clock-skew check).
        dead_letters: a ``DeadLetterWriter`` (one on ``config.dead_letter_topic`` by default).
        guard: a window guard (``streams.label_guard.LabelRateGuard``): the candidate that learned a
            window it holds as suspect is rejected at the next gate and the learner reset.
    """

    def __init__(self, model: Any, config: WorkerConfig, bootstrap: str, kafka: KafkaSettings | None = None,
                 shadows: Mapping[str, Any] | None = None, metrics: ModelWorkerMetrics | None = None,
                 on_window: Callable[[dict[str, Any]], None] | None = None, record_keys: bool = False,
                 clock: Callable[[], float] = time.time, dead_letters: DeadLetterWriter | None = None,
                 guard: Any = None) -> None:
        self.model = model
        self.cfg = config
        self.name = model.name
        self.topic = config.topic
        self.bootstrap = bootstrap
        self.kafka = kafka or KafkaSettings(bootstrap=bootstrap)  # type: ignore[call-arg]
        self.shadows = dict(shadows or {})
        self.metrics = metrics or ModelWorkerMetrics(worker=config.worker)
        self.on_window = on_window
        self.record_keys = record_keys
        self.clock = clock
        self.ckpt_dir = Path(config.checkpoint_dir)
        self.ckpt_path = self.ckpt_dir / CHECKPOINT_FILE
        self.windows_path = self.ckpt_dir / WINDOWS_FILE
        self.dead_letters = dead_letters or DeadLetterWriter(bootstrap, config.dead_letter_topic,
                                                             metrics=self.metrics.worker, worker=config.worker)
        self.gate = WindowGate(self, config.registry_dir)
        self.guard = guard
        self.metrics.bind(self.name, list(parts_of(model)))
        if config.min_window > config.window_examples and config.window_seconds is None:
            log.warning("min_window %d > window_examples %d: a final partial window never trains",
                        config.min_window, config.window_examples)
        # state that goes into the checkpoint
        self.run_id = uuid.uuid4().hex
        self.window = 0  # windows trained in total = index of the open window
        self.offsets: dict[int, int] = {}  # next offset per partition after the last trained record
        self.dedup = EventTimeDedup(config.dedup_horizon_s, config.dedup_max_keys)
        self.examples_trained = 0
        self.newest_event_time = math.nan
        self.newest_append_ts = math.nan
        self.last_window: dict[str, Any] | None = None
        self.suspect: str | None = None  # why the guard held the last window learned, if it did
        # in memory only
        self.pos: dict[int, int] = {}  # next offset per partition after the last record read
        self.buffer: list[dict[str, Any]] = []
        self.buf_keys: list[str] = []
        self.buf_times: list[float] = []
        self.buf_bucket: int | None = None
        self.buf_append_max = math.nan
        self._consumer: Consumer | None = None
        self._pending_checkpoint = False
        self.records = self.dead = self.duplicates = self.stage_skipped = 0
        self.windows_this_run = 0

    # ---- checkpoint ----------------------------------------------------------------------------
    def restore(self) -> None:
        data = atomic.load_checkpoint(self.ckpt_path, CHECKPOINT_VERSION, f"{self.cfg.worker} checkpoint",
                                      "move it away to start training from scratch")
        if data is None:
            log.info("no checkpoint in %s: reading %s from the beginning", self.ckpt_dir, self.topic)
            self._trim_windows_file()  # lines of an earlier, discarded run would be stale
            return
        where = f"{self.cfg.worker} checkpoint {self.ckpt_path}"
        if data.get("topic") != self.topic:
            raise ConfigError(f"{where} belongs to topic {data.get('topic')!r}, not {self.topic!r}; use another "
                              "--checkpoint-dir")
        try:
            self.model = self._load_model(self.model, data["model"], data.get("fingerprint"), where)
            saved = data.get("shadows") or {}
            for label, sh in list(self.shadows.items()):
                if label not in saved:
                    raise ConfigError(f"{where} has no shadow model {label!r}; use another --checkpoint-dir or "
                                      "drop the shadow")
                self.shadows[label] = self._load_model(sh, saved[label]["state"], saved[label].get("fingerprint"),
                                                       f"{where} (shadow {label})")
            self.run_id = str(data["run_id"])
            self.window = int(data["window"])
            self.offsets = {int(p): int(o) for p, o in data["offsets"].items()}
            self.dedup = EventTimeDedup.from_state(data["dedup"], self.cfg.dedup_horizon_s, self.cfg.dedup_max_keys)
            self.gate.restore(data["gate"])
            self.examples_trained = int(data["examples_trained"])
            self.newest_event_time = float(data["newest_event_time"])
            self.newest_append_ts = float(data["newest_append_ts"])
            self.last_window = data.get("last_window")
            guard = data.get("guard") or {}
            self.suspect = guard.get("suspect")
            if self.guard is not None:
                self.guard.restore(guard.get("state"))
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where} is inconsistent ({type(e).__name__}: {e}); move it away to start "
                              "from scratch") from None
        self.pos = dict(self.offsets)
        self.gate.check_registry_for_window = self.window
        self._trim_windows_file()
        self.metrics.newest_event_time[self.name] = self.newest_event_time
        log.info("restored checkpoint: %d windows trained, %d examples, serving %s, offsets %s", self.window,
                 self.examples_trained, self.gate.serving_versions, sorted(self.offsets.items()))

    def _load_model(self, current: Any, state: Any, fingerprint: Any, where: str) -> Any:
        if not isinstance(state, dict):
            raise ValueError(f"the model state is a {type(state).__name__}, not a dict")
        if fingerprint != fingerprint_of(current):
            raise ConfigError(f"{where} was written with a different model configuration (strategy, fields or "
                              "sizes changed); use another --checkpoint-dir or the old settings")
        try:
            model = type(current).from_state(state)
        except Exception as e:
            raise ConfigError(f"{where}: the model state does not load ({type(e).__name__}: {e})") from None
        problems = problems_of(model)
        if problems:
            raise ConfigError(f"{where} holds an invalid model: {'; '.join(problems[:5])}")
        return model

    def _trim_windows_file(self) -> None:
        """Drop windows.jsonl lines of windows the checkpoint does not contain (a crash after the line
        was written but before the checkpoint): each window keeps exactly one line."""
        if not self.windows_path.exists():
            return
        lines = self.windows_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["window"]) < self.window:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        if len(keep) != len(lines):
            atomic.atomic_write(self.windows_path, "".join(x + "\n" for x in keep).encode())
            log.info("windows.jsonl: dropped %d line(s) written after the checkpoint", len(lines) - len(keep))

    def checkpoint(self, wait_s: float | None = None) -> bool:
        """Write the checkpoint once every dead letter so far is acknowledged; otherwise postpone it
        (False): the previous checkpoint stays, so a crash re-reads the bad records and writes their
        dead letters again rather than losing them."""
        if not self.dead_letters.confirm(self.cfg.dead_letter_wait_s if wait_s is None else wait_s):
            self._pending_checkpoint = True
            self.metrics.checkpoints_postponed.labels(self.name).inc()
            log.warning("checkpoint postponed: %d dead letters not acknowledged yet (kept and re-sent)",
                        self.dead_letters.outstanding)
            return False
        state = self.model.state()
        atomic.save_checkpoint(self.ckpt_path, {
            "version": CHECKPOINT_VERSION, "topic": self.topic, "name": self.name, "run_id": self.run_id,
            "window": self.window, "offsets": dict(self.offsets),
            "model": state, "fingerprint": fingerprint_of(self.model),
            "shadows": {label: {"state": sh.state(), "fingerprint": fingerprint_of(sh)}
                        for label, sh in self.shadows.items()},
            "dedup": self.dedup.state(), "gate": self.gate.checkpoint_state(),
            "examples_trained": self.examples_trained, "newest_event_time": self.newest_event_time,
            "newest_append_ts": self.newest_append_ts, "last_window": self.last_window,
            "guard": {"suspect": self.suspect, "state": self.guard.state() if self.guard is not None else None},
            "written_at": self.clock(),
        })
        self._pending_checkpoint = False
        # the model does not change until the next gate scores it: that gate publishes this very state
        self.gate.remember_candidate(self.window, state)
        if self._consumer is not None and self.offsets:
            tps = [TopicPartition(self.topic, p, o) for p, o in self.offsets.items()]
            try:
                self._consumer.commit(offsets=tps, asynchronous=True)
            except Exception as e:  # monitoring only; the checkpoint is the source of truth
                log.warning("offset commit failed: %s", e)
        return True

    # ---- per record ----------------------------------------------------------------------------
    def _decode_all(self, msgs: list[Any], now: float) -> list[Any] | None:
        """Every record of a consumed batch decoded at once (``batch_decoder``), else None."""
        bd = self.cfg.batch_decoder
        if bd is None and self.cfg.decoder is decode_example:
            bd = decode_examples
        if bd is None:
            return None
        return bd([m.value() for m in msgs], now)

    def _handle(self, msg: Any, now: float, decoded: Any = None) -> None:
        part, off = msg.partition(), msg.offset()
        raw = msg.value()
        self.records += 1
        self.metrics.worker.records_in.labels(self.cfg.worker, self.topic).inc()
        try:
            if decoded is None:
                decoded = self.cfg.decoder(raw, now)
            elif isinstance(decoded, InvalidRecord):
                raise decoded
            key, event_time, rec = decoded
        except InvalidRecord as err:
            self.dead += 1
            self.dead_letters.write(self.topic, part, off, raw, err)
            log.warning("dead letter %s:%d:%d %s", self.topic, part, off, err)
            self.pos[part] = off + 1
            return
        if skip_stages := self.cfg.skip_stages:
            if isinstance(rec, dict) and rec.get("stage") in skip_stages:
                self.stage_skipped += 1
                self.pos[part] = off + 1
                return
        if self.dedup.seen_or_add(key, event_time):
            self.duplicates += 1
            self.metrics.duplicates.labels(self.name).inc()
            self.pos[part] = off + 1
            return
        if self.cfg.window_seconds is not None:
            bucket = int(math.floor(event_time / self.cfg.window_seconds))
            if self.buffer and self.buf_bucket is not None and bucket > self.buf_bucket:
                self._close_window()  # this record opens the next window: offsets exclude it
            if not self.buffer:
                self.buf_bucket = bucket
        self.buffer.append(rec)
        self.buf_keys.append(key)
        self.buf_times.append(event_time)
        ts_type, ts_ms = msg.timestamp()
        if ts_type != 0 and ts_ms > 0:
            t = ts_ms / 1000.0
            self.buf_append_max = t if math.isnan(self.buf_append_max) else max(self.buf_append_max, t)
            self.metrics.worker.processing_latency.labels(self.cfg.worker).observe(max(0.0, now - t))
        self.pos[part] = off + 1
        if self.cfg.window_seconds is None and len(self.buffer) >= self.cfg.window_examples:
            self._close_window()

    # ---- one window ----------------------------------------------------------------------------
    def describe_window(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra fields of a window's windows.jsonl line (plug-ins override: the CTR's click rate)."""
        return {}

    def _close_window(self, partial: bool = False) -> None:
        k = self.window
        records, keys, times = self.buffer, self.buf_keys, self.buf_times
        append_max = self.buf_append_max
        self.buffer, self.buf_keys, self.buf_times, self.buf_bucket = [], [], [], None
        self.buf_append_max = math.nan
        n = len(records)
        rec: dict[str, Any] = {"window": k, "examples": n, "partial": partial, "event_time_min": min(times),
                               "event_time_max": max(times), **self.describe_window(records)}
        # 1. gate: candidate (trained through k-1) vs serving, both on window k
        t_gate = time.perf_counter()
        if k > 0:
            self.gate.run(k, records, rec, append_max, suspect=self.suspect)
        else:
            rec.update(gate="none", version=None)
            rec.update({key: None for key in self.gate.score_keys()})
        rec["gate_seconds"] = round(time.perf_counter() - t_gate, 4)
        # 2. shadows: next-window scores, then they learn this window
        for label, sh in self.shadows.items():
            if k > 0:
                s = sh.score(records)
                rec.update({f"{label}_{key}": f_or_none(v) for key, v in s.items()})
                self.metrics.set_scores(self.name, label, s)
            else:
                rec.update({f"{label}_{key}": None for key in self.gate.score_keys()})
            sh.learn(records)
        # 3. the guard judges window k: the next gate rejects the candidate that learns a suspect one
        if self.guard is not None:
            self.suspect = self.guard.judge(records)
            if self.suspect:
                rec["suspect"] = self.suspect
                self.metrics.suspect_windows.labels(self.name).inc()
                log.warning("window %d held as suspect: %s; its candidate will be rejected", k, self.suspect)
        # 4. learn window k
        t_learn = time.perf_counter()
        stats = self.model.learn(records) or {}
        learn_s = time.perf_counter() - t_learn
        rec["train_seconds"] = round(learn_s, 4)
        rec["loss"] = f_or_none(stats.get("loss"))
        # 5. bookkeeping, windows.jsonl, checkpoint
        self.window = k + 1
        self.windows_this_run += 1
        self.offsets = dict(self.pos)
        self.examples_trained += n
        self.newest_event_time = rec["event_time_max"] if math.isnan(self.newest_event_time) else max(
            self.newest_event_time, rec["event_time_max"])
        if not math.isnan(append_max):
            self.newest_append_ts = append_max
        self.last_window = {"window": k, "event_time_min": rec["event_time_min"],
                            "event_time_max": rec["event_time_max"], "examples": n}
        rec["examples_trained"] = self.examples_trained
        rec["serving_version"] = self.gate.serving_versions.get(self.name) if self.gate.single else \
            dict(self.gate.serving_versions)
        rec["wall_time"] = self.clock()
        if self.record_keys:
            rec["keys"] = keys
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(self.windows_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_window is not None:
            self.on_window(rec)
        self.checkpoint()
        m = self.metrics
        m.examples_trained.labels(self.name).inc(n)
        m.windows_trained.labels(self.name).inc()
        m.train_seconds.labels(self.name).set(learn_s)
        m.newest_event_time[self.name] = self.newest_event_time
        m.dedup_keys.labels(self.name).set(len(self.dedup))
        m.evicted_early(self.name, self.dedup.evicted_early)
        log.info("window %d: %d examples%s, %s, gate %s%s, train %.2fs", k, n, " (partial)" if partial else "",
                 self.gate.summary(rec), rec.get("gate"), f" -> {rec['version']}" if rec.get("version") else "",
                 learn_s)

    # ---- main loop -----------------------------------------------------------------------------
    def _update_lag(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        export_lag(consumer, tps, lambda _t, p: self.pos.get(p, 0), self.metrics.worker.consumer_lag,
                   self.cfg.worker)

    def run(self, stop_event: threading.Event | None = None) -> dict[str, Any]:
        """Consume and train until ``stop_event`` is set, ``max_windows`` windows were trained in
        this run, or nothing arrived for ``idle_exit_s`` seconds (a final partial window trains when
        it holds at least ``min_window`` records). Returns a summary dict."""
        stop_event = stop_event or threading.Event()
        self.restore()
        consumer = self._consumer = checkpointed_consumer(self.bootstrap, self.cfg.group_id, self.kafka)
        cfg = self.cfg
        reason = "stopped"
        try:
            tps = assign_from(consumer, self.bootstrap, [self.topic], lambda _t, p: self.offsets.get(p))
            log.info("%s %s on %s: topic %s (%d partitions), %s, registry %s", cfg.worker, self.name, self.bootstrap,
                     self.topic, len(tps), f"windows of {cfg.window_seconds:g}s event time" if cfg.window_seconds
                     else f"windows of {cfg.window_examples} examples", cfg.registry_dir)
            last_msg = last_lag = time.monotonic()
            poller = BatchPoller(consumer, 1000, 0.1)
            while not stop_event.is_set():
                msgs = poller.poll()
                now = self.clock()
                decoded = self._decode_all(msgs, now) if msgs else None
                try:
                    for i, m in enumerate(msgs):
                        self._handle(m, now, decoded[i] if decoded is not None else None)
                        if cfg.max_windows is not None and self.windows_this_run >= cfg.max_windows:
                            raise _Stop("max_windows")
                        if stop_event.is_set():
                            raise _Stop("stopped")
                except _Stop as s:
                    reason = str(s)
                    break
                mono = time.monotonic()
                if msgs:
                    last_msg = mono
                if mono - last_lag >= 2.0:
                    self._update_lag(consumer, tps)
                    last_lag = mono
                    if self._pending_checkpoint and self.checkpoint(wait_s=0.0):
                        log.info("postponed checkpoint written")
                if cfg.idle_exit_s is not None and mono - last_msg >= cfg.idle_exit_s:
                    reason = "idle"
                    if len(self.buffer) >= cfg.min_window:
                        self._close_window(partial=True)
                    elif self.buffer:
                        log.info("idle: %d records in the open window (< min_window %d) stay untrained",
                                 len(self.buffer), cfg.min_window)
                    break
            if not self.buffer and self.pos != self.offsets:
                # only duplicates / dead letters since the last window: nothing is pending, so the
                # read position itself is safe to checkpoint (they are not read again)
                saved = self.offsets
                self.offsets = dict(self.pos)
                if not self.checkpoint(wait_s=30.0):
                    self.offsets = saved
            elif self._pending_checkpoint:
                self.checkpoint(wait_s=30.0)
            self._update_lag(consumer, tps)
        finally:
            try:
                consumer.close()
            except Exception:
                pass
            self._consumer = None
            self.dead_letters.close(10)
        log.info("%s %s stops (%s): %d windows this run, %d in total, serving %s", cfg.worker, self.name, reason,
                 self.windows_this_run, self.window, self.gate.serving_versions)
        return self.summary(reason)

    def summary(self, reason: str = "") -> dict[str, Any]:
        g = self.gate.counts
        return {"reason": reason, "windows_this_run": self.windows_this_run, "windows": self.window,
                "examples_trained": self.examples_trained, "records": self.records, "duplicates": self.duplicates,
                "other_stage": self.stage_skipped,
                "dead_letters": self.dead, "published": g["publish"], "rejected": g["reject"], "resets": g["reset"],
                "serving_version": (self.gate.serving_versions.get(self.name) if self.gate.single
                                    else dict(self.gate.serving_versions)),
                "pending_examples": len(self.buffer), "offsets": dict(self.offsets),
                "checkpoint_pending": self._pending_checkpoint}


def run_worker(worker: ModelWorker, stop_event: threading.Event | None = None, metrics_port: int | None = None,
               host: str = "127.0.0.1") -> dict[str, Any]:
    """Run ``worker`` in this thread with ``/metrics`` on ``host:metrics_port`` (None or 0 = none);
    returns its summary. (Torch threads are the model's business: set them before, e.g.
    ``torch.set_num_threads(1)``.)"""
    server = worker.metrics.serve(metrics_port, host=host) if metrics_port else None
    try:
        return worker.run(stop_event)
    finally:
        if server is not None:
            server.shutdown()
