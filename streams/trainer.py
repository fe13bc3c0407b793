"""The stream trainer: labelled examples from Kafka -> windows -> incremental CTR updates -> gated
model versions in the registry.

One process owns every partition of the ``examples`` topic (explicit ``assign()``, no group
rebalancing), like the feature updater.

Loop
    consume -> ``core.events.decode`` (bad record -> dead-letter topic with the reason, counted,
    never a crash) -> de-duplicate by key (``request_id:ad_id``; the joiner may re-emit an example
    with the same key and content) -> append to the open window. A window closes after
    ``window_examples`` unique examples, or (``window_seconds``) when an example of a later
    event-time bucket arrives; that example opens the next window.

Per closed window k
    1. Gate (progressive validation): score window k with the candidate (the learner as trained
       through k-1) and with the serving model (registry ``LATEST``). Publish the candidate when
       ``AUC_c >= AUC_s - gate_auc_margin`` and ``LogLoss_c <= LogLoss_s + gate_logloss_margin``
       (always when nothing is served yet); otherwise ``reject()`` it and, with
       ``on_reject=reset``, reset the learner to the serving model's state.
    2. Optional shadow learner (``compare``): scored on window k, then trained on it.
    3. ``CTRLearner.train_window`` on window k, initialised from the previous model.
    4. One line in ``<checkpoint_dir>/windows.jsonl``, then ONE atomic checkpoint file (tmp + fsync
       + ``os.replace``): learner state, shadow state, next offset per partition after the last
       example of window k, the de-duplication horizon, window counter, serving version, gate
       counters. A restart restores it, validates it, seeks to its offsets and continues with
       window k+1: no window is trained twice and none is skipped.

See docs/trainer.md for every switch and the choices behind them.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter, Gauge

from core import atomic
from core.errors import AdstreamError, ConfigError, InvalidRecord
from core.events import Example, dead_letter_record, decode
from core.metrics import NS, WorkerMetrics
from core.settings import Settings, TrainerSettings, load_settings
from streams.broker import resolve_bootstrap
from streams.kafka_io import (CountingProducer, assign_from, checkpointed_consumer, export_lag, is_error,
                              make_producer)

if TYPE_CHECKING:
    from models.ctr import CTRConfig, CTRLearner, FieldConfig
    from models.ctr.features import RawBatch

log = logging.getLogger(__name__)

WORKER = "trainer"
GROUP_ID = "adstream-trainer"
CHECKPOINT_FILE = "checkpoint.pkl"
WINDOWS_FILE = "windows.jsonl"
CHECKPOINT_VERSION = 1
DAY = 86400.0
# the presets of `adstream evaluate-ctr` (models.evaluation.STRATEGIES; checked in model_config)
STRATEGIES = ("retrain", "finetune", "distill", "ddp-fp", "ddp-mp", "ddp")

# torch/torchrec take seconds to import: models/ is imported inside the functions that need it, so
# `adstream --help` and the argument parser stay fast.

# field -> (share of `capacity` (0 = a fixed small table), admission sightings, TTL in days or None)
FIELD_POLICY: dict[str, tuple[float, int, float | None]] = {
    "user_id": (1.0, 2, 7),
    "query": (0.25, 2, 14),
    "creative_id": (0.5, 1, 30),
    "ad_id": (0.25, 1, 30),
    "bidword": (0.25, 1, 30),
    "advertiser": (1 / 16, 1, None),
    "category": (0, 1, None),
    "top_category": (0, 1, None),
    "position": (0, 1, None),
    "slot": (0, 1, None),
    "domain": (0, 1, None),
    "segment": (0, 1, None),
    "match": (0, 1, None),
}
SMALL_TABLE = 1024
UNKNOWN_FIELD_POLICY = (0.25, 2, 7)


# --------------------------------------------------------------------------- model configuration


def field_configs(ts: TrainerSettings) -> list[FieldConfig]:
    """Per-field table size, admission and TTL (event time) for a stream (see FIELD_POLICY)."""
    from models.ctr import FieldConfig

    out = []
    for name in ts.categorical:
        share, admission, ttl_days = FIELD_POLICY.get(name, UNKNOWN_FIELD_POLICY)
        cap = SMALL_TABLE if share == 0 else max(16, int(ts.capacity * share))
        if share == 0:
            cap = min(cap, ts.capacity)
        out.append(FieldConfig(name, capacity=cap, admission=admission,
                               ttl=None if ttl_days is None else ttl_days * DAY))
    return out


def model_config(ts: TrainerSettings, strategy: str | None = None) -> CTRConfig:
    """The CTRConfig of a strategy: the preset of ``adstream evaluate-ctr`` (models.evaluation) with
    the trainer's fields, sizes and learning rates."""
    from models.evaluation import STRATEGIES as EVAL_STRATEGIES
    from models.evaluation import Columns, EvalConfig, strategy_config

    assert tuple(EVAL_STRATEGIES) == STRATEGIES, "strategy presets changed in models.evaluation"
    strategy = strategy or ts.strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if not ts.categorical:
        raise ConfigError("trainer.categorical needs at least one field")
    ec = EvalConfig(strategies=(strategy,), backbone=ts.backbone, embedding_dim=ts.embedding_dim,
                    capacity=ts.capacity, emb_lr=ts.emb_lr, dense_lr=ts.dense_lr, mp_lambda=ts.mp_lambda,
                    epochs=ts.epochs, batch_size=ts.batch_size)
    cols = Columns(time="event_time", label="clicked", categorical=list(ts.categorical), numeric=list(ts.numeric))
    cfg = replace(strategy_config(strategy, ec, cols, ts.seed), fields=field_configs(ts))
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"invalid trainer model settings: {e}") from None
    return cfg


