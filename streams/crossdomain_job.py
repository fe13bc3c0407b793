"""The cross-domain job: DACDR (``models.crossdomain``) on the stream model worker.

Examples from the ``examples`` topic -> windows -> ``DACDRModel.learn`` (every domain's examples
fold into the per-user, per-domain behaviour history; the loss is on the variant's training domains)
-> gated versions under ``crossdomain.model_name`` in the registry. Windows, de-dup, gate (cold-start
AUC and LogLoss on the next window), publish, checkpoint and metrics are the worker's
(``streams.model_worker``).

After every window the histories of the users in it are pushed to the history store
(``crossdomain.history_store = redis``: ``features.history_store``), where the online service reads
them to decide whether a user is cold in the requested domain and to give DACDR the user's
behaviour. The job is the one place examples are folded into histories, so training and serving see
the same fold.

New domains: ``--add-domain NAME`` (repeatable) adds a domain row to a restored model, freezing the
shared tables (``--freeze tables|all|none``) for the fine-tune that follows.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

from core.errors import ConfigError
from core.settings import Settings
from streams.broker import resolve_bootstrap
from streams.model_worker import ModelWorker, WorkerConfig, run_worker
from streams.trainer import dedup_horizon_s
from streams.worker_metrics import ModelWorkerMetrics

log = logging.getLogger(__name__)

WORKER = "crossdomain"
GROUP_ID = "adstream-crossdomain"


def dacdr_config(settings: Settings):
    from models.crossdomain.config import DACDRConfig

    xs = settings.crossdomain
    targets = list(xs.target_domains) or (xs.domains[1:2] if len(xs.domains) > 1 else xs.domains[:1])
    return DACDRConfig.variant(
        xs.variant, targets, item_fields=list(xs.item_fields), context_fields=list(xs.context_fields),
        domains=list(xs.domains), dim=xs.dim, max_len=xs.max_len, emb_lr=xs.emb_lr, dense_lr=xs.dense_lr,
        epochs=xs.epochs, cold_threshold=xs.cold_threshold, seed=xs.seed)


def worker_config(settings: Settings) -> WorkerConfig:
    xs = settings.crossdomain
    return WorkerConfig(
        topic=settings.kafka.topics.examples, dead_letter_topic=settings.kafka.topics.dead_letter,
        registry_dir=xs.registry_dir, checkpoint_dir=xs.checkpoint_dir, window_examples=xs.window_examples,
        min_window=xs.min_window, on_reject=xs.on_reject,
        gate_margins={"auc_cold": xs.gate_cold_auc_margin, "logloss": xs.gate_logloss_margin},
        dedup_horizon_s=dedup_horizon_s(settings), max_windows=xs.max_windows, idle_exit_s=xs.idle_exit_s,
        group_id=GROUP_ID, worker=WORKER)


def history_store(settings: Settings) -> Any:
    if settings.crossdomain.history_store == "redis":
        from features.history_store import RedisHistoryStore

        return RedisHistoryStore(settings.features.redis_url)
    return None


class CrossDomainJob(ModelWorker):
    """DACDR on the stream model worker, configured by ``settings``; ``history`` (a history store)
    receives the histories of each window's users. Keywords go to ``ModelWorker``."""

    def __init__(self, settings: Settings, history: Any = None, add_domains: list[str] | None = None,
                 freeze: str | None = "tables", metrics: ModelWorkerMetrics | None = None, **kw: Any) -> None:
        from models.crossdomain.model import DACDRModel

        self.settings = settings
        self.history_store = history
        self.add_domains = list(add_domains or [])
        self.freeze = freeze
        self.pushed = 0
        self.push_failures = 0
        model = DACDRModel(dacdr_config(settings), name=settings.crossdomain.model_name)
        user_cb = kw.pop("on_window", None)

        def on_window(rec: dict[str, Any]) -> None:
            if user_cb is not None:
                user_cb(rec)

        super().__init__(model, worker_config(settings), resolve_bootstrap(settings), settings.kafka,
                         metrics=metrics or ModelWorkerMetrics(worker=WORKER), on_window=on_window, **kw)

    def restore(self) -> None:
        super().restore()
        for d in self.add_domains:
            if d not in self.model.domains:
                self.model.add_domain(d, freeze_shared=self.freeze)
                log.info("added domain %r (shared parts frozen: %s); known domains %s", d, self.freeze,
                         self.model.domains)

    def describe_window(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        doms: dict[str, int] = {}
        for r in records:
            d = str(r.get("domain"))
            doms[d] = doms.get(d, 0) + 1
        return {"domains": doms}

    def _close_window(self, partial: bool = False) -> None:
        users = {str(r.get("user_id")) for r in self.buffer}
        t_max = max((float(r.get("event_time") or 0.0) for r in self.buffer), default=None)
        super()._close_window(partial)
        if self.history_store is not None and users:
            try:
                self.pushed += self.history_store.write(self.model.history, users, t_max)
            except Exception as e:  # noqa: BLE001 - the store being down must not stop training
                self.push_failures += 1
                log.warning("history push failed (%d so far): %s", self.push_failures, e)


def run_crossdomain(settings: Settings, stop_event: threading.Event | None = None, metrics_port: int | None = None,
                    add_domains: list[str] | None = None, freeze: str | None = "tables", **kw: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(settings.crossdomain.threads)
    job = CrossDomainJob(settings, history=history_store(settings), add_domains=add_domains, freeze=freeze, **kw)
    out = run_worker(job, stop_event, metrics_port, host=settings.metrics.host)
    out["histories_pushed"] = job.pushed
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domains", metavar="D1,D2", help="known domains in row order (crossdomain.domains)")
    p.add_argument("--target", metavar="D", help="target domain(s) of dacdr-target / single")
    p.add_argument("--variant", choices=["dacdr", "dacdr-target", "single", "pooled"])
    p.add_argument("--add-domain", action="append", default=[], metavar="NAME",
                   help="add a domain row to the restored model before training on (repeatable)")
    p.add_argument("--freeze", choices=["tables", "all", "none"], default="tables",
                   help="with --add-domain: what stays frozen during the fine-tune")
    p.add_argument("--window", type=int, metavar="N", help="examples per window")
    p.add_argument("--registry-dir", metavar="DIR")
    p.add_argument("--checkpoint-dir", metavar="DIR")
    p.add_argument("--history-store", choices=["none", "redis"], help="push histories (features.redis_url)")
    p.add_argument("--max-windows", type=int, metavar="N")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without records")
    p.add_argument("--metrics-port", type=int, default=0, help="/metrics port (0: none)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    upd: dict[str, Any] = {}
    if args.domains:
        upd["domains"] = [d.strip() for d in args.domains.split(",") if d.strip()]
    if args.target:
        upd["target_domains"] = [d.strip() for d in args.target.split(",") if d.strip()]
    for k, a in (("variant", "variant"), ("window_examples", "window"), ("registry_dir", "registry_dir"),
                 ("checkpoint_dir", "checkpoint_dir"), ("history_store", "history_store"),
                 ("max_windows", "max_windows"), ("idle_exit_s", "idle_exit")):
        v = getattr(args, a, None)
        if v is not None:
            upd[k] = v
    xs = settings.crossdomain.model_copy(update=upd)
    if len(set(xs.domains)) != len(xs.domains):
        raise ConfigError(f"--domains has duplicates: {xs.domains}")
    return settings.model_copy(update={"crossdomain": xs})
