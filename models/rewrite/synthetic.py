"""Training and test data for the rewriters from the synthetic world (lexicon on), and the world's
judge as the evaluation's ground truth.

:func:`world_records` turns the world's simulated traffic into ``examples``-shaped dicts (the same
keys the joiner writes: request_id, event_time, query, ad_id, bidword, category, bid, clicked,
features.match). :func:`split_queries` holds out queries (mostly tail) that training never sees.
:class:`WorldJudge` adapts :class:`core.lexicon.RewriteJudge` to the evaluation's judge interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from core.lexicon import RELATION_REWARD, LexiconConfig, RewriteJudge
from core.world import DriftConfig, World, WorldConfig


def rewrite_world(seed: int, **overrides) -> World:
    """A stationary world with the lexicon on (tail queries, ad titles)."""
    cfg = WorldConfig(seed=seed, drift=DriftConfig.none(), lexicon=LexiconConfig(enabled=True))
    return World(replace(cfg, **overrides) if overrides else cfg)


def world_records(world: World, duration_s: float, requests_per_s: float = 5.0, slots: int = 4,
                  seed: int | None = None, start: float | None = None) -> list[dict]:
    out = []
    for req, rid, served in world.simulate(start, duration_s, requests_per_s, slots, seed):
        for s in served:
            ad = world.ads[s.ad]
            out.append({"request_id": rid, "event_time": round(req.event_time, 6), "user_id": req.user_id,
                        "query": req.query, "ad_id": ad.id, "creative_id": ad.creatives[s.creative].id,
                        "bidword": s.bidword, "category": ad.category, "position": s.position, "bid": s.bid,
                        "clicked": int(s.clicked), "converted": int(s.converted),
                        "features": {"match": s.match}})
    return out


@dataclass
class QuerySplit:
    train: set[str]
    test: set[str]
    valid: set[str]

    def kind(self, q: str) -> str:
        return "train" if q in self.train else "valid" if q in self.valid else "test"


def split_queries(world: World, seed: int, tail_test: float = 0.3, base_test: float = 0.1,
                  valid: float = 0.1) -> QuerySplit:
    """Held-out queries: ``tail_test`` of the tail queries and ``base_test`` of the base ones go to
    test, ``valid`` of the rest to validation (hyper-parameters are picked there, never on test)."""
    rng = np.random.default_rng([seed, 12])
    train, test, val = set(), set(), set()
    for q in world.queries:
        u = rng.random()
        share = tail_test if q.kind != "base" else base_test
        if u < share:
            test.add(q.text)
        elif u < share + valid * (1 - share):
            val.add(q.text)
        else:
            train.add(q.text)
    return QuerySplit(train, test, val)


class WorldJudge:
    """The evaluation's judge on the synthetic world (gold concepts, true revenue)."""

    def __init__(self, world: World, t: float | None = None) -> None:
        self.j = RewriteJudge(world)
        self.world = world
        self.live_map = self.j.live_bidwords(t)
        self.live = set(self.live_map)
        self._best: dict[str, float] = {}

    def relation(self, q: str, b: str) -> str:
        return self.j.relation(q, b)

    def bidword_revenue(self, q: str, b: str) -> float:
        return self.j.revenue(q, b, self.live_map)

    def revenue(self, q: str, bidwords: Sequence[str]) -> float:
        """Expected revenue of the distinct live ads the bidwords recall: Σ_ad max bid × CTR(q, ad)."""
        best: dict[str, float] = {}
        for b in bidwords:
            for a, bid in self.live_map.get(b, ()):
                v = bid * self.j.ad_value(q, a)
                if v > best.get(a, 0.0):
                    best[a] = v
        return float(sum(best.values()))

    def best_revenue(self, q: str) -> float:
        v = self._best.get(q)
        if v is None:
            v = self._best[q] = max((self.bidword_revenue(q, b) for b in self.live), default=0.0)
        return v

    def reward(self, q: str, b: str) -> float:
        return RELATION_REWARD[self.relation(q, b)]

    def relevant_ads(self, q: str, live_ads: Iterable[str]) -> set[str]:
        return self.j.relevant_ads(q, live_ads)

    def is_tail(self, q: str) -> bool:
        qq = self.world.query_by_text.get(q)
        return qq is not None and qq.kind != "base"


