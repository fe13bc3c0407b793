"""The parallel creative ranker of the ad service (Peri-CR): CR+ from the registry, or the Beta ranker.

:class:`CreativeStage` picks one creative per candidate ad. It runs beside the ad ranker (a pool
thread; ``online/service.py``) and never waits for it, except when the served CR+ was trained to
read the ad ranker's pCTR of the request (``pctr_source = ar``: then the service ranks the ads
first and hands their pCTRs over).

- **Ranker**: ``serve.creative_model`` names a registry model (CR+, ``jac-cr``), served by the one
  loader; its score is the click probability of each (context, ad, creative) row, so a creative never
  shown is scored from its content (``cr_*`` from the catalog). Empty: the Beta ranker. A configured
  model that is missing or fails gives the Beta ranker's scores and ``creative_model`` in
  ``degraded``.
- **Exploration** (``serve.creative_exploration``): ``thompson`` draws each creative's CTR from the
  Beta posterior ``Beta(k·m + clicks, k·(1 − m) + impressions − clicks)`` whose prior mean ``m`` is
  the ranker's score (CR+: its content-aware prediction; Beta ranker: the ad's CTR) and whose
  strength is ``k = serve.creative_prior_strength``; ``ucb`` takes the posterior mean plus
  ``creative_ucb_z`` posterior standard deviations. A new creative (no impressions) is uncertain, so
  it is tried; one with many impressions is ranked by its record. The draws come from a generator
  seeded by the request id: the same request ranks the same way, in parallel or in sequence.
- **Logged**: ``model_versions`` gets ``creative`` (the version that chose: a registry version or
  ``beta-v1``), ``creative_ranker`` (``beta`` or the registry name) and, when on,
  ``creative_exploration``.
- :class:`CreativeStatsCache` (``serve.creative_features = cache``): every live creative's row and
  its ``(impressions, clicks)``, refreshed in the background.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from core.settings import ServeSettings
from online.index import AdIndex, Candidate
from online.models import BetaCreativeRanker, LoadedModel, ModelLoader, predict_or_baseline

log = logging.getLogger(__name__)


@dataclass
class CreativeChoice:
    best: list[int]  # index of the chosen creative per candidate
    ranker: str  # "beta" or the registry name of the model
    version: str  # the version that chose ("beta-v1" for the Beta ranker)
    degraded: bool  # a configured model was missing or failed: the Beta ranker chose
    scores: list[list[float]] = field(default_factory=list)  # per candidate, per creative (the reward blend reads them)

    def versions(self, exploration: str) -> dict[str, str]:
        out = {"creative": self.version, "creative_ranker": self.ranker}
        if exploration != "off":
            out["creative_exploration"] = exploration
        return out


def creative_stats(row: dict | None) -> tuple[float, float]:
    """``(impressions, clicks)`` of a creative's feature row, cleaned: absent, non-numeric or
    non-finite counts are 0, clicks are clipped to ``[0, impressions]``."""
    row = row or {}
    try:
        imps = float(row.get("impressions") or 0.0)
        clks = float(row.get("clicks") or 0.0)
    except (TypeError, ValueError):
        return 0.0, 0.0
    if not (math.isfinite(imps) and math.isfinite(clks)) or imps < 0:
        return 0.0, 0.0
    return imps, min(max(clks, 0.0), imps)


def posterior_means_fast(means: list[list[float]], stats: list[list[tuple[float, float]]], k: float,
                         model_scores: bool) -> tuple[list[int], list[list[float]]] | None:
    """The ``exploration = off`` scores and the best creative per candidate, as arrays: the same
    floating-point operations in the same order as the per-creative loop of :meth:`CreativeStage.rank`
    (so the same floats), and ``np.argmax`` keeps the first of tied scores as the loop does. None
    where the loop must decide (ragged or mismatched groups, a NaN score): the caller runs the loop."""
    n = len(means)
    if n == 0:
        return [], []
    width = len(means[0])
    if width == 0 or any(len(ms) != width or len(st) != width for ms, st in zip(means, stats)) or len(stats) != n:
        return None
    m = np.array(means, dtype=np.float64)
    if model_scores:
        s = m
    else:
        st = np.array(stats, dtype=np.float64)  # (n, width, 2)
        imps, clks = st[:, :, 0], st[:, :, 1]
        a = k * m + clks
        b = k * (1 - m) + imps - clks
        ab = a + b
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(ab > 0, a / ab, m)
    if np.isnan(s).any():
        return None
    return s.argmax(axis=1).tolist(), s.tolist()


class CreativeStage:
    """See the module docstring. ``loader`` serves ``settings.creative_model`` (None: Beta only)."""

    def __init__(self, settings: ServeSettings, index: AdIndex, beta: BetaCreativeRanker,
                 loader: ModelLoader | None = None) -> None:
        self.settings = settings
        self.index = index
        self.beta = beta
        self.loader = loader
        self.exploration = settings.creative_exploration
        self.vectorised = True  # exploration off: posterior_means_fast (False: the per-creative loop, its reference)

    @property
    def model_name(self) -> str:
        return self.loader.name if self.loader is not None else ""

    def current(self) -> LoadedModel | None:
        return self.loader.current if self.loader is not None else None

    @staticmethod
    def needs_ad_pctr(model: LoadedModel | None) -> bool:
        """The served CR+ reads the ad ranker's pCTR of the request (it cannot run in parallel)."""
        return model is not None and getattr(model.model, "pctr_source", "") == "ar"

    def batch(self, user_id: str, domain: str, context: dict[str, Any], cands: Sequence[Candidate], position: int,
             event_time: float, ad_pctr: Sequence[float] | None = None) -> dict[str, Any]:
        """The candidates as a grouped batch (``CreativeRankerModel.predict``): the request's context
        once, the ads' fields once per ad, the creatives and their content (from the catalog) once
        per creative."""
        content = self.index.creative_content
        crs = [cr for c in cands for cr in c.creatives]
        feats = [content(cr) for cr in crs]
        keys = {k for f in feats for k in f}
        creatives: dict[str, list[Any]] = {"creative_id": crs}
        for k in keys:
            creatives[k] = [f.get(k) for f in feats]
        return {
            "context": {**context, "user_id": user_id, "domain": domain, "position": position,
                        "event_time": event_time},
            "ads": {"ad_id": [c.ad_id for c in cands], "category": [c.category for c in cands],
                    "advertiser": [c.advertiser or None for c in cands]},
            "counts": [len(c.creatives) for c in cands],
            "creatives": creatives,
            "ad_pctr": None if ad_pctr is None else [float(x) for x in ad_pctr],
        }

    def rank(self, model: LoadedModel | None, rows_fn, cands: Sequence[Candidate],
             creative_rows: list[list[dict | None]], priors: list[float], request_id: str,
             degraded: list[str], stats: list[list[tuple[float, float]]] | None = None) -> CreativeChoice:
        """The chosen creative per candidate. ``rows_fn()`` builds the model's candidate batch (only
        called when a model is served); ``creative_rows`` are the creatives' stream statistics, and
        ``stats`` the same as ``(impressions, clicks)`` pairs (``creative_stats``) where the caller
        has them already (the creative cache computes them once per refresh)."""
        k = self.beta.strength
        means: list[list[float]]
        if self.loader is None:
            ranker, version, bad = "beta", self.beta.version, False
            means = [[p] * len(rows) for rows, p in zip(creative_rows, priors)]
        else:
            local: list[str] = []
            flat, version = predict_or_baseline(model, rows_fn() if model is not None else None,
                                                lambda _x: None, "creative_model", local)
            if not local and len(flat) != sum(len(c.creatives) for c in cands):
                log.warning("creative model %s returned %d scores for %d creatives: Beta ranker", version, len(flat),
                            sum(len(c.creatives) for c in cands))
                local.append("creative_model")
            if local:
                degraded.extend(local)
                ranker, version, bad = "beta", self.beta.version, True
                means = [[p] * len(rows) for rows, p in zip(creative_rows, priors)]
            else:
                ranker, bad = self.loader.name, False
                means, i = [], 0
                for c in cands:
                    n = len(c.creatives)
                    means.append([min(max(float(x), 1e-6), 1 - 1e-6) for x in flat[i:i + n]])
                    i += n
        model_scores = ranker != "beta"
        if stats is None:
            stats = [[creative_stats(row) for row in (rows or [None] * len(ms))]
                     for ms, rows in zip(means, creative_rows)]
        if self.exploration == "off" and self.vectorised:
            fast = posterior_means_fast(means, stats, k, model_scores)
            if fast is not None:
                best, all_scores = fast
                return CreativeChoice(best, ranker, version, bad, all_scores)
        rng = random.Random(zlib.crc32(request_id.encode())) if self.exploration == "thompson" else None
        best, all_scores = [], []
        for ms, st in zip(means, stats):
            scores = []
            for m, (imps, clks) in zip(ms, st):
                a, b = k * m + clks, k * (1 - m) + imps - clks
                if self.exploration == "thompson":
                    s = rng.betavariate(max(a, 1e-6), max(b, 1e-6))
                elif self.exploration == "ucb":
                    s = a / (a + b) + self.settings.creative_ucb_z * math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
                else:
                    s = m if model_scores else (a / (a + b) if a + b > 0 else m)
                scores.append(s)
            best.append(max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 0)
            all_scores.append(scores)
        return CreativeChoice(best, ranker, version, bad, all_scores)


