"""The creative-image jobs on the stream model worker (docs/images.md).

* ``gate``: the availability gate (``models.creative_image.gate``) learns from the ``creatives``
  topic (catalogue records; those with a review label teach it) and publishes ``creative-gate``
  versions gated on broken-creative F1 of the next window.
* ``reward``: the pairwise reward model (``models.creative_image.reward``) learns click statistics
  from the ``examples`` topic, window by window, while a follower thread reads the whole ``creatives``
  topic (a changelog: from the beginning, no consumer group) and hands each catalogue record to
  ``observe_catalogue`` (the creative's image and text features). Publishes ``creative-reward``
  versions gated on the next window's pairwise accuracy.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.errors import ConfigError, InvalidRecord
from core.events import CreativeChange, decode
from core.settings import Settings
from streams.broker import resolve_bootstrap
from streams.inventory_feed import InventoryFeed
from streams.model_worker import Decoded, ModelWorker, WorkerConfig, run_worker
from streams.trainer import dedup_horizon_s
from streams.worker_metrics import ModelWorkerMetrics

log = logging.getLogger(__name__)

JOBS = ("gate", "reward")


def decode_creative(raw: bytes | None, now: float) -> Decoded:
    """The ``creatives`` topic: ``CreativeChange`` -> (``creative:action:time``, event time, dict). An
    image that is not a decodable PNG is an invalid record (a dead letter with the reason)."""
    from core.images import from_png

    ev = decode(raw, CreativeChange, now=now)
    assert isinstance(ev, CreativeChange)
    for name in ("image", "product_image"):
        text = getattr(ev, name)
        if text:
            try:
                from_png(text)
            except ValueError as e:
                raise InvalidRecord("invalid_value", f"creative_change.{name}: {e}") from None
    return f"{ev.creative_id}:{ev.action}:{ev.event_time:.6f}", ev.event_time, ev.to_dict()


def _model(job: str, settings: Settings) -> Any:
    cs = settings.creatives
    if job == "gate":
        from models.creative_image.gate import AvailabilityGate, GateConfig

        return AvailabilityGate(GateConfig(encoder=cs.encoder, size=cs.size, tau=cs.tau), name=cs.gate_model)
    if job == "reward":
        from models.creative_image.reward import CreativeRewardModel, RewardConfig

        return CreativeRewardModel(RewardConfig(encoder=cs.encoder if cs.encoder == "classical" else "classical",
                                                size=cs.size), name=cs.reward_model)
    raise ConfigError(f"unknown creative job {job!r}; choose from {JOBS}")


def worker_config(job: str, settings: Settings) -> WorkerConfig:
    cs, topics = settings.creatives, settings.kafka.topics
    ckpt = cs.checkpoint_dir / job
    if job == "gate":
        return WorkerConfig(topic=topics.creatives, dead_letter_topic=topics.dead_letter, registry_dir=cs.registry_dir,
                            checkpoint_dir=ckpt, window_examples=cs.gate_window, min_window=cs.min_window,
                            on_reject=cs.on_reject, dedup_horizon_s=86400.0 * 365, max_windows=cs.max_windows,
                            idle_exit_s=cs.idle_exit_s, group_id="adstream-creative-gate", worker="creative_gate",
                            decoder=decode_creative)
    return WorkerConfig(topic=topics.examples, dead_letter_topic=topics.dead_letter, registry_dir=cs.registry_dir,
                        checkpoint_dir=ckpt, window_examples=cs.reward_window, min_window=cs.min_window,
                        on_reject=cs.on_reject, dedup_horizon_s=dedup_horizon_s(settings),
                        max_windows=cs.max_windows, idle_exit_s=cs.idle_exit_s, group_id="adstream-creative-reward",
                        worker="creative_reward")


class CreativeJob(ModelWorker):
    """A creative-image job (``gate`` or ``reward``) on the stream model worker."""

    def __init__(self, job: str, settings: Settings, metrics: ModelWorkerMetrics | None = None, **kw: Any) -> None:
        self.job = job
        self.settings = settings
        cfg = worker_config(job, settings)
        super().__init__(_model(job, settings), cfg, resolve_bootstrap(settings), settings.kafka,
                         metrics=metrics or ModelWorkerMetrics(worker=cfg.worker), **kw)
        self.catalogue: InventoryFeed | None = None

    def _observe(self, change: CreativeChange) -> None:
        self.model.observe_catalogue([change.to_dict()])

    def restore(self) -> None:
        super().restore()
        if self.job == "reward" and self.catalogue is None:
            # the model object is final after restore: follow the catalogue into it
            self.catalogue = InventoryFeed(self.bootstrap, self.settings.kafka.topics.creatives, self._observe,
                                           expected=CreativeChange).start()
            if not self.catalogue.wait_caught_up(60.0):
                log.warning("creative catalogue not caught up after 60 s: training goes on, features arrive later")

    def stop_catalogue(self) -> None:
        if self.catalogue is not None:
            self.catalogue.stop()
            self.catalogue = None


def run_creative_job(job: str, settings: Settings, stop_event: threading.Event | None = None,
                     metrics_port: int | None = None, **kw: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(settings.creatives.threads)
    w = CreativeJob(job, settings, **kw)
    try:
        return run_worker(w, stop_event, metrics_port, host=settings.metrics.host)
    finally:
        w.stop_catalogue()
