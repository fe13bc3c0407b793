"""Rewrite and retrieval data from any table (CSV, TSV or Parquet) of query → target rows.

Queries are split (seeded) into train / validation / test: nothing of a test query is seen in
training. Rows can be filtered to positives (``label_col`` with ``positive`` values, e.g. ESCI's
``E``), weighted (``weight_col``: clicks) and priced (``bid_col``); the value of a target is
Σ weight × bid over the training rows (its number of rows without those columns).

Retrieval: items are ``item_col`` values with their text (``text_col``, else the training queries
linked to the item: GRAM's click sharing), their category (``category_col``, else the last word of
the text, the head noun of an English product phrase) and their bidwords (``bidword_col``, else the
training queries linked to them, an exact-query index).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import ConfigError
from models.rewrite.experiments import RetrievalData, RewriteData
from models.rewrite.metrics import TargetJudge
from models.rewrite.mobgm import weak_relevance
from models.rewrite.tokenizer import normalize


def read_table(path: str | Path):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {p}")
    suf = p.suffix.lower()
    try:
        if suf in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suf in (".jsonl", ".ndjson"):
            return pd.read_json(p, lines=True)
        if suf in (".csv", ".tsv", ".txt"):
            with open(p, encoding="utf-8", errors="replace") as f:
                head = f.readline()
            sep = "\t" if head.count("\t") > head.count(",") else ","
            return pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - a broken file is the user's to fix
        raise ConfigError(f"cannot read {p}: {e}") from None
    raise ConfigError(f"unknown file type {suf!r} (use .csv, .tsv, .parquet or .jsonl)")


def _need(df, cols: Sequence[str | None]) -> None:
    missing = [c for c in cols if c and c not in df.columns]
    if missing:
        raise ConfigError(f"column(s) {missing} not in the file; it has {list(df.columns)}")


def _rows(df, query_col: str, target_col: str, label_col: str | None, positive: Sequence[str],
          weight_col: str | None, bid_col: str | None):
    _need(df, [query_col, target_col, label_col, weight_col, bid_col])
    out = []
    for i, r in enumerate(df.itertuples(index=False)):
        d = r._asdict() if hasattr(r, "_asdict") else dict(zip(df.columns, r))
        q, t = normalize(d[query_col]), str(d[target_col]).strip()
        if not q or not t or t.lower() == "nan":
            continue
        if label_col and str(d[label_col]).strip() not in positive:
            continue
        w = _num(d.get(weight_col), 1.0, i, weight_col) if weight_col else 1.0
        b = _num(d.get(bid_col), 1.0, i, bid_col) if bid_col else 1.0
        out.append((q, t, w, b))
    if not out:
        raise ConfigError("no usable rows (empty queries/targets, or no row has a positive label)")
    return out


def _num(v, default: float, row: int, col: str | None) -> float:
    if v is None or v == "":
        return default
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"column {col!r}, row {row}: {v!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise ConfigError(f"column {col!r}, row {row}: {v!r} must be a finite number >= 0")
    return x


def split(queries: Sequence[str], seed: int, test: float, valid: float) -> tuple[set[str], set[str], set[str]]:
    if not (0 < test < 1 and 0 <= valid < 1 and test + valid < 1):
        raise ConfigError("need 0 < test share < 1, 0 <= valid share and test + valid < 1")
    qs = sorted(set(queries))
    rng = np.random.default_rng([seed, 12])
    order = rng.permutation(len(qs))
    n_test = max(1, int(round(test * len(qs))))
    n_valid = int(round(valid * len(qs)))
    te = {qs[i] for i in order[:n_test]}
    va = {qs[i] for i in order[n_test:n_test + n_valid]}
    tr = set(qs) - te - va
    if not tr:
        raise ConfigError(f"only {len(qs)} distinct queries: nothing is left for training")
    return tr, va, te


def file_rewrite_data(df, query_col: str, target_col: str, *, seed: int = 0, title_col: str | None = None,
                      label_col: str | None = None, positive: Sequence[str] = (), weight_col: str | None = None,
                      bid_col: str | None = None, inventory: Sequence[str] | None = None, test: float = 0.3,
                      valid: float = 0.1, name: str = "") -> RewriteData:
    rows = _rows(df, query_col, target_col, label_col, positive, weight_col, bid_col)
    if title_col:
        _need(df, [title_col])
    tr, va, te = split([q for q, *_ in rows], seed, test, valid)
    gold: dict[str, set[str]] = defaultdict(set)
    pair_w: dict[tuple[str, str], float] = defaultdict(float)
    value_train: dict[str, float] = defaultdict(float)
    value_all: dict[str, float] = defaultdict(float)
    for q, t, w, b in rows:
        t = normalize(t)
        gold[q].add(t)
        value_all[t] += w * b
        if q in tr:
            pair_w[(q, t)] += w
            value_train[t] += w * b
    live = sorted({normalize(b) for b in inventory} if inventory else {normalize(t) for _, t, _, _ in rows})
    ppt: list[tuple[str, str, float]] = []
    if title_col:
        seen: dict[tuple[str, str], float] = defaultdict(float)
        for i, r in enumerate(df[[query_col, title_col]].itertuples(index=False)):
            q, title = normalize(r[0]), normalize(r[1])
            if q in tr and title:
                seen[(q, title)] += 1.0
        ppt = [(q, t, n) for (q, t), n in sorted(seen.items())]
    sft = [(q, t, w) for (q, t), w in sorted(pair_w.items())]
    corpus = sorted(tr) + live + [t for _, t, _ in ppt]
    return RewriteData(
        sft_pairs=sft, ppt_pairs=ppt, test_queries=sorted(te), valid_queries=sorted(va), live=live,
        revenue={b: math.log1p(v) for b, v in value_train.items()},
        rel_labels=weak_relevance([(q, t) for q, t, _ in sft], live, seed=seed),
        judge=TargetJudge(gold, live, value_all), corpus=corpus, name=name or "file")


def file_retrieval_data(df, query_col: str, item_col: str, *, seed: int = 0, text_col: str | None = None,
                        category_col: str | None = None, bidword_col: str | None = None,
                        label_col: str | None = None, positive: Sequence[str] = (), weight_col: str | None = None,
                        test: float = 0.3, valid: float = 0.1, name: str = "") -> RetrievalData:
    rows = _rows(df, query_col, item_col, label_col, positive, weight_col, None)
    _need(df, [text_col, category_col, bidword_col])
    tr, _va, te = split([q for q, *_ in rows], seed, test, valid)
    text: dict[str, str] = {}
    cat: dict[str, str] = {}
    bidwords: dict[str, set[str]] = defaultdict(set)
    if text_col or category_col or bidword_col:
        for r in df.itertuples(index=False):
            d = dict(zip(df.columns, r))
            item = str(d[item_col]).strip()
            if text_col and normalize(d[text_col]) and item not in text:
                text[item] = normalize(d[text_col])
            if category_col and normalize(d[category_col]) and item not in cat:
                cat[item] = normalize(d[category_col])
            if bidword_col and normalize(d[bidword_col]):
                bidwords[normalize(d[bidword_col])].add(item)
    links: dict[tuple[str, str], float] = defaultdict(float)
    relevant: dict[str, set[str]] = defaultdict(set)
    linked: dict[str, list[str]] = defaultdict(list)
    for q, item, w, _b in rows:
        if q in tr:
            links[(q, item)] += w
            linked[item].append(q)
        elif q in te:
            relevant[q].add(item)
    items: dict[str, tuple[str, str]] = {}
    for item in sorted({i for _, i, _, _ in rows}):
        t = text.get(item) or " ".join(dict.fromkeys(" ".join(linked.get(item, [])).split()))
        c = cat.get(item) or (t.split()[-1] if t else "")
        items[item] = (t, c)
    if not bidword_col:
        for item, qs in linked.items():
            for q in qs:
                bidwords[q].add(item)
    return RetrievalData(items, [(q, i, w) for (q, i), w in sorted(links.items())], sorted(te), dict(relevant),
                         {b: [(i, 1.0) for i in sorted(v)] for b, v in bidwords.items()}, sorted(tr),
                         name=name or "file")


from models.rewrite.catalog import load_catalog  # noqa: E402,F401 - its old home
