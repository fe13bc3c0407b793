"""Query understanding with the served query classifier (docs/query.md, "Serving").

:class:`ModelQueryClassifier` classifies a query with the version of ``query-classifier`` the
generic :class:`~online.models.ModelLoader` serves, and falls back to the stream-fed
:class:`~online.index.CountsClassifier` when no version is served or the model fails; the request's
``degraded`` list then says ``query_understanding``.

Head queries are answered from a cache: one LRU per served version (``cache_size`` entries),
filled on every miss and, when a version is swapped in, with the version's most clicked queries
(computed off the request path), so a head query never pays for the encoder.

``budget_ms``: a query the model cannot answer in time (a cache miss needs the encoder: a MiniLM
forward pass) is answered by counts and marked degraded; the model's answer still lands in the cache
for the next time. Without a budget the request waits for the model.

``mode``: ``model`` (a missing version is degraded), ``auto`` (degraded only once a version was
published: a service whose registry never held a query classifier classifies by counts, as
before) or ``counts`` (the baseline only).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Sequence

from online.index import CountsClassifier
from online.models import LoadedModel, ModelLoader

log = logging.getLogger(__name__)

COMPONENT = "query_understanding"


class _OverBudget(Exception):
    """The model did not answer within the classifier's budget."""


class LRU:
    """A small thread-safe LRU map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class ModelQueryClassifier:
    """``understand(query, matched) -> (categories best first, degraded, version)``; ``classify``
    gives the top category (the :class:`online.index.QueryClassifier` protocol)."""

    def __init__(self, loader: ModelLoader | None, fallback: CountsClassifier, cache_size: int = 10_000,
                 mode: str = "auto", warm_head: int = 1000, budget_ms: float | None = None,
                 workers: int = 1, max_pending: int = 64) -> None:
        if mode not in ("model", "auto", "counts"):
            raise ValueError(f"query classifier mode must be model, auto or counts, not {mode!r}")
        self.loader = loader
        self.fallback = fallback
        self.mode = mode
        self.cache_size = cache_size
        self.warm_head = warm_head
        self.budget_s = budget_ms / 1000.0 if budget_ms else None
        self.max_pending = max_pending
        self._pool = None
        if self.budget_s is not None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="query-classify")
        self._pending = 0
        self._caches: dict[str, LRU] = {}
        self._lock = threading.Lock()
        self.failures = 0
        self.timeouts = 0
        self.fallbacks = 0
        if loader is not None:
            prev = loader._on_swap

            def on_swap(old: LoadedModel | None, new: LoadedModel) -> None:
                if prev is not None:
                    prev(old, new)
                self._warm(new)

            loader._on_swap = on_swap

    def _cache(self, version: str) -> LRU:
        c = self._caches.get(version)
        if c is None:
            with self._lock:
                c = self._caches.get(version)
                if c is None:
                    self._caches = {version: LRU(self.cache_size)}  # older versions' entries are dropped
                    c = self._caches[version]
        return c

    def _warm(self, loaded: LoadedModel) -> None:
        """Precompute the categories of the version's most clicked queries (off the request path)."""
        head = getattr(loaded.model, "head_queries", None)
        if self.cache_size <= 0 or not callable(head):
            return
        try:
            qs = list(head(min(self.warm_head, self.cache_size)))
            cache = self._cache(loaded.version)
            for s in range(0, len(qs), 256):
                chunk = qs[s:s + 256]
                for q, cats in zip(chunk, loaded.predict(chunk)):
                    cache.put(q, [c for c, _ in cats])
        except Exception as e:  # noqa: BLE001 - a warm-up failure only costs latency
            log.warning("query cache warm-up for %s failed: %s", loaded.version, e)

    def _required(self) -> bool:
        if self.mode == "model":
            return True
        lo = self.loader
        return lo is not None and (lo.swaps > 0 or lo.failed_loads > 0)

    def understand(self, query: str, matched: list[tuple[str, str]]) -> tuple[list[str], bool, str]:
        if self.mode != "counts" and self.loader is not None:
            loaded = self.loader.current  # read once: swap-safe
            if loaded is not None:
                key = " ".join(query.split())
                cache = self._cache(loaded.version)
                cats = cache.get(key)
                if cats is not None:
                    return cats, False, loaded.version
                try:
                    cats = self._predict(loaded, key, cache)
                    if cats:
                        return cats, False, loaded.version
                except _OverBudget:
                    self.timeouts += 1
                except Exception as e:  # noqa: BLE001 - a broken model degrades, never fails the request
                    self.failures += 1
                    if self.failures <= 5 or self.failures % 1000 == 0:
                        log.warning("query classifier %s failed (%d so far), using counts: %s", loaded.version,
                                    self.failures, e)
                return self._baseline(query, matched, True)
            return self._baseline(query, matched, self._required())
        return self._baseline(query, matched, False)

    def _predict(self, loaded: LoadedModel, key: str, cache: LRU) -> list[str]:
        """The model's categories for one query, cached. With a budget, a query the model does not
        answer in time raises :class:`_OverBudget`; its answer still fills the cache when it comes."""

        def run() -> list[str]:
            try:
                cats = [c for c, _ in loaded.predict([key])[0]]
                if cats:
                    cache.put(key, cats)
                return cats
            finally:
                with self._lock:
                    self._pending -= 1

        if self._pool is None:
            with self._lock:
                self._pending += 1
            return run()
        with self._lock:
            if self._pending >= self.max_pending:
                raise _OverBudget()  # the model is behind: do not queue more work
            self._pending += 1
        fut = self._pool.submit(run)
        try:
            return fut.result(timeout=self.budget_s)
        except FutureTimeout:
            raise _OverBudget() from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _baseline(self, query: str, matched: list[tuple[str, str]], degraded: bool) -> tuple[list[str], bool, str]:
        if degraded:
            self.fallbacks += 1
        c = self.fallback.classify(query, matched)
        return ([c] if c else []), degraded, "counts"

    def classify(self, query: str, matched: list[tuple[str, str]]) -> str | None:
        cats, _, _ = self.understand(query, matched)
        return cats[0] if cats else None

    def cache_stats(self) -> dict[str, Any]:
        c = next(iter(self._caches.values()), None)
        return {"entries": len(c) if c else 0, "hits": c.hits if c else 0, "misses": c.misses if c else 0,
                "fallbacks": self.fallbacks, "over_budget": self.timeouts, "failures": self.failures}


def query_loader(registry_root, name: str = "query-classifier", poll_s: float = 1.0) -> ModelLoader:
    """The generic loader for the query classifier (built with ``QueryStreamModel.from_state``)."""

    def build(state: dict[str, Any]):
        from models.query.stream import QueryStreamModel

        return QueryStreamModel.from_state(state)

    return ModelLoader(registry_root, name, poll_s, build=build)


def categories_for_retrieval(categories: Sequence[str], k: int = 2) -> list[str]:
    """The predicted categories that feed the index's category match (best first, at most ``k``)."""
    return list(dict.fromkeys(c for c in categories if c))[:k]
