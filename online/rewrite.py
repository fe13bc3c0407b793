"""Query rewriting and generative retrieval on the request path (issue 12 item 5).

:class:`RewriteStage` runs, for one query:

1. the index rewriter (bidwords whose words are all in the query) — always, it is the baseline;
2. the MoBGM rewriter (registry name ``serve.rewrite_model``), decoding through the **live** bidword
   trie of the served version: generated bidwords join the matches as ``rewrite``;
3. GRAM (registry name ``serve.gram_model``): live ads by their shared codes, as ``gram`` candidates.

Each model runs under a latency budget (``serve.rewrite_budget_ms``): its decoding polls a deadline
and gives up when it passes; a timeout, an error or a missing model serves the index rewriter alone
and names the model in the response's ``degraded`` list (``rewriter`` / ``gram``). Head queries hit
an LRU cache (``serve.rewrite_cache_size``, entries live ``serve.rewrite_cache_ttl_s`` and belong to
one model version).

The live inventory: the trie of each loaded rewriter version is built from the index's live bidwords
when the version is loaded and changed by the index's listener the moment a ``bidword-inventory``
event makes a bidword live or removes its last ad. Every output (fresh or cached) is filtered
against the index once more, so a removed bidword is never served, whatever the version or the cache
says. New ads are indexed by the served GRAM version as they appear (near-line, no retraining).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from online.index import AdIndex, IndexRewriter
from online.models import LoadedModel, ModelLoader

log = logging.getLogger(__name__)


@dataclass
class RewriteSettings:
    budget_ms: float = 15.0
    cache_size: int = 10_000
    cache_ttl_s: float = 300.0
    k: int = 3
    rerank: bool = True
    gram_k: int = 30
    background_queue: int = 64  # queries over budget finished in the background at most (0 = never)


class _Cache:
    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._d: OrderedDict[str, tuple[str, float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, query: str, version: str) -> Any | None:
        with self._lock:
            e = self._d.get(query)
            if e is None or e[0] != version or self.clock() - e[1] > self.ttl_s:
                self.misses += 1
                return None
            self._d.move_to_end(query)
            self.hits += 1
            return e[2]

    def put(self, query: str, version: str, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[query] = (version, self.clock(), value)
            self._d.move_to_end(query)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


class RewriteStage:
    def __init__(self, index: AdIndex, rewriter: ModelLoader | None = None, gram: ModelLoader | None = None,
                 settings: RewriteSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 catalog: dict[str, tuple[str, str]] | None = None) -> None:
        self.index = index
        self.baseline = IndexRewriter(index)
        self.rewriter = rewriter
        self.gram = gram
        self.s = settings or RewriteSettings()
        self.clock = clock
        self.catalog = catalog or {}  # ad -> (title, category), for new ads GRAM has not seen
        self.cache = _Cache(self.s.cache_size, self.s.cache_ttl_s, clock)
        self.gram_cache = _Cache(self.s.cache_size, self.s.cache_ttl_s, clock)
        self._tries: dict[int, Any] = {}  # id(model) -> its live trie
        self._lock = threading.Lock()
        self.timeouts = {"rewriter": 0, "gram": 0}
        self.errors = {"rewriter": 0, "gram": 0}
        self.last_ms = {"rewriter": 0.0, "gram": 0.0}
        self._new_ads: list[tuple[str, str, list[str]]] = []
        self._pending: set[tuple[str, str]] = set()
        self._bg = None
        self._closed = False
        self.completed_later = {"rewriter": 0, "gram": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        index.add_listener(on_word=self._on_word, on_ad=self._on_ad)

    # ---- live inventory -----------------------------------------------------------------------
    def trie_for(self, loaded: LoadedModel) -> Any:
        """The live trie of a loaded rewriter version (built from the live bidwords on first use)."""
        m = loaded.model
        t = self._tries.get(id(m))
        if t is None:
            with self._lock:
                t = self._tries.get(id(m))
                if t is None:
                    if len(self._tries) > 4:  # old versions
                        self._tries.clear()
                    t = m.new_trie(self.index.live_bidwords())
                    self._tries[id(m)] = t
        return t

    def _on_word(self, word: str, live: bool) -> None:
        cur = self.rewriter.current if self.rewriter is not None else None
        if cur is None:
            return
        t = self._tries.get(id(cur.model))
        if t is None:
            return
        ids = cur.model.bidword_ids(word)
        if live:
            t.add(ids, word)
        else:
            t.remove(ids)

    def _on_ad(self, ad_id: str, category: str, live: bool) -> None:
        # called under the index lock: only note the ad; a thread indexes it (a GRAM decode, ms)
        if not live or self.gram is None:
            return
        ad = self.index._ads.get(ad_id)  # noqa: SLF001 - we are inside the index's lock
        words = sorted(ad.bidwords) if ad is not None else []
        with self._lock:
            self._new_ads.append((ad_id, category, words))
        self._wake.set()

    def index_new_ads(self) -> int:
        """Index the ads that became live since the last call into the served GRAM version."""
        cur = self.gram.current if self.gram is not None else None
        with self._lock:
            todo, self._new_ads = self._new_ads, []
        if cur is None or not getattr(cur.model, "ready", True):
            return 0
        n = 0
        for ad_id, category, words in todo:
            if cur.model.has_item(ad_id):
                continue
            text, cat = self.catalog.get(ad_id, ("", category))
            try:
                cur.model.index_item(ad_id, text or " ".join(words), cat or category)
                n += 1
            except Exception:  # noqa: BLE001
                log.exception("GRAM could not index the new ad %s", ad_id)
        return n

    def start(self) -> "RewriteStage":
        if self._thread is None and self.gram is not None:
            self._thread = threading.Thread(target=self._run, name="gram-near-line", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self.index_new_ads()

    def stop(self) -> None:
        self._closed = True
        if self._bg is not None:
            self._bg.shutdown(wait=False, cancel_futures=True)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ---- request path -------------------------------------------------------------------------
    def _deadline(self) -> Callable[[], bool]:
        end = time.perf_counter() + self.s.budget_ms / 1000.0
        return lambda: time.perf_counter() > end

    def _generated(self, query: str, degraded: list[str]) -> list[tuple[str, float]]:
        cur = self.rewriter.current if self.rewriter is not None else None
        if cur is None or not getattr(cur.model, "ready", True):
            degraded.append("rewriter")
            return []
        got = self.cache.get(query, cur.version)
        if got is None:
            t0 = time.perf_counter()
            try:
                got = cur.predict(self._request(cur, query, self._deadline()))
            except Exception as e:  # noqa: BLE001 - timeout (DecodeAborted) or a broken version
                self._failed("rewriter", e, degraded)
                if type(e).__name__ == "DecodeAborted":
                    self._later("rewriter", query, cur)
                return []
            self.last_ms["rewriter"] = (time.perf_counter() - t0) * 1000
            if getattr(got, "reranked", True) or not self.s.rerank:
                self.cache.put(query, cur.version, got)
            else:  # served in the beam's order (no time for the re-rank): the full answer is cached later
                self._later("rewriter", query, cur)
        return [(b, s) for b, s in got if self.index.is_live(b)]

    def _request(self, cur: LoadedModel, query: str, stop: Callable[[], bool] | None):
        from models.rewrite.stream import RewriteRequest

        return RewriteRequest(query, self.trie_for(cur), self.index.is_live, None, self.s.k, self.s.rerank, stop)

    def _later(self, name: str, query: str, cur: LoadedModel) -> None:
        """Finish a query that ran out of budget off the request path and cache it, so a head query
        pays the budget once (one background thread, a bounded set of pending queries)."""
        key = (name, query)
        with self._lock:
            if key in self._pending or len(self._pending) >= self.s.background_queue or self._closed:
                return
            self._pending.add(key)
        if self._bg is None:
            from concurrent.futures import ThreadPoolExecutor

            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewrite-complete")

        def run() -> None:
            try:
                if name == "rewriter":
                    self.cache.put(query, cur.version, cur.predict(self._request(cur, query, None)))
                else:
                    self.gram_cache.put(query, cur.version, cur.predict((query, self.s.gram_k, self.index.has_ad)))
                self.completed_later[name] += 1
            except Exception:  # noqa: BLE001
                log.debug("background completion of %r failed", query, exc_info=True)
            finally:
                with self._lock:
                    self._pending.discard(key)

        try:
            self._bg.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self._pending.discard(key)

    def _failed(self, name: str, e: Exception, degraded: list[str]) -> None:
        if type(e).__name__ == "DecodeAborted":
            self.timeouts[name] += 1
        else:
            self.errors[name] += 1
            if self.errors[name] <= 5 or self.errors[name] % 1000 == 0:
                log.warning("%s failed (%d so far), serving the index rewriter: %s", name, self.errors[name], e)
        degraded.append(name)

    def gram_candidates(self, query: str, degraded: list[str]) -> list[tuple[str, str]]:
        cur = self.gram.current if self.gram is not None else None
        if cur is None or not getattr(cur.model, "ready", True):
            if self.gram is not None:
                degraded.append("gram")
            return []
        got = self.gram_cache.get(query, cur.version)
        if got is None:
            try:
                got = cur.predict((query, self.s.gram_k, self.index.has_ad, self._deadline()))
            except Exception as e:  # noqa: BLE001
                self._failed("gram", e, degraded)
                if type(e).__name__ == "DecodeAborted":
                    self._later("gram", query, cur)
                return []
            self.gram_cache.put(query, cur.version, got)
        return [(a, code) for a, _score, code in got if self.index.has_ad(a)]

    def run(self, query: str, degraded: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``(matched bidwords with their match type, GRAM (ad id, code))`` for one query."""
        matched = self.baseline.rewrite(query)
        if self.rewriter is not None:
            seen = {w for w, _ in matched}
            matched += [(b, "rewrite") for b, _ in self._generated(query, degraded) if b not in seen]
        extra = self.gram_candidates(query, degraded) if self.gram is not None else []
        return matched, extra

    def loaders(self) -> list[ModelLoader]:
        return [ld for ld in (self.rewriter, self.gram) if ld is not None]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget_ms": self.s.budget_ms, "cache_hits": self.cache.hits,
                               "cache_misses": self.cache.misses, "timeouts": dict(self.timeouts),
                               "errors": dict(self.errors), "completed_later": dict(self.completed_later)}
        for name, ld in (("rewriter", self.rewriter), ("gram", self.gram)):
            cur = ld.current if ld is not None else None
            out[f"{name}_version"] = cur.version if cur is not None else None
        return out


