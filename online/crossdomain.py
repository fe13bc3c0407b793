"""Cold-start routing in the ad service: DACDR for users who are new to the requested domain.

Per request (``serve.crossdomain_model`` set): the user's behaviour history is read from the history
store (one ``HGETALL``; ``features.history_store``); a user with fewer than
``serve.crossdomain_cold_views`` views in the requested domain is *cold* there, and the served
cross-domain model ranks the ads, reading the user's behaviour in every domain from that history.
Everyone else, and every request when the store or the model is missing or fails, goes to the CTR
model. The choice is in the response and the logged impression (``model_versions["ad_ranker"]``:
``crossdomain`` or ``ctr``, with the reason in ``model_versions["ad_ranker_reason"]``), counted
in ``adstream_serve_ad_ranker_total{ranker, reason}`` and logged at debug level.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Route:
    use_crossdomain: bool
    reason: str  # cold | warm | no_history_store | history_failed | no_model
    history: dict[str, Any] | None = None
    history_s: float = 0.0


class CrossDomainRouter:
    """See the module docstring. ``store``: a history store (``read(user)``); ``loader``: the
    cross-domain model's ``online.models.ModelLoader``."""

    def __init__(self, loader: Any, store: Any, cold_views: int = 1, retry_s: float = 1.0) -> None:
        self.loader = loader
        self.store = store
        self.cold_views = int(cold_views)
        self.retry_s = retry_s
        self._down_until = 0.0
        self.failures = 0

    def route(self, user_id: str, domain: str) -> Route:
        model = self.loader.current if self.loader is not None else None
        if self.store is None:
            return Route(False, "no_history_store")
        if time.monotonic() < self._down_until:
            return Route(False, "history_failed")
        t0 = time.perf_counter()
        try:
            hist = self.store.read(user_id)
        except Exception as e:  # noqa: BLE001 - a store failure sends the request to the CTR model
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_s
            if self.failures <= 5 or self.failures % 1000 == 0:
                log.warning("history read failed (%d so far): %s", self.failures, e)
            return Route(False, "history_failed", None, time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        views = len((hist.get(domain) or {}).get("view") or [])
        if views >= self.cold_views:
            return Route(False, "warm", hist, dt)
        if model is None:
            return Route(False, "no_model", hist, dt)
        return Route(True, "cold", hist, dt)
