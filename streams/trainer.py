"""The stream trainer: the CTR model (``models.ctr.stream.CTRStreamModel``) on the one stream model
worker (``streams.model_worker``): labelled examples from Kafka -> windows -> incremental CTR updates
-> gated model versions in the registry.

This module only maps the settings (``trainer:`` section) onto the worker and the model: the CTR
configuration of a strategy (the presets of ``adstream evaluate-ctr``) with the stream field policy
below, the gate margins, an optional shadow learner (``compare``) and the de-duplication horizon,
and it holds the command line (``adstream train``, ``python -m streams.trainer``). Windows, de-dup,
gate, publish, checkpoint and metrics are the worker's (docs/trainer.md).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from core.errors import AdstreamError, ConfigError
from core.logs import setup_logging, verbosity_from_env
from core.settings import Settings, TrainerSettings, load_settings
from streams.broker import resolve_bootstrap
from streams.label_guard import label_guard
from streams.model_worker import ModelWorker, WorkerConfig, run_worker
from streams.worker_metrics import ModelWorkerMetrics

if TYPE_CHECKING:
    from models.ctr import CTRConfig, CTRLearner, FieldConfig

log = logging.getLogger(__name__)

WORKER = "trainer"
GROUP_ID = "adstream-trainer"
DAY = 86400.0
DEDUP_SLACK_S = 120.0  # beyond the joiner's attribution window + lateness
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


def ctr_model(ts: TrainerSettings, strategy: str | None = None, name: str | None = None):
    """The CTR StreamModel of a strategy (the trainer's settings)."""
    from models.ctr.stream import CTRStreamModel

    strategy = strategy or ts.strategy
    return CTRStreamModel(model_config(ts, strategy), name=name or ts.model_name, strategy=strategy,
                          batch_size=ts.batch_size)


def dedup_horizon_s(settings: Settings) -> float:
    """The trainer's de-duplication horizon: set, or the joiner's re-emission horizon + slack."""
    ts = settings.trainer
    if ts.dedup_horizon_s is not None:
        return float(ts.dedup_horizon_s)
    return settings.join.attribution_window_s + settings.join.allowed_lateness_s + DEDUP_SLACK_S


def worker_config(settings: Settings) -> WorkerConfig:
    """The worker's configuration from the settings."""
    ts = settings.trainer
    return WorkerConfig(
        topic=settings.kafka.topics.examples, dead_letter_topic=settings.kafka.topics.dead_letter,
        registry_dir=ts.registry_dir, checkpoint_dir=ts.checkpoint_dir, window_examples=ts.window_examples,
        window_seconds=ts.window_seconds, min_window=ts.min_window, on_reject=ts.on_reject,
        gate_margins={"auc": ts.gate_auc_margin, "logloss": ts.gate_logloss_margin,
                      "overprediction": ts.gate_calibration_margin, "underprediction": ts.gate_calibration_margin},
        dedup_horizon_s=dedup_horizon_s(settings), dedup_max_keys=ts.dedup_max_keys,
        max_windows=ts.max_windows, idle_exit_s=ts.idle_exit_s, group_id=GROUP_ID, worker=WORKER,
        skip_stages=("close",) if ts.train_at_click else ("click",))


# --------------------------------------------------------------------------- the CTR worker


class TrainerMetrics(ModelWorkerMetrics):
    """The stream trainer's metrics (``streams.worker_metrics``: labelled by model name)."""

    def __init__(self, worker_metrics: Any = None) -> None:
        super().__init__(worker_metrics, worker=WORKER)


class CTRTrainer(ModelWorker):
    """The CTR model (``CTRStreamModel``, + a shadow learner with ``compare``) on the stream model
    worker, configured by ``settings``. Keywords go to :class:`streams.model_worker.ModelWorker`."""

    def __init__(self, settings: Settings, metrics: ModelWorkerMetrics | None = None, **kw: Any) -> None:
        ts = self.ts = settings.trainer
        self.settings = settings
        shadows = {"shadow": ctr_model(ts, ts.compare, name=f"{ts.model_name}-shadow")} if ts.compare else None
        kw.setdefault("guard", label_guard(ts.label_guard))
        super().__init__(ctr_model(ts), worker_config(settings), resolve_bootstrap(settings), settings.kafka,
                         shadows=shadows, metrics=metrics or TrainerMetrics(), **kw)

    @property
    def learner(self) -> CTRLearner:
        return self.model.learner

    @property
    def shadow(self) -> CTRLearner | None:
        sh = self.shadows.get("shadow")
        return sh.learner if sh is not None else None

    def _restore(self) -> None:
        self.restore()

    def describe_window(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"ctr": sum(1 for r in records if r.get("clicked")) / len(records), "strategy": self.ts.strategy}
        if self.ts.compare:
            out["shadow_strategy"] = self.ts.compare
        return out


StreamTrainer = CTRTrainer


def run_trainer(settings: Settings, stop_event: threading.Event | None = None,
                metrics: TrainerMetrics | None = None, metrics_port: int | None = -1,
                threads: int | None = None, **kw: Any) -> dict[str, Any]:
    """Run the stream trainer in this thread; returns the summary dict. ``metrics_port``: -1 =
    settings' ``metrics.trainer_port``, 0 or None = no ``/metrics`` endpoint. ``threads``: torch
    intra-op threads (default: ``trainer.threads``). Other keywords go to :class:`StreamTrainer`."""
    import torch

    torch.set_num_threads(threads or settings.trainer.threads)
    port = settings.metrics.trainer_port if metrics_port == -1 else metrics_port
    worker = StreamTrainer(settings, metrics=metrics or TrainerMetrics(), **kw)
    return run_worker(worker, stop_event, port, host=settings.metrics.host)


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
    p.add_argument("--gate-calibration-margin", type=float, metavar="X",
                   help="publish if the candidate over- (under-) predicts the window's clicks by at most a factor "
                   "e^X more than the serving model (log scale; 0.4 = 1.5x)")
    p.add_argument("--on-reject", choices=("reset", "continue"),
                   help="after a rejection: reset the learner to the serving model (default) or continue")
    p.add_argument("--label-guard", type=float, metavar="RATIO",
                   help="hold a window whose click rate is RATIO x the recent windows' (and 4 standard errors above) "
                   "as suspect and reject the candidate that learned it (default 4; 0 = off)")
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
                     ("gate_logloss_margin", "gate_logloss_margin"),
                     ("gate_calibration_margin", "gate_calibration_margin")):
        v = getattr(args, arg, None)
        if v is not None:
            upd[key] = v
    if getattr(args, "gate_margin", None) is not None:
        upd.setdefault("gate_auc_margin", args.gate_margin)
        upd.setdefault("gate_logloss_margin", args.gate_margin)
    if getattr(args, "label_guard", None) is not None:
        upd["label_guard"] = {**settings.trainer.label_guard.model_dump(), "ratio": args.label_guard or None}
    if getattr(args, "window_examples", None) is not None:
        upd["window_seconds"] = None
    if not upd:
        return settings
    try:
        tr = TrainerSettings.model_validate({**settings.trainer.model_dump(), **upd})
    except Exception as e:
        raise ConfigError(f"invalid trainer options: {e}") from None
    return settings.model_copy(update={"trainer": tr})


def run_from_args(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    import warnings

    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch, once per process
    settings = settings_for(args, settings)
    log.info("trainer: examples come from the joiner (join settings as configured here: %s); a window closes "
             "after %s", settings.join.delay_note(), f"{settings.trainer.window_seconds:g}s of event time"
             if settings.trainer.window_seconds else f"{settings.trainer.window_examples} examples")
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
    setup_logging(verbosity_from_env())
    try:
        over = {"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {}
        return run_from_args(args, load_settings(args.config, **over))
    except AdstreamError as e:
        print(f"trainer: error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