class CreativeStatsCache:
    """Creative rows of every live creative, read in the background every ``refresh_s`` seconds
    (``serve.creative_features = cache``): the creative ranker's inputs change slowly, and reading
    them per request costs one row per (ad, creative) pair. A failed refresh keeps the old rows."""

    def __init__(self, store, index: AdIndex, refresh_s: float = 5.0, chunk: int = 2000) -> None:
        self.store = store
        self.index = index
        self.refresh_s = refresh_s
        self.chunk = chunk
        self._data: tuple[dict[str, dict], dict[str, tuple[float, float]]] = ({}, {})  # rows, creative_stats
        self.refreshed_at = 0.0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        ids = self.index.live_creatives()
        rows: dict[str, dict] = {}
        try:
            for i in range(0, len(ids), self.chunk):
                rows.update(self.store.read("creative", ids[i:i + self.chunk]))
        except Exception as e:  # noqa: BLE001
            self.failures += 1
            log.warning("creative cache refresh failed (%d so far): %s", self.failures, e)
            return 0
        self._data = (rows, {cr: creative_stats(row) for cr, row in rows.items()})  # one reference swap
        self.refreshed_at = time.time()
        return len(rows)

    def get(self, creative_id: str) -> dict | None:
        return self._data[0].get(creative_id)

    def snapshot(self) -> tuple[dict[str, dict], dict[str, tuple[float, float]]]:
        """The rows and their ``creative_stats`` (computed once per refresh) of one refresh."""
        return self._data

    def start(self) -> "CreativeStatsCache":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="creative-cache", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
