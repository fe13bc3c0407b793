"""Multi-label metrics (spec §1.5): micro-F1, macro-F1 over the labels with support in the gold,
tail macro-F1 (the rarest half of those labels by training count) and Recall@K.

Labels are integer ids; predictions and gold are lists of label-id sets, one per example.
Zero division: a label with gold support and no true positive has F1 = 0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _counts(pred: Sequence[Iterable[int]], gold: Sequence[Iterable[int]]):
    tp: dict[int, int] = {}
    fp: dict[int, int] = {}
    fn: dict[int, int] = {}
    for p, g in zip(pred, gold, strict=True):
        p, g = set(p), set(g)
        for x in p & g:
            tp[x] = tp.get(x, 0) + 1
        for x in p - g:
            fp[x] = fp.get(x, 0) + 1
        for x in g - p:
            fn[x] = fn.get(x, 0) + 1
    return tp, fp, fn


def _f1(tp: int, fp: int, fn: int) -> float:
    d = 2 * tp + fp + fn
    return 2.0 * tp / d if d else 0.0


def f1_scores(pred: Sequence[Iterable[int]], gold: Sequence[Iterable[int]],
              train_counts: Sequence[float] | dict[int, float] | None = None) -> dict[str, float]:
    """``micro_f1``, ``macro_f1``, ``tail_macro_f1`` (needs ``train_counts``), ``seen_macro_f1``
    (labels with a training count > 0), and the number of labels each averages over."""
    tp, fp, fn = _counts(pred, gold)
    support = sorted(set(tp) | set(fn))  # labels present in the gold
    micro = _f1(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    per = {x: _f1(tp.get(x, 0), fp.get(x, 0), fn.get(x, 0)) for x in support}
    out = {"micro_f1": micro, "macro_f1": float(np.mean(list(per.values()))) if per else 0.0,
           "n_labels": len(support), "n_examples": len(gold)}
    if train_counts is not None:
        cnt = (lambda x: float(train_counts.get(x, 0.0))) if isinstance(train_counts, dict) \
            else (lambda x: float(train_counts[x]) if x < len(train_counts) else 0.0)
        tail = tail_labels(support, cnt)
        out["tail_macro_f1"] = float(np.mean([per[x] for x in tail])) if tail else 0.0
        out["n_tail_labels"] = len(tail)
        seen = [x for x in support if cnt(x) > 0]
        out["seen_macro_f1"] = float(np.mean([per[x] for x in seen])) if seen else 0.0
        unseen = [x for x in support if cnt(x) <= 0]
        out["unseen_macro_f1"] = float(np.mean([per[x] for x in unseen])) if unseen else float("nan")
        out["n_unseen_labels"] = len(unseen)
    return out


def tail_labels(labels: Sequence[int], count) -> list[int]:
    """The rarest half (rounded up) of ``labels`` by training count (ties broken by id)."""
    ranked = sorted(labels, key=lambda x: (count(x), x))
    return ranked[: (len(ranked) + 1) // 2]


def recall_at_k(scores: np.ndarray, gold: Sequence[Iterable[int]], k: int) -> float:
    """Mean over examples of |top-k ∩ gold| / min(|gold|, k) (examples without gold are skipped)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    vals = []
    for row, g in zip(top, gold):
        g = set(g)
        if g:
            vals.append(len(g & set(row.tolist())) / min(len(g), k))
    return float(np.mean(vals)) if vals else 0.0


def predict_sets(probs: np.ndarray, threshold: float, min_labels: int = 1, max_labels: int | None = None) -> list[set[int]]:
    """Labels with probability ≥ threshold; at least the ``min_labels`` best, at most ``max_labels``."""
    out = []
    order = np.argsort(-probs, axis=1, kind="stable")
    for p, o in zip(probs, order):
        chosen = [int(j) for j in o if p[j] >= threshold]
        if len(chosen) < min_labels:
            chosen = [int(j) for j in o[:min_labels]]
        if max_labels is not None:
            chosen = chosen[:max_labels]
        out.append(set(chosen))
    return out
