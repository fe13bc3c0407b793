"""The rewriters as :class:`models.stream_model.StreamModel` plug-ins of the one stream worker.

One job, :class:`RewriteJob` (``adstream train-rewrite``), reads ``examples`` windows and publishes
two parts under their own registry names, each gated on the same held-out window:

* ``rewriter`` — :class:`RewriterStreamModel`, MoBGM. Its first window bootstraps it (tokenizer,
  post-pre-training on query ↔ title click pairs when a catalog of titles is given, SFT on
  query → clicked bidword pairs, the discriminator, one DPO round). Every later window: the stream
  statistics (clicks × bid per bidword), SFT on the window's new click pairs plus a replay sample of
  older ones, and every ``dpo_every`` windows a DPO round on the window's queries with the current
  policy as the reference (spec §4.6). Gate: ``click_hit`` — the share of the window's clicked
  (query, bidword) pairs whose bidword is in the model's top-k rewrite (higher is better).
* ``gram`` — :class:`GramStreamModel`, GRAM. Bootstrap: co-training on the first window's click
  links (and the catalog); later windows: new links → new query/item code rows, new ads indexed at
  once. Gate: ``click_recall`` — the share of the window's clicked (query, ad) pairs whose ad GRAM
  retrieves in its top ``gate_k``.

A removed bidword is never served whatever the version: the serving side decodes through its live
trie and filters the result against the live inventory (``online.rewrite``); a version only brings
weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from models.rewrite.catalog import world_catalog
from models.rewrite.decode import TokenTrie
from models.rewrite.gram import Gram, GramConfig
from models.rewrite.mobgm import MoBGM, MoBGMConfig, Rewrites, weak_relevance
from models.rewrite.stats import StreamStats
from models.rewrite.tokenizer import WordPieceTokenizer, normalize
from models.stream_model import Criterion, Gate

REWRITER_NAME = "rewriter"
GRAM_NAME = "gram"


@dataclass(frozen=True)
class RefreshConfig:
    min_bootstrap_clicks: int = 50  # a window with fewer clicks does not bootstrap (it only counts)
    sft_epochs: int = 2  # per window, over new pairs + replay
    replay: int = 512  # older pairs replayed per window
    refresh_lr: float = 1e-3
    dpo_every: int = 3  # windows between DPO rounds (0 = never after the bootstrap)
    dpo_queries: int = 120
    gate_queries: int = 150  # distinct queries scored per held-out window
    gate_k: int = 20  # GRAM: ads retrieved per query for the gate
    half_life_s: float = 6 * 3600.0
    min_clicks: float = 1.0  # SFT pair filter (clicks, share of the query's clicks)
    min_share: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewriteRequest:
    """What the serving side passes to :meth:`RewriterStreamModel.predict`."""

    query: str
    trie: TokenTrie | None = None  # the live trie (in this version's token ids); None = free decoding
    live: Callable[[str], bool] | None = None
    revenue: Mapping[str, float] | None = None  # bidword -> log(1 + Σ clicks × bid), else the model's own
    k: int = 3
    rerank: bool = True
    should_stop: Callable[[], bool] | None = None


def _clicked(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("clicked") and isinstance(r.get("query"), str)
            and isinstance(r.get("bidword"), str) and r.get("bidword")]


def _sample(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return list(items)
    rng = np.random.default_rng(seed)
    return [items[int(i)] for i in sorted(rng.choice(len(items), size=n, replace=False))]


class RewriterStreamModel:
    name = REWRITER_NAME
    gate = Gate.of(Criterion("click_hit", higher_is_better=True, margin=0.02, label="click hit@k"))
    thread_safe = True

    def __init__(self, cfg: MoBGMConfig | None = None, refresh: RefreshConfig | None = None,
                 titles: Mapping[str, str] | None = None, rel_labels: Sequence[tuple[str, str, int]] = (),
                 name: str = REWRITER_NAME) -> None:
        self.cfg = cfg or MoBGMConfig()
        self.refresh = refresh or RefreshConfig()
        self.titles = dict(titles or {})
        self.rel_labels = [tuple(x) for x in rel_labels]
        self.name = name
        self.m: MoBGM | None = None
        self.stats = StreamStats(self.refresh.half_life_s)
        self.bidwords: set[str] = set()  # every bidword seen in the stream (the gate's inventory)
        self.windows = 0
        self.clicks_seen = 0
        self._trie: TokenTrie | None = None

    # ---- StreamModel
    def learn(self, records: list[dict]) -> dict:
        st = self.stats.update(records)
        for r in records:
            if isinstance(r.get("bidword"), str) and r["bidword"]:
                self.bidwords.add(normalize(r["bidword"]))
        self._trie = None
        clicked = _clicked(records)
        self.windows += 1
        self.clicks_seen += len(clicked)
        out: dict[str, Any] = {**st, "clicks": len(clicked)}
        if self.m is None:
            if self.clicks_seen < self.refresh.min_bootstrap_clicks:  # the clicks of every window so far
                out["stage"] = "waiting for clicks"
                return out
            out.update(self._bootstrap())
            return out
        fresh = {(normalize(r["query"]), normalize(r["bidword"])) for r in clicked}
        pairs = [p for p in self.stats.sft_pairs(self.refresh.min_clicks) if (p[0], p[1]) in fresh]
        older = [p for p in self.stats.sft_pairs(self.refresh.min_clicks) if (p[0], p[1]) not in fresh]
        rows = pairs + _sample(older, self.refresh.replay, self.windows)
        s = self.m.sft(rows, epochs=self.refresh.sft_epochs, lr=self.refresh.refresh_lr) if rows else {}
        out["sft_rows"] = len(rows)
        out["sft_loss"] = s.get("loss_last", math.nan)
        if self.refresh.dpo_every and self.windows % self.refresh.dpo_every == 0 and self.m.disc is not None:
            qs = sorted({q for q, _ in fresh})[: self.refresh.dpo_queries]
            d = self.m.align(qs, self.trie(), self.stats.bidword_revenue())
            out["dpo_pairs"] = d.get("pairs", 0)
        return out

    def _bootstrap(self) -> dict:
        from models.rewrite.synthetic import filter_pairs

        c = self.cfg
        sft = filter_pairs(self.stats.sft_pairs(0.5), self.refresh.min_clicks, self.refresh.min_share)
        links = self.stats.click_links(0.5)
        ppt = [(q, normalize(self.titles[a]), n) for q, a, n in links if self.titles.get(a)]
        corpus = [q for q, _, _ in sft] + sorted(self.bidwords) + [t for _, t, _ in ppt]
        self.m = MoBGM.create(corpus, c)
        if ppt:
            self.m.post_pretrain(ppt)
        self.m.sft(sft)
        rel = list(self.rel_labels) or weak_relevance([(q, b) for q, b, _ in sft], sorted(self.bidwords), seed=c.seed)
        queries = sorted({q for q, _, _ in sft})
        self.m.fit_discriminator(rel, sorted(self.bidwords), self.stats.bidword_revenue(), queries, c.seed)
        self.m.align(queries[: max(self.refresh.dpo_queries, 1) * 2], self.trie(), self.stats.bidword_revenue())
        return {"stage": "bootstrap", "sft_pairs": len(sft), "ppt_pairs": len(ppt), "relevance_labels": len(rel)}

    def trie(self) -> TokenTrie:
        if self._trie is None:
            self._trie = self.m.gen.trie_of(sorted(self.bidwords))
        return self._trie

    def score(self, records: list[dict]) -> dict:
        clicked = _clicked(records)
        if self.m is None or not clicked:
            return {"click_hit": math.nan, "queries": 0}
        by_q: dict[str, set[str]] = {}
        for r in clicked:
            by_q.setdefault(normalize(r["query"]), set()).add(normalize(r["bidword"]))
        qs = _sample(sorted(by_q), self.refresh.gate_queries, self.windows)
        trie = self.m.gen.trie_of(sorted(self.bidwords | {b for q in qs for b in by_q[q]}))
        hits = n = 0
        for q in qs:
            outs = {b for b, _ in self.m.rewrite(q, trie, {}, k=self.cfg.top_k, rerank=False)}
            hits += len(outs & by_q[q])
            n += len(by_q[q])
        return {"click_hit": hits / max(n, 1), "queries": len(qs), "pairs": n}

    def predict(self, inputs: RewriteRequest | Sequence[RewriteRequest]) -> Any:
        if isinstance(inputs, RewriteRequest):
            return self._one(inputs)
        return [self._one(r) for r in inputs]

    def _one(self, r: RewriteRequest) -> list[tuple[str, float]]:
        if self.m is None:
            raise RuntimeError("the rewriter has not been trained yet")
        rev = r.revenue if r.revenue is not None else self.stats.bidword_revenue()
        out = self.m.rewrite(r.query, r.trie, rev, k=r.k, rerank=r.rerank, live=r.live, should_stop=r.should_stop)
        if r.live is not None:
            out = Rewrites([(b, s) for b, s in out if r.live(b)], getattr(out, "reranked", False))
        return out

    # ---- serving helpers
    @property
    def ready(self) -> bool:
        return self.m is not None

    def bidword_ids(self, bidword: str) -> list[int]:
        return self.m.tok.encode(bidword, self.cfg.lm.max_target - 1)

    def new_trie(self, bidwords: Sequence[str]) -> TokenTrie:
        return self.m.gen.trie_of([normalize(b) for b in bidwords])

    def warm(self) -> None:
        if self.m is not None:
            self.m.rewrite("warm up", None, {}, k=1, rerank=False)

    def fingerprint(self) -> dict:
        return {"model": "mobgm", "lm": self.cfg.lm.to_dict(), "vocab_size": self.cfg.vocab_size}

    def meta(self) -> dict:
        return {"model": "mobgm", "stages": list(self.m.stages) if self.m else [], "windows": self.windows,
                "params": self.m.gen.n_params if self.m else 0}

    def state(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "refresh": self.refresh.to_dict(), "titles": dict(self.titles),
                "rel_labels": [list(x) for x in self.rel_labels], "stats": self.stats.state(),
                "bidwords": sorted(self.bidwords), "windows": self.windows, "clicks_seen": self.clicks_seen,
                "name": self.name,
                "mobgm": self.m.state() if self.m is not None else None}

    @classmethod
    def from_state(cls, s: dict) -> "RewriterStreamModel":
        m = cls(MoBGMConfig.from_dict(s["cfg"]), RefreshConfig(**s["refresh"]), s.get("titles") or {},
                [tuple(x) for x in s.get("rel_labels") or []], s.get("name", REWRITER_NAME))
        m.stats = StreamStats.from_state(s["stats"])
        m.bidwords = set(s.get("bidwords") or [])
        m.windows = int(s.get("windows", 0))
        m.clicks_seen = int(s.get("clicks_seen", 0))
        m.m = MoBGM.from_state(s["mobgm"]) if s.get("mobgm") is not None else None
        return m


class GramStreamModel:
    name = GRAM_NAME
    gate = Gate.of(Criterion("click_recall", higher_is_better=True, margin=0.02, label="click recall@k"))
    thread_safe = True

    def __init__(self, cfg: GramConfig | None = None, refresh: RefreshConfig | None = None,
                 catalog: Mapping[str, tuple[str, str]] | None = None, name: str = GRAM_NAME) -> None:
        self.cfg = cfg or GramConfig()
        self.refresh = refresh or RefreshConfig()
        self.catalog = {k: (normalize(t), c) for k, (t, c) in (catalog or {}).items()}
        self.name = name
        self.g: Gram | None = None
        self.stats = StreamStats(self.refresh.half_life_s)
        self.windows = 0
        self.clicks_seen = 0
        self.items_seen: dict[str, tuple[str, str]] = {}  # ads seen in the stream (until the bootstrap)

    def _items_of(self, records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
        items = {}
        for r in records:
            a = r.get("ad_id")
            if not isinstance(a, str) or not a:
                continue
            text, cat = self.catalog.get(a, ("", ""))
            if not text:
                text = normalize(str(r.get("bidword") or ""))
            items[a] = (text, cat or str(r.get("category") or ""))
        return items

    def learn(self, records: list[dict]) -> dict:
        st = self.stats.update(records)
        self.windows += 1
        items = self._items_of(records)
        clicked = [r for r in records if r.get("clicked")]
        self.clicks_seen += len(clicked)
        self.items_seen.update(items)
        out: dict[str, Any] = {**st, "clicks": len(clicked)}
        if self.g is None:
            if self.clicks_seen < self.refresh.min_bootstrap_clicks:
                out["stage"] = "waiting for clicks"
                return out
            all_items = {**self.catalog, **self.items_seen}
            self.g = Gram.create(all_items, [q for q, _, _ in self.stats.click_links(0.5)], self.cfg)
            self.g.fit(all_items, self.stats.click_links(0.5))
            out.update({"stage": "bootstrap", "items": len(all_items), "codes": len(self.g.all_codes())})
            return out
        new_items = {a: v for a, v in items.items() if a not in self.g.items}
        for a, (t, c) in new_items.items():
            self.g.index_item(a, t, c)
        fresh = {(normalize(r["query"]), r["ad_id"]) for r in clicked if isinstance(r.get("query"), str)}
        links = [x for x in self.stats.click_links(0.5) if (x[0], x[1]) in fresh]
        if links:
            rows = self.g.sft_rows(links)
            rows = [r for r in rows if r[0] == "<qc>"] + _sample([r for r in rows if r[0] == "<tc>"], self.refresh.replay,
                                                                  self.windows)
            s = self.g.gen.fit(rows, self.refresh.sft_epochs, self.refresh.refresh_lr, self.cfg.batch, self.windows)
            out["sft_rows"] = s.get("rows", 0)
            self.g.reindex()
        out["new_items"] = len(new_items)
        return out

    def score(self, records: list[dict]) -> dict:
        clicked = [r for r in records if r.get("clicked") and isinstance(r.get("query"), str)]
        if self.g is None or not clicked:
            return {"click_recall": math.nan, "queries": 0}
        by_q: dict[str, set[str]] = {}
        for r in clicked:
            by_q.setdefault(normalize(r["query"]), set()).add(r["ad_id"])
        qs = _sample(sorted(by_q), self.refresh.gate_queries, self.windows)
        hits = n = 0
        for q in qs:
            got = {a for a, _, _ in self.g.retrieve(q, self.refresh.gate_k)}
            hits += len(got & by_q[q])
            n += len(by_q[q])
        return {"click_recall": hits / max(n, 1), "queries": len(qs), "pairs": n}

    def predict(self, inputs: Any) -> Any:
        """``(query, k, live)`` or a list of them → ``[(ad_id, score, code)]`` per query."""
        if self.g is None:
            raise RuntimeError("GRAM has not been trained yet")
        one = isinstance(inputs, tuple) and isinstance(inputs[0], str)
        reqs = [inputs] if one else list(inputs)
        out = []
        for q, k, live, *rest in reqs:
            stop = rest[0] if rest else None
            out.append(self.g.retrieve(q, k, live, should_stop=stop))
        return out[0] if one else out

    @property
    def ready(self) -> bool:
        return self.g is not None

    def index_item(self, ad_id: str, text: str, category: str = "") -> None:
        if self.g is not None:
            self.g.index_item(ad_id, text or self.catalog.get(ad_id, ("", ""))[0], category)

    def has_item(self, ad_id: str) -> bool:
        return self.g is not None and ad_id in self.g.items

    def warm(self) -> None:
        if self.g is not None:
            self.g.retrieve("warm up", 1)

    def fingerprint(self) -> dict:
        return {"model": "gram", "lm": self.cfg.lm.to_dict(), "vocab_size": self.cfg.vocab_size}

    def meta(self) -> dict:
        return {"model": "gram", "windows": self.windows, "items": len(self.g.items) if self.g else 0}

    def state(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "refresh": self.refresh.to_dict(),
                "catalog": {k: list(v) for k, v in self.catalog.items()}, "stats": self.stats.state(),
                "windows": self.windows, "clicks_seen": self.clicks_seen, "name": self.name,
                "items_seen": {k: list(v) for k, v in self.items_seen.items()} if self.g is None else {},
                "gram": self.g.state() if self.g else None}

    @classmethod
    def from_state(cls, s: dict) -> "GramStreamModel":
        m = cls(GramConfig.from_dict(s["cfg"]), RefreshConfig(**s["refresh"]),
                {k: (v[0], v[1]) for k, v in (s.get("catalog") or {}).items()}, s.get("name", GRAM_NAME))
        m.stats = StreamStats.from_state(s["stats"])
        m.windows = int(s.get("windows", 0))
        m.clicks_seen = int(s.get("clicks_seen", 0))
        m.items_seen = {k: (v[0], v[1]) for k, v in (s.get("items_seen") or {}).items()}
        m.g = Gram.from_state(s["gram"]) if s.get("gram") is not None else None
        return m


@dataclass
class RewriteJob:
    """Both rewriters as one job of the stream worker (two registry names, gated each on its own)."""

    rewriter: RewriterStreamModel = field(default_factory=RewriterStreamModel)
    gram: GramStreamModel | None = field(default_factory=GramStreamModel)
    name: str = "rewrite"

    def parts(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.rewriter.name: self.rewriter}
        if self.gram is not None:
            out[self.gram.name] = self.gram
        return out

    def learn(self, records: list[dict]) -> dict:
        out = {f"{self.rewriter.name}_{k}": v for k, v in self.rewriter.learn(records).items()}
        if self.gram is not None:
            out.update({f"{self.gram.name}_{k}": v for k, v in self.gram.learn(records).items()})
        return out

    def score(self, records: list[dict]) -> dict:
        out = dict(self.rewriter.score(records))
        if self.gram is not None:
            out.update(self.gram.score(records))
        return out

    def predict(self, inputs: Any) -> Any:
        return self.rewriter.predict(inputs)

    def reset_to(self, states: Mapping[str, dict]) -> None:
        if self.rewriter.name in states:
            self.rewriter = RewriterStreamModel.from_state(states[self.rewriter.name])
        if self.gram is not None and self.gram.name in states:
            self.gram = GramStreamModel.from_state(states[self.gram.name])

    def fingerprint(self) -> dict:
        return {"rewriter": self.rewriter.fingerprint(), "gram": self.gram.fingerprint() if self.gram else None}

    def state(self) -> dict:
        return {"rewriter": self.rewriter.state(), "gram": self.gram.state() if self.gram else None, "name": self.name}

    @classmethod
    def from_state(cls, s: dict) -> "RewriteJob":
        return cls(RewriterStreamModel.from_state(s["rewriter"]),
                   GramStreamModel.from_state(s["gram"]) if s.get("gram") else None, s.get("name", "rewrite"))


__all__ = ["GRAM_NAME", "REWRITER_NAME", "GramStreamModel", "RefreshConfig", "RewriteJob", "RewriteRequest",
           "RewriterStreamModel", "WordPieceTokenizer", "world_catalog"]
