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


def auc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC ``a`` measured on ``n_pos`` positives and ``n_neg`` negatives
    (Hanley & McNeil 1982). NaN when ``a`` is NaN or a class is missing."""
    if not np.isfinite(a) or n_pos <= 0 or n_neg <= 0:
        return float("nan")
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def log_calibration(y: np.ndarray, p: np.ndarray, pseudo: float = 0.5) -> float:
    """log((Σp + c) / (Σy + c)): how far the predicted clicks of a window are from the observed ones,
    on a log scale (0 = calibrated, log 2 = twice too many). ``c`` (½) keeps it finite on a window
    without clicks."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if len(y) == 0:
        return float("nan")
    return float(np.log((p.sum() + pseudo) / (y.sum() + pseudo)))
