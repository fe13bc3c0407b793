"""Serving models: any published StreamModel, hot-swapped from the registry by name, and the
creative ranker's Beta baseline.

:class:`ModelLoader` polls the registry's ``LATEST`` pointer of one model name from its own thread.
A new version is loaded (safetensors + JSON: nothing in it can run code), rebuilt with the model's
``from_state``, warmed (its ``warm()`` hook) off the request path, then put in place with a single
reference assignment (``self._current = loaded``). A request reads ``loader.current`` once and uses
that object to the end, so in-flight requests finish on the version they started with. A loader's
``preload`` runs once before its first look (the service's CTR loader imports torch there: not
under traffic when the first version arrives; docs/speed.md "The first CTR model").

Predictions take no lock: a StreamModel's ``predict`` is read-only (the CTR model's served copy
never toggles train/eval). A model that declares ``thread_safe = False`` is serialised per version.

:func:`predict_or_baseline` is the one way a request uses a model: the served version, else the
baseline, and the model's name added to the response's ``degraded`` list.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from models.registry import ModelRegistry, RegistryError
from models.stream_model import is_thread_safe

log = logging.getLogger(__name__)

__all__ = ["BetaCreativeRanker", "LoadedModel", "ModelLoader", "build_learner", "pin_torch_threads",
           "predict_or_baseline", "preload_ctr"]

_thread_state = threading.local()


def pin_torch_threads(n: int) -> None:
    """Give torch ``n`` intra-op threads in the calling thread (once per thread; nothing before torch
    is loaded). A request thread that nothing configured runs the CTR model's operators on every
    core with OpenMP workers that spin between calls: measured on 2 cores, 2x the CPU per request
    and a slower ``ad_rank`` (docs/speed.md "Serving"). ``serve.torch_threads`` sets ``n``."""
    if getattr(_thread_state, "torch_threads", 0) == n:
        return
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        # not loaded, or being imported right now by another thread (a loader building the first
        # version of a model that needs torch): the module is partial, set_num_threads may not
        # exist yet. Pinned on a later request, once the import is done.
        return
    try:
        torch.set_num_threads(n)
    except Exception as e:  # noqa: BLE001 - a thread setting must never fail a request
        log.warning("torch.set_num_threads(%d) failed, threads left as they are: %s", n, e)
        return
    _thread_state.torch_threads = n


def __getattr__(name: str) -> Any:  # torch loads only when the CTR model is used
    if name in ("examples_to_raw", "WARM_EXAMPLE"):
        import models.ctr.stream as ctr_stream

        return getattr(ctr_stream, name)
    raise AttributeError(name)


@dataclass
class LoadedModel:
    """One loaded version of a model: ``predict`` goes straight to the model's (read-only) ``predict``."""

    version: str
    model: Any
    created_at: float | None
    loaded_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    _lock: threading.Lock | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._lock is None and not is_thread_safe(self.model):
            self._lock = threading.Lock()

    def predict(self, inputs: Any) -> Any:
        if self._lock is None:
            return self.model.predict(inputs)
        with self._lock:
            return self.model.predict(inputs)

    @property
    def learner(self) -> Any:
        """The CTR model's learner (``model`` itself for other models)."""
        return getattr(self.model, "learner", self.model)


def build_learner(state: dict[str, Any]) -> Any:
    """The CTR model of a registry state (``CTRStreamModel.from_state``), ready to serve."""
    from models.ctr.stream import CTRStreamModel

    if not isinstance(state, dict) or "config" not in state:
        raise RegistryError("the stored state has no 'config' (not a CTRLearner.state_dict())")
    return CTRStreamModel.from_state(state)


def preload_ctr() -> None:
    """Import the CTR model's modules (torch, torchrec, fbgemm): the serving CTR loader's ``preload``."""
    import models.ctr.stream  # noqa: F401


def predict_or_baseline(loaded: LoadedModel | None, inputs: Any, baseline: Callable[[Any], Any], name: str,
                        degraded: list[str]) -> tuple[Any, str]:
    """``(output, version)`` of the served model; when it is missing or fails, ``(baseline(inputs),
    "baseline")`` with ``name`` appended to ``degraded`` (a request never fails on a model)."""
    if loaded is not None:
        try:
            return loaded.predict(inputs), loaded.version
        except Exception as e:  # noqa: BLE001 - a broken model degrades, never fails the request
            log.warning("model %s %s failed, serving the baseline: %s", name or loaded.name, loaded.version, e)
    degraded.append(name)
    return baseline(inputs), "baseline"


class ModelLoader:
    """Watches ``ModelRegistry(root, name)`` and keeps the latest version loaded.

    ``build``: state -> model (a StreamModel class's ``from_state``; the CTR model by default)."""

    def __init__(self, registry_root, name: str = "ctr", poll_s: float = 1.0,
                 build: Callable[[Any], Any] = build_learner,
                 on_swap: Callable[[LoadedModel | None, LoadedModel], None] | None = None,
                 preload: Callable[[], None] | None = None) -> None:
        self.registry = ModelRegistry(registry_root, name)
        self._preload = preload  # run once, before the first look at the registry (_run_preload)
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
            self._run_preload()
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
                model = self._build(state)
                loaded = LoadedModel(latest, model, _created_at(info.meta), time.time(), dict(info.meta), self.name)
                warm = getattr(model, "warm", None)
                if callable(warm):
                    warm()  # off the request path; raises on a model that predicts garbage
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

    def _run_preload(self) -> None:
        """``preload`` once, before the first look at the registry (so before readiness, ``checked``):
        e.g. the CTR model's modules (torch, fbgemm: seconds of Python), which would otherwise be
        imported when the first version is published, while requests are served under the same GIL
        (measured: docs/speed.md "The first CTR model"). Called with the lock."""
        if self._preload is None:
            return
        preload, self._preload = self._preload, None
        t0 = time.perf_counter()
        try:
            preload()
            log.info("model %s: its modules loaded in %.2fs", self.name, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - loading a version will say what is wrong
            log.exception("model %s: preload failed", self.name)

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
