"""Serving models: the ad CTR ranker (hot-swapped from the registry) and the creative ranker.

:class:`ModelLoader` polls the registry's ``LATEST`` pointer from its own thread. A new version is
loaded, rebuilt and warmed (one prediction) off the request path, then put in place with a single
reference assignment (``self._current = loaded``). A request reads ``loader.current`` once and uses
that object to the end, so in-flight requests finish on the version they started with.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from models.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One loaded CTR model version. ``predict`` is serialised per version (the learner toggles
    train/eval mode around its forward pass)."""

    version: str
    learner: Any
    created_at: float | None
    loaded_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, examples: Sequence[dict[str, Any]]) -> np.ndarray:
        raw = examples_to_raw(examples, self.learner.fields, self.learner.config.numeric)
        with self._lock:
            return self.learner.predict(raw)


def examples_to_raw(examples: Sequence[dict[str, Any]], fields: Sequence[str], numeric: Sequence[str]):
    """Example dicts -> ``RawBatch`` with the semantics of ``models.ctr.raw_from_examples`` (a name
    is looked up at the top level, then in ``features``; missing/invalid numbers are NaN), built
    column by column: the prediction path's hot loop."""
    from models.ctr import RawBatch

    n = len(examples)
    feats = [ex.get("features") or {} for ex in examples]
    cats = {}
    for f in fields:
        col = np.empty(n, dtype=object)
        col[:] = [ex[f] if f in ex else fe.get(f) for ex, fe in zip(examples, feats)]
        cats[f] = col
    dense = np.full((n, len(numeric)), np.nan, dtype=np.float32)
    for j, f in enumerate(numeric):
        for i, (ex, fe) in enumerate(zip(examples, feats)):
            v = ex[f] if f in ex else fe.get(f)
            if v is None:
                continue
            if isinstance(v, (int, float)):
                x = float(v)
            else:
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    continue
            if math.isfinite(x):
                dense[i, j] = x
    times = np.array([float(ex.get("event_time") or 0.0) for ex in examples], dtype=np.float64)
    return RawBatch(cats, dense, np.zeros(n, dtype=np.float32), times, np.arange(n, dtype=np.int64))


def build_learner(state: dict[str, Any]):
    """``CTRLearner(CTRConfig.from_dict(state["config"]))`` + ``load_state_dict(state)``."""
    from models.ctr import CTRConfig, CTRLearner

    if not isinstance(state, dict) or "config" not in state:
        raise RegistryError("the stored state has no 'config' (not a CTRLearner.state_dict())")
    cfg = state["config"]
    learner = CTRLearner(CTRConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg)
    learner.load_state_dict(state)
    return learner


WARM_EXAMPLE = {"user_id": "warm-u", "query": "warm", "ad_id": "warm-a", "creative_id": "warm-c",
                "bidword": "warm", "category": "warm/leaf", "position": 0, "bid": 1.0, "slot": "top",
                "domain": "search", "event_time": 0.0, "features": {}}


class ModelLoader:
    """Watches ``ModelRegistry(root, name)`` and keeps the latest version loaded."""

    def __init__(self, registry_root, name: str = "ctr", poll_s: float = 1.0,
                 build: Callable[[Any], Any] = build_learner,
                 on_swap: Callable[[LoadedModel | None, LoadedModel], None] | None = None) -> None:
        self.registry = ModelRegistry(registry_root, name)
        self.name = name
        self.poll_s = poll_s
        self._build = build
        self._on_swap = on_swap
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time (poller vs admin calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checked = threading.Event()  # set after the first look at the registry
        self.last_error: str | None = None
        self.failed_loads = 0
        self.swaps = 0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def refresh(self) -> LoadedModel | None:
        """Load ``LATEST`` if it differs from the served version; returns what is served now.
        A version that fails to load or warm is logged, counted and not served (the old one stays)."""
        with self._lock:
            try:
                latest = self.registry.latest()
            except RegistryError as e:
                self.last_error = str(e)
                log.warning("model %s: %s", self.name, e)
                self.checked.set()
                return self._current
            cur = self._current
            if latest is None or (cur is not None and cur.version == latest):
                self.checked.set()
                return cur
            t0 = time.perf_counter()
            try:
                state, info = self.registry.load(latest)
                learner = self._build(state)
                loaded = LoadedModel(latest, learner, _created_at(info.meta), time.time(), dict(info.meta))
                p = loaded.predict([WARM_EXAMPLE])  # warm up off the request path
                if not np.all(np.isfinite(p)):
                    raise RegistryError(f"version {latest} predicts non-finite values")
            except Exception as e:  # noqa: BLE001 - a bad version must never take the service down
                self.failed_loads += 1
                self.last_error = f"{latest}: {e}"
                log.error("model %s version %s not served: %s", self.name, latest, e)
                self.checked.set()
                return cur
            self._current = loaded  # the swap: one reference assignment
            self.swaps += 1
            self.last_error = None
            log.info("model %s: serving %s (was %s), loaded in %.2fs", self.name, latest,
                     cur.version if cur else None, time.perf_counter() - t0)
            if self._on_swap is not None:
                self._on_swap(cur, loaded)
            self.checked.set()
            return loaded

    def rollback(self) -> LoadedModel | None:
        self.registry.rollback()
        return self.refresh()

    def promote(self, version: str) -> LoadedModel | None:
        self.registry.promote(version)
        return self.refresh()

    def start(self) -> "ModelLoader":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"model-loader-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001
                log.exception("model loader %s", self.name)
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def age_s(self, now: float | None = None) -> float:
        m = self._current
        if m is None:
            return float("nan")
        now = time.time() if now is None else now
        return now - (m.created_at if m.created_at is not None else m.loaded_at)


def _created_at(meta: dict[str, Any]) -> float | None:
    v = meta.get("created_at")
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            from datetime import datetime

            try:
                return datetime.fromisoformat(v).timestamp()
            except ValueError:
                return None
    return None


class BetaCreativeRanker:
    """Per-creative CTR with a Beta prior: ``(clicks + k·m) / (impressions + k)`` where ``m`` is the
    ad's stream CTR (the creatives of an ad shrink toward their ad) and ``k`` the prior strength.
    Inputs are the feature-store rows of the creatives; it never waits for the ad ranker."""

    version = "beta-v1"

    def __init__(self, strength: float = 20.0, default_ctr: float = 0.02) -> None:
        self.strength = strength
        self.default_ctr = default_ctr

    def score(self, creative_rows: Sequence[dict[str, Any] | None], ad_prior: float) -> list[float]:
        k = self.strength
        out = []
        for row in creative_rows:
            imps = (row or {}).get("impressions") or 0
            clks = (row or {}).get("clicks") or 0
            out.append((clks + k * ad_prior) / (imps + k) if imps + k > 0 else ad_prior)
        return out
