"""The ad-serving pipeline, independent of HTTP.

    query understanding -> candidates (index) -> ONE feature read (user + every ad x creative)
    -> ad CTR ranker  ||  creative ranker   (Peri-CR: in parallel, neither waits for the other;
                                             CR+ or the Beta ranker, online/creative.py)
    -> eCPM = pCTR x bid -> top slots, each with its best creative -> impression log (EventSink)

Every dependency can fail without failing the request: the feature store (defaults, ``features``
in ``degraded``), the CTR model (stream-CTR prior, ``ctr_model``), the event sink (counted drops,
``impression_log``).

Optional parts (docs/crossdomain.md, docs/images.md): a :class:`online.creatives.CreativeCatalogue`
drops creatives whose gate verdict forbids them from the candidates before anything is ranked; a
:class:`online.crossdomain.CrossDomainRouter` sends users cold in the requested domain to the
cross-domain model; a :class:`online.creatives.RewardBlender` lets the creative reward model replace
or blend with the creative ranker.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from core.events import Impression
from core.ports import EventSink
from core.settings import ServeSettings
from online.creative import CreativeChoice, CreativeStage, CreativeStatsCache, creative_stats
from online.index import AdIndex, Candidate, CountsClassifier, IndexRewriter, QueryClassifier, QueryRewriter
from online.metrics import ServeMetrics
from online.models import BetaCreativeRanker, LoadedModel, ModelLoader, pin_torch_threads, predict_or_baseline

log = logging.getLogger(__name__)

# candidate match type -> retrieval source logged in the impression's features["source"]
SOURCES = {"exact": "index", "broad": "index", "rewrite": "rewriter", "gram": "gram", "category": "category",
           "related": "category"}
TOP_SLOTS = 2  # positions < TOP_SLOTS are slot "top", the rest "side" (as in the synthetic world)
ENTITY_STATS = ("impressions", "clicks")
_NO_STATS = creative_stats(None)


@dataclass
class AdRequestData:
    user_id: str
    query: str
    slots: int
    domain: str = "search"
    request_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ranked:
    pctr: list[float]
    version: str
    degraded: bool


class FeatureReader:
    """Wraps ``FeatureStoreClient.read_for_request`` with a deadline and a breaker.

    The read runs on a small pool and is given up after ``timeout_s`` (a store that hangs, or a
    client that retries a refused connection for seconds, must not hold the request). After a
    failure or a timeout the store is skipped for ``retry_s`` seconds (requests get defaults at
    once), then tried again."""

    def __init__(self, store, retry_s: float = 1.0, timeout_s: float = 0.1) -> None:
        self.store = store
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._down_until = 0.0
        self.failures = 0
        self.timeouts = 0
        self.last_error: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="feature-read")
        tags = list(getattr(store, "tags", []) or [])
        self.tags = tags or ["1h"]

    def read(self, user_id: str, ad_ids: list[str], creative_ids: list[str] | None, query: str) -> dict | None:
        if self.store is None:
            return None
        if time.monotonic() < self._down_until:
            return None
        kw = {"creative_ids": creative_ids} if creative_ids is not None else {}
        fut = self._pool.submit(self.store.read_for_request, user_id, ad_ids, query=query, **kw)
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.timeouts += 1
            self._fail(f"no answer within {self.timeout_s * 1000:.0f} ms")
        except Exception as e:  # noqa: BLE001 - any store failure degrades, never fails the request
            self._fail(f"{type(e).__name__}: {e}")
        return None

    def _fail(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self._down_until = time.monotonic() + self.retry_s
        if self.failures <= 5 or self.failures % 1000 == 0:
            log.warning("feature read failed (%d so far), serving defaults for %.1fs: %s",
                        self.failures, self.retry_s, why)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return self.store is not None and time.monotonic() >= self._down_until


def _num(v: Any) -> float | None:
    if type(v) is float:  # the common case (feature rows hold floats): no try, no conversion
        return v if v - v == 0.0 else None  # finite (inf - inf and nan - nan are nan)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class AdService:
    """One instance per process; ``handle`` is thread-safe."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        index: AdIndex,
        feature_store=None,
        loader: ModelLoader | None = None,
        sink: EventSink | None = None,
        impressions_topic: str = "impressions",
        metrics: ServeMetrics | None = None,
        classifier: QueryClassifier | None = None,
        rewriter: QueryRewriter | None = None,
        creative_ranker: BetaCreativeRanker | None = None,
        creative_loader: ModelLoader | None = None,
        rewrite_stage: Any = None,
        clock: Callable[[], float] = time.time,
        keep_stage_log: int = 0,
        catalogue: Any = None,
        crossdomain: Any = None,
        reward: Any = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.features = FeatureReader(feature_store, settings.feature_retry_s, settings.feature_timeout_s)
        self.loader = loader
        self.sink = sink
        self.topic = impressions_topic
        self.metrics = metrics or ServeMetrics()
        self.classifier = classifier or CountsClassifier(index)
        self.rewriter = rewriter or IndexRewriter(index)
        self.rewrite_stage = rewrite_stage  # online.rewrite.RewriteStage: generated bidwords + GRAM candidates
        self.creative_ranker = creative_ranker or BetaCreativeRanker(settings.creative_prior_strength,
                                                                     settings.default_ctr)
        self.creative = CreativeStage(settings, index, self.creative_ranker, creative_loader)
        self.clock = clock
        self.parallel = settings.parallel_ranking
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="creative-rank")
        self.stage_log: deque[dict[str, float]] | None = deque(maxlen=keep_stage_log) if keep_stage_log else None
        self.parallel_calls = 0
        self._lock = threading.Lock()
        self.tag = self.features.tags[0]
        self._feature_names: dict[str, list[tuple[str, str]]] = {}
        self.catalogue = catalogue  # online.creatives.CreativeCatalogue: gate verdicts
        self.crossdomain = crossdomain  # online.crossdomain.CrossDomainRouter: cold-start routing
        self.reward = reward  # online.creatives.RewardBlender: the reward model beside the creative ranker
        self.creative_cache: CreativeStatsCache | None = None
        if settings.creative_features == "cache" and feature_store is not None:
            self.creative_cache = CreativeStatsCache(feature_store, index, settings.creative_cache_refresh_s)
            self.creative_cache.refresh()
            self.creative_cache.start()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        close_classifier = getattr(self.classifier, "close", None)
        if callable(close_classifier):
            close_classifier()
        self.features.close()
        if self.creative_cache is not None:
            self.creative_cache.stop()

    # ---- pieces -------------------------------------------------------------------------------
    def _stream_ctr(self, row: dict | None) -> float | None:
        return _num((row or {}).get(f"ctr_{self.tag}"))

    def _entity_features(self, ent: str, row: dict | None, out: dict[str, Any]) -> dict[str, Any]:
        names = self._feature_names.get(ent)
        if names is None:  # (feature name, row column) pairs, built once per entity type
            cols = [*ENTITY_STATS, *(f"ctr_{t}" for t in self.features.tags)]
            names = self._feature_names[ent] = [(f"{ent}_{c}", c) for c in cols]
        if not row:
            out.update(dict.fromkeys(n for n, _ in names))
            return out
        get = row.get
        for name, col in names:
            v = get(col)  # _num, with its common case (a finite float) inlined: this runs ~400 times a request
            out[name] = v if type(v) is float and v - v == 0.0 else _num(v)
        return out

    def request_features(self, req: AdRequestData, category: str | None, user_row: dict | None,
                         query_row: dict | None) -> dict[str, Any]:
        """The part of the served features that is the same for every candidate of a request."""
        base: dict[str, Any] = {"query_category": category or "", "query_len": len(req.query.split())}
        for k, v in (req.context or {}).items():  # request context (the user's segment, ...) travels along
            if k != "event_time" and k not in base:
                base[k] = v
        self._entity_features("user", user_row, base)
        return self._entity_features("query", query_row, base)

    def served_features(self, base: dict[str, Any], cand: Candidate, ad_row: dict | None,
                        creative_row: dict | None) -> dict[str, Any]:
        """The flat feature dict the ad ranker sees and the impression carries."""
        f = dict(base)
        f["match"] = cand.match
        f["source"] = SOURCES.get(cand.match, cand.match)  # which retrieval source brought the candidate
        if cand.code:
            f["gram_code"] = cand.code
        f["top_category"] = cand.category.split("/", 1)[0] if cand.category else ""
        f["n_creatives"] = len(cand.creatives)
        if cand.advertiser:
            f["advertiser"] = cand.advertiser
        self._entity_features("ad", ad_row, f)
        return self._entity_features("creative", creative_row, f)

    def example(self, req: AdRequestData, cand: Candidate, creative_id: str, position: int,
                features: dict[str, Any], event_time: float) -> dict[str, Any]:
        """An example-shaped dict (the keys of ``core.events.Example``) for the CTR model."""
        return {"user_id": req.user_id, "query": req.query, "ad_id": cand.ad_id, "creative_id": creative_id,
                "bidword": cand.bidword, "category": cand.category, "position": position, "bid": cand.bid,
                "slot": "top" if position < TOP_SLOTS else "side", "domain": req.domain,
                "event_time": event_time, "features": features}

    def rank_ads(self, model: LoadedModel | None, examples: list[dict], priors: list[float]) -> Ranked:
        """pCTR of the served CTR model, else the stream-CTR priors (degraded)."""
        degraded: list[str] = []
        p, version = predict_or_baseline(model, examples, lambda _x: priors, "ctr_model", degraded)
        return Ranked([float(x) for x in p], "prior" if degraded else version, bool(degraded))

    def rank_creatives(self, model: LoadedModel | None, rows_fn, cands: list[Candidate],
                       creative_rows: list[list[dict | None]], priors: list[float], request_id: str,
                       degraded: list[str], stats: list[list[tuple[float, float]]] | None = None) -> CreativeChoice:
        """The best creative of every candidate (ties: the first): CR+ or the Beta ranker; with a reward
        blender (``serve.creative_reward``), the creative reward model replaces or blends with its scores."""
        pin_torch_threads(self.settings.torch_threads)  # this may be a pool thread (parallel ranking)
        choice = self.creative.rank(model, rows_fn, cands, creative_rows, priors, request_id, degraded, stats)
        if self.reward is not None and cands:
            try:
                picks = self.reward.choose_many([c.creatives for c in cands], choice.scores)
                for j, r in enumerate(picks):
                    if r is not None:
                        choice.best[j] = r
            except Exception as e:  # noqa: BLE001 - the ranker's choice stands
                degraded.append("creative_reward")
                log.warning("creative reward model failed, the ranker decides: %s", e)
        return choice

    def rank_ads_routed(self, req: AdRequestData, model: LoadedModel | None, examples: list[dict],
                        priors: list[float], degraded: list[str]) -> tuple[Ranked, str, str]:
        """The CTR model, or the cross-domain model for a user cold in the requested domain.
        Returns the ranking, the ranker used and why."""
        router = self.crossdomain
        route = router.route(req.user_id, req.domain) if router is not None else None
        if route is not None and route.use_crossdomain:
            xd = router.loader.current
            if xd is not None:
                hist = route.history or {}
                try:
                    p = xd.predict([dict(ex, history=hist) for ex in examples])
                    ranked = Ranked([float(x) for x in p], f"{xd.name}:{xd.version}", False)
                    log.debug("request %s: user %s cold in %s -> %s", req.request_id, req.user_id, req.domain,
                              ranked.version)
                    return ranked, "crossdomain", "cold"
                except Exception as e:  # noqa: BLE001 - fall back to the CTR model
                    log.warning("cross-domain model %s failed, the CTR model ranks: %s", xd.version, e)
                    degraded.append("crossdomain_model")
                    return self.rank_ads(model, examples, priors), "ctr", "failed"
        reason = route.reason if route is not None else "off"
        if route is not None and route.reason == "history_failed":
            degraded.append("history")
        return self.rank_ads(model, examples, priors), "ctr", reason

    # ---- the pipeline -------------------------------------------------------------------------
    def handle(self, req: AdRequestData, parallel: bool | None = None) -> dict[str, Any]:
        pin_torch_threads(self.settings.torch_threads)  # the server's request threads: once each
        m = self.metrics
        stages: dict[str, float] = {}
        t_start = t0 = time.perf_counter()
        degraded: list[str] = []
        request_id = req.request_id or uuid.uuid4().hex
        event_time = _num(req.context.get("event_time")) if req.context else None
        if event_time is None:
            event_time = self.clock()

        # 1. query understanding: the rewrite stage (index + generated bidwords + GRAM, each within its
        #    budget) or the index rewriter; then the served query classifier, else counts
        if self.rewrite_stage is not None:
            matched, extra = self.rewrite_stage.run(req.query, degraded)
            stages["rewrite"] = time.perf_counter() - t0
        else:
            matched, extra = self.rewriter.rewrite(req.query), []
        categories: list[str] = []
        query_version = None
        try:
            understand = getattr(self.classifier, "understand", None)
            if understand is not None:
                categories, q_degraded, query_version = understand(req.query, matched)
                if q_degraded:
                    degraded.append("query_understanding")
            else:
                c = self.classifier.classify(req.query, matched)
                categories = [c] if c else []
        except Exception as e:  # noqa: BLE001
            log.warning("query classifier failed: %s", e)
            degraded.append("query_understanding")
        category = categories[0] if categories else None
        t1 = time.perf_counter(); stages["query"] = t1 - t0  # noqa: E702

        # 2. candidates (bidword matches, generated bidwords, GRAM's ads, then the predicted categories)
        cands = self.index.candidates(matched, categories[: self.settings.query_categories] or None,
                                      self.settings.max_candidates, extra)
        if self.catalogue is not None and cands:  # creatives the gate forbids: held back before any ranker
            cands, held = self.catalogue.filter(cands)
            if held:
                m.creatives_gated.inc(held)
        t2 = time.perf_counter(); stages["retrieve"] = t2 - t1  # noqa: E702
        m.candidates.observe(len(cands))

        # 3. one batched feature read: the user, the query, every (ad, creative) pair
        #    (or every ad, with creative rows from the in-memory cache)
        cache = self.creative_cache
        if cache is None:
            pair_ads = [c.ad_id for c in cands for _ in c.creatives]
            feats = self.features.read(req.user_id, pair_ads, [cr for c in cands for cr in c.creatives],
                                       req.query) if cands else None
        else:
            pair_ads = [c.ad_id for c in cands]
            feats = self.features.read(req.user_id, pair_ads, None, req.query) if cands else None
        t3 = time.perf_counter(); stages["features"] = t3 - t2  # noqa: E702
        if cands:
            m.feature_read.observe(t3 - t2)
        if self.features.store is None or (cands and feats is None):
            degraded.append("features")
        user_row = (feats or {}).get("user")
        query_row = (feats or {}).get("query")
        pairs = (feats or {}).get("ads") or [None] * len(pair_ads)
        ad_rows: list[dict | None] = []
        cr_rows: list[list[dict | None]] = []
        if cache is None:
            i = 0
            for c in cands:
                n = len(c.creatives)
                chunk = pairs[i:i + n]
                i += n
                ad_rows.append((chunk[0] or {}).get("ad") if chunk and chunk[0] else None)
                cr_rows.append([(p or {}).get("creative") if p else None for p in chunk])
            cr_stats = None
        else:
            crows, cstats = cache.snapshot()
            get_row, get_stats = crows.get, cstats.get
            cr_stats = []
            for c, p in zip(cands, pairs):
                ad_rows.append((p or {}).get("ad") if p else None)
                cr_rows.append([get_row(cr) for cr in c.creatives])
                cr_stats.append([get_stats(cr, _NO_STATS) for cr in c.creatives])
        default = self.settings.default_ctr
        priors = [self._stream_ctr(r) or default for r in ad_rows]
        pos = self.settings.ranking_position
        first = self.settings.ad_ranker_creative == "first"
        base = self.request_features(req, category, user_row, query_row)
        ad_features = [self.served_features(base, c, ad_rows[j], cr_rows[j][0] if first and cr_rows[j] else None)
                       for j, c in enumerate(cands)]
        examples = [self.example(req, c, c.creatives[0] if first else "", pos, ad_features[j], event_time)
                    for j, c in enumerate(cands)]
        t4 = time.perf_counter(); stages["assemble"] = t4 - t3  # noqa: E702

        # 4. ad ranker || creative ranker
        model = self.loader.current if self.loader is not None else None  # read once: swap-safe
        cr_model = self.creative.current()
        use_parallel = self.parallel if parallel is None else parallel
        cr_degraded: list[str] = []
        ranker, why = "ctr", "off"

        def rows_fn(ad_pctr=None):
            return self.creative.batch(req.user_id, req.domain, base, cands, pos, event_time, ad_pctr)

        if cands:
            cr_args = (cr_model, rows_fn, cands, cr_rows, priors, request_id, cr_degraded, cr_stats)
            if use_parallel and not self.creative.needs_ad_pctr(cr_model):
                fut = self._pool.submit(self._timed, self.rank_creatives, *cr_args)
                (ranked, ranker, why), t_ad = self._timed(self.rank_ads_routed, req, model, examples, priors,
                                                          degraded)
                choice, t_cr = fut.result()
                with self._lock:
                    self.parallel_calls += 1
            else:  # sequential, or a CR+ that reads the ad ranker's pCTR of this request
                (ranked, ranker, why), t_ad = self._timed(self.rank_ads_routed, req, model, examples, priors,
                                                          degraded)
                if self.creative.needs_ad_pctr(cr_model):
                    cr_args = (cr_model, lambda: rows_fn(ranked.pctr), *cr_args[2:])
                choice, t_cr = self._timed(self.rank_creatives, *cr_args)
            stages["ad_rank"], stages["creative_rank"] = t_ad, t_cr
        else:
            ranked = Ranked([], model.version if model else "prior", model is None)
            choice = CreativeChoice([], self.creative.model_name or "beta",
                                    cr_model.version if cr_model else self.creative_ranker.version, False)
        degraded.extend(cr_degraded)
        best_cr = choice.best
        if self.crossdomain is not None:
            m.ad_ranker.labels(ranker, why).inc()
        t5 = time.perf_counter(); stages["rank"] = t5 - t4  # noqa: E702
        if ranked.degraded:
            degraded.append("ctr_model")

        # 5. eCPM = pCTR x bid, top slots with their best creative
        order = sorted(range(len(cands)), key=lambda j: (-ranked.pctr[j] * cands[j].bid, cands[j].ad_id))
        versions = {"ctr": ranked.version, **choice.versions(self.creative.exploration)}
        if query_version is not None:
            versions["query"] = query_version
        if self.crossdomain is not None:
            versions["ad_ranker"], versions["ad_ranker_reason"] = ranker, why
        if self.reward is not None and self.reward.version:
            versions["creative_reward"] = f"{self.reward.mode}:{self.reward.version}"
        ads_out, imps = [], []
        for position, j in enumerate(order[: req.slots]):
            c = cands[j]
            cr_i = best_cr[j]
            creative_id = c.creatives[cr_i]
            pctr = ranked.pctr[j]
            ads_out.append({"ad_id": c.ad_id, "creative_id": creative_id, "bidword": c.bidword,
                            "category": c.category, "bid": c.bid, "pctr": pctr, "ecpm": pctr * c.bid,
                            "position": position, "source": SOURCES.get(c.match, c.match),
                            **({"code": c.code} if c.code else {})})
            served = self._entity_features("creative", cr_rows[j][cr_i] if cr_rows[j] else None,
                                           dict(ad_features[j]))
            served["pctr"] = pctr
            served.update(self.index.creative_content(creative_id))  # the shown creative's content (cr_*)
            imps.append(Impression(
                request_id=request_id, event_time=event_time, user_id=req.user_id, query=req.query,
                ad_id=c.ad_id, creative_id=creative_id, bidword=c.bidword, category=c.category,
                position=position, bid=c.bid, slot="top" if position < TOP_SLOTS else "side",
                domain=req.domain, features=served, model_versions=dict(versions)))
        t6 = time.perf_counter(); stages["assemble"] += t6 - t5  # noqa: E702

        # 6. impression log (non-blocking)
        if self.sink is not None and imps:
            try:
                for imp in imps:
                    self.sink.send(self.topic, request_id, imp.to_json())
                m.impressions_logged.inc(len(imps))
            except Exception as e:  # noqa: BLE001 - the sink must not raise; if it does, degrade
                log.warning("impression log failed: %s", e)
                degraded.append("impression_log")
        t7 = time.perf_counter(); stages["log"] = t7 - t6  # noqa: E702
        stages["total"] = t7 - t_start
        for k, v in stages.items():
            m.stage_latency.labels(k).observe(v)
        for d in degraded:
            m.degraded.labels(d).inc()
        m.requests.labels("degraded" if degraded else "ok").inc()
        if self.stage_log is not None:
            stages["degraded"] = float(bool(degraded))
            stages["query_degraded"] = float("query_understanding" in degraded)
            self.stage_log.append(stages)
        return {"request_id": request_id, "ads": ads_out, "model_versions": versions, "degraded": degraded}

    @staticmethod
    def _timed(fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t
