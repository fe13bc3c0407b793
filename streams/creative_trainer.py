"""The JAC job on the one stream model worker: AR+ and CR+ trained jointly from ``examples``.

``models.creative.stream.JACStreamModel`` is the plug-in; this module only configures
``streams.model_worker.ModelWorker`` from ``settings.creative`` (docs/creative.md):

- one window of unique examples (``window_examples``, or ``window_seconds`` of event time) is one
  joint update of both halves (one pass, batches of ``batch_size``);
- before it trains, the window is the held-out window of the candidate: both parts are scored on it,
  each against its own serving version (``jac-ar``: AUC + LogLoss; ``jac-cr``: NSCTR + LogLoss),
  and published together (``joint=all``) or each on its own (``joint=each``) under their registry
  names, one version per name per window; a rejection resets the job to the serving versions;
- checkpoint (the full JAC state with both optimizers) with the offsets, atomically, once per window.

``adstream train-creative`` runs it; ``python -m streams.creative_trainer`` too.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

from core.errors import AdstreamError, ConfigError
from core.logs import setup_logging, verbosity_from_env
from core.settings import CreativeSettings, Settings, load_settings
from streams.broker import resolve_bootstrap
from streams.label_guard import label_guard
from streams.model_worker import ModelWorker, WorkerConfig
from streams.trainer import dedup_horizon_s
from streams.worker_metrics import ModelWorkerMetrics

log = logging.getLogger(__name__)

WORKER = "creative-trainer"
GROUP_ID = "adstream-creative-trainer"


def jac_config(cs: CreativeSettings):
    """The stream JAC configuration (the example fields of ``models.creative.config``) with the
    settings' switches."""
    from models.creative.config import JACConfig

    cfg = JACConfig(mode=cs.mode, ste=cs.ste, quant_r=cs.quant_r, buckets=cs.buckets, pctr_source=cs.pctr_source,
                    cr_lr=cs.cr_lr, batch_size=cs.batch_size, seed=cs.seed)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"invalid creative settings: {e}") from None
    return cfg


def jac_model(cs: CreativeSettings):
    from models.creative.stream import JACStreamModel

    return JACStreamModel(jac_config(cs), ar_name=cs.ar_name, cr_name=cs.cr_name)


def worker_config(settings: Settings) -> WorkerConfig:
    cs = settings.creative
    return WorkerConfig(
        topic=settings.kafka.topics.examples, dead_letter_topic=settings.kafka.topics.dead_letter,
        registry_dir=cs.registry_dir, checkpoint_dir=cs.checkpoint_dir, window_examples=cs.window_examples,
        window_seconds=cs.window_seconds, min_window=cs.min_window, on_reject=cs.on_reject, joint=cs.joint,
        gate_margins={"nsctr": cs.gate_nsctr_margin, "auc": cs.gate_auc_margin, "logloss": cs.gate_logloss_margin,
                      "overprediction": cs.gate_calibration_margin, "underprediction": cs.gate_calibration_margin},
        dedup_horizon_s=dedup_horizon_s(settings), dedup_max_keys=settings.trainer.dedup_max_keys,
        max_windows=cs.max_windows, idle_exit_s=cs.idle_exit_s, group_id=GROUP_ID, worker=WORKER)


class CreativeTrainer(ModelWorker):
    """The JAC job on the stream model worker, configured by ``settings``."""

    def __init__(self, settings: Settings, metrics: ModelWorkerMetrics | None = None, **kw: Any) -> None:
        self.settings = settings
        kw.setdefault("guard", label_guard(settings.creative.label_guard))
        super().__init__(jac_model(settings.creative), worker_config(settings), resolve_bootstrap(settings),
                         settings.kafka, metrics=metrics or ModelWorkerMetrics(worker=WORKER), **kw)

    def describe_window(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(records), 1)
        return {"ctr": sum(1 for r in records if r.get("clicked")) / n,
                "with_content": sum(1 for r in records if (r.get("features") or {}).get("cr_layout") is not None) / n}


