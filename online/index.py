"""The online ad index and the baseline query understanding.

:class:`AdIndex` holds, per ad, its bidwords with bids (from ``BidwordChange`` events on the
``bidword-inventory`` topic), its category and its creatives (a catalog: creatives do not travel on
the inventory topic). It answers :meth:`AdIndex.candidates` for a query:

* ``exact`` / ``broad``: a bidword whose tokens are all in the query (exact: the same token set);
* ``category``: ads of the query's predicted leaf category;
* ``related``: ads of the same top category (``top/leaf`` ids), when fewer than the limit matched.

Writes (the inventory feed thread) and reads (request threads) share one lock; a read copies what
it needs, so a request never sees half an update.

Query understanding is pluggable (:class:`QueryClassifier`, :class:`QueryRewriter`); the
baselines are fed by the same stream: the classifier counts the categories of ads bidding on the
query's matched bidwords, the rewriter returns the matched bidwords.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

from core.events import BidwordChange

# match types, best first: literal bidword matches, a generated bidword (the rewriter), a GRAM
# candidate (generative retrieval), the predicted category, its top category
MATCH_ORDER = {"exact": 0, "broad": 1, "rewrite": 2, "gram": 3, "category": 4, "related": 5}


def tokens(text: str) -> frozenset[str]:
    return frozenset(text.lower().split())


def top_of(category: str) -> str:
    return category.split("/", 1)[0] if category else ""


@dataclass(frozen=True, slots=True)
class Candidate:
    ad_id: str
    bidword: str
    bid: float
    category: str
    match: str
    creatives: tuple[str, ...]
    advertiser: str = ""
    code: str = ""  # GRAM: the code the candidate was retrieved by


@dataclass(slots=True)
class _Ad:
    category: str = ""
    bidwords: dict[str, float] = field(default_factory=dict)
    creatives: tuple[str, ...] = ()
    advertiser: str = ""


class AdIndex:
    """Bidword / category index of the live ad inventory (thread-safe)."""

    def __init__(self, default_creatives=lambda ad_id: (f"{ad_id}-c0",)) -> None:
        self._lock = threading.Lock()
        self._ads: dict[str, _Ad] = {}
        self._catalog: dict[str, tuple[tuple[str, ...], str, str]] = {}  # ad -> (creatives, adv, cat)
        self._content: dict[str, dict] = {}  # creative -> its content features (cr_*), when known
        self._word_ads: dict[str, dict[str, float]] = defaultdict(dict)  # bidword -> ad -> bid
        self._word_tokens: dict[str, frozenset[str]] = {}
        self._token_words: dict[str, set[str]] = defaultdict(set)
        self._by_category: dict[str, set[str]] = defaultdict(set)
        self._by_top: dict[str, set[str]] = defaultdict(set)
        self._default_creatives = default_creatives
        self.changes_applied = 0
        self.version = 0
        # called (under the index lock, so keep them short) when a bidword becomes live or stops being
        # live (word, live: bool), and when an ad becomes live or stops being live (ad id, category, live)
        self._word_listeners: list = []
        self._ad_listeners: list = []

    def add_listener(self, on_word=None, on_ad=None) -> None:
        """Be told of every bidword (``on_word(word, live)``) and ad (``on_ad(ad_id, category, live)``)
        that appears in or leaves the live inventory, in the applying thread, the moment it happens."""
        with self._lock:
            if on_word is not None:
                self._word_listeners.append(on_word)
            if on_ad is not None:
                self._ad_listeners.append(on_ad)

    def remove_listener(self, fn) -> None:
        with self._lock:
            for lst in (self._word_listeners, self._ad_listeners):
                if fn in lst:
                    lst.remove(fn)

    def _tell(self, listeners, *args) -> None:
        for fn in list(listeners):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a listener must not break the inventory feed
                import logging

                logging.getLogger(__name__).exception("inventory listener failed")

    # ---- writes -------------------------------------------------------------------------------
    def set_catalog(self, ad_id: str, creatives: Iterable[str], advertiser: str = "",
                    category: str = "", content: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Creatives (and advertiser) of an ad, live or not yet live; ``content``: creative id -> its
        content features (``cr_*``: what the creative ranker scores a never-shown creative from)."""
        crs = tuple(creatives)
        if not crs:
            raise ValueError(f"ad {ad_id!r} needs at least one creative")
        with self._lock:
            self._catalog[ad_id] = (crs, advertiser, category)
            for cr, feats in (content or {}).items():
                self._content[cr] = dict(feats)
            ad = self._ads.get(ad_id)
            if ad is not None:
                ad.creatives, ad.advertiser = crs, advertiser

    def add_creative(self, ad_id: str, creative_id: str, category: str = "", content: dict | None = None) -> None:
        """One more creative of an ad (the creative catalogue), with its content features (``cr_*``);
        already known: only the content is updated."""
        with self._lock:
            if content:
                self._content[creative_id] = dict(content)
            live = self._ads.get(ad_id)
            default = (live.creatives if live is not None else (), live.advertiser if live is not None else "",
                       category)
            crs, adv, cat = self._catalog.get(ad_id, default)
            if creative_id in crs:
                return
            crs = crs + (creative_id,)
            self._catalog[ad_id] = (crs, adv, cat or category)
            ad = self._ads.get(ad_id)
            if ad is not None:
                ad.creatives = crs

    def remove_creative(self, ad_id: str, creative_id: str) -> None:
        """A creative leaves its ad (an ad keeps at least its catalogue's other creatives)."""
        with self._lock:
            crs, adv, cat = self._catalog.get(ad_id, ((), "", ""))
            left = tuple(c for c in crs if c != creative_id)
            if not left or left == crs:
                return
            self._catalog[ad_id] = (left, adv, cat)
            ad = self._ads.get(ad_id)
            if ad is not None:
                ad.creatives = left

    def apply(self, change: BidwordChange) -> None:
        """Apply one inventory change (add/update/remove of a bidword on an ad)."""
        with self._lock:
            self._apply(change)

    def apply_many(self, changes: Iterable[BidwordChange]) -> int:
        n = 0
        with self._lock:
            for c in changes:
                self._apply(c)
                n += 1
        return n

    def _apply(self, c: BidwordChange) -> None:
        self.changes_applied += 1
        self.version += 1
        word = " ".join(c.bidword.lower().split())
        if not word:
            return
        if c.action == "remove":
            ad = self._ads.get(c.ad_id)
            if ad is None or word not in ad.bidwords:
                return
            del ad.bidwords[word]
            self._word_ads[word].pop(c.ad_id, None)
            if not self._word_ads[word]:
                del self._word_ads[word]
                for t in self._word_tokens.pop(word, ()):
                    self._token_words[t].discard(word)
                self._tell(self._word_listeners, word, False)
            if not ad.bidwords:  # no bidword left: the ad is no longer live
                del self._ads[c.ad_id]
                self._by_category[ad.category].discard(c.ad_id)
                self._by_top[top_of(ad.category)].discard(c.ad_id)
                self._tell(self._ad_listeners, c.ad_id, ad.category, False)
            return
        ad = self._ads.get(c.ad_id)
        new_ad = ad is None
        if ad is None:
            crs, adv, cat = self._catalog.get(c.ad_id, ((), "", ""))
            ad = self._ads[c.ad_id] = _Ad(category=c.category or cat,
                                          creatives=crs or tuple(self._default_creatives(c.ad_id)),
                                          advertiser=adv)
        elif c.category and c.category != ad.category:
            self._by_category[ad.category].discard(c.ad_id)
            self._by_top[top_of(ad.category)].discard(c.ad_id)
            ad.category = c.category
        self._by_category[ad.category].add(c.ad_id)
        self._by_top[top_of(ad.category)].add(c.ad_id)
        ad.bidwords[word] = float(c.bid)
        new_word = word not in self._word_ads
        self._word_ads[word][c.ad_id] = float(c.bid)
        if new_word:
            self._tell(self._word_listeners, word, True)
        if new_ad:
            self._tell(self._ad_listeners, c.ad_id, ad.category, True)
        if word not in self._word_tokens:
            wt = tokens(word)
            self._word_tokens[word] = wt
            for t in wt:
                self._token_words[t].add(word)

    # ---- reads --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ads)

    def creative_content(self, creative_id: str) -> dict:
        """The content features of a creative ({} when unknown). Read without the lock: one dict get."""
        return self._content.get(creative_id) or {}

    def is_live(self, word: str) -> bool:
        """Is ``word`` a bidword of a live ad right now? (no lock: one dict lookup)"""
        return word in self._word_ads

    def has_ad(self, ad_id: str) -> bool:
        return ad_id in self._ads

    def live_bidwords(self) -> list[str]:
        with self._lock:
            return sorted(self._word_ads)

    def live_creatives(self) -> list[str]:
        with self._lock:
            return [cr for ad in self._ads.values() for cr in ad.creatives]

    def match_bidwords(self, query: str) -> list[tuple[str, str]]:
        """``[(bidword, "exact" | "broad")]`` whose tokens are all in the query."""
        qt = tokens(query)
        with self._lock:
            words = set().union(*(self._token_words.get(t, ()) for t in qt)) if qt else set()
            out = []
            for w in words:
                wt = self._word_tokens[w]
                if wt <= qt:
                    out.append((w, "exact" if wt == qt else "broad"))
        out.sort(key=lambda x: (MATCH_ORDER[x[1]], x[0]))
        return out

    def category_counts(self, bidwords: Iterable[tuple[str, str]]) -> Counter:
        """Categories of the ads bidding on these bidwords (exact matches count twice)."""
        counts: Counter = Counter()
        with self._lock:
            for w, m in bidwords:
                weight = 2 if m == "exact" else 1
                for ad_id in self._word_ads.get(w, ()):
                    counts[self._ads[ad_id].category] += weight
        return counts

    def candidates(self, matched: list[tuple[str, str]], category: str | Sequence[str] | None,
                   limit: int = 200, extra: list[tuple[str, str]] | None = None) -> list[Candidate]:
        """Candidate ads: bidword matches first (exact, then broad, then bidwords the rewriter
        generated; the highest bid per ad), then ``extra`` ads (GRAM's ``(ad id, code)``, live ones
        only, at the ad's highest bid), then the predicted leaf category (or categories, best first),
        then their top categories; each ad once (its best source), at most ``limit``, best first."""
        cats = ([category] if category else []) if isinstance(category, str) else [c for c in (category or ()) if c]
        best: dict[str, tuple[int, float, str, str]] = {}
        codes: dict[str, str] = {}
        with self._lock:
            for w, m in matched:
                rank = MATCH_ORDER[m]
                for ad_id, bid in self._word_ads.get(w, {}).items():
                    cur = best.get(ad_id)
                    if cur is None or (rank, -bid) < (cur[0], -cur[1]):
                        best[ad_id] = (rank, bid, w, m)
            for ad_id, code in extra or ():
                ad = self._ads.get(ad_id)
                if ad is None or ad_id in best or not ad.bidwords:
                    continue
                w, bid = max(ad.bidwords.items(), key=lambda kv: (kv[1], kv[0]))
                best[ad_id] = (MATCH_ORDER["gram"], bid, w, "gram")
                codes[ad_id] = code
            pools = [("category", self._by_category.get(c, ())) for c in cats]
            pools += [("related", self._by_top.get(t, ())) for t in dict.fromkeys(top_of(c) for c in cats)]
            if pools:
                for m, pool in pools:
                    if len(best) >= limit:
                        break
                    for ad_id in pool:
                        if ad_id in best:
                            continue
                        ad = self._ads[ad_id]
                        w, bid = max(ad.bidwords.items(), key=lambda kv: (kv[1], kv[0]))
                        best[ad_id] = (MATCH_ORDER[m], bid, w, m)
            ranked = sorted(best.items(), key=lambda kv: (kv[1][0], -kv[1][1], kv[0]))[:limit]
            return [Candidate(ad_id, w, bid, self._ads[ad_id].category, m, self._ads[ad_id].creatives,
                              self._ads[ad_id].advertiser, codes.get(ad_id, ""))
                    for ad_id, (_r, bid, w, m) in ranked]


