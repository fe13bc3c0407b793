"""The counts baseline of the offline evaluation (variant ``counts``): the serving fallback's rule.

Serving falls back to counting (``online/index.py`` ``CountsClassifier``: the most frequent
category among the ads whose bidwords the query matched). Offline there is no ad inventory, so the
same rule runs on the training rows: every word of the query votes for the labels of the training
rows that contain it, and the labels with the most votes win. No encoder and no training.

Tuned with the same effort as the neural variants: the vote weighting (``raw`` counts, or ``share``:
each word's votes normalised to one, so frequent words do not drown the rest) and the decision rule
(threshold × cap on the scores normalised by the query's best, at least one label,
:func:`models.query.classifier.best_threshold`) are chosen on the validation rows. A query that
shares no word with the training rows gets the labels' training frequencies as its scores (the
most frequent label).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import numpy as np

from models.query.metrics import predict_sets

WEIGHTINGS = ("raw", "share")
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


class CountsBaseline:
    def __init__(self, n_labels: int, weighting: str = "share") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}")
        self.n_labels = n_labels
        self.weighting = weighting
        self.word_labels: dict[str, np.ndarray] = {}
        self.prior = np.zeros(n_labels)
        self.threshold, self.max_labels = 0.5, 1

    def fit(self, queries: Sequence[str], labels: Sequence[Sequence[int]]) -> "CountsBaseline":
        acc: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(self.n_labels))
        for q, ls in zip(queries, labels, strict=True):
            for y in ls:
                self.prior[y] += 1.0
            for w in words(q):
                for y in ls:
                    acc[w][y] += 1.0
        self.word_labels = dict(acc)
        return self

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """[n, L] votes normalised by each query's best label (1.0 for the top label)."""
        out = np.zeros((len(queries), self.n_labels))
        prior = self.prior / max(self.prior.max(), 1.0)
        for i, q in enumerate(queries):
            v = np.zeros(self.n_labels)
            for w in words(q):
                c = self.word_labels.get(w)
                if c is not None:
                    v += c / c.sum() if self.weighting == "share" else c
            out[i] = v / v.max() if v.max() > 0 else prior
        return out

    def predict(self, queries: Sequence[str]) -> list[set[int]]:
        return predict_sets(self.scores(queries), self.threshold, 1, self.max_labels)


def fit_counts(train_q: Sequence[str], train_y: Sequence[Sequence[int]], val_q: Sequence[str],
               val_y: Sequence[Sequence[int]], n_labels: int, select: str) -> tuple[CountsBaseline, float]:
    """The weighting and decision rule best on validation (by ``select``); returns (model, val metric)."""
    from models.query.classifier import best_threshold, label_counts

    counts = label_counts(train_y, n_labels)
    best: tuple[float, CountsBaseline] | None = None
    for wt in WEIGHTINGS:
        m = CountsBaseline(n_labels, wt).fit(train_q, train_y)
        v, (t, cap) = best_threshold(m.scores(val_q), val_y, counts, select)
        m.threshold, m.max_labels = t, cap
        if best is None or v > best[0] + 1e-9:
            best = (v, m)
    assert best is not None
    return best[1], best[0]