def _build(kind: str):
    """A loader's builder that imports the model code (torch) only when a version is loaded."""
    def build(state):
        from models.rewrite.stream import GramStreamModel, RewriterStreamModel

        return (RewriterStreamModel if kind == "rewriter" else GramStreamModel).from_state(state)

    return build


def build_rewrite_stage(settings, index: AdIndex, registry_root,
                        catalog: dict[str, tuple[str, str]] | None = None) -> RewriteStage | None:
    """The stage ``serve.rewrite_model`` / ``serve.gram_model`` ask for (None when both are off).
    ``catalog`` (ad -> (title, category)) defaults to ``serve.rewrite_catalog``."""
    if not (settings.rewrite_model or settings.gram_model):
        return None
    from models.rewrite.catalog import load_catalog

    rw = gr = None
    if settings.rewrite_model:
        rw = ModelLoader(registry_root, settings.rewrite_model, settings.model_poll_s, build=_build("rewriter"))
    if settings.gram_model:
        gr = ModelLoader(registry_root, settings.gram_model, settings.model_poll_s, build=_build("gram"))
    rs = RewriteSettings(budget_ms=settings.rewrite_budget_ms, cache_size=settings.rewrite_cache_size,
                         cache_ttl_s=settings.rewrite_cache_ttl_s, k=settings.rewrite_k, rerank=settings.rewrite_rerank,
                         gram_k=settings.gram_k)
    return RewriteStage(index, rw, gr, rs, catalog=catalog if catalog is not None else load_catalog(settings.rewrite_catalog))
