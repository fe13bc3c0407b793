"""The offline evaluations behind ``adstream evaluate-rewrite`` / ``evaluate-retrieval``.

:func:`run_rewrite` trains, on the same data and tokenizer, the generators the issue compares —
SFT-only, SFT + post-pre-training, and aligned (SFT + PPT + DPO) — plus the index rewriter, and
measures each on held-out queries in three decoding modes: ``free`` (the raw generator), ``trie``
(beam search through the live inventory) and ``served`` (trie + the final re-rank by R).
:func:`run_retrieval` trains GRAM and measures Recall@K of the bidword index, GRAM and their union.
Data come from the synthetic world (:func:`synthetic_rewrite_data`, :func:`synthetic_retrieval_data`)
or from a file (``models.rewrite.filedata``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from models.rewrite.discriminator import RELATIONS
from models.rewrite.gram import Gram, GramConfig
from models.rewrite.metrics import Judge, interleave, recall_at_k, rewrite_metrics
from models.rewrite.mobgm import MoBGM, MoBGMConfig, weak_relevance
from models.rewrite.tokenizer import WordPieceTokenizer, normalize

Progress = Callable[[str], None]


class LiteralIndex:
    """The index rewriter's rule (``online.index.IndexRewriter``): strings whose words are all in
    the query, exact matches first; and the items bidding on them."""

    def __init__(self, bidwords: Mapping[str, Sequence[tuple[str, float]]]) -> None:
        self.items = {normalize(b): list(v) for b, v in bidwords.items()}
        self.toks = {b: frozenset(b.split()) for b in self.items}

    def rewrite(self, q: str) -> list[str]:
        qt = frozenset(normalize(q).split())
        hits = [(self.toks[b] != qt, -len(self.toks[b]), b) for b in self.items if self.toks[b] <= qt]
        return [b for _, _, b in sorted(hits)]

    def retrieve(self, q: str) -> list[str]:
        best: dict[str, tuple[int, float]] = {}
        for rank, b in enumerate(self.rewrite(q)):
            exact = int(self.toks[b] != frozenset(normalize(q).split()))
            for item, bid in self.items[b]:
                key = (exact, -bid)
                if item not in best or key < best[item]:
                    best[item] = key
        return [i for i, _ in sorted(best.items(), key=lambda kv: (kv[1], kv[0]))]


@dataclass
class RewriteData:
    sft_pairs: list[tuple[str, str, float]]
    ppt_pairs: list[tuple[str, str, float]]
    test_queries: list[str]
    valid_queries: list[str]
    live: list[str]
    revenue: dict[str, float]  # bidword -> log(1 + Σ clicks × bid)
    rel_labels: list[tuple[str, str, int]]
    judge: Judge
    corpus: list[str]
    tail: set[str] = field(default_factory=set)
    index_items: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    name: str = ""


@dataclass
class RetrievalData:
    items: dict[str, tuple[str, str]]  # item -> (text, category)
    links: list[tuple[str, str, float]]  # training (query, item, clicks)
    test_queries: list[str]
    relevant: dict[str, set[str]]
    index_bidwords: dict[str, list[tuple[str, float]]]  # bidword -> [(item, bid)]
    train_queries: list[str]
    tail: set[str] = field(default_factory=set)
    name: str = ""


def _slices(queries: Sequence[str], data_tail: set[str], index: LiteralIndex) -> dict[str, list[str]]:
    out = {"all": list(queries), "no_literal": [q for q in queries if not index.rewrite(q)]}
    if data_tail:
        out["tail"] = [q for q in queries if q in data_tail]
    return out


def _decode_all(m: MoBGM, queries: Sequence[str], trie, revenue, k: int, live) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {"free": {}, "trie": {}, "served": {}}
    for q in queries:
        out["free"][q] = [b for b, _ in m.rewrite(q, None, revenue, k=k, rerank=False)]
        out["trie"][q] = [b for b, _ in m.rewrite(q, trie, revenue, k=k, rerank=False)]
        out["served"][q] = [b for b, _ in m.rewrite(q, trie, revenue, k=k, rerank=m.disc is not None, live=live)]
    return out


def run_rewrite(data: RewriteData, cfg: MoBGMConfig | None = None, k: int = 3, progress: Progress | None = None,
                stages: Sequence[str] = ("sft", "sft+ppt", "aligned")) -> dict:
    cfg = cfg or MoBGMConfig()
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    tok = WordPieceTokenizer.train(data.corpus, cfg.vocab_size)
    index = LiteralIndex(data.index_items or {b: [] for b in data.live})
    live_set = set(data.live)
    is_live = live_set.__contains__
    queries = sorted(set(data.test_queries))
    valid = sorted(set(data.valid_queries))
    slices = _slices(queries, data.tail, index)
    report: dict = {"data": data.name, "k": k, "sizes": {
        "sft_pairs": len(data.sft_pairs), "ppt_pairs": len(data.ppt_pairs), "test_queries": len(queries),
        "valid_queries": len(valid), "live_bidwords": len(live_set), "relevance_labels": len(data.rel_labels),
        **{f"test_{s}": len(v) for s, v in slices.items()}}, "methods": {}, "valid": {}, "train": {}}

    def measure(name: str, outputs: dict[str, list[str]]) -> dict:
        return {s: rewrite_metrics({q: outputs[q] for q in qs}, data.judge) for s, qs in slices.items()}

    report["methods"]["index"] = {"served": measure("index", {q: index.rewrite(q)[:k] for q in queries})}
    say("index rewriter measured")
    models: dict[str, MoBGM] = {}
    if "sft" in stages:
        m = MoBGM(tok, cfg)
        m.sft(data.sft_pairs)
        models["sft"] = m
        say("SFT-only trained")
    base = None
    if data.ppt_pairs and ("sft+ppt" in stages or "aligned" in stages):
        m = MoBGM(tok, cfg)
        m.post_pretrain(data.ppt_pairs)
        m.sft(data.sft_pairs)
        models["sft+ppt"] = base = m
        say("SFT + post-pre-training trained")
    base = base or models.get("sft")
    trie = base.gen.trie_of(data.live) if base is not None else None
    if base is not None and "aligned" in stages:
        train_queries = sorted({q for q, _, _ in data.sft_pairs})
        aligned = MoBGM(tok, cfg, base.gen.copy())
        aligned.fit_discriminator(data.rel_labels, data.live, data.revenue, train_queries, cfg.seed)
        say("discriminator trained")
        aligned.align(train_queries, trie, data.revenue)
        models["aligned"] = aligned
        say("aligned (DPO) trained")
        for m in models.values():
            if m is not aligned:
                m.disc = aligned.disc  # the same re-rank for every generator
    for name, m in models.items():
        outs = _decode_all(m, queries, trie, data.revenue, k, is_live)
        report["methods"][name] = {mode: measure(name, o) for mode, o in outs.items()}
        if valid:
            vo = _decode_all(m, valid, trie, data.revenue, k, is_live)
            report["valid"][name] = {mode: rewrite_metrics(o, data.judge) for mode, o in vo.items()}
        report["train"][name] = m.history
        say(f"{name} measured")
    report["params"] = {"generator": base.gen.n_params if base else 0}
    report["seconds"] = time.perf_counter() - t0
    report["config"] = cfg.to_dict()
    return report


def run_retrieval(data: RetrievalData, cfg: GramConfig | None = None, ks: Sequence[int] = (5, 10, 20),
                  progress: Progress | None = None) -> dict:
    cfg = cfg or GramConfig()
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    index = LiteralIndex(data.index_bidwords)
    g = Gram.create(data.items, data.train_queries, cfg)
    g.fit(data.items, data.links)
    say("GRAM trained")
    queries = sorted(q for q in set(data.test_queries) if data.relevant.get(q))
    kmax = max(ks)
    ranked: dict[str, dict[str, list[str]]] = {"index": {}, "gram": {}, "union": {}}
    t1 = time.perf_counter()
    for q in queries:
        a = index.retrieve(q)
        b = [x[0] for x in g.retrieve(q, kmax * 2)]
        ranked["index"][q], ranked["gram"][q], ranked["union"][q] = a, b, interleave(a, b)
    per_query_ms = (time.perf_counter() - t1) / max(1, len(queries)) * 1000
    slices = _slices(queries, data.tail, LiteralIndex({b: [] for b in data.index_bidwords}))
    report: dict = {"data": data.name, "ks": list(ks), "sizes": {
        "items": len(data.items), "links": len(data.links), "test_queries": len(queries),
        "codes": len(g.all_codes()), **{f"test_{s}": len(v) for s, v in slices.items()}}, "sources": {}}
    for src, r in ranked.items():
        report["sources"][src] = {s: recall_at_k({q: r[q] for q in qs}, data.relevant, ks) for s, qs in slices.items()}
    report["gram_ms_per_query"] = per_query_ms
    report["train"] = g.history
    report["params"] = {"generator": g.gen.n_params}
    report["seconds"] = time.perf_counter() - t0
    report["config"] = cfg.to_dict()
    return report


# ---------------------------------------------------------------------------- synthetic data
def synthetic_rewrite_data(seed: int, duration_s: float = 3 * 3600.0, requests_per_s: float = 5.0,
                           **world) -> RewriteData:
    from models.rewrite.synthetic import (WorldJudge, clicked_pairs, filter_pairs, judged_relevance,
                                          revenue_by_bidword, rewrite_world, split_queries, world_records)

    w = rewrite_world(seed, **world)
    recs = world_records(w, duration_s, requests_per_s, seed=seed)
    split = split_queries(w, seed)
    judge = WorldJudge(w)
    train = split.train
    sft = filter_pairs(clicked_pairs(recs, train))
    ppt = [(q, w.ad_by_id[a].title, n) for q, a, n in filter_pairs(clicked_pairs(recs, train, "ad_id"), 1.0, 0.0)]
    corpus = sorted(train) + [a.title for a in w.ads] + sorted(judge.live)
    items: dict[str, list[tuple[str, float]]] = {}
    for b, v in judge.live_map.items():
        items[b] = list(v)
    return RewriteData(sft, ppt, sorted(split.test), sorted(split.valid), sorted(judge.live), revenue_by_bidword(recs),
                       judged_relevance(judge, sorted(train), seed=seed), judge, corpus,
                       {q.text for q in w.queries if q.kind != "base"}, items, f"synthetic seed {seed}")


def synthetic_retrieval_data(seed: int, duration_s: float = 3 * 3600.0, requests_per_s: float = 5.0,
                             **world) -> RetrievalData:
    from models.rewrite.synthetic import WorldJudge, clicked_pairs, rewrite_world, split_queries, world_records

    w = rewrite_world(seed, **world)
    recs = world_records(w, duration_s, requests_per_s, seed=seed)
    split = split_queries(w, seed)
    judge = WorldJudge(w)
    live_ads = [a.id for a in w.ads if not np.isfinite(a.active_from)]
    items = {a: (w.ad_by_id[a].title, w.ad_by_id[a].category) for a in live_ads}
    links = clicked_pairs(recs, split.train, "ad_id")
    rel = {q: judge.relevant_ads(q, live_ads) for q in split.test}
    return RetrievalData(items, links, sorted(split.test), rel, {b: list(v) for b, v in judge.live_map.items()},
                         sorted(split.train), {q.text for q in w.queries if q.kind != "base"}, f"synthetic seed {seed}")


def relabel(labels: Sequence[tuple[str, str, int]]) -> dict[str, int]:
    """Counts per relevance class (for reports)."""
    c = np.bincount([x[2] for x in labels], minlength=len(RELATIONS)) if labels else np.zeros(len(RELATIONS), int)
    return {r: int(n) for r, n in zip(RELATIONS, c)}


__all__ = ["LiteralIndex", "RetrievalData", "RewriteData", "relabel", "replace", "run_retrieval", "run_rewrite",
           "synthetic_retrieval_data", "synthetic_rewrite_data", "weak_relevance"]