# ---- query understanding ------------------------------------------------------------------------
class QueryClassifier(Protocol):
    def classify(self, query: str, matched: list[tuple[str, str]]) -> str | None: ...


class QueryRewriter(Protocol):
    def rewrite(self, query: str) -> list[tuple[str, str]]: ...


class IndexRewriter:
    """Query -> bidwords by exact/token match against the live inventory."""

    def __init__(self, index: AdIndex) -> None:
        self.index = index

    def rewrite(self, query: str) -> list[tuple[str, str]]:
        return self.index.match_bidwords(query)


class CountsClassifier:
    """Query -> leaf category: the most frequent category among ads bidding on the matched
    bidwords (ties: the smallest id); None when nothing matched."""

    def __init__(self, index: AdIndex) -> None:
        self.index = index

    def classify(self, query: str, matched: list[tuple[str, str]]) -> str | None:
        counts = self.index.category_counts(matched)
        if not counts:
            return None
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


# ---- bootstrapping from the synthetic world ----------------------------------------------------
def world_inventory(world, t: float | None = None) -> list[BidwordChange]:
    """``BidwordChange(add)`` for every bidword of every ad of ``world`` live at event time ``t``
    (all initial ads when None): the same records ``World.generate(initial_inventory=True)`` emits."""
    out = []
    for ad in world.ads:
        if t is None and ad.active_from != float("-inf"):
            continue
        if t is not None and ad.active_from > t:
            continue
        at = world.config.epoch if t is None else t
        for w, bid in ad.bidwords:
            out.append(BidwordChange(event_time=at, ad_id=ad.id, bidword=w, action="add", bid=bid,
                                     category=ad.category))
    return out


def load_world_catalog(index: AdIndex, world) -> int:
    """Creatives (with their content when the world has it), advertiser and category of every ad of
    ``world`` (new ads included)."""
    for ad in world.ads:
        content = {c.id: world.creative_features(c) for c in ad.creatives if c.content is not None}
        index.set_catalog(ad.id, [c.id for c in ad.creatives], ad.advertiser, ad.category, content or None)
    return len(world.ads)