def run_creative_trainer(settings: Settings, stop_event: threading.Event | None = None,
                         metrics: ModelWorkerMetrics | None = None, metrics_port: int | None = -1,
                         **kw: Any) -> dict[str, Any]:
    """Run the JAC job in this thread; returns the worker's summary. ``metrics_port``: -1 = settings'
    ``metrics.creative_trainer_port``, 0 or None = no ``/metrics`` endpoint."""
    import torch

    torch.set_num_threads(settings.creative.threads)
    metrics = metrics or ModelWorkerMetrics(worker=WORKER)
    port = settings.metrics.creative_trainer_port if metrics_port == -1 else metrics_port
    server = metrics.serve(port, host=settings.metrics.host) if port else None
    try:
        return CreativeTrainer(settings, metrics=metrics, **kw).run(stop_event)
    finally:
        if server is not None:
            server.shutdown()


# --------------------------------------------------------------------------- command line

OPTIONS = (("window_examples", "window_examples"), ("window_seconds", "window_seconds"), ("min_window", "min_window"),
           ("registry", "registry_dir"), ("checkpoint_dir", "checkpoint_dir"), ("mode", "mode"), ("ste", "ste"),
           ("quant_r", "quant_r"), ("buckets", "buckets"), ("pctr_source", "pctr_source"), ("joint", "joint"),
           ("on_reject", "on_reject"), ("batch_size", "batch_size"), ("max_windows", "max_windows"),
           ("idle_exit", "idle_exit_s"), ("threads", "threads"), ("ar_name", "ar_name"), ("cr_name", "cr_name"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_mutually_exclusive_group()
    w.add_argument("--window-examples", type=int, metavar="N", help="close a window after N unique examples")
    w.add_argument("--window-seconds", type=float, metavar="S", help="close windows every S seconds of event time")
    p.add_argument("--min-window", type=int, metavar="N", help="smallest final partial window that trains")
    p.add_argument("--registry", metavar="DIR", help="model registry directory")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint and windows.jsonl directory")
    p.add_argument("--ar-name", metavar="NAME", help="registry name of AR+ (default jac-ar)")
    p.add_argument("--cr-name", metavar="NAME", help="registry name of CR+ (default jac-cr)")
    p.add_argument("--mode", choices=("jac", "cr"), help="jac (AR+ and CR+ jointly) or cr (the creative ranker alone)")
    p.add_argument("--ste", choices=("copy", "interp", "none"), help="straight-through gradient from CR to AR")
    p.add_argument("--quant-r", type=float, metavar="R", help="r of the pCTR quantiser (Eq. 5)")
    p.add_argument("--buckets", type=int, metavar="K", help="pCTR buckets (Eq. 5)")
    p.add_argument("--pctr-source", choices=("cached", "ar", "fixed"),
                   help="the ad pCTR CR+ sees when it serves beside AR+ (docs/creative.md)")
    p.add_argument("--joint", choices=("all", "each"), help="publish AR+ and CR+ together (all) or each on its own")
    p.add_argument("--on-reject", choices=("reset", "continue"))
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--max-windows", type=int, metavar="N", help="stop after N windows in this run")
    p.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without new records")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default 1)")
    p.add_argument("--metrics-port", type=int, default=-1, metavar="PORT",
                   help="/metrics port on 127.0.0.1 (default: metrics.creative_trainer_port; 0 = off)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    upd = {key: getattr(args, arg) for arg, key in OPTIONS if getattr(args, arg, None) is not None}
    if getattr(args, "window_examples", None) is not None:
        upd["window_seconds"] = None
    if not upd:
        return settings
    try:
        cs = CreativeSettings.model_validate({**settings.creative.model_dump(), **upd})
    except Exception as e:
        raise ConfigError(f"invalid creative trainer options: {e}") from None
    return settings.model_copy(update={"creative": cs})


def run_from_args(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import warnings

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    settings = settings_for(args, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        out = run_creative_trainer(settings, stop, metrics_port=args.metrics_port)
    except KeyboardInterrupt:
        return 130
    print(f"creative trainer: {out.get('windows_this_run')} windows this run ({out.get('windows')} in total), "
          f"{out.get('examples_trained')} examples, {out.get('published')} published, {out.get('rejected')} rejected, "
          f"serving {out.get('serving_version')} [{out.get('reason')}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.creative_trainer",
                                description="Train JAC (AR+ and CR+) on the examples topic, window by window, "
                                "and publish both halves, gated, to the model registry.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers")
    add_arguments(p)
    args = p.parse_args(argv)
    setup_logging(verbosity_from_env())
    try:
        over = {"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {}
        return run_from_args(args, load_settings(args.config, **over))
    except AdstreamError as e:
        print(f"creative trainer: error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