def learner_from_state(state: dict[str, Any]) -> CTRLearner:
    """A learner rebuilt from a ``CTRLearner.state_dict()`` (a registry version or a checkpoint)."""
    from models.ctr import CTRConfig, CTRLearner

    learner = CTRLearner(CTRConfig.from_dict(state["config"]))
    learner.load_state_dict(state)
    return learner


# --------------------------------------------------------------------------- metrics


class TrainerMetrics:
    """The worker metrics (records in, dead letters, lag) plus the trainer's own, on one registry.

    The trainer-specific names are defined here until they move to core/metrics.py."""

    def __init__(self, worker_metrics: WorkerMetrics | None = None) -> None:
        self.worker = worker_metrics or WorkerMetrics(WORKER)
        r = self.registry = self.worker.registry
        self.examples_trained = Counter(f"{NS}_trainer_examples_trained", "Examples trained on", registry=r)
        self.duplicates = Counter(f"{NS}_trainer_duplicates", "Examples dropped as duplicates (same key)",
                                  registry=r)
        self.windows_trained = Counter(f"{NS}_trainer_windows_trained", "Windows trained", registry=r)
        self.gate_decisions = Counter(f"{NS}_trainer_gate_decisions", "Gate decisions by outcome",
                                      ["outcome"], registry=r)
        self.window_auc = Gauge(f"{NS}_trainer_window_auc", "AUC on the latest window before training on it",
                                ["model"], registry=r)
        self.window_logloss = Gauge(f"{NS}_trainer_window_logloss", "LogLoss on the latest window",
                                    ["model"], registry=r)
        self.window_calibration = Gauge(f"{NS}_trainer_window_calibration",
                                        "Predicted / observed clicks on the latest window", ["model"], registry=r)
        self.train_seconds = Gauge(f"{NS}_trainer_window_train_seconds", "Seconds to train the latest window",
                                   registry=r)
        self.model_age = Gauge(f"{NS}_trainer_model_age_seconds",
                               "Now minus the event time of the newest example trained on", registry=r)
        self.since_publish = Gauge(f"{NS}_trainer_seconds_since_publish",
                                   "Seconds since this trainer last published a version", registry=r)
        self.publish_freshness = Gauge(f"{NS}_trainer_publish_freshness_seconds",
                                       "At the latest publish: publish time minus the Kafka append time of "
                                       "the newest example in the published model", registry=r)
        self.newest_event_time = float("nan")
        self.last_publish = float("nan")
        self.model_age.set_function(lambda: time.time() - self.newest_event_time)
        self.since_publish.set_function(lambda: time.time() - self.last_publish)

    def serve(self, port: int, host: str = "127.0.0.1"):
        return self.worker.serve(port, host=host)


# --------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    atomic.save_checkpoint(path, data)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint dict, None when there is none; ConfigError when it is unreadable."""
    return atomic.load_checkpoint(path, CHECKPOINT_VERSION, "trainer checkpoint",
                                  "move it away to start training from scratch")


class KeyHorizon:
    """The most recent ``size`` example keys (set + FIFO), for de-duplication."""

    def __init__(self, size: int, keys: list[str] | None = None) -> None:
        self.size = size
        self.order: collections.deque[str] = collections.deque()
        self.keys: set[str] = set()
        for k in keys or []:
            self.add(k)

    def add(self, key: str) -> bool:
        """False when ``key`` is already in the horizon."""
        if key in self.keys:
            return False
        if self.size <= 0:
            return True
        self.keys.add(key)
        self.order.append(key)
        if len(self.order) > self.size:
            self.keys.discard(self.order.popleft())
        return True

    def dump(self) -> list[str]:
        return list(self.order)


