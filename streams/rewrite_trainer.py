"""The rewrite job on the one stream model worker: MoBGM (``rewriter``) and GRAM (``gram``)
refreshed from ``examples`` (docs/rewrite.md).

``models.rewrite.stream.RewriteJob`` is the plug-in; this module only configures
``streams.model_worker.ModelWorker`` from ``settings.rewrite``:

- a window of unique examples (``window_examples``, or ``window_seconds`` of event time) is one
  refresh: the first windows wait for ``min_bootstrap_clicks`` clicks and then bootstrap both models
  (tokenizer, post-pre-training on query ↔ title pairs when a catalog is set, SFT, discriminator,
  one DPO round; GRAM's co-training and index); later windows add the window's new click pairs (SFT
  for the rewriter, code rows for GRAM, new ads indexed) and, every ``dpo_every`` windows, a DPO
  round with the current policy as the reference;
- before it trains, each window is the held-out window of the candidates: ``rewriter`` (click hit@k)
  and ``gram`` (click recall@k) are scored on it against their serving versions and published each
  on its own (``joint=each``) under their registry names; a rejection resets that part;
- one checkpoint with the offsets, atomically, per window.

``adstream train-rewrite`` runs it; ``python -m streams.rewrite_trainer`` too.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

from core.errors import AdstreamError, ConfigError
from core.logs import setup_logging, verbosity_from_env
from core.settings import RewriteTrainSettings, Settings, load_settings
from streams.broker import resolve_bootstrap
from streams.model_worker import ModelWorker, WorkerConfig
from streams.trainer import dedup_horizon_s
from streams.worker_metrics import ModelWorkerMetrics

log = logging.getLogger(__name__)

WORKER = "rewrite-trainer"
GROUP_ID = "adstream-rewrite-trainer"


def rewrite_job(rs: RewriteTrainSettings):
    """The job the settings describe (imports torch)."""
    from dataclasses import replace

    from models.rewrite.catalog import load_catalog
    from models.rewrite.gram import GramConfig
    from models.rewrite.mobgm import MoBGMConfig
    from models.rewrite.stream import GramStreamModel, RefreshConfig, RewriteJob, RewriterStreamModel

    catalog = load_catalog(rs.catalog)
    refresh = RefreshConfig(min_bootstrap_clicks=rs.min_bootstrap_clicks, sft_epochs=rs.sft_epochs,
                            dpo_every=rs.dpo_every)
    x = rs.epochs_scale
    mc = MoBGMConfig(seed=rs.seed)
    mc = replace(mc, ppt_epochs=max(1, round(mc.ppt_epochs * x)), sft_epochs=max(1, round(mc.sft_epochs * x)),
                 dpo_epochs=max(1, round(mc.dpo_epochs * x)), disc=replace(mc.disc, epochs=max(1, round(mc.disc.epochs * x))))
    gc = GramConfig(seed=rs.seed)
    gc = replace(gc, epochs=max(1, round(gc.epochs * x)))
    titles = {a: t for a, (t, _c) in catalog.items() if t}
    rewriter = RewriterStreamModel(mc, refresh, titles, name=rs.rewriter_name)
    gram = GramStreamModel(gc, refresh, catalog, name=rs.gram_name) if rs.gram_name else None
    if rs.gram_name and rs.gram_name == rs.rewriter_name:
        raise ConfigError("rewrite.rewriter_name and rewrite.gram_name must differ")
    return RewriteJob(rewriter, gram)


def worker_config(settings: Settings) -> WorkerConfig:
    rs = settings.rewrite
    return WorkerConfig(
        topic=settings.kafka.topics.examples, dead_letter_topic=settings.kafka.topics.dead_letter,
        registry_dir=rs.registry_dir, checkpoint_dir=rs.checkpoint_dir, window_examples=rs.window_examples,
        window_seconds=rs.window_seconds, min_window=rs.min_window, on_reject=rs.on_reject, joint=rs.joint,
        gate_margins={"click_hit": rs.gate_click_hit_margin, "click_recall": rs.gate_click_recall_margin},
        dedup_horizon_s=dedup_horizon_s(settings), dedup_max_keys=settings.trainer.dedup_max_keys,
        max_windows=rs.max_windows, idle_exit_s=rs.idle_exit_s, group_id=GROUP_ID, worker=WORKER)


class RewriteTrainer(ModelWorker):
    """The rewrite job on the stream model worker, configured by ``settings``."""

    def __init__(self, settings: Settings, metrics: ModelWorkerMetrics | None = None, **kw: Any) -> None:
        self.settings = settings
        super().__init__(rewrite_job(settings.rewrite), worker_config(settings), resolve_bootstrap(settings),
                         settings.kafka, metrics=metrics or ModelWorkerMetrics(worker=WORKER), **kw)

    def describe_window(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(records), 1)
        clicks = sum(1 for r in records if r.get("clicked"))
        return {"ctr": clicks / n, "clicks": clicks, "queries": len({r.get("query") for r in records})}


def run_rewrite_trainer(settings: Settings, stop_event: threading.Event | None = None,
                        metrics: ModelWorkerMetrics | None = None, metrics_port: int | None = -1,
                        **kw: Any) -> dict[str, Any]:
    """Run the rewrite job in this thread; returns the worker's summary. ``metrics_port``: -1 =
    settings' ``metrics.rewrite_trainer_port``, 0 or None = no ``/metrics`` endpoint."""
    import torch

    torch.set_num_threads(settings.rewrite.threads)
    metrics = metrics or ModelWorkerMetrics(worker=WORKER)
    port = settings.metrics.rewrite_trainer_port if metrics_port == -1 else metrics_port
    server = metrics.serve(port, host=settings.metrics.host) if port else None
    try:
        return RewriteTrainer(settings, metrics=metrics, **kw).run(stop_event)
    finally:
        if server is not None:
            server.shutdown()


