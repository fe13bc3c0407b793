"""A synthetic e-commerce search-ads world with a known ground truth and controllable drift.

The world is pure: no I/O, no clock. Everything follows from a seed, so the same seed gives the same
world and the same event stream, byte for byte. It is used for load generation, stream tests, CTR
evaluation under drift (the truth is known, so a model can be checked against it) and, through the
public :meth:`World.sample_request`, :meth:`World.candidates` and :meth:`World.click_prob`, as the
click simulator behind the online service.

What it models (see ``docs/world.md`` for the full description):

* a category tree (top categories × leaves), queries with a gold leaf, bidword phrases per leaf;
* ads (advertiser, leaf, bidwords with bids, 2–5 creatives with their own quality) and users
  (a segment and a preference vector over top categories);
* a ground-truth click model (position-based: examination × attractiveness)::

      ctr = sigmoid(base + pref[user, top(ad)] + relevance(query, ad) + quality(ad)
                    + creative(user, creative) + domain_offset + drift(ad, t)) × position_bias(position)

  where creative(user, c) = quality(c), or, with creative content on (``core.creatives``),
  main(content) + a small residual + personal(segment(user), content);

  and a conversion probability given a click;
* drift over event time (:class:`DriftConfig`): an abrupt CTR shift of chosen leaf categories, a
  gradual CTR shift of chosen ads, new ads appearing (with bidword-inventory events) and trending
  queries. The first ``stable_tops`` top categories never drift.

Times are event times in seconds since the Unix epoch. Drift times are fractions of
``DriftConfig.horizon_s`` after ``WorldConfig.epoch``.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from core.creatives import CONTENT_COLUMNS, CreativeContent, CreativeContentConfig, CreativeEffects
from core.domains import CrossDomainConfig, DomainEffects
from core.images import BROKEN_KINDS, ImageConfig, ImageEffects, ImageSpec, Product
from core.events import BidwordChange, Click, Conversion, CreativeChange, Event, Impression
from core.lexicon import Concept, Lexicon, LexiconConfig, build_tail_queries, render_title

if TYPE_CHECKING:  # pandas is imported lazily: the event path does not need it
    import pandas as pd

TOP_VOCAB: dict[str, list[str]] = {
    "shoes": ["running shoes", "hiking boots", "sandals", "sneakers", "slippers", "high heels"],
    "electronics": ["headphones", "laptops", "smartphones", "cameras", "speakers", "smartwatches"],
    "home": ["sofas", "desk lamps", "rugs", "curtains", "mattresses", "office chairs"],
    "outdoor": ["tents", "backpacks", "rain jackets", "sleeping bags", "trekking poles", "headlamps"],
    "beauty": ["face cream", "shampoo", "lipstick", "perfume", "sunscreen", "nail polish"],
    "kitchen": ["coffee makers", "frying pans", "knife sets", "blenders", "kettles", "toasters"],
}
MODIFIERS = [
    "red", "black", "white", "blue", "cheap", "waterproof", "wireless", "leather", "kids",
    "womens", "mens", "large", "small", "premium", "lightweight", "organic",
]
BRANDS = ["acme", "nordik", "zento", "kairo", "lumo", "vexa", "oakfield", "sora"]
BIDWORD_PATTERNS = ["buy {}", "{} sale", "best {}", "{} online", "discount {}"]

# serving-policy bonus per match type (log scale, added to log(bid) + quality estimate)
MATCH_TYPES = ("exact", "broad", "category", "related", "explore")
_MATCH_BONUS = {"exact": 0.5, "broad": 0.3, "category": 0.0, "related": -1.0}
_NEG_INF = float("-inf")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DriftConfig:
    """Switches for drift over event time. Times are fractions of ``horizon_s`` after the epoch.

    * ``abrupt``: leaf categories whose CTR logit jumps by ±``abrupt_shift`` (sign alternates
      +, −, +, …) at ``abrupt_at``;
    * ``gradual``: ads whose CTR logit moves linearly by ``gradual_shift`` between
      ``gradual_start`` and ``gradual_end``;
    * ``new_ads``: ads that appear at times spread over [``new_ads_start``, ``new_ads_end``]
      (with ``BidwordChange(add)`` events);
    * ``trending``: queries that receive ``trending_share`` of all requests during their window.

    The first ``stable_tops`` top categories are never touched by any of these, so a test can check
    that a model keeps its long-term knowledge there.
    """

    enabled: bool = True
    horizon_s: float = 7200.0
    stable_tops: int = 1
    abrupt: bool = True
    abrupt_at: float = 0.5
    abrupt_n_categories: int = 3
    abrupt_shift: float = 1.2
    gradual: bool = True
    gradual_start: float = 0.25
    gradual_end: float = 0.75
    gradual_n_ads: int = 15
    gradual_shift: float = -1.5
    new_ads: bool = True
    new_ads_n: int = 20
    new_ads_start: float = 0.3
    new_ads_end: float = 0.9
    trending: bool = True
    trending_n_queries: int = 3
    trending_start: float = 0.2
    trending_end: float = 0.4
    trending_share: float = 0.15

    @classmethod
    def none(cls) -> "DriftConfig":
        """A stationary world: no drift of any kind."""
        return cls(enabled=False)

    @classmethod
    def parse(cls, spec: str | None, horizon_s: float | None = None) -> "DriftConfig":
        """Parse a command-line spec: ``none``, ``all`` (default) or a comma list of the kinds
        ``abrupt,gradual,new_ads,trending`` to switch on. ``horizon_s`` sets the time scale."""
        base = cls() if horizon_s is None else cls(horizon_s=float(horizon_s))
        if spec is None or spec.strip() in ("", "all", "default"):
            return base
        if spec.strip() == "none":
            return replace(base, enabled=False)
        kinds = {k.strip().replace("-", "_") for k in spec.split(",") if k.strip()}
        known = {"abrupt", "gradual", "new_ads", "trending"}
        unknown = kinds - known
        if unknown:
            from core.errors import ConfigError

            raise ConfigError(
                f"unknown drift kind(s) {sorted(unknown)}; use none, all or a list of {sorted(known)}"
            )
        return replace(base, **{k: (k in kinds) for k in known})


@dataclass(frozen=True)
class WorldConfig:
    """Size and ground-truth parameters of the world. All logits are on the CTR logit scale."""

    seed: int = 7
    n_top: int = 4
    n_leaf_per_top: int = 5
    n_queries_per_leaf: int = 8
    n_bidwords_per_leaf: int = 6
    n_ads: int = 200
    n_advertisers: int = 60
    min_creatives: int = 2
    max_creatives: int = 5
    n_users: int = 5000
    n_segments: int = 4
    epoch: float = 1_700_000_000.0  # event time of "t = 0" (2023-11-14T22:13:20Z)
    # ground truth
    base_logit: float = -3.0
    rel_same_leaf: float = 0.0
    rel_same_top: float = -1.0
    rel_other: float = -2.5
    ad_quality_sd: float = 0.5
    creative_quality_sd: float = 0.4
    segment_affinity_sd: float = 0.7
    user_affinity_sd: float = 0.3
    position_bias_exponent: float = 0.7
    position_bias_table: tuple[float, ...] | None = None  # overrides the exponent when given
    conv_base_logit: float = -2.0
    click_delay_mean_s: float = 15.0  # clicks come 1 s + Exp(mean) after their impression
    conversion_delay_mean_s: float = 300.0
    # traffic and serving policy
    user_pref_share: float = 0.7  # share of requests whose top category follows the user's taste
    cross_leaf_bid_prob: float = 0.15  # an ad also bids on a bidword of a sibling leaf
    skip_leaf_bidword_prob: float = 0.3  # an ad does not bid on the bare leaf name
    explore_rate: float = 0.05  # per slot: a random ad is shown instead (match "explore")
    policy_quality_weight: float = 0.8
    policy_noise: float = 0.6
    creative_policy: str = "random"  # random | best | epsilon (best with prob 0.8)
    top_slots: int = 2  # positions < top_slots are slot "top", the rest "side"
    domains: tuple[tuple[str, float, float], ...] = (("search", 1.0, 0.0),)  # name, share, offset
    drift: DriftConfig = field(default_factory=DriftConfig)
    creative_content: CreativeContentConfig = field(default_factory=CreativeContentConfig)  # off by default
    cross_domain: CrossDomainConfig = field(default_factory=CrossDomainConfig)  # off by default
    images: ImageConfig = field(default_factory=ImageConfig)  # off by default
    lexicon: LexiconConfig = field(default_factory=LexiconConfig)  # tail queries + ad titles; off by default

    def __post_init__(self) -> None:
        from core.errors import ConfigError

        if self.n_top < 1 or self.n_leaf_per_top < 1 or self.n_ads < 1 or self.n_users < 1:
            raise ConfigError("the world needs at least one category, ad and user")
        if not 1 <= self.min_creatives <= self.max_creatives:
            raise ConfigError("need 1 <= min_creatives <= max_creatives")
        if self.creative_policy not in ("random", "best", "epsilon"):
            raise ConfigError(f"creative_policy must be random, best or epsilon, not {self.creative_policy!r}")
        if not self.domains or any(share <= 0 for _, share, _ in self.domains):
            raise ConfigError("domains must be a non-empty list of (name, share > 0, offset)")
        if self.drift.enabled and self.drift.stable_tops >= self.n_top and self._any_drift():
            raise ConfigError("stable_tops leaves no top category that may drift")
        self.creative_content.validate()
        self.cross_domain.validate([d[0] for d in self.domains])
        self.images.validate()
        self.lexicon.validate()

    def _any_drift(self) -> bool:
        d = self.drift
        return d.abrupt or d.gradual or d.new_ads or d.trending


# --------------------------------------------------------------------------- entities


@dataclass(frozen=True)
class Category:
    id: str  # leaf id "top/leaf-name"
    top: str
    name: str  # words used in queries and bidwords
    index: int
    top_index: int
    price: float  # mean order value, for conversions


@dataclass(frozen=True)
class Query:
    text: str
    category: str  # gold leaf id
    index: int
    popularity: float
    kind: str = "base"  # base | a tail kind of core.lexicon.TAIL_KINDS (lexicon on)


@dataclass(frozen=True)
class Creative:
    id: str
    ad_id: str
    quality: float  # logit effect for every user (with content: main(content) + residual)
    content: CreativeContent | None = None  # None unless WorldConfig.creative_content.enabled
    image: ImageSpec | None = None  # None unless WorldConfig.images.enabled


@dataclass(frozen=True)
class Ad:
    id: str
    advertiser: str
    category: str  # leaf id
    bidwords: tuple[tuple[str, float], ...]  # (phrase, bid), all from its leaf (or a sibling)
    creatives: tuple[Creative, ...]
    quality: float
    index: int
    active_from: float  # event time it appears; -inf for the initial inventory
    title: str = ""  # product title (lexicon on)


@dataclass(frozen=True)
class User:
    id: str
    segment: str
    preference: tuple[float, ...]  # affinity (logit) per top category
    index: int


@dataclass(frozen=True)
class Candidate:
    """An ad that may be served for a query, with the bidword that matched it."""

    ad_id: str
    bidword: str
    bid: float
    match: str  # exact | broad | category | related


@dataclass(frozen=True)
class Request:
    """One search request: a user issues a query at an event time on a domain."""

    event_time: float
    user_id: str
    query: str
    domain: str
    user_index: int
    query_index: int


@dataclass(frozen=True)
class DriftSegment:
    """One drifted segment. ``shift`` is the CTR-logit change (0 for inventory and traffic drift);
    for ``gradual`` it is reached at ``end``, for ``abrupt`` it holds from ``start`` on."""

    kind: str  # abrupt | gradual | new_ads | trending
    level: str  # category | ad | query
    ids: tuple[str, ...]
    start: float
    end: float
    shift: float
    shifts: tuple[float, ...] = ()  # per id, when they differ (abrupt: alternating signs)


@dataclass(slots=True)
class ServedSlot:
    """What the simulator decided for one position of one request (internal, but documented)."""

    ad: int
    creative: int
    bidword: str
    bid: float
    match: str
    position: int
    p_click: float
    clicked: bool
    click_time: float
    converted: bool
    conversion_time: float
    value: float


# --------------------------------------------------------------------------- the world


class World:
    """The synthetic world. Build it once from a :class:`WorldConfig`; all methods are pure."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config or WorldConfig()
        rng = np.random.default_rng(cfg.seed)
        self._build_categories(rng)
        self._build_queries(rng)
        self._build_tail_queries()
        self._build_bidwords(rng)
        self.ads: list[Ad] = []
        self.ad_by_id: dict[str, Ad] = {}
        self._build_ads(rng, cfg.n_ads)
        self._build_users(rng)
        self._build_drift(rng)
        self._build_creative_content()
        self._build_images()
        self._build_cross_domain()
        self._build_titles()
        self._index_candidates()
        self._pos_bias_cache: dict[int, float] = {}

    # ---- construction

    def _build_categories(self, rng: np.random.Generator) -> None:
        cfg = self.config
        tops = list(TOP_VOCAB)[: cfg.n_top]
        tops += [f"cat{i}" for i in range(len(tops), cfg.n_top)]
        self.tops: list[str] = tops
        self.categories: list[Category] = []
        for ti, top in enumerate(tops):
            leaves = TOP_VOCAB.get(top, [])[: cfg.n_leaf_per_top]
            leaves += [f"{top} kind{j}" for j in range(len(leaves), cfg.n_leaf_per_top)]
            for name in leaves:
                price = float(np.exp(rng.normal(3.5, 0.5)))
                cid = f"{top}/{name.replace(' ', '-')}"
                self.categories.append(Category(cid, top, name, len(self.categories), ti, round(price, 2)))
        self.category_by_id = {c.id: c for c in self.categories}

    def _build_queries(self, rng: np.random.Generator) -> None:
        cfg = self.config
        self.queries: list[Query] = []
        seen: set[str] = set()
        leaf_pop = np.exp(rng.normal(0.0, 0.5, len(self.categories)))
        for c in self.categories:
            pool = [f"{m} {c.name}" for m in MODIFIERS] + [f"{b} {c.name}" for b in BRANDS]
            pool += [f"{m1} {m2} {c.name}" for m1, m2 in zip(MODIFIERS[::2], MODIFIERS[1::2])]
            order = rng.permutation(len(pool))
            texts = [c.name] + [pool[i] for i in order]
            rank = 0
            for text in texts:
                if rank >= cfg.n_queries_per_leaf:
                    break
                if text in seen:
                    continue
                seen.add(text)
                pop = float(leaf_pop[c.index] / (rank + 1) ** 0.8)
                self.queries.append(Query(text, c.id, len(self.queries), pop))
                rank += 1
        self.query_by_text = {q.text: q for q in self.queries}
        self._query_tokens = [frozenset(q.text.split()) for q in self.queries]

    def _build_bidwords(self, rng: np.random.Generator) -> None:
        cfg = self.config
        self.bidwords_by_category: dict[str, list[str]] = {}
        for c in self.categories:
            pool = [f"{m} {c.name}" for m in MODIFIERS] + [f"{b} {c.name}" for b in BRANDS]
            pool += [p.format(c.name) for p in BIDWORD_PATTERNS]
            order = rng.permutation(len(pool))
            self.bidwords_by_category[c.id] = [c.name] + [pool[i] for i in order[: cfg.n_bidwords_per_leaf - 1]]
        self._leaf_bid = {c.id: float(np.exp(rng.normal(0.0, 0.3))) for c in self.categories}

    def _make_ad(self, rng: np.random.Generator, index: int, active_from: float, leaf: Category) -> Ad:
        cfg = self.config
        words = self.bidwords_by_category[leaf.id]
        k = int(rng.integers(1, min(4, len(words)))) if len(words) > 1 else 0
        chosen = [words[1 + int(i)] for i in rng.choice(len(words) - 1, size=k, replace=False)] if k else []
        if not chosen or rng.random() >= cfg.skip_leaf_bidword_prob:
            chosen.insert(0, words[0])  # most ads also bid on the bare leaf name
        siblings = [c for c in self.categories if c.top_index == leaf.top_index and c.id != leaf.id]
        if siblings and rng.random() < cfg.cross_leaf_bid_prob:
            sib = siblings[int(rng.integers(len(siblings)))]
            chosen.append(sib.name)
        ad_scale = float(np.exp(rng.normal(0.0, 0.3))) * self._leaf_bid[leaf.id]
        bidwords = tuple((w, round(ad_scale * float(np.exp(rng.normal(0.0, 0.15))), 4)) for w in chosen)
        ad_id = f"a{index:04d}"
        n_cr = int(rng.integers(cfg.min_creatives, cfg.max_creatives + 1))
        creatives = tuple(
            Creative(f"{ad_id}-c{j}", ad_id, round(float(rng.normal(0.0, cfg.creative_quality_sd)), 4))
            for j in range(n_cr)
        )
        return Ad(
            id=ad_id,
            advertiser=f"adv{int(rng.integers(cfg.n_advertisers)):03d}",
            category=leaf.id,
            bidwords=bidwords,
            creatives=creatives,
            quality=round(float(rng.normal(0.0, cfg.ad_quality_sd)), 4),
            index=index,
            active_from=active_from,
        )

    def _build_ads(self, rng: np.random.Generator, n: int) -> None:
        for _ in range(n):
            leaf = self.categories[int(rng.integers(len(self.categories)))]
            ad = self._make_ad(rng, len(self.ads), _NEG_INF, leaf)
            self.ads.append(ad)
            self.ad_by_id[ad.id] = ad

    def _build_users(self, rng: np.random.Generator) -> None:
        cfg = self.config
        protos = rng.normal(0.0, cfg.segment_affinity_sd, (cfg.n_segments, cfg.n_top))
        self.segment_preferences = [tuple(round(float(x), 4) for x in row) for row in protos]
        segs = rng.integers(cfg.n_segments, size=cfg.n_users)
        noise = rng.normal(0.0, cfg.user_affinity_sd, (cfg.n_users, cfg.n_top))
        activity = np.exp(rng.normal(0.0, 1.0, cfg.n_users))
        self.users: list[User] = []
        self._user_seg: list[int] = []
        self._user_top_cum: list[list[float]] = []
        for i in range(cfg.n_users):
            pref = tuple(round(float(x), 4) for x in protos[segs[i]] + noise[i])
            self.users.append(User(f"u{i:05d}", f"s{int(segs[i])}", pref, i))
            self._user_seg.append(int(segs[i]))
            w = np.exp(np.array(pref) * 1.5)
            self._user_top_cum.append(list(np.cumsum(w / w.sum())))
        self.user_by_id = {u.id: u for u in self.users}
        self._user_cum = list(np.cumsum(activity / activity.sum()))
        # query choice: global and per top category, by popularity
        pops = np.array([q.popularity for q in self.queries])
        self._query_cum = list(np.cumsum(pops / pops.sum()))
        self._top_queries: list[list[int]] = [[] for _ in range(cfg.n_top)]
        for q in self.queries:
            self._top_queries[self.category_by_id[q.category].top_index].append(q.index)
        self._top_query_cum = []
        for qs in self._top_queries:
            p = pops[qs] / pops[qs].sum()
            self._top_query_cum.append(list(np.cumsum(p)))
        names = [d[0] for d in cfg.domains]
        shares = np.array([d[1] for d in cfg.domains], dtype=float)
        self._domain_names = names
        self._domain_cum = list(np.cumsum(shares / shares.sum()))
        self._domain_offset = {d[0]: d[2] for d in cfg.domains}

    def _build_drift(self, rng: np.random.Generator) -> None:
        cfg, d = self.config, self.config.drift
        t0, h = cfg.epoch, d.horizon_s
        self._abrupt_at = t0 + d.abrupt_at * h
        self._gradual_window = (t0 + d.gradual_start * h, t0 + d.gradual_end * h)
        self._trend_window = (t0 + d.trending_start * h, t0 + d.trending_end * h)
        self._abrupt_shift: dict[int, float] = {}  # leaf index -> logit shift
        self._gradual_ads: set[int] = set()
        self._trending: list[int] = []
        self._segments: list[DriftSegment] = []
        on = d.enabled
        drift_leaves = [c for c in self.categories if c.top_index >= d.stable_tops]
        if on and d.abrupt and drift_leaves:
            pick = rng.choice(len(drift_leaves), size=min(d.abrupt_n_categories, len(drift_leaves)), replace=False)
            leaves = [drift_leaves[int(i)] for i in sorted(pick)]
            shifts = [d.abrupt_shift * (1 if j % 2 == 0 else -1) for j in range(len(leaves))]
            for c, s in zip(leaves, shifts):
                self._abrupt_shift[c.index] = s
            self._segments.append(DriftSegment(
                "abrupt", "category", tuple(c.id for c in leaves), self._abrupt_at, math.inf,
                d.abrupt_shift, tuple(shifts)))
        abrupt_ids = {self.categories[i].id for i in self._abrupt_shift}
        if on and d.gradual:
            pool = [a.index for a in self.ads if self.category_by_id[a.category].top_index >= d.stable_tops
                    and a.category not in abrupt_ids]
            if pool:
                pick = rng.choice(len(pool), size=min(d.gradual_n_ads, len(pool)), replace=False)
                ads = sorted(pool[int(i)] for i in pick)
                self._gradual_ads = set(ads)
                g0, g1 = self._gradual_window
                self._segments.append(DriftSegment(
                    "gradual", "ad", tuple(self.ads[i].id for i in ads), g0, g1, d.gradual_shift))
        if on and d.new_ads and drift_leaves and d.new_ads_n > 0:
            times = np.sort(rng.uniform(d.new_ads_start, d.new_ads_end, d.new_ads_n)) * h + t0
            new_ids = []
            for t in times:
                leaf = drift_leaves[int(rng.integers(len(drift_leaves)))]
                ad = self._make_ad(rng, len(self.ads), round(float(t), 3), leaf)
                self.ads.append(ad)
                self.ad_by_id[ad.id] = ad
                new_ids.append(ad.id)
            self._segments.append(DriftSegment(
                "new_ads", "ad", tuple(new_ids), float(times[0]), float(times[-1]), 0.0))
        if on and d.trending and d.trending_n_queries > 0:
            pool = [q.index for q in self.queries if self.category_by_id[q.category].top_index >= d.stable_tops
                    and q.kind == "base"]
            # trending queries are rare ones that suddenly become popular
            pool.sort(key=lambda i: self.queries[i].popularity)
            pool = pool[: max(d.trending_n_queries, len(pool) // 2)]
            pick = rng.choice(len(pool), size=min(d.trending_n_queries, len(pool)), replace=False)
            self._trending = sorted(pool[int(i)] for i in pick)
            w0, w1 = self._trend_window
            self._segments.append(DriftSegment(
                "trending", "query", tuple(self.queries[i].text for i in self._trending), w0, w1, 0.0))
        self._ad_top = [self.category_by_id[a.category].top_index for a in self.ads]
        self._ad_leaf = [self.category_by_id[a.category].index for a in self.ads]
        self._active_from = np.array([a.active_from for a in self.ads], dtype=float)

    def _build_creative_content(self) -> None:
        """Content for every creative (initial and new ads), from its own generator so that no other
        draw of the world moves; ``quality`` becomes main(content) + residual_share · old quality."""
        cc = self.config.creative_content
        self.creative_effects: CreativeEffects | None = None
        if not cc.enabled:
            return
        rng = np.random.default_rng([self.config.seed, cc.seed_stream])
        fx = self.creative_effects = CreativeEffects(cc, self.config.n_segments, rng)
        for i, ad in enumerate(self.ads):
            crs = []
            for c in ad.creatives:
                content = fx.draw(rng)
                crs.append(replace(c, quality=round(fx.main(content) + cc.residual_share * c.quality, 4),
                                   content=content))
            self.ads[i] = replace(ad, creatives=tuple(crs))
            self.ad_by_id[ad.id] = self.ads[i]

    def _build_images(self) -> None:
        """A product picture per ad and an image per creative (``core.images``), from their own
        generator; ``quality`` gains the image's main effect (broken images lose a lot)."""
        ic = self.config.images
        self.image_effects: ImageEffects | None = None
        self.products: dict[str, Product] = {}
        if not ic.enabled:
            return
        from core.images import draw_product, draw_spec, scene_of, shape_of

        rng = np.random.default_rng([self.config.seed, ic.seed_stream])
        fx = self.image_effects = ImageEffects(ic, self.config.n_segments, rng)
        scenes = [scene_of(t, i) for i, t in enumerate(self.tops)]
        for i, ad in enumerate(self.ads):
            ti = self.category_by_id[ad.category].top_index
            product = self.products[ad.id] = draw_product(rng, shape_of(self.tops[ti], ti), scenes[ti])
            others = [s for j, s in enumerate(scenes) if j != ti]
            crs = []
            for c in ad.creatives:
                broken = BROKEN_KINDS[int(rng.integers(len(BROKEN_KINDS)))] if rng.random() < ic.broken_share else ""
                spec = draw_spec(rng, product, scenes[ti], others, ic, broken)
                crs.append(replace(c, quality=round(c.quality + fx.main(spec), 4), image=spec))
            self.ads[i] = replace(ad, creatives=tuple(crs))
            self.ad_by_id[ad.id] = self.ads[i]

    def _build_cross_domain(self) -> None:
        """Domain-specific taste offsets and the users new to the target domain (``core.domains``),
        from their own generator so that no other draw of the world moves."""
        xd = self.config.cross_domain
        self.domain_effects: DomainEffects | None = None
        self._new_from = _NEG_INF
        if not xd.enabled:
            return
        rng = np.random.default_rng([self.config.seed, xd.seed_stream])
        self.domain_effects = DomainEffects(xd, self._domain_names, len(self.users), len(self.tops), rng)
        self._new_from = self.config.epoch + xd.new_from * self.config.drift.horizon_s
        others = [i for i, d in enumerate(self._domain_names) if d != xd.target]
        shares = np.array([self.config.domains[i][1] for i in others], dtype=float)
        self._other_domains = [self._domain_names[i] for i in others]
        self._other_domain_cum = list(np.cumsum(shares / shares.sum()))
        self._xd_top_cum = self.domain_effects.top_cum(np.array([u.preference for u in self.users]))
    def _build_tail_queries(self) -> None:
        """Lexicon on: tail queries (colloquial synonyms, attribute surfaces, typos) with their gold
        concepts, taking ``tail_share`` of the traffic; drawn from their own generator."""
        lc = self.config.lexicon
        self.lexicon: Lexicon | None = None
        if not lc.enabled:
            return
        rng = np.random.default_rng([self.config.seed, lc.seed_stream])
        lex = self.lexicon = Lexicon.build(self.categories, BRANDS)
        for q in self.queries:
            lex.concepts[q.text] = lex.parse(q.text)
        tail = build_tail_queries(lex, self.categories, BRANDS, lc, rng, set(self.query_by_text))
        base_pop = sum(q.popularity for q in self.queries)
        weights = np.array([1.0 / (1 + i % max(1, lc.n_tail_per_leaf)) ** 0.5 for i in range(len(tail))])
        if len(tail) and lc.tail_share > 0:
            weights *= base_pop * lc.tail_share / (1.0 - lc.tail_share) / weights.sum()
        for tq, pop in zip(tail, weights.tolist()):
            tq.popularity = float(pop)
            lex.concepts[tq.text] = Concept(tq.leaf, tq.attrs)
            self.queries.append(Query(tq.text, tq.leaf, len(self.queries), float(pop), tq.kind))
        lex.tail = tail
        self.query_by_text = {q.text: q for q in self.queries}
        self._query_tokens = [frozenset(q.text.split()) for q in self.queries]

    def _build_titles(self) -> None:
        """Lexicon on: a product title for every ad (initial and new ones)."""
        lex = self.lexicon
        if lex is None:
            return
        rng = np.random.default_rng([self.config.seed, self.config.lexicon.seed_stream, 1])
        for i, ad in enumerate(self.ads):
            leaf = self.category_by_id[ad.category]
            title = render_title(rng, leaf, [w for w, _ in ad.bidwords], lex, BRANDS, self.config.lexicon, leaf.top)
            self.ads[i] = replace(ad, title=title)
            self.ad_by_id[ad.id] = self.ads[i]
            lex.titles[ad.id] = title

    def _index_candidates(self) -> None:
        """Per query: candidate ads (bidword match, same leaf, same top) as arrays for ranking."""
        self._cands: list[dict[str, Any]] = []
        for q in self.queries:
            qtok = self._query_tokens[q.index]
            qleaf = self.category_by_id[q.category]
            found: dict[int, tuple[str, float, str]] = {}
            for a in self.ads:
                best: tuple[str, float, str] | None = None
                for w, bid in a.bidwords:
                    wt = frozenset(w.split())
                    if wt <= qtok:
                        m = "exact" if wt == qtok else "broad"
                        key = (m == "exact", bid)
                        if best is None or key > (best[2] == "exact", best[1]):
                            best = (w, bid, m)
                if best is None:
                    leaf = self.category_by_id[a.category]
                    if leaf.id == qleaf.id:
                        best = (a.bidwords[0][0], a.bidwords[0][1], "category")
                    elif leaf.top_index == qleaf.top_index:
                        best = (a.bidwords[0][0], a.bidwords[0][1], "related")
                if best is not None:
                    found[a.index] = best
            idx = sorted(found)
            ads = np.array(idx, dtype=np.int64)
            bids = [found[i][1] for i in idx]
            static = np.array(
                [math.log(found[i][1]) + self.config.policy_quality_weight * self.ads[i].quality
                 + _MATCH_BONUS[found[i][2]] for i in idx], dtype=float)
            self._cands.append({
                "ads": ads,
                "ad_list": idx,
                "active_from": self._active_from[ads],
                "bidwords": [found[i][0] for i in idx],
                "bids": bids,
                "match": [found[i][2] for i in idx],
                "static": static,
                "has_new": bool(np.isfinite(self._active_from[ads]).any()) if len(idx) else False,
            })

    # ---- lookups

    def _u(self, user: User | str | int) -> User:
        if isinstance(user, User):
            return user
        return self.users[user] if isinstance(user, int) else self.user_by_id[user]

    def _q(self, query: Query | str | int) -> Query:
        if isinstance(query, Query):
            return query
        return self.queries[query] if isinstance(query, int) else self.query_by_text[query]

    def _a(self, ad: Ad | str | int) -> Ad:
        if isinstance(ad, Ad):
            return ad
        return self.ads[ad] if isinstance(ad, int) else self.ad_by_id[ad]

    def _c(self, ad: Ad, creative: Creative | str | int) -> Creative:
        if isinstance(creative, Creative):
            return creative
        if isinstance(creative, int):
            return ad.creatives[creative]
        for c in ad.creatives:
            if c.id == creative:
                return c
        raise KeyError(f"creative {creative!r} does not belong to ad {ad.id}")

    def top_of(self, category_id: str) -> str:
        return self.category_by_id[category_id].top

    def best_creative(self, ad: Ad | str, user: User | str | int | None = None) -> Creative:
        """The creative with the highest true effect (the creative ranker's target): for ``user``
        when given (content effects depend on the segment), else by ``quality``."""
        a = self._a(ad)
        if user is None:
            return max(a.creatives, key=lambda c: c.quality)
        u = self._u(user).index
        return max(a.creatives, key=lambda c: self._creative_logit(u, c))

    def creative_features(self, creative: Creative) -> dict[str, Any]:
        """The creative's content as impression/example features (empty when content is off)."""
        return creative.content.features() if creative.content is not None else {}

    def creative_logit(self, user: User | str | int, ad: Ad | str | int, creative: Creative | str | int) -> float:
        """The creative's part of the true CTR logit for ``user``: quality + personal(segment, content)."""
        a = self._a(ad)
        return self._creative_logit(self._u(user).index, self._c(a, creative))

    def _creative_logit(self, u: int, c: Creative) -> float:
        fx = self.creative_effects
        v = c.quality
        if fx is not None and c.content is not None:
            v += fx.personal(self._user_seg[u], c.content)
        if c.image is not None and self.image_effects is not None:
            v += self.image_effects.personal(self._user_seg[u], c.image)
        return v

    def creative_image(self, ad: Ad | str | int, creative: Creative | str | int) -> np.ndarray:
        """The creative's picture (``size × size × 3`` uint8; images must be on)."""
        from core.images import render

        c = self._c(self._a(ad), creative)
        if c.image is None:
            raise ValueError("this world has no creative images (WorldConfig.images.enabled is off)")
        return render(c.image, self.config.images.size)

    def product(self, ad: Ad | str | int) -> Product:
        return self.products[self._a(ad).id]

    def product_image(self, ad: Ad | str | int) -> np.ndarray:
        from core.images import render_product

        return render_product(self.product(ad), self.config.images.size)

    def creative_event(self, ad: Ad | str | int, creative: Creative | str | int, t: float,
                       reviewed: bool = True) -> CreativeChange:
        """The catalogue event announcing a creative (image, product image, content, the review
        label when ``reviewed``)."""
        from core.images import to_png

        a = self._a(ad)
        c = self._c(a, creative)
        feats: dict[str, Any] = dict(c.content.features()) if c.content is not None else {}
        feats["title"] = self.category_by_id[a.category].name
        return CreativeChange(event_time=round(t, 6), ad_id=a.id, creative_id=c.id, action="add",
                              category=a.category, image=to_png(self.creative_image(a, c)),
                              product_image=to_png(self.product_image(a)),
                              review=c.image.label if (reviewed and c.image is not None) else "",
                              source="world", features=feats)

    def domain_taste(self, user: User | str | int, domain: str) -> tuple[float, ...]:
        """The user's taste per top category in ``domain`` (the shared preference plus the domain's
        and the user's own offsets; the preference itself when cross-domain behaviour is off)."""
        u = self._u(user)
        fx = self.domain_effects
        return u.preference if fx is None else fx.taste(u.preference, u.index, domain)

    def is_new_to_target(self, user: User | str | int) -> bool:
        """Whether the user makes no target-domain request before :attr:`new_target_from`."""
        fx = self.domain_effects
        return bool(fx is not None and fx.new_to_target[self._u(user).index])

    @property
    def new_target_from(self) -> float:
        """Event time from which users new to the target domain may appear there (-inf when off)."""
        return self._new_from

    def active_ads(self, t: float) -> list[Ad]:
        return [a for a in self.ads if a.active_from <= t]

    # ---- ground truth

    def position_bias(self, position: int) -> float:
        """Examination probability of a 0-based position (1.0 at the top)."""
        b = self._pos_bias_cache.get(position)
        if b is None:
            table = self.config.position_bias_table
            if table is not None:
                b = table[min(position, len(table) - 1)]
            else:
                b = 1.0 / (1.0 + position) ** self.config.position_bias_exponent
            self._pos_bias_cache[position] = b
        return b

    def relevance(self, query: Query | str, ad: Ad | str) -> float:
        """Query–ad relevance on the logit scale: same leaf / same top category / other."""
        q, a = self._q(query), self._a(ad)
        return self._relevance(self.category_by_id[q.category].index, a.index)

    def _relevance(self, qleaf: int, ad_index: int) -> float:
        cfg = self.config
        if self._ad_leaf[ad_index] == qleaf:
            return cfg.rel_same_leaf
        if self._ad_top[ad_index] == self.categories[qleaf].top_index:
            return cfg.rel_same_top
        return cfg.rel_other

    def drift_shift(self, ad: Ad | str | int, t: float) -> float:
        """The CTR-logit drift of an ad at event time ``t`` (0 when it does not drift)."""
        return self._drift_shift(self._a(ad).index, t)

    def _drift_shift(self, a: int, t: float) -> float:
        s = 0.0
        if self._abrupt_shift and t >= self._abrupt_at:
            s += self._abrupt_shift.get(self._ad_leaf[a], 0.0)
        if a in self._gradual_ads:
            g0, g1 = self._gradual_window
            if t > g0:
                s += self.config.drift.gradual_shift * min(1.0, (t - g0) / (g1 - g0) if g1 > g0 else 1.0)
        return s

    def _logit(self, u: int, q: int, a: int, cr: float, t: float, domain: str) -> float:
        cfg = self.config
        ad = self.ads[a]
        qleaf = self.category_by_id[self.queries[q].category].index
        return (
            cfg.base_logit
            + self.users[u].preference[self._ad_top[a]]
            + self._relevance(qleaf, a)
            + ad.quality
            + cr
            + self._domain_offset.get(domain, 0.0)
            + self._drift_shift(a, t)
            + (self.domain_effects.logit_offset(u, domain, self._ad_top[a]) if self.domain_effects else 0.0)
        )

    def true_ctr(
        self,
        user: User | str | int,
        query: Query | str | int,
        ad: Ad | str | int,
        creative: Creative | str | int,
        position: int,
        t: float,
        domain: str = "search",
    ) -> float:
        """P(click) of showing ``creative`` of ``ad`` at 0-based ``position`` to ``user`` for
        ``query`` at event time ``t``: sigmoid(logit) × position_bias(position)."""
        u, q, a = self._u(user), self._q(query), self._a(ad)
        c = self._c(a, creative)
        return (sigmoid(self._logit(u.index, q.index, a.index, self._creative_logit(u.index, c), t, domain))
                * self.position_bias(position))

    click_prob = true_ctr  # the name the traffic simulator uses

    def attractiveness(self, user: User | str | int, query: Query | str | int, ad: Ad | str | int,
                       creative: Creative | str | int, t: float, domain: str = "search") -> float:
        """P(click | examined): the true CTR without the position bias."""
        return self.true_ctr(user, query, ad, creative, 0, t, domain) / self.position_bias(0)

    def conversion_prob(self, user: User | str | int, ad: Ad | str | int, t: float = 0.0) -> float:
        """P(conversion | click) = sigmoid(conv_base + 0.5·quality(ad) + 0.5·pref[user, top(ad)])."""
        u, a = self._u(user), self._a(ad)
        return self._conv_prob(u.index, a.index)

    def _conv_prob(self, u: int, a: int) -> float:
        return sigmoid(self.config.conv_base_logit + 0.5 * self.ads[a].quality
                       + 0.5 * self.users[u].preference[self._ad_top[a]])

    # ---- drift introspection

    def drifted_segments(self) -> list[DriftSegment]:
        """Every drifted segment with its kind, ids, times and logit shift."""
        return list(self._segments)

    def stable_categories(self) -> list[str]:
        """Leaf ids untouched by any drift: no CTR shift, no drifting ad, no new ad, no trending
        query. Always includes every leaf of the first ``stable_tops`` top categories."""
        touched: set[str] = {self.categories[i].id for i in self._abrupt_shift}
        touched |= {self.ads[i].category for i in self._gradual_ads}
        touched |= {a.category for a in self.ads if math.isfinite(a.active_from)}
        touched |= {self.queries[i].category for i in self._trending}
        return [c.id for c in self.categories if c.id not in touched]

    def is_drifted(self, ad: Ad | str | int) -> bool:
        a = self._a(ad).index
        return self._ad_leaf[a] in self._abrupt_shift or a in self._gradual_ads

    # ---- traffic

    def sample_request(self, rng: random.Random, t: float, domain: str | None = None) -> Request:
        """Draw one request at event time ``t``: a user (by activity), a query (by the user's taste
        for top categories, global popularity, or a trending query inside its window)."""
        u = min(bisect.bisect_left(self._user_cum, rng.random()), len(self.users) - 1)
        if self.domain_effects is not None and domain is None:
            return self._sample_cross_domain(rng, t, u)
        w0, w1 = self._trend_window
        if self._trending and w0 <= t < w1 and rng.random() < self.config.drift.trending_share:
            q = self._trending[int(rng.random() * len(self._trending))]
        elif rng.random() < self.config.user_pref_share:
            cum = self._user_top_cum[u]
            top = min(bisect.bisect_left(cum, rng.random()), len(cum) - 1)
            qs, qcum = self._top_queries[top], self._top_query_cum[top]
            q = qs[min(bisect.bisect_left(qcum, rng.random()), len(qs) - 1)]
        else:
            q = min(bisect.bisect_left(self._query_cum, rng.random()), len(self.queries) - 1)
        if domain is None:
            if len(self._domain_names) == 1:
                domain = self._domain_names[0]
            else:
                domain = self._domain_names[min(bisect.bisect_left(self._domain_cum, rng.random()),
                                                len(self._domain_names) - 1)]
        return Request(t, self.users[u].id, self.queries[q].text, domain, u, q)

    def _sample_cross_domain(self, rng: random.Random, t: float, u: int) -> Request:
        """Cross-domain requests: the domain first (a user new to the target is elsewhere until
        ``new_from``), then a query by the user's taste in that domain (or trending / popular)."""
        fx = self.domain_effects
        assert fx is not None
        names = self._domain_names
        domain = names[min(bisect.bisect_left(self._domain_cum, rng.random()), len(names) - 1)]
        if domain == fx.target and t < self._new_from and fx.new_to_target[u]:
            domain = self._other_domains[min(bisect.bisect_left(self._other_domain_cum, rng.random()),
                                             len(self._other_domains) - 1)]
        w0, w1 = self._trend_window
        if self._trending and w0 <= t < w1 and rng.random() < self.config.drift.trending_share:
            q = self._trending[int(rng.random() * len(self._trending))]
        elif rng.random() < self.config.user_pref_share:
            cum = self._xd_top_cum[u, fx.index[domain]]
            top = min(int(np.searchsorted(cum, rng.random())), len(cum) - 1)
            qs, qcum = self._top_queries[top], self._top_query_cum[top]
            q = qs[min(bisect.bisect_left(qcum, rng.random()), len(qs) - 1)]
        else:
            q = min(bisect.bisect_left(self._query_cum, rng.random()), len(self.queries) - 1)
        return Request(t, self.users[u].id, self.queries[q].text, domain, u, q)

    def candidates(self, query: Query | str, t: float | None = None) -> list[Candidate]:
        """Ads that may be served for ``query`` (active at ``t`` when given): bidword matches
        (``exact``/``broad``: every bidword token appears in the query), ads of the query's leaf
        (``category``) and of its top category (``related``)."""
        q = self._q(query)
        c = self._cands[q.index]
        out = []
        for j, a in enumerate(c["ads"].tolist()):
            if t is not None and self.ads[a].active_from > t:
                continue
            out.append(Candidate(self.ads[a].id, c["bidwords"][j], c["bids"][j], c["match"][j]))
        return out

    def serve(self, rng: random.Random, nprng: np.random.Generator, req: Request, slots: int) -> list[ServedSlot]:
        """The built-in serving policy: rank candidates by log(bid) + w·quality + match bonus +
        noise, fill ``slots`` positions, explore a random ad per slot with ``explore_rate``, pick a
        creative by ``creative_policy``; then draw clicks and conversions from the ground truth."""
        cfg = self.config
        t = req.event_time
        c = self._cands[req.query_index]
        k = len(c["ads"])
        chosen: list[tuple[int, str, float, str]] = []
        if k:
            score = c["static"] + nprng.normal(0.0, cfg.policy_noise, k)
            if c["has_new"]:
                score[c["active_from"] > t] = _NEG_INF
            order = np.argsort(-score, kind="stable")[:slots].tolist() if k > 1 else [0]
            ads, bws, bids, match = c["ad_list"], c["bidwords"], c["bids"], c["match"]
            for j in order:
                if c["has_new"] and self.ads[ads[j]].active_from > t:
                    break
                chosen.append((ads[j], bws[j], bids[j], match[j]))
        n_ads = len(self.ads)
        used = {x[0] for x in chosen}
        for pos in range(slots):
            if rng.random() >= cfg.explore_rate:
                continue
            for _ in range(8):
                a = int(rng.random() * n_ads)
                if a not in used and self.ads[a].active_from <= t:
                    ad = self.ads[a]
                    w, bid = ad.bidwords[0]
                    if pos < len(chosen):
                        used.discard(chosen[pos][0])
                        chosen[pos] = (a, w, bid, "explore")
                    else:
                        chosen.append((a, w, bid, "explore"))
                    used.add(a)
                    break
        out: list[ServedSlot] = []
        u = req.user_index
        for pos, (a, w, bid, m) in enumerate(chosen):
            ad = self.ads[a]
            n_cr = len(ad.creatives)
            if cfg.creative_policy == "random" or (cfg.creative_policy == "epsilon" and rng.random() < 0.2):
                ci = int(rng.random() * n_cr)
            else:
                ci = max(range(n_cr), key=lambda i: ad.creatives[i].quality)
            p = sigmoid(self._logit(u, req.query_index, a, self._creative_logit(u, ad.creatives[ci]), t,
                                    req.domain)) * self.position_bias(pos)
            clicked = rng.random() < p
            click_time = conv_time = value = 0.0
            converted = False
            if clicked:
                click_time = t + 1.0 + rng.expovariate(1.0 / cfg.click_delay_mean_s)
                if rng.random() < self._conv_prob(u, a):
                    converted = True
                    conv_time = click_time + 1.0 + rng.expovariate(1.0 / cfg.conversion_delay_mean_s)
                    price = self.category_by_id[ad.category].price
                    value = round(price * math.exp(rng.gauss(0.0, 0.3)), 2)
            out.append(ServedSlot(a, ci, w, bid, m, pos, p, clicked, click_time, converted, conv_time, value))
        return out

    def simulate(
        self,
        start_time: float | None = None,
        duration_s: float = 3600.0,
        requests_per_s: float = 10.0,
        slots: int = 4,
        seed: int | None = None,
    ) -> Iterator[tuple[Request, str, list[ServedSlot]]]:
        """Requests in event-time order (Poisson arrivals at ``requests_per_s``), each with its
        request id and what was served and what happened. The basis of :meth:`generate` and
        :meth:`to_examples_frame`."""
        from core.errors import ConfigError

        if requests_per_s <= 0 or duration_s < 0 or slots < 1:
            raise ConfigError("need requests_per_s > 0, duration_s >= 0 and slots >= 1")
        seed = self.config.seed if seed is None else seed
        rng = random.Random(seed)
        nprng = np.random.default_rng([seed, 1])
        t = self.config.epoch if start_time is None else float(start_time)
        end = t + duration_s
        n = 0
        while True:
            t += rng.expovariate(requests_per_s)
            if t >= end:
                return
            req = self.sample_request(rng, t)
            yield req, f"r{seed}-{n}", self.serve(rng, nprng, req, slots)
            n += 1

    def generate(
        self,
        start_time: float | None = None,
        duration_s: float = 3600.0,
        requests_per_s: float = 10.0,
        slots: int = 4,
        seed: int | None = None,
        inventory_events: bool = True,
        initial_inventory: bool = False,
    ) -> Iterator[Event]:
        """Impressions, clicks, conversions (and bidword-inventory changes) in event-time order.

        Clicks come 1 s + Exp(``click_delay_mean_s``) after their impression and carry the served
        ids; conversions follow their click. Events after the end of the window (late clicks) are
        still emitted, in order, after the last request. ``inventory_events`` emits
        ``BidwordChange(add)`` when a new ad appears inside the window; ``initial_inventory`` also
        emits the initial inventory at the start. The same seed gives the same stream."""
        start = self.config.epoch if start_time is None else float(start_time)
        end = start + duration_s
        pending: list[tuple[float, int, Event]] = []
        seq = 0

        def push(ev: Event) -> None:
            nonlocal seq
            heapq.heappush(pending, (ev.event_time, seq, ev))
            seq += 1

        for ad in self.ads:
            inside = math.isfinite(ad.active_from) and start <= ad.active_from < end
            if (inventory_events and inside) or (initial_inventory and ad.active_from <= start):
                at = start if ad.active_from <= start else ad.active_from
                for w, bid in ad.bidwords:
                    push(BidwordChange(event_time=round(at, 6), ad_id=ad.id, bidword=w, action="add",
                                       bid=bid, category=ad.category))
            if self.image_effects is not None and (ad.active_from <= start or (inventory_events and inside)):
                # the creative catalogue: every creative's image, a share of them with a review label
                at = start if ad.active_from <= start else ad.active_from
                rv = random.Random(f"{self.config.seed}-{ad.id}-review")
                for c in ad.creatives:
                    push(self.creative_event(ad, c, at, rv.random() < self.config.images.review_share))
        for req, rid, served in self.simulate(start, duration_s, requests_per_s, slots, seed):
            t = round(req.event_time, 6)
            while pending and pending[0][0] <= t:
                yield heapq.heappop(pending)[2]
            user = self.users[req.user_index]
            q = req.query
            qlen = len(q.split())
            for s in served:
                ad = self.ads[s.ad]
                cr = ad.creatives[s.creative]
                features = {"segment": user.segment, "match": s.match, "top_category": self.tops[self._ad_top[s.ad]],
                            "advertiser": ad.advertiser, "query_len": qlen}
                if cr.content is not None:
                    features.update(cr.content.features())
                yield Impression(
                    request_id=rid, event_time=t, user_id=user.id, query=q, ad_id=ad.id,
                    creative_id=cr.id, bidword=s.bidword,
                    category=ad.category, position=s.position, bid=s.bid,
                    slot="top" if s.position < self.config.top_slots else "side", domain=req.domain,
                    features=features,
                )
                if s.clicked:
                    push(Click(request_id=rid, event_time=round(s.click_time, 6), ad_id=ad.id,
                               user_id=user.id, creative_id=ad.creatives[s.creative].id, query=q,
                               bidword=s.bidword, category=ad.category))
                if s.converted:
                    push(Conversion(request_id=rid, event_time=round(s.conversion_time, 6), ad_id=ad.id,
                                    user_id=user.id, value=s.value))
        while pending:
            yield heapq.heappop(pending)[2]

    # ---- offline evaluation

    EXAMPLE_CATEGORICAL = ("user_id", "segment", "query", "query_category", "ad_id", "advertiser",
                           "creative_id", "bidword", "category", "top_category", "match", "domain", "slot")
    EXAMPLE_NUMERIC = ("position", "bid", "query_len")

    def to_examples_frame(
        self,
        start_time: float | None = None,
        duration_s: float = 3600.0,
        requests_per_s: float = 10.0,
        slots: int = 4,
        seed: int | None = None,
    ) -> "pd.DataFrame":
        """Labelled impressions of :meth:`simulate` as a DataFrame (one row per impression, in
        event-time order): ``event_time``, ``clicked`` (label), ``converted``, the categorical id
        columns :attr:`EXAMPLE_CATEGORICAL`, the numeric columns :attr:`EXAMPLE_NUMERIC`,
        ``request_id`` and the oracle ``true_ctr`` (for evaluation only, never a feature). With
        creative content on, the content columns of ``core.creatives.CONTENT_COLUMNS`` come before
        ``true_ctr``. The rows are exactly the impressions :meth:`generate` yields for the same
        arguments."""
        import pandas as pd

        content = self.creative_effects is not None
        cols: dict[str, list[Any]] = {k: [] for k in (
            "event_time", "request_id", "clicked", "converted", *self.EXAMPLE_CATEGORICAL,
            *self.EXAMPLE_NUMERIC, *(CONTENT_COLUMNS if content else ()), "true_ctr")}
        top_slots = self.config.top_slots
        for req, rid, served in self.simulate(start_time, duration_s, requests_per_s, slots, seed):
            user = self.users[req.user_index]
            qcat = self.queries[req.query_index].category
            qlen = len(req.query.split())
            t = round(req.event_time, 6)
            for s in served:
                ad = self.ads[s.ad]
                cols["event_time"].append(t)
                cols["request_id"].append(rid)
                cols["clicked"].append(int(s.clicked))
                cols["converted"].append(int(s.converted))
                cols["user_id"].append(user.id)
                cols["segment"].append(user.segment)
                cols["query"].append(req.query)
                cols["query_category"].append(qcat)
                cols["ad_id"].append(ad.id)
                cols["advertiser"].append(ad.advertiser)
                cols["creative_id"].append(ad.creatives[s.creative].id)
                cols["bidword"].append(s.bidword)
                cols["category"].append(ad.category)
                cols["top_category"].append(self.tops[self._ad_top[s.ad]])
                cols["match"].append(s.match)
                cols["domain"].append(req.domain)
                cols["slot"].append("top" if s.position < top_slots else "side")
                cols["position"].append(s.position)
                cols["bid"].append(s.bid)
                cols["query_len"].append(qlen)
                if content:
                    for k, v in ad.creatives[s.creative].content.features().items():
                        cols[k].append(v)
                cols["true_ctr"].append(s.p_click)
        df = pd.DataFrame(cols)
        df["position"] = df["position"].astype("int64")
        df["query_len"] = df["query_len"].astype("int64")
        df["bid"] = df["bid"].astype("float64")
        return df

    def summary(self) -> dict[str, Any]:
        """Sizes of the world, for logs and docs."""
        return {
            "top_categories": len(self.tops),
            "leaf_categories": len(self.categories),
            "queries": len(self.queries),
            "bidwords": sum(len(v) for v in self.bidwords_by_category.values()),
            "ads": len(self.ads),
            "new_ads": sum(1 for a in self.ads if math.isfinite(a.active_from)),
            "creatives": sum(len(a.creatives) for a in self.ads),
            "users": len(self.users),
            "drifted_segments": [(s.kind, len(s.ids)) for s in self._segments],
            "creative_content": self.creative_effects is not None,
            "cross_domain": self.domain_effects.summary() if self.domain_effects is not None else False,
        }


def generate_examples(
    world: World | None = None,
    start_time: float | None = None,
    duration_s: float = 3600.0,
    requests_per_s: float = 10.0,
    slots: int = 4,
    seed: int | None = None,
) -> "pd.DataFrame":
    """:meth:`World.to_examples_frame` on ``world`` (a default world when None)."""
    return (world or World()).to_examples_frame(start_time, duration_s, requests_per_s, slots, seed)


def example_columns(world: World | None = None) -> dict[str, Sequence[str] | str]:
    """The column roles of the examples frame, as the CTR evaluation expects them (with the
    creative content columns when ``world`` has content on)."""
    content = world is not None and world.creative_effects is not None
    return {
        "time_col": "event_time",
        "label_col": "clicked",
        "categorical": list(World.EXAMPLE_CATEGORICAL)
        + ([k for k, r in CONTENT_COLUMNS.items() if r == "categorical"] if content else []),
        "numeric": list(World.EXAMPLE_NUMERIC)
        + ([k for k, r in CONTENT_COLUMNS.items() if r == "numeric"] if content else []),
    }
