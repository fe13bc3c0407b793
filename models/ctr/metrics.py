"""AUC and LogLoss in numpy (no sklearn): exact ranking AUC with ties (average ranks)."""

from __future__ import annotations

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count ½.

    Computed exactly from average ranks (Mann-Whitney U). NaN when only one class is present.
    """
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average rank of each block of equal scores (1-based)
    starts = np.r_[0, np.nonzero(np.diff(ps))[0] + 1]
    ends = np.r_[starts[1:], len(ps)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [eps, 1-eps])."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())