# --------------------------------------------------------------------------- command line

OPTIONS = (("window_examples", "window_examples"), ("window_seconds", "window_seconds"), ("min_window", "min_window"),
           ("registry", "registry_dir"), ("checkpoint_dir", "checkpoint_dir"), ("catalog", "catalog"),
           ("rewriter_name", "rewriter_name"), ("gram_name", "gram_name"), ("min_bootstrap_clicks", "min_bootstrap_clicks"),
           ("sft_epochs", "sft_epochs"), ("dpo_every", "dpo_every"), ("epochs_scale", "epochs_scale"),
           ("joint", "joint"), ("on_reject", "on_reject"), ("max_windows", "max_windows"),
           ("idle_exit", "idle_exit_s"), ("threads", "threads"), ("seed", "seed"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_mutually_exclusive_group()
    w.add_argument("--window-examples", type=int, metavar="N", help="close a window after N unique examples")
    w.add_argument("--window-seconds", type=float, metavar="S", help="close windows every S seconds of event time")
    p.add_argument("--min-window", type=int, metavar="N", help="smallest final partial window that trains")
    p.add_argument("--registry", metavar="DIR", help="model registry directory")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint and windows.jsonl directory")
    p.add_argument("--catalog", metavar="SPEC", help="ad titles: world:SEED or a file with ad_id,title[,category]")
    p.add_argument("--rewriter-name", metavar="NAME", help="registry name of the MoBGM rewriter (default rewriter)")
    p.add_argument("--gram-name", metavar="NAME", help="registry name of GRAM (default gram; '' = no GRAM)")
    p.add_argument("--min-bootstrap-clicks", type=int, metavar="N", help="clicks the first models are trained from")
    p.add_argument("--sft-epochs", type=int, metavar="N", help="SFT passes per window over new pairs + replay")
    p.add_argument("--dpo-every", type=int, metavar="N", help="windows between DPO rounds (0: bootstrap only)")
    p.add_argument("--epochs-scale", type=float, metavar="X", help="scale the bootstrap's epochs (quick demos)")
    p.add_argument("--joint", choices=("all", "each"), help="publish both together (all) or each on its own")
    p.add_argument("--on-reject", choices=("reset", "continue"))
    p.add_argument("--max-windows", type=int, metavar="N", help="stop after N windows in this run")
    p.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without new records")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, metavar="N")
    p.add_argument("--metrics-port", type=int, default=-1, metavar="PORT",
                   help="/metrics port on 127.0.0.1 (default: metrics.rewrite_trainer_port; 0 = off)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    upd = {key: getattr(args, arg) for arg, key in OPTIONS if getattr(args, arg, None) is not None}
    if getattr(args, "window_examples", None) is not None:
        upd["window_seconds"] = None
    if not upd:
        return settings
    try:
        rs = RewriteTrainSettings.model_validate({**settings.rewrite.model_dump(), **upd})
    except Exception as e:
        raise ConfigError(f"invalid rewrite trainer options: {e}") from None
    return settings.model_copy(update={"rewrite": rs})


def run_from_args(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    settings = settings_for(args, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        out = run_rewrite_trainer(settings, stop, metrics_port=args.metrics_port)
    except KeyboardInterrupt:
        return 130
    print(f"rewrite trainer: {out.get('windows_this_run')} windows this run ({out.get('windows')} in total), "
          f"{out.get('examples_trained')} examples, {out.get('published')} published, {out.get('rejected')} rejected, "
          f"serving {out.get('serving_version')} [{out.get('reason')}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.rewrite_trainer",
                                description="Refresh the MoBGM rewriter and GRAM from the examples topic, window by "
                                "window, and publish each, gated, to the model registry.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers")
    add_arguments(p)
    args = p.parse_args(argv)
    setup_logging(verbosity_from_env())
    try:
        over = {"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {}
        return run_from_args(args, load_settings(args.config, **over))
    except AdstreamError as e:
        print(f"rewrite trainer: error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
