"""GRAM (spec §5): generative retrieval with text codes shared by queries and ads.

* **Codes** (§5.2): ``category|attr|attr`` — the item's category name and its normalised attributes
  in a fixed (sorted) order, at three granularities (coarse: the category; medium: + 1 attribute;
  fine: + 2). The normaliser (:class:`CodeBook`, the paper's NER, spec §5.6 option 1) is a
  dictionary built from the item side: category names, and attribute words = words of item texts
  that occur under at least ``min_attr_categories`` categories (brands, colours, materials...).
* **Initial codes with click sharing** (§5.2 step 4): a query's codes are its own NER codes plus the
  coarse/medium codes of the items it clicked (at least ``min_share`` clicks); an item's codes are
  its NER codes.
* **Code generator** (§5.3): one tiny GPT-2, two prompts ``<qc> query`` and ``<tc> title``,
  co-trained (L = L_q + λ·L_t); optional **co-alignment** DPO (Eq. 6): for a clicked (q, t), c_w ∈
  the intersection of both sides' top codes, c_l ∈ the query side's others, with
  log π(c|q,t) = logsumexp(log π(c|q), log π(c|t)) − ln 2 against the frozen SFT model.
* **Index and scoring** (§5.4): the item side's top codes (near-line, cached with their
  probabilities P^t) fill an inverted index code → items; a query's beam (through the trie of
  indexed codes) gives P^q; candidates are the postings, scored by
  S(q, t) = −Σ_i w_i · JS_i(P^q_i, P^t_i) (Eq. 7 read as a divergence, so relevance is its negative;
  w_i = granularity weight (1 + attrs_i) / (1 + max_attrs), the spec's α).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from models.rewrite.decode import TokenTrie
from models.rewrite.generator import Generator, Row
from models.rewrite.lm import LN2, LMConfig
from models.rewrite.tokenizer import WordPieceTokenizer, normalize

STOP = frozenset({"a", "an", "and", "for", "of", "the", "with", "to", "in", "on", "by", "&", "-", "|"})


@dataclass(frozen=True)
class GramConfig:
    lm: LMConfig = field(default_factory=lambda: LMConfig(max_target=16))
    vocab_size: int = 1000
    lr: float = 3e-3
    batch: int = 64
    epochs: int = 5
    lam: float = 1.0  # weight of the item side in co-training (L_q + λ L_t); 0 = query side alone
    max_attrs: int = 2  # attributes in the finest code
    min_attr_categories: int = 2
    min_share: float = 2.0  # clicks for a clicked item's code to be shared with the query
    beams: int = 10  # serving beam (spec §5.3)
    item_codes: int = 8  # codes kept per item (P^t)
    coalign: bool = True
    coalign_epochs: int = 1
    coalign_lr: float = 5e-4
    beta_w: float = 0.3
    beta_l: float = 0.3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "GramConfig":
        d = dict(d)
        return cls(lm=LMConfig(**d.pop("lm")), **d)


def category_name(category: str) -> str:
    """``top/leaf-name`` → ``leaf name``; any other string is lower-cased as it is."""
    leaf = category.rsplit("/", 1)[-1] if "/" in category else category
    return normalize(leaf.replace("-", " ").replace("_", " "))


class CodeBook:
    """The dictionary NER of the item side: category names and attribute words."""

    def __init__(self, categories: Iterable[str] = (), attrs: Iterable[str] = (), max_attrs: int = 2) -> None:
        self.categories = {normalize(c) for c in categories if normalize(c)}
        self.attrs = set(attrs)
        self.max_attrs = max_attrs
        self._max_cat_words = max((len(c.split()) for c in self.categories), default=1)

    @classmethod
    def build(cls, items: Mapping[str, tuple[str, str]], min_attr_categories: int = 2, max_attrs: int = 2) -> "CodeBook":
        cats = {category_name(c) for _, c in items.values() if c}
        where: dict[str, set[str]] = defaultdict(set)
        cat_words = {w for c in cats for w in c.split()}
        for text, c in items.values():
            for w in set(normalize(text).split()):
                if w not in STOP and w not in cat_words and not w.isdigit():
                    where[w].add(category_name(c) if c else "")
        attrs = {w for w, cs in where.items() if len(cs) >= min_attr_categories}
        return cls(cats, attrs, max_attrs)

    def ner(self, text: str, category: str | None = None) -> tuple[str | None, tuple[str, ...]]:
        """(category name or None, sorted attributes) found in ``text`` (``category`` wins when given)."""
        words = normalize(text).split()
        cat = category_name(category) if category else None
        attrs: set[str] = set()
        i = 0
        while i < len(words):
            for n in range(min(self._max_cat_words, len(words) - i), 0, -1):
                span = " ".join(words[i:i + n])
                if span in self.categories:
                    cat = cat or span
                    i += n
                    break
                if n == 1 and span in self.attrs:
                    attrs.add(span)
            else:
                i += 1
        return cat, tuple(sorted(attrs))

    def codes(self, cat: str | None, attrs: Sequence[str], fine: bool = True) -> list[str]:
        """Coarse, medium (and fine) codes of a (category, attributes) pair."""
        if not cat:
            return []
        out = [cat] + [f"{cat}|{a}" for a in attrs]
        if fine and self.max_attrs >= 2:
            out += [f"{cat}|{a}|{b}" for i, a in enumerate(attrs) for b in attrs[i + 1:]]
        return out

    def state(self) -> dict:
        return {"categories": sorted(self.categories), "attrs": sorted(self.attrs), "max_attrs": self.max_attrs}

    @classmethod
    def from_state(cls, s: dict) -> "CodeBook":
        return cls(s["categories"], s["attrs"], int(s["max_attrs"]))


def n_attrs(code: str) -> int:
    return code.count("|")


def js_terms(p: float, q: float) -> float:
    """One term of Eq. 7: p ln(2p/(p+q)) + q ln(2q/(p+q)) (0 ln 0 = 0); in [0, ln 2]."""
    s = p + q
    if s <= 0:
        return 0.0
    out = 0.0
    if p > 0:
        out += p * math.log(2 * p / s)
    if q > 0:
        out += q * math.log(2 * q / s)
    return out


def relevance_score(pq: Mapping[str, float], pt: Mapping[str, float], max_attrs: int) -> float:
    """S(q, t) = −Σ_i w_i JS_i over the codes of either side (larger = more relevant)."""
    s = 0.0
    for c in set(pq) | set(pt):
        w = (1 + n_attrs(c)) / (1 + max_attrs)
        s -= w * js_terms(pq.get(c, 0.0), pt.get(c, 0.0))
    return s


def _normalise(scored: Sequence[tuple[str, float]]) -> dict[str, float]:
    if not scored:
        return {}
    m = max(s for _, s in scored)
    e = {c: math.exp(s - m) for c, s in scored}
    z = sum(e.values())
    return {c: v / z for c, v in e.items()}


class Gram:
    def __init__(self, tok: WordPieceTokenizer, cfg: GramConfig, book: CodeBook, gen: Generator | None = None) -> None:
        self.tok = tok
        self.cfg = cfg
        self.book = book
        self.gen = gen or Generator(tok, cfg.lm, cfg.seed)
        self.items: dict[str, tuple[str, str]] = {}  # item -> (text, category)
        self.item_p: dict[str, dict[str, float]] = {}  # item -> code -> P^t
        self.postings: dict[str, set[str]] = defaultdict(set)
        self.code_trie = TokenTrie()
        self.history: list[dict] = []

    @classmethod
    def create(cls, items: Mapping[str, tuple[str, str]], queries: Iterable[str], cfg: GramConfig | None = None) -> "Gram":
        cfg = cfg or GramConfig()
        book = CodeBook.build(items, cfg.min_attr_categories, cfg.max_attrs)
        corpus = [t for t, _ in items.values()] + list(queries) + sorted(book.categories) + sorted(book.attrs)
        return cls(WordPieceTokenizer.train(corpus, cfg.vocab_size), cfg, book)

    # ---- training data
    def item_codes_ner(self, item: str) -> list[str]:
        text, cat = self.items[item]
        return self.book.codes(*self.book.ner(text, cat))

    def query_targets(self, links: Sequence[tuple[str, str, float]]) -> dict[str, Counter]:
        """codes(q) = NER(q) ∪ shared coarse/medium codes of its clicked items (spec §5.2)."""
        shared: dict[str, Counter] = defaultdict(Counter)
        for q, item, w in links:
            if item not in self.items:
                continue
            text, cat = self.items[item]
            c, attrs = self.book.ner(text, cat)
            for code in self.book.codes(c, attrs, fine=False):
                shared[q][code] += w
        out: dict[str, Counter] = {}
        for q in sorted(shared):
            cq, aq = self.book.ner(q)
            tgt = Counter({c: 1.0 for c in self.book.codes(cq, aq)})
            for code, w in shared[q].items():
                if w >= self.cfg.min_share or (n_attrs(code) == 0 and w >= 1.0):
                    tgt[code] += w
            if tgt:
                out[q] = tgt
        return out

    def sft_rows(self, links: Sequence[tuple[str, str, float]]) -> list[Row]:
        rows: list[Row] = []
        for q, tgt in self.query_targets(links).items():
            tot = sum(tgt.values())
            for code, w in sorted(tgt.items()):
                rows.append(("<qc>", q, code, w / tot))
        if self.cfg.lam > 0:
            for item in sorted(self.items):
                codes = self.item_codes_ner(item)
                for code in codes:
                    rows.append(("<tc>", self.items[item][0], code, self.cfg.lam / max(1, len(codes))))
        return rows

    # ---- training
    def fit(self, items: Mapping[str, tuple[str, str]], links: Sequence[tuple[str, str, float]],
            epochs: int | None = None) -> dict:
        self.items.update({k: (normalize(t), c) for k, (t, c) in items.items()})
        rows = self.sft_rows(links)
        st = self.gen.fit(rows, self.cfg.epochs if epochs is None else epochs, self.cfg.lr, self.cfg.batch, self.cfg.seed)
        self.history.append({"stage": "sft", **{k: v for k, v in st.items() if isinstance(v, (int, float))}})
        self.reindex()
        if self.cfg.coalign and links:
            ca = self.coalign(links)
            self.history.append({"stage": "coalign", **{k: v for k, v in ca.items() if isinstance(v, (int, float))}})
            self.reindex()
        return st

    def _pair_logprob(self, model, rows: Sequence[Row]) -> torch.Tensor:
        """log π(c|q,t) = logsumexp(log π(c|q), log π(c|t)) − ln 2 (rows: ("<qt>", "q\\tt", c))."""
        q_rows = [("<qc>", r[1].split("\t")[0], r[2], 1.0) for r in rows]
        t_rows = [("<tc>", r[1].split("\t")[1], r[2], 1.0) for r in rows]
        from models.rewrite.lm import seq_logprob

        a = seq_logprob(model, self.gen.encode_rows(q_rows))
        b = seq_logprob(model, self.gen.encode_rows(t_rows))
        return torch.logsumexp(torch.stack([a, b]), 0) - LN2

    def coalign(self, links: Sequence[tuple[str, str, float]], max_pairs: int = 3000) -> dict:
        """Eq. 6 on clicked (q, t): chosen = a code both sides generate, rejected = a query-side code
        the item side does not generate."""
        rng = np.random.default_rng(self.cfg.seed + 3)
        pairs = []
        item_top: dict[str, set[str]] = {i: set(p) for i, p in self.item_p.items()}
        for q, item, _w in links:
            if item not in item_top:
                continue
            qc = [c for c, _ in self.gen.decode("<qc>", q, beams=self.cfg.beams, trie=self.code_trie)]
            inter = [c for c in qc if c in item_top[item]]
            diff = [c for c in qc if c not in item_top[item]]
            if inter and diff:
                src = f"{q}\t{self.items[item][0]}"
                pairs.append((("<qt>", src, inter[0], 1.0), ("<qt>", src, diff[0], 1.0)))
        if len(pairs) > max_pairs:
            pairs = [pairs[int(i)] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
        if not pairs:
            return {"pairs": 0}
        ref = self.gen.copy()
        return self.gen.dpo(pairs, ref, self.cfg.coalign_epochs, self.cfg.coalign_lr, self.cfg.beta_w, self.cfg.beta_l,
                            sft_weight=0.0, seed=self.cfg.seed + 4, logprob_fn=self._pair_logprob)

    # ---- the index (near-line)
    def all_codes(self) -> list[str]:
        codes: set[str] = set()
        for item in self.items:
            codes.update(self.item_codes_ner(item))
        return sorted(codes)

    def reindex(self) -> None:
        self.code_trie = self.gen.trie_of(self.all_codes())
        self.item_p.clear()
        self.postings = defaultdict(set)
        for item in sorted(self.items):
            self.index_item(item, *self.items[item], _rebuild=False)

    def index_item(self, item: str, text: str, category: str = "", _rebuild: bool = True) -> dict[str, float]:
        """Codes of one item (its NER codes ∪ the item-side generator's top codes through the code
        trie) with P^t, into the inverted index. A new item is retrievable at once (§5.8)."""
        text = normalize(text)
        self.items[item] = (text, category)
        ner = self.book.codes(*self.book.ner(text, category))
        if _rebuild:
            for c in ner:
                if self.code_trie.find(self.tok.encode(c, self.cfg.lm.max_target - 1)) is None:
                    self.code_trie.add(self.tok.encode(c, self.cfg.lm.max_target - 1), c)
        gen = self.gen.decode("<tc>", text, beams=self.cfg.item_codes, trie=self.code_trie)
        scored = dict(gen)
        floor = min(scored.values()) - 1.0 if scored else 0.0
        for c in ner:
            scored.setdefault(c, floor)
        p = _normalise(sorted(scored.items(), key=lambda kv: -kv[1])[: max(self.cfg.item_codes, len(ner))])
        old = self.item_p.get(item, {})
        for c in old:
            self.postings[c].discard(item)
        self.item_p[item] = p
        for c in p:
            self.postings[c].add(item)
        return p

    def remove_item(self, item: str) -> None:
        for c in self.item_p.pop(item, {}):
            self.postings[c].discard(item)
        self.items.pop(item, None)

    # ---- serving
    def query_codes(self, query: str, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        return _normalise(self.gen.decode("<qc>", query, beams=self.cfg.beams, trie=self.code_trie,
                                          should_stop=should_stop))

    def retrieve(self, query: str, k: int = 50, live: Callable[[str], bool] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[tuple[str, float, str]]:
        """Top-``k`` ``(item, S(q, item), best shared code)``; ``live`` filters items (the live inventory)."""
        pq = self.query_codes(query, should_stop)
        cands: dict[str, str] = {}
        for c in sorted(pq, key=lambda c: -pq[c]):
            for item in list(self.postings.get(c, ())):
                if item not in cands and (live is None or live(item)):
                    cands[item] = c
        scored = [(item, relevance_score(pq, self.item_p.get(item, {}), self.cfg.max_attrs), code)
                  for item, code in cands.items()]
        scored.sort(key=lambda x: (-x[1], x[0]))
        return scored[:k]

    # ---- state
    def state(self) -> dict:
        return {"config": self.cfg.to_dict(), "tokenizer": self.tok.to_json(), "book": self.book.state(),
                "generator": self.gen.state(), "items": {k: list(v) for k, v in self.items.items()},
                "item_p": {k: dict(v) for k, v in self.item_p.items()}, "history": list(self.history)}

    @classmethod
    def from_state(cls, s: dict) -> "Gram":
        cfg = GramConfig.from_dict(s["config"])
        tok = WordPieceTokenizer.from_json(s["tokenizer"])
        g = cls(tok, cfg, CodeBook.from_state(s["book"]), Generator.from_state(tok, s["generator"]))
        g.items = {k: (v[0], v[1]) for k, v in s["items"].items()}
        g.code_trie = g.gen.trie_of(g.all_codes())
        g.item_p = {k: {c: float(p) for c, p in v.items()} for k, v in s["item_p"].items()}
        for item, p in g.item_p.items():
            for c in p:
                g.postings[c].add(item)
        g.history = list(s.get("history", []))
        return g
