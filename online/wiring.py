"""The optional serving parts, built from ``ServeSettings``: the creative catalogue with the gate, the
creative reward model and cold-start routing to the cross-domain model (one ``ModelLoader`` per
published model name, the same loader the CTR model uses). ``adstream serve`` feeds the catalogue
from the ``creatives`` topic and passes :attr:`Extras.service_kwargs` to the ``AdService``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.settings import ServeSettings
from online.creatives import CreativeCatalogue, RewardBlender
from online.crossdomain import CrossDomainRouter
from online.index import AdIndex
from online.models import ModelLoader

log = logging.getLogger(__name__)


def _gate(state: dict) -> Any:
    from models.creative_image.gate import AvailabilityGate

    return AvailabilityGate.from_state(state)


def _reward(state: dict) -> Any:
    from models.creative_image.reward import CreativeRewardModel

    return CreativeRewardModel.from_state(state)


def _dacdr(state: dict) -> Any:
    from models.crossdomain.model import DACDRModel

    return DACDRModel.from_state(state)


@dataclass
class Extras:
    catalogue: CreativeCatalogue | None = None
    reward: RewardBlender | None = None
    router: CrossDomainRouter | None = None
    loaders: dict[str, ModelLoader] = field(default_factory=dict)
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def service_kwargs(self) -> dict[str, Any]:
        return {"catalogue": self.catalogue, "reward": self.reward, "crossdomain": self.router}


def serving_extras(serve: ServeSettings, index: AdIndex | None, registry_root: str | Path | None = None,
                   redis_url: str = "127.0.0.1:6379", start: bool = True) -> Extras:
    """See the module docstring. ``start``: load what is published now and start the pollers."""
    root = registry_root or serve.registry_dir
    ex = Extras()

    def loader(name: str, build: Callable[[dict], Any]) -> ModelLoader:
        ld = ModelLoader(root, name, serve.model_poll_s, build=build)
        if start:
            ld.refresh()
            ld.start()
        ex.loaders[name] = ld
        ex.closers.append(ld.stop)
        return ld

    gate_loader = loader(serve.creative_gate_model, _gate) if serve.creative_gate_model else None
    if serve.creative_gate != "off" or gate_loader is not None or serve.creative_reward != "off":
        ex.catalogue = CreativeCatalogue(serve.creative_gate, index, gate_loader)
    if serve.creative_reward != "off":
        ex.reward = RewardBlender(serve.creative_reward, loader(serve.creative_reward_model, _reward), ex.catalogue,
                                  serve.creative_reward_weight)
    if serve.crossdomain_model:
        store = None
        if serve.history_store == "redis":
            from features.history_store import RedisHistoryStore

            store = RedisHistoryStore(redis_url, timeout_s=serve.history_timeout_s)
            ex.closers.append(store.close)
        else:
            log.warning("serve.crossdomain_model is set but serve.history_store is none: no user is routed")
        ex.router = CrossDomainRouter(loader(serve.crossdomain_model, _dacdr), store, serve.crossdomain_cold_views)
    return ex