def _f(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def score(learner: CTRLearner, raw: RawBatch, dicts: list[dict[str, Any]], same_fields: bool) -> dict[str, Any]:
    """AUC, LogLoss and calibration (predicted / observed clicks) of ``learner`` on one window."""
    from models.ctr import auc, logloss

    p = learner.predict(raw if same_fields else dicts)
    y = raw.labels
    clicks = float(y.sum())
    return {"auc": auc(y, p), "logloss": logloss(y, p),
            "calibration": float(p.sum()) / clicks if clicks > 0 else float("nan")}


def gate_decision(cand: dict[str, float], serving: dict[str, float] | None, auc_margin: float,
                  logloss_margin: float) -> tuple[bool, str]:
    """``(publish, reason)``. A NaN AUC (a window with one class) is not compared."""
    if serving is None:
        return True, "no serving model"
    ca, sa, cl, sl = cand["auc"], serving["auc"], cand["logloss"], serving["logloss"]
    if not math.isfinite(cl):
        return False, "candidate LogLoss is not finite"
    reasons = []
    if math.isfinite(ca) and math.isfinite(sa) and ca < sa - auc_margin:
        reasons.append(f"AUC {ca:.4f} < serving {sa:.4f} - {auc_margin}")
    if math.isfinite(sl) and cl > sl + logloss_margin:
        reasons.append(f"LogLoss {cl:.4f} > serving {sl:.4f} + {logloss_margin}")
    if reasons:
        return False, "; ".join(reasons)
    return True, "within margins"


# --------------------------------------------------------------------------- worker


class _Stop(Exception):
    pass


class StreamTrainer:
    """See the module docstring. Use :meth:`run` (blocking) from a thread or a process.

    Args:
        settings: the full settings (``kafka``, ``trainer``, ``metrics``).
        metrics: a :class:`TrainerMetrics` (a fresh registry by default).
        on_window: called with each window's record (the windows.jsonl line) after training, before
            the checkpoint.
        record_keys: also write the example keys of each window into windows.jsonl (tests, audits).
        clock: wall clock for ``created_at``, freshness and the clock-skew check (``time.time``).
    """

    def __init__(self, settings: Settings, metrics: TrainerMetrics | None = None,
                 on_window: Callable[[dict[str, Any]], None] | None = None, record_keys: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        from models.ctr import CTRLearner
        from models.registry import ModelRegistry

        self.settings = settings
        self.ts = settings.trainer
        if self.ts.min_window > self.ts.window_examples and self.ts.window_seconds is None:
            log.warning("min_window %d > window_examples %d: a final partial window never trains",
                        self.ts.min_window, self.ts.window_examples)
        self.topic = settings.kafka.topics.examples
        self.dl_topic = settings.kafka.topics.dead_letter
        self.bootstrap = resolve_bootstrap(settings)
        self.metrics = metrics or TrainerMetrics()
        self.on_window = on_window
        self.record_keys = record_keys
        self.clock = clock
        self.ckpt_dir = Path(self.ts.checkpoint_dir)
        self.ckpt_path = self.ckpt_dir / CHECKPOINT_FILE
        self.windows_path = self.ckpt_dir / WINDOWS_FILE
        self.registry = ModelRegistry(self.ts.registry_dir, self.ts.model_name)
        self.cfg = model_config(self.ts)
        self.shadow_cfg = model_config(self.ts, self.ts.compare) if self.ts.compare else None
        self.fields = [f.name for f in self.cfg.fields]
        self.learner = CTRLearner(self.cfg)
        self.shadow = CTRLearner(self.shadow_cfg) if self.shadow_cfg else None
        # state that goes into the checkpoint
        self.run_id = uuid.uuid4().hex
        self.window = 0  # windows trained in total = index of the open window
        self.offsets: dict[int, int] = {}  # next offset per partition after the last trained example
        self.horizon = KeyHorizon(self.ts.dedup_horizon)
        self.serving_version: str | None = None
        self.gate = {"publish": 0, "reject": 0, "reset": 0}
        self.examples_trained = 0
        self.newest_event_time = float("nan")
        self.newest_append_ts = float("nan")
        self.last_window: dict[str, Any] | None = None  # event-time range etc. of the newest trained window
        # in memory only
        self.pos: dict[int, int] = {}  # next offset per partition after the last record read
        self.buffer: list[dict[str, Any]] = []
        self.buf_keys: list[str] = []
        self.buf_bucket: int | None = None
        self.buf_append_max = float("nan")
        self._serving_cache: tuple[str, CTRLearner] | None = None
        self._cand_state: tuple[int, dict[str, Any]] | None = None  # (window it is the candidate for, state)
        self._check_registry_for_window: int | None = None  # after a restore: was window k decided already?
        self._dl_producer: CountingProducer | None = None
        self._consumer: Consumer | None = None
        self.records = self.dead = self.duplicates = 0
        self.windows_this_run = 0

    # ---- checkpoint ----------------------------------------------------------------------------
    def _restore(self) -> None:
        data = load_checkpoint(self.ckpt_path)
        if data is None:
            log.info("no checkpoint in %s: reading %s from the beginning", self.ckpt_dir, self.topic)
            self._trim_windows_file()  # lines of an earlier, discarded run would be stale
            return
        where = f"trainer checkpoint {self.ckpt_path}"
        if data.get("topic") != self.topic:
            raise ConfigError(f"{where} belongs to topic {data.get('topic')!r}, not {self.topic!r}; use another "
                              "--checkpoint-dir")
        try:
            self._load_learner(self.learner, data["learner"], where)
            if self.shadow is not None:
                if data.get("shadow") is None:
                    raise ConfigError(f"{where} has no shadow learner but compare={self.ts.compare!r}; use "
                                      "another --checkpoint-dir or drop --compare")
                self._load_learner(self.shadow, data["shadow"], where + " (shadow)")
            self.run_id = str(data["run_id"])
            self.window = int(data["window"])
            self.offsets = {int(p): int(o) for p, o in data["offsets"].items()}
            self.horizon = KeyHorizon(self.ts.dedup_horizon, list(data["seen_keys"]))
            self.serving_version = data["serving_version"]
            self.gate = dict(data["gate"])
            self.examples_trained = int(data["examples_trained"])
            self.newest_event_time = float(data["newest_event_time"])
            self.newest_append_ts = float(data["newest_append_ts"])
            self.last_window = data.get("last_window")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where} is inconsistent ({type(e).__name__}: {e}); move it away to start "
                              "from scratch") from None
        self.pos = dict(self.offsets)
        self._check_registry_for_window = self.window
        self._trim_windows_file()
        self.metrics.newest_event_time = self.newest_event_time
        log.info("restored checkpoint: %d windows trained, %d examples, serving %s, offsets %s",
                 self.window, self.examples_trained, self.serving_version, sorted(self.offsets.items()))

    def _load_learner(self, learner: CTRLearner, state: dict[str, Any], where: str) -> None:
        if state.get("config") != learner.config.to_dict():
            raise ConfigError(f"{where} was written with a different model configuration (strategy, fields "
                              "or sizes changed); use another --checkpoint-dir or the old settings")
        try:
            learner.load_state_dict(state)
        except Exception as e:
            raise ConfigError(f"{where}: the learner state does not load ({type(e).__name__}: {e})") from None
        problems = learner.validate_state()
        if problems:
            raise ConfigError(f"{where} holds an invalid model: {'; '.join(problems[:5])}")

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

    def checkpoint(self) -> None:
        if self._dl_producer is not None and self._dl_producer.flush(30) > 0:
            raise AdstreamError("dead-letter records could not be delivered; not checkpointing")
        lstate = self.learner.state_dict()
        save_checkpoint(self.ckpt_path, {
            "version": CHECKPOINT_VERSION,
            "topic": self.topic,
            "run_id": self.run_id,
            "window": self.window,
            "offsets": dict(self.offsets),
            "learner": lstate,
            "shadow": self.shadow.state_dict() if self.shadow is not None else None,
            "seen_keys": self.horizon.dump(),
            "serving_version": self.serving_version,
            "gate": dict(self.gate),
            "examples_trained": self.examples_trained,
            "newest_event_time": self.newest_event_time,
            "newest_append_ts": self.newest_append_ts,
            "last_window": self.last_window,
            "written_at": self.clock(),
        })
        # the learner does not change until the next gate scores it: that gate publishes this very
        # state (state_dict() deep-copies the mappers, which costs about a second with large tables)
        self._cand_state = (self.window, lstate)
        if self._consumer is not None and self.offsets:
            tps = [TopicPartition(self.topic, p, o) for p, o in self.offsets.items()]
            try:
                self._consumer.commit(offsets=tps, asynchronous=True)
            except Exception as e:  # monitoring only; the checkpoint is the source of truth
                log.warning("offset commit failed: %s", e)

    # ---- Kafka ---------------------------------------------------------------------------------
    def _update_lag(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        export_lag(consumer, tps,
                   lambda _t, p: self.pos.get(p, 0), self.metrics.worker.consumer_lag, WORKER)

    def _dead_letter(self, part: int, off: int, raw: bytes | None, err: InvalidRecord) -> None:
        self.dead += 1
        self.metrics.worker.dead_letters.labels(WORKER, err.reason).inc()
        if self._dl_producer is None:
            self._dl_producer = make_producer(self.bootstrap, linger_ms=20)
        self._dl_producer.produce(self.dl_topic, dead_letter_record(self.topic, part, off, raw, err),
                                  key=f"{self.topic}:{part}:{off}")
        self._dl_producer.poll(0)
        self.metrics.worker.records_out.labels(WORKER, self.dl_topic).inc()
        log.warning("dead letter %s:%d:%d %s", self.topic, part, off, err)

    # ---- per record ----------------------------------------------------------------------------
    def _handle(self, msg: Any, now: float) -> None:
        part, off = msg.partition(), msg.offset()
        raw = msg.value()
        self.records += 1
        self.metrics.worker.records_in.labels(WORKER, self.topic).inc()
        try:
            ex = decode(raw, Example, now=now)
        except InvalidRecord as err:
            self._dead_letter(part, off, raw, err)
            self.pos[part] = off + 1
            return
        assert isinstance(ex, Example)
        key = ex.key
        if key in self.horizon.keys:
            self.duplicates += 1
            self.metrics.duplicates.inc()
            self.pos[part] = off + 1
            return
        if self.ts.window_seconds is not None:
            bucket = int(math.floor(ex.event_time / self.ts.window_seconds))
            if self.buffer and self.buf_bucket is not None and bucket > self.buf_bucket:
                self._close_window()  # this example opens the next window: offsets exclude it
            if not self.buffer:
                self.buf_bucket = bucket
        self.horizon.add(key)
        self.buffer.append(ex.to_dict())
        self.buf_keys.append(key)
        ts_type, ts_ms = msg.timestamp()
        if ts_type != 0 and ts_ms > 0:
            t = ts_ms / 1000.0
            self.buf_append_max = t if math.isnan(self.buf_append_max) else max(self.buf_append_max, t)
            self.metrics.worker.processing_latency.labels(WORKER).observe(max(0.0, now - t))
        self.pos[part] = off + 1
        if self.ts.window_seconds is None and len(self.buffer) >= self.ts.window_examples:
            self._close_window()

    # ---- one window ----------------------------------------------------------------------------
    def _serving(self) -> tuple[str, CTRLearner] | None:
        """The registry's LATEST as a learner (cached by version; reloaded after a rollback/promote)."""
        from models.registry import RegistryError

        try:
            version = self.registry.latest()
        except RegistryError as e:
            log.warning("registry: %s", e)
            return None
        if version is None:
            return None
        if self._serving_cache is not None and self._serving_cache[0] == version:
            return self._serving_cache
        try:
            state, _info = self.registry.load(version)
            learner = learner_from_state(state)
        except Exception as e:
            log.warning("cannot load serving model %s (%s): gating without it", version, e)
            return None
        self._serving_cache = (version, learner)
        return self._serving_cache

    def _earlier_decision(self, k: int) -> tuple[str, str] | None:
        """After a restart: did this run already decide window k (publish/reject before the crash)?"""
        for rejected, outcome in ((False, "publish"), (True, "reject")):
            d = self.registry.rejected_dir if rejected else self.registry.versions_dir
            for v in reversed(self.registry.versions(rejected=rejected)):
                try:
                    meta = json.loads((d / v / "meta.json").read_text())
                except (OSError, ValueError):
                    continue
                if meta.get("run_id") == self.run_id and meta.get("window") == k:
                    return outcome, v
        return None

    def _close_window(self, partial: bool = False) -> None:
        from models.ctr import CTRLearner, iter_batches, raw_from_examples

        k = self.window
        dicts, keys = self.buffer, self.buf_keys
        append_max = self.buf_append_max
        self.buffer, self.buf_keys, self.buf_bucket, self.buf_append_max = [], [], None, float("nan")
        raw = raw_from_examples(dicts, self.fields, self.cfg.numeric, index_offset=self.examples_trained)
        n = len(raw)
        rec: dict[str, Any] = {"window": k, "examples": n, "partial": partial,
                               "event_time_min": float(raw.times.min()), "event_time_max": float(raw.times.max()),
                               "ctr": float(raw.labels.mean()), "strategy": self.ts.strategy}
        # 1. gate: candidate (trained through k-1) vs serving, both on window k
        t_gate = time.perf_counter()
        if self.learner.windows_trained > 0:
            cand = score(self.learner, raw, dicts, True)
            rec.update(auc=_f(cand["auc"]), logloss=_f(cand["logloss"]), calibration=_f(cand["calibration"]))
            self._set_window_gauges("candidate", cand)
            self._gate(k, rec, cand, raw, dicts, append_max)
        else:
            rec.update(auc=None, logloss=None, calibration=None, gate="none", version=None)
        rec["gate_seconds"] = round(time.perf_counter() - t_gate, 4)
        # 2. shadow learner: next-window metrics, then train it on this window
        if self.shadow is not None:
            if self.shadow.windows_trained > 0:
                sh = score(self.shadow, raw, dicts, True)
                rec.update(shadow_auc=_f(sh["auc"]), shadow_logloss=_f(sh["logloss"]))
                self._set_window_gauges("shadow", sh)
            else:
                rec.update(shadow_auc=None, shadow_logloss=None)
            if self.ts.compare == "retrain":
                self.shadow = CTRLearner(self.shadow_cfg)  # type: ignore[arg-type]
            self.shadow.train_window(iter_batches(raw, self.ts.batch_size), shuffle_seed=self.ts.seed + k)
            rec["shadow_strategy"] = self.ts.compare
        # 3. train on window k
        if self.ts.strategy == "retrain":
            self.learner = CTRLearner(self.cfg)
        stats = self.learner.train_window(iter_batches(raw, self.ts.batch_size), shuffle_seed=self.ts.seed + k)
        rec["train_seconds"] = round(stats.seconds, 4)
        rec["loss"] = _f(stats.loss_mean)
        # 4. bookkeeping, windows.jsonl, checkpoint
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
        rec["serving_version"] = self.serving_version
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
        m.examples_trained.inc(n)
        m.windows_trained.inc()
        m.train_seconds.set(stats.seconds)
        m.newest_event_time = self.newest_event_time
        log.info("window %d: %d examples%s, AUC %s (serving %s%s), LogLoss %s (serving %s), gate %s%s, "
                 "train %.2fs", k, n, " (partial)" if partial else "", _fmt(rec.get("auc")),
                 _fmt(rec.get("serving_auc")),
                 f", {self.ts.compare} {_fmt(rec.get('shadow_auc'))}" if self.shadow is not None else "",
                 _fmt(rec.get("logloss")), _fmt(rec.get("serving_logloss")), rec.get("gate"),
                 f" -> {rec['version']}" if rec.get("version") else "", stats.seconds)

    def _set_window_gauges(self, model: str, s: dict[str, float]) -> None:
        for g, key in ((self.metrics.window_auc, "auc"), (self.metrics.window_logloss, "logloss"),
                       (self.metrics.window_calibration, "calibration")):
            g.labels(model).set(s[key])

    def _gate(self, k: int, rec: dict[str, Any], cand: dict[str, float], raw: RawBatch,
              dicts: list[dict[str, Any]], append_max: float) -> None:
        serving = self._serving()
        sv = None
        if serving is not None:
            self.serving_version = serving[0]  # LATEST may have moved (rollback, promote, another trainer)
            same = [f.name for f in serving[1].config.fields] == self.fields and \
                serving[1].config.numeric == self.cfg.numeric
            sv = score(serving[1], raw, dicts, same)
            rec.update(serving_auc=_f(sv["auc"]), serving_logloss=_f(sv["logloss"]),
                       serving_calibration=_f(sv["calibration"]))
            self._set_window_gauges("serving", sv)
        publish, reason = gate_decision(cand, sv, self.ts.gate_auc_margin, self.ts.gate_logloss_margin)
        earlier = None
        if self._check_registry_for_window == k:
            self._check_registry_for_window = None
            earlier = self._earlier_decision(k)
        if self._cand_state is not None and self._cand_state[0] == k:
            state = self._cand_state[1]
        else:
            state = self.learner.state_dict()
        if earlier is not None:  # decided before a crash: keep that decision, do not store it twice
            publish = earlier[0] == "publish"
            version = earlier[1]
            reason = f"decided before the restart ({reason})"
            if publish and self.registry.latest() != version and serving is not None and serving[0] != version:
                log.warning("window %d was published as %s before the restart; LATEST is now %s", k, version,
                            serving[0])
        else:
            lw = self.last_window or {}
            meta = {"window": k, "trained_through_window": k - 1, "run_id": self.run_id,
                    "auc": _f(cand["auc"]), "logloss": _f(cand["logloss"]), "calibration": _f(cand["calibration"]),
                    "serving_version": serving[0] if serving else None,
                    "serving_auc": rec.get("serving_auc"), "serving_logloss": rec.get("serving_logloss"),
                    "gate_examples": len(raw), "examples": self.examples_trained,
                    "event_time_range": [lw.get("event_time_min"), lw.get("event_time_max")],
                    "gate_event_time_range": [rec["event_time_min"], rec["event_time_max"]],
                    "strategy": self.ts.strategy, "created_at": self.clock(), "gate_reason": reason,
                    "config": self.cfg.to_dict()}
            info = (self.registry.publish if publish else self.registry.reject)(state, meta)
            version = info.version
        outcome = "publish" if publish else "reject"
        self.gate[outcome] += 1
        self.metrics.gate_decisions.labels(outcome).inc()
        rec.update(gate=outcome, gate_reason=reason, version=version)
        if publish:
            self.serving_version = version
            self._serving_cache = (version, learner_from_state(state))
            now = self.clock()
            rec["published_at"] = now
            self.metrics.last_publish = now
            if not math.isnan(self.newest_append_ts):
                fresh = now - self.newest_append_ts
                rec["publish_freshness_s"] = round(fresh, 3)
                self.metrics.publish_freshness.set(fresh)
            return
        log.warning("window %d: candidate rejected (%s), kept as %s", k, reason, version)
        if self.ts.on_reject == "reset" and serving is not None:
            try:
                self.learner.load_state_dict(serving[1].state_dict())
                self.gate["reset"] += 1
                rec["reset_to"] = serving[0]
            except (ValueError, KeyError, RuntimeError) as e:
                log.warning("cannot reset to the serving model %s (%s); continuing from the candidate",
                            serving[0], e)

    # ---- main loop -----------------------------------------------------------------------------
    def run(self, stop_event: threading.Event | None = None) -> dict[str, Any]:
        """Consume and train until ``stop_event`` is set, ``max_windows`` windows were trained in
        this run, or nothing arrived for ``idle_exit_s`` seconds (a final partial window trains when
        it holds at least ``min_window`` examples). Returns a summary dict."""
        stop_event = stop_event or threading.Event()
        self._restore()
        consumer = self._consumer = checkpointed_consumer(self.bootstrap, GROUP_ID, self.settings.kafka)
        ts = self.ts
        reason = "stopped"
        try:
            tps = assign_from(consumer, self.bootstrap, [self.topic], lambda _t, p: self.offsets.get(p))
            log.info("trainer on %s: topic %s (%d partitions), strategy %s%s, %s, registry %s",
                     self.bootstrap, self.topic, len(tps), ts.strategy,
                     f" (shadow {ts.compare})" if ts.compare else "",
                     f"windows of {ts.window_seconds:g}s event time" if ts.window_seconds
                     else f"windows of {ts.window_examples} examples", self.registry.dir)
            last_msg = last_lag = time.monotonic()
            while not stop_event.is_set():
                msgs = consumer.consume(num_messages=1000, timeout=0.1)
                now = self.clock()
                try:
                    for m in msgs:
                        if is_error(m):
                            continue
                        self._handle(m, now)
                        if ts.max_windows is not None and self.windows_this_run >= ts.max_windows:
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
                if ts.idle_exit_s is not None and mono - last_msg >= ts.idle_exit_s:
                    reason = "idle"
                    if len(self.buffer) >= ts.min_window:
                        self._close_window(partial=True)
                    elif self.buffer:
                        log.info("idle: %d examples in the open window (< min_window %d) stay untrained",
                                 len(self.buffer), ts.min_window)
                    break
            if not self.buffer and self.pos != self.offsets:
                # only duplicates / dead letters since the last window: nothing is pending, so the
                # read position itself is safe to checkpoint (they are not read again)
                self.offsets = dict(self.pos)
                self.checkpoint()
            self._update_lag(consumer, tps)
        finally:
            try:
                consumer.close()
            except Exception:
                pass
            self._consumer = None
            if self._dl_producer is not None:
                self._dl_producer.flush(10)
        log.info("trainer stops (%s): %d windows this run, %d in total, serving %s", reason,
                 self.windows_this_run, self.window, self.serving_version)
        return self.summary(reason)

    def summary(self, reason: str = "") -> dict[str, Any]:
        return {"reason": reason, "windows_this_run": self.windows_this_run, "windows": self.window,
                "examples_trained": self.examples_trained, "records": self.records, "duplicates": self.duplicates,
                "dead_letters": self.dead, "published": self.gate["publish"], "rejected": self.gate["reject"],
                "resets": self.gate["reset"], "serving_version": self.serving_version,
                "pending_examples": len(self.buffer), "offsets": dict(self.offsets)}


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def run_trainer(settings: Settings, stop_event: threading.Event | None = None,
                metrics: TrainerMetrics | None = None, metrics_port: int | None = -1,
                threads: int | None = None, **kw: Any) -> dict[str, Any]:
    """Run the stream trainer in this thread; returns the summary dict. ``metrics_port``: -1 =
    settings' ``metrics.trainer_port``, 0 or None = no ``/metrics`` endpoint. ``threads``: torch
    intra-op threads (default: ``trainer.threads``). Other keywords go to :class:`StreamTrainer`."""
    import torch

    torch.set_num_threads(threads or settings.trainer.threads)
    metrics = metrics or TrainerMetrics()
    port = settings.metrics.trainer_port if metrics_port == -1 else metrics_port
    server = metrics.serve(port, host=settings.metrics.host) if port else None
    try:
        return StreamTrainer(settings, metrics=metrics, **kw).run(stop_event)
    finally:
        if server is not None:
            server.shutdown()


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's options (shared by ``python -m streams.trainer`` and ``adstream train``)."""
    w = p.add_mutually_exclusive_group()
    w.add_argument("--window-examples", type=int, metavar="N", help="close a window after N unique examples")
    w.add_argument("--window-seconds", type=float, metavar="S",
                   help="close windows at event-time boundaries every S seconds instead")
    p.add_argument("--min-window", type=int, metavar="N", help="smallest final partial window that trains")
    p.add_argument("--strategy", choices=STRATEGIES, help="update strategy (presets of evaluate-ctr; default ddp)")
    p.add_argument("--compare", choices=STRATEGIES, metavar="STRATEGY",
                   help="also train a shadow learner with this strategy and log its next-window AUC/LogLoss")
    p.add_argument("--backbone", choices=("dcn", "deepfm"))
    p.add_argument("--registry", metavar="DIR", help="model registry directory")
    p.add_argument("--model-name", metavar="NAME", help="model name in the registry (default ctr)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint and windows.jsonl directory")
    p.add_argument("--gate-margin", type=float, metavar="X", help="set both gate margins (AUC and LogLoss)")
    p.add_argument("--gate-auc-margin", type=float, metavar="X", help="publish if AUC >= serving AUC - X")
    p.add_argument("--gate-logloss-margin", type=float, metavar="X",
                   help="publish if LogLoss <= serving LogLoss + X")
    p.add_argument("--on-reject", choices=("reset", "continue"),
                   help="after a rejection: reset the learner to the serving model (default) or continue")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--capacity", type=int, metavar="ROWS", help="rows of the largest embedding table")
    p.add_argument("--max-windows", type=int, metavar="N", help="stop after N windows in this run")
    p.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without new records")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default 1)")
    p.add_argument("--metrics-port", type=int, default=-1, metavar="PORT",
                   help="/metrics port on 127.0.0.1 (default: settings metrics.trainer_port; 0 = off)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    """A copy of ``settings`` with the trainer options given on a command line."""
    upd: dict[str, Any] = {}
    for arg, key in (("window_examples", "window_examples"), ("window_seconds", "window_seconds"),
                     ("min_window", "min_window"), ("strategy", "strategy"), ("compare", "compare"),
                     ("backbone", "backbone"), ("registry", "registry_dir"), ("model_name", "model_name"),
                     ("checkpoint_dir", "checkpoint_dir"), ("on_reject", "on_reject"), ("batch_size", "batch_size"),
                     ("capacity", "capacity"), ("max_windows", "max_windows"), ("idle_exit", "idle_exit_s"),
                     ("threads", "threads"), ("gate_auc_margin", "gate_auc_margin"),
                     ("gate_logloss_margin", "gate_logloss_margin")):
        v = getattr(args, arg, None)
        if v is not None:
            upd[key] = v
    if getattr(args, "gate_margin", None) is not None:
        upd.setdefault("gate_auc_margin", args.gate_margin)
        upd.setdefault("gate_logloss_margin", args.gate_margin)
    if getattr(args, "window_examples", None) is not None:
        upd["window_seconds"] = None
    if not upd:
        return settings
    try:
        tr = TrainerSettings.model_validate({**settings.trainer.model_dump(), **upd})
    except Exception as e:
        raise ConfigError(f"invalid trainer options: {e}") from None
    return settings.model_copy(update={"trainer": tr})


class _DropLibraryInfo(logging.Filter):
    """fbgemm logs every embedding-table construction at INFO on the root logger (dozens of lines
    per model load); keep its warnings, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.levelno < logging.WARNING and "fbgemm" in record.pathname)


def quiet_library_logs() -> None:
    """Install :class:`_DropLibraryInfo` on the root handlers (command-line edges call this)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _DropLibraryInfo) for f in h.filters):
            h.addFilter(_DropLibraryInfo())


def run_from_args(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    import warnings

    quiet_library_logs()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch, once per process
    settings = settings_for(args, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        out = run_trainer(settings, stop, metrics_port=args.metrics_port)
    except KeyboardInterrupt:
        return 130
    print(f"trainer: {out['windows_this_run']} windows this run ({out['windows']} in total), "
          f"{out['examples_trained']} examples trained, {out['published']} published, {out['rejected']} rejected, "
          f"{out['duplicates']} duplicates, {out['dead_letters']} dead letters, serving {out['serving_version']} "
          f"[{out['reason']}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.trainer",
                                description="Train the CTR model on the examples topic, window by window, "
                                "and publish gated versions to the model registry.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        over = {"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {}
        return run_from_args(args, load_settings(args.config, **over))
    except AdstreamError as e:
        print(f"trainer: error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
