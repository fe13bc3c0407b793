"""Posterior click statistics per query, kept current from the ``examples`` stream (pure).

Exponentially decayed counters (spec §1.3): ``c <- c·exp(-λ(t - t_last)) + x`` with
``λ = ln 2 / half_life``, per query for its (category) clicks and impressions and its clicked
bidwords (the product-title stand-in the ad stream has). From them:

* click labels: categories whose share of the query's decayed clicks is at least ``label_share``
  (and whose decayed clicks are at least ``min_clicks``);
* posterior knowledge: the ``top_k`` most clicked categories (by name) and bidwords.

Event times come in with the records; nothing reads a clock. Late events (older than the query's
last update) are added with their decay, so applying events in any micro-batches gives the same
counters as one pass (up to float rounding). Replays are the caller's business (de-dup by key).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from models.query.labels import display_name


@dataclass
class StatsConfig:
    half_life_s: float = 3600.0
    label_share: float = 0.2
    min_clicks: float = 0.5
    top_k: int = 3
    max_queries: int = 200_000  # the least recently updated queries are dropped beyond this
    hierarchy_sep: str = "/"


class _Q:
    __slots__ = ("t", "clicks", "imps", "words")

    def __init__(self, t: float) -> None:
        self.t = t
        self.clicks: dict[str, float] = {}
        self.imps: dict[str, float] = {}
        self.words: dict[str, float] = {}


class QueryClickStats:
    def __init__(self, config: StatsConfig | None = None) -> None:
        self.config = config or StatsConfig()
        self.lam = math.log(2.0) / self.config.half_life_s
        self._q: dict[str, _Q] = {}
        self.events = 0
        self.max_event_time = -math.inf

    def __len__(self) -> int:
        return len(self._q)

    def __contains__(self, query: str) -> bool:
        return query in self._q

    # ---- updates
    def _decay_to(self, s: _Q, t: float) -> float:
        """Bring the query's counters to time ``t`` (when later); returns the weight of an event at ``t``."""
        if t >= s.t:
            f = math.exp(-self.lam * (t - s.t))
            if f < 1.0:
                for d in (s.clicks, s.imps, s.words):
                    for k in list(d):
                        d[k] *= f
            s.t = t
            return 1.0
        return math.exp(-self.lam * (s.t - t))  # a late event, decayed to the query's time

    def add(self, record: Mapping[str, Any]) -> str | None:
        """One example (``query``, ``category``, ``clicked``, ``bidword``, ``event_time``). Returns the
        query when the record was used."""
        q = " ".join(str(record.get("query") or "").split())
        cat = str(record.get("category") or "")
        t = record.get("event_time")
        if not q or not cat or not isinstance(t, (int, float)) or not math.isfinite(t):
            return None
        s = self._q.get(q)
        if s is None:
            s = self._q[q] = _Q(float(t))
        w = self._decay_to(s, float(t))
        s.imps[cat] = s.imps.get(cat, 0.0) + w
        if record.get("clicked"):
            s.clicks[cat] = s.clicks.get(cat, 0.0) + w
            bw = " ".join(str(record.get("bidword") or "").split())
            if bw:
                s.words[bw] = s.words.get(bw, 0.0) + w
        self.events += 1
        self.max_event_time = max(self.max_event_time, float(t))
        return q

    def add_many(self, records: Iterable[Mapping[str, Any]]) -> set[str]:
        touched = {q for q in (self.add(r) for r in records) if q}
        self.evict()
        return touched

    def evict(self) -> int:
        over = len(self._q) - self.config.max_queries
        if over <= 0:
            return 0
        for q in sorted(self._q, key=lambda k: self._q[k].t)[:over]:
            del self._q[q]
        return over

    # ---- reads
    def counts_at(self, query: str, t: float) -> dict[str, dict[str, float]]:
        """The query's decayed counters as of event time ``t`` (not modifying them)."""
        s = self._q.get(query)
        if s is None:
            return {"clicks": {}, "impressions": {}, "words": {}}
        f = math.exp(-self.lam * max(0.0, t - s.t))
        return {"clicks": {k: v * f for k, v in s.clicks.items()}, "impressions": {k: v * f for k, v in s.imps.items()},
                "words": {k: v * f for k, v in s.words.items()}}

    def labels(self, query: str) -> dict[str, float]:
        """Click labels with their share of the query's decayed clicks."""
        s = self._q.get(query)
        if s is None:
            return {}
        total = sum(s.clicks.values())
        if total <= 0:
            return {}
        cfg = self.config
        return {k: v / total for k, v in sorted(s.clicks.items())
                if v / total >= cfg.label_share and v >= cfg.min_clicks}

    def knowledge(self, query: str) -> list[str]:
        """Posterior knowledge: the most clicked categories (names), then the most clicked bidwords."""
        s = self._q.get(query)
        if s is None:
            return []
        k = self.config.top_k
        top = lambda d: [x for x, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:k] if v > 1e-9]  # noqa: E731
        cats = [display_name(c, self.config.hierarchy_sep) for c in top(s.clicks)]
        return list(dict.fromkeys(cats + top(s.words)))

    def snapshot(self, query: str) -> dict[str, Any]:
        """What the model learns for one query: labels, click mass, impressions, knowledge, time."""
        s = self._q[query]
        return {"query": query, "labels": self.labels(query), "clicks": round(sum(s.clicks.values()), 6),
                "impressions": round(sum(s.imps.values()), 6), "knowledge": self.knowledge(query),
                "event_time": s.t}

    # ---- state
    def state(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "events": self.events,
                "max_event_time": self.max_event_time if math.isfinite(self.max_event_time) else None,
                "queries": {q: [s.t, s.clicks, s.imps, s.words] for q, s in self._q.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "QueryClickStats":
        out = cls(StatsConfig(**state["config"]))
        out.events = int(state.get("events", 0))
        m = state.get("max_event_time")
        out.max_event_time = float(m) if m is not None else -math.inf
        for q, (t, c, i, w) in state["queries"].items():
            s = out._q[q] = _Q(float(t))
            s.clicks, s.imps, s.words = dict(c), dict(i), dict(w)
        return out


class SnapshotEmitter:
    """Decides when a query's snapshot is worth sending to the model: its label set or knowledge
    changed, its click mass moved by ``min_change`` (relative), or ``interval_s`` of event time
    passed since its last snapshot while it kept getting traffic."""

    def __init__(self, interval_s: float = 60.0, min_change: float = 0.25, max_queries: int = 200_000) -> None:
        self.interval_s = interval_s
        self.min_change = min_change
        self.max_queries = max_queries
        self._last: dict[str, tuple[tuple[str, ...], tuple[str, ...], float, float]] = {}

    def due(self, snap: Mapping[str, Any]) -> bool:
        q = snap["query"]
        key = (tuple(sorted(snap["labels"])), tuple(snap["knowledge"]))
        last = self._last.get(q)
        clicks, t = float(snap["clicks"]), float(snap["event_time"])
        if last is not None:
            same = last[:2] == key
            moved = abs(clicks - last[2]) > self.min_change * max(last[2], 1.0)
            if same and not moved and t - last[3] < self.interval_s:
                return False
        if not snap["labels"] and (last is None or not last[0]):
            return False  # nothing to learn yet (no click label ever)
        self._last.pop(q, None)
        self._last[q] = (key[0], key[1], clicks, t)
        while len(self._last) > self.max_queries:
            self._last.pop(next(iter(self._last)))
        return True

    def state(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "min_change": self.min_change, "max_queries": self.max_queries,
                "last": {q: [list(a), list(b), c, t] for q, (a, b, c, t) in self._last.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "SnapshotEmitter":
        out = cls(state["interval_s"], state["min_change"], state["max_queries"])
        out._last = {q: (tuple(a), tuple(b), float(c), float(t)) for q, (a, b, c, t) in state["last"].items()}
        return out