def clicked_pairs(records: Iterable[dict], queries: set[str], key: str = "bidword") -> list[tuple[str, str, float]]:
    """(query, value of ``key`` of the clicked ad, clicks) over ``queries``."""
    c: dict[tuple[str, str], float] = {}
    for r in records:
        if r["clicked"] and r["query"] in queries:
            k = (r["query"], r[key])
            c[k] = c.get(k, 0.0) + 1.0
    return [(q, v, n) for (q, v), n in sorted(c.items())]


def filter_pairs(pairs: Sequence[tuple[str, str, float]], min_clicks: float = 2.0, min_share: float = 0.1
                 ) -> list[tuple[str, str, float]]:
    """Log mining's quality filter (spec §4.2 'extracted and filtered from search logs'): keep a
    (query, x) pair with at least ``min_clicks`` clicks and ``min_share`` of its query's clicks; a
    query with no pair left keeps its most clicked one."""
    tot: dict[str, float] = {}
    best: dict[str, tuple[str, str, float]] = {}
    for q, x, n in pairs:
        tot[q] = tot.get(q, 0.0) + n
        if q not in best or n > best[q][2]:
            best[q] = (q, x, n)
    out = [(q, x, n) for q, x, n in pairs if n >= min_clicks and n >= min_share * tot[q]]
    kept = {q for q, _, _ in out}
    out += [best[q] for q in sorted(best) if q not in kept]
    return out


def revenue_by_bidword(records: Iterable[dict]) -> dict[str, float]:
    """bidword -> log(1 + Σ clicks × bid) (the stream statistic of the re-rank)."""
    c: dict[str, float] = {}
    for r in records:
        if r["clicked"]:
            c[r["bidword"]] = c.get(r["bidword"], 0.0) + float(r["bid"])
    return {b: math.log1p(v) for b, v in c.items()}


def judged_relevance(judge: WorldJudge, queries: Sequence[str], per_query: int = 12, seed: int = 0
                     ) -> list[tuple[str, str, int]]:
    """Relevance labels from the judge (the stand-in for MoBGM's expert annotations): per query,
    every live bidword of its leaf plus random others."""
    from models.rewrite.discriminator import RELATIONS

    rng = np.random.default_rng(seed)
    live = sorted(judge.live)
    lex = judge.j.lex
    by_leaf: dict[str | None, list[str]] = {}
    for b in live:
        by_leaf.setdefault(lex.parse(b).leaf, []).append(b)
    out = []
    tops: dict[str, list[str]] = {}
    for b in live:
        leaf = lex.parse(b).leaf
        if leaf:
            tops.setdefault(leaf.split("/")[0], []).append(b)
    for q in queries:
        leaf = lex.concept(q).leaf
        pool = list(by_leaf.get(leaf, [])) + (tops.get(leaf.split("/")[0], []) if leaf else [])
        pool += [live[int(i)] for i in rng.choice(len(live), size=min(per_query, len(live)), replace=False)]
        for b in dict.fromkeys(pool):
            out.append((q, b, RELATIONS.index(judge.relation(q, b))))
    # at most as many "incorrect" labels as the others together (the rest is redundant)
    inc = [x for x in out if x[2] == RELATIONS.index("incorrect")]
    rest = [x for x in out if x[2] != RELATIONS.index("incorrect")]
    keep = max(len(rest), per_query)
    if len(inc) > keep:
        inc = [inc[int(i)] for i in sorted(rng.choice(len(inc), size=keep, replace=False))]
    return rest + inc


def bootstrap_models(world: World, records: list[dict], mobgm_cfg=None, gram_cfg=None, refresh=None):
    """A MoBGM rewriter and GRAM bootstrapped on ``records`` through their StreamModel ``learn``
    (as the stream job's first window does), with the world's titles as the catalog."""
    from models.rewrite.stream import GramStreamModel, RefreshConfig, RewriterStreamModel, world_catalog

    refresh = refresh or RefreshConfig(min_bootstrap_clicks=20, dpo_queries=40)
    cat = world_catalog(world)
    rw = RewriterStreamModel(mobgm_cfg, refresh, {a: t for a, (t, _) in cat.items()})
    gr = GramStreamModel(gram_cfg, refresh, cat)
    rw.learn(records)
    gr.learn(records)
    return rw, gr
