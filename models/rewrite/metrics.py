"""Metrics of rewriting and retrieval (spec §4.4, §1.5) and the judges they use.

Rewriting, over the top-k outputs of each held-out query:

* ``relevance_rate``: share of outputs the judge does not rate ``incorrect``; ``relevance_at_1`` the
  same for the first output;
* ``authenticity_rate``: share of outputs that are live bidwords;
* ``expected_revenue``: mean over queries of the judge's revenue of the live outputs (synthetic: Σ
  over the distinct live ads they recall of bid × CTR(query, ad));
* ``coverage``: share of queries with at least one live, relevant output;
* ``distinct_1`` / ``distinct_2``: distinct word uni-/bi-grams over all outputs / their number;
* ``combined`` / ``combined_at_1``: the oracle combined score R* = w_rel·reward(relation) +
  w_auth·[live] + w_rev·[live]·revenue(q, b)/best revenue(q), mean over outputs (a query without
  output scores 0).

Retrieval: Recall@K = |top-K ∩ relevant| / |relevant| per query, averaged (queries with no relevant
item are skipped); ``interleave`` merges two ranked sources round-robin without duplicates.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from models.rewrite.tokenizer import normalize

REWARD = {"synonym": 1.0, "hyponym": 0.8, "hypernym": 0.6, "incorrect": 0.0}


class Judge(Protocol):
    live: set[str]

    def relation(self, q: str, b: str) -> str: ...

    def bidword_revenue(self, q: str, b: str) -> float: ...

    def revenue(self, q: str, bidwords: Sequence[str]) -> float: ...

    def best_revenue(self, q: str) -> float: ...


class TargetJudge:
    """The judge of a file of (query, target) pairs: a gold target = synonym; an output whose words
    are a proper subset / superset of a gold target's = hypernym / hyponym; anything else incorrect.
    The revenue of a relevant live output is the target's value in the training rows (Σ clicks ×
    bid, or its number of rows)."""

    def __init__(self, gold: Mapping[str, set[str]], live: Iterable[str], value: Mapping[str, float]) -> None:
        self.gold = {normalize(q): {normalize(t) for t in ts} for q, ts in gold.items()}
        self.live = {normalize(b) for b in live}
        self.value = {normalize(b): float(v) for b, v in value.items()}

    def relation(self, q: str, b: str) -> str:
        b = normalize(b)
        gold = self.gold.get(normalize(q), set())
        if b in gold:
            return "synonym"
        bt = set(b.split())
        for g in gold:
            gt = set(g.split())
            if bt < gt:
                return "hypernym"
            if bt > gt:
                return "hyponym"
        return "incorrect"

    def bidword_revenue(self, q: str, b: str) -> float:
        b = normalize(b)
        return self.value.get(b, 0.0) if b in self.live and self.relation(q, b) != "incorrect" else 0.0

    def revenue(self, q: str, bidwords: Sequence[str]) -> float:
        return float(sum(self.bidword_revenue(q, b) for b in set(map(normalize, bidwords))))

    def best_revenue(self, q: str) -> float:
        return max((self.value.get(g, 0.0) for g in self.gold.get(normalize(q), ())), default=0.0)


def distinct_n(outputs: Iterable[Sequence[str]], n: int) -> float:
    grams: list[tuple[str, ...]] = []
    for outs in outputs:
        for b in outs:
            w = b.split()
            grams += [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rewrite_metrics(outputs: Mapping[str, Sequence[str]], judge: Judge, weights=(1.0, 0.5, 0.5)) -> dict[str, float]:
    """Metrics of ``outputs`` (query -> top-k bidwords, best first)."""
    w_rel, w_auth, w_rev = weights
    rel, auth, rel1, comb, comb1, revs, cov = [], [], [], [], [], [], []
    for q, outs in outputs.items():
        outs = [normalize(b) for b in outs]
        live_outs = [b for b in outs if b in judge.live]
        relations = [judge.relation(q, b) for b in outs]
        rel += [r != "incorrect" for r in relations]
        auth += [b in judge.live for b in outs]
        best = judge.best_revenue(q)
        scores = []
        for b, r in zip(outs, relations):
            live = b in judge.live
            rv = judge.bidword_revenue(q, b) / best if live and best > 0 else 0.0
            scores.append(w_rel * REWARD[r] + w_auth * float(live) + w_rev * rv)
        comb.append(float(np.mean(scores)) if scores else 0.0)
        comb1.append(scores[0] if scores else 0.0)
        rel1.append(relations[0] != "incorrect" if relations else False)
        revs.append(judge.revenue(q, live_outs))
        cov.append(any(r != "incorrect" for b, r in zip(outs, relations) if b in judge.live))
    def mean(x, empty=None):  # a rate over no outputs is undefined (None), a per-query mean is 0
        return float(np.mean(x)) if len(x) else empty

    return {
        "queries": len(outputs), "outputs": len(rel),
        "relevance_rate": mean(rel), "relevance_at_1": mean(rel1, 0.0), "authenticity_rate": mean(auth),
        "expected_revenue": mean(revs, 0.0), "coverage": mean(cov, 0.0),
        "distinct_1": distinct_n(outputs.values(), 1), "distinct_2": distinct_n(outputs.values(), 2),
        "combined": mean(comb, 0.0), "combined_at_1": mean(comb1, 0.0),
    }


def interleave(*ranked: Sequence[str]) -> list[str]:
    out, seen = [], set()
    for i in range(max((len(r) for r in ranked), default=0)):
        for r in ranked:
            if i < len(r) and r[i] not in seen:
                seen.add(r[i])
                out.append(r[i])
    return out


def recall_at_k(ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], ks: Sequence[int]) -> dict[str, float]:
    out = {}
    qs = [q for q in ranked if relevant.get(q)]
    for k in ks:
        vals = [len(set(ranked[q][:k]) & relevant[q]) / len(relevant[q]) for q in qs]
        out[f"recall@{k}"] = float(np.mean(vals)) if vals else 0.0
    out["queries"] = len(qs)
    return out


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per numeric key: mean, std (ddof=0) and n over runs (seeds)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))] if runs else []
    out = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in runs if isinstance(r.get(k), (int, float))])
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(len(vals))}
    return out
