"""Offline metrics of a creative ranker on logged impressions (pure numpy).

NSCTR (Peri-CR paper, Algorithm 1) for logged impressions ``(ad A, shown creative C, click y)`` and
the ranker's pick ``k*(impression) = argmax_k f(A, C_k)``::

    Imp[A]   = impressions of A
    Imp_s[A] = impressions of A where the pick is the shown creative ("matched")
    Clk_s[A] = clicks among them
    NSCTR    = Σ_A Clk_s[A] · Imp[A] / Imp_s[A]  /  Σ_A Imp[A]
    sCTR     = Σ_A Clk_s[A] / Σ_A Imp_s[A]

NSCTR is the impression-weighted mean, over ads, of each ad's matched CTR: every ad is re-weighted
back to its share of the logged impressions (sCTR lets an ad whose creatives the ranker happens to
agree with the logging policy on dominate).

Choices the paper leaves open (docs/creative.md):

- an ad with Imp_s = 0 (the ranker never agrees with the log) is undefined in Algorithm 1:
  ``unmatched="drop"`` (default) leaves it out of both sums, ``"zero"`` counts it with no clicks;
  the number of such ads is reported either way;
- with logging propensities (the probability the logging policy had of showing the shown creative),
  matched impressions are weighted by 1/propensity in Imp_s and Clk_s, so an ad's matched CTR is
  the self-normalised inverse-propensity estimate of the CTR the ranker would get on that ad. With
  constant propensities this is exactly Algorithm 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.ctr.metrics import auc

UNMATCHED = ("drop", "zero")


def _codes(keys: np.ndarray) -> tuple[np.ndarray, int]:
    _, inv = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64), int(inv.max()) + 1 if len(inv) else 0


def nsctr(ads: np.ndarray, matched: np.ndarray, clicks: np.ndarray, propensity: np.ndarray | None = None,
          unmatched: str = "drop") -> dict[str, Any]:
    """NSCTR and sCTR of a ranker whose pick equals the shown creative where ``matched`` is True
    (or with weight ``matched`` in [0, 1]: see :func:`match_weights`).

    Returns ``{"nsctr", "sctr", "matched_share", "ads", "ads_unmatched", "impressions"}``; NaN
    metrics when nothing can be computed (no impression, or no matched impression)."""
    if unmatched not in UNMATCHED:
        raise ValueError(f"unmatched must be one of {UNMATCHED}")
    codes, n_ads = _codes(ads)
    m = np.asarray(matched, dtype=np.float64)
    y = np.asarray(clicks, dtype=np.float64)
    w = np.ones(len(y)) if propensity is None else 1.0 / np.clip(np.asarray(propensity, dtype=np.float64), 1e-12, None)
    imp = np.bincount(codes, minlength=n_ads).astype(np.float64)
    imp_s = np.bincount(codes, weights=w * m, minlength=n_ads)
    clk_s = np.bincount(codes, weights=w * m * y, minlength=n_ads)
    has = imp_s > 0
    denom = imp[has].sum() if unmatched == "drop" else imp.sum()
    num = (clk_s[has] * imp[has] / imp_s[has]).sum()
    # a rough standard error: per ad, a binomial on its matched impressions (n, clicks + ½ smoothed so a
    # clickless ad is not certain), the ads weighted by their impression share
    n_s = np.bincount(codes, weights=m, minlength=n_ads)[has]
    c_s = np.bincount(codes, weights=m * y, minlength=n_ads)[has]
    rate = (c_s + 0.5) / (n_s + 1.0)
    share = imp[has] / denom if denom > 0 else np.zeros(int(has.sum()))
    out = {
        "nsctr": float(num / denom) if denom > 0 else float("nan"),
        "nsctr_se": float(np.sqrt((share**2 * rate * (1 - rate) / np.maximum(n_s, 1.0)).sum())) if denom > 0
        else float("nan"),
        "sctr": float(clk_s.sum() / imp_s.sum()) if imp_s.sum() > 0 else float("nan"),
        "matched_share": float(m.mean()) if len(m) else float("nan"),
        "matched_impressions": float(m.sum()),
        "matched_clicks": float((m * y).sum()),
        "ads": int(n_ads),
        "ads_unmatched": int(n_ads - has.sum()),
        "impressions": int(len(y)),
    }
    return out


def gauc(groups: np.ndarray, y: np.ndarray, p: np.ndarray) -> float:
    """Impression-weighted mean of the per-group AUC, skipping groups with one class only (NaN when
    no group has both)."""
    codes, n = _codes(groups)
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(codes[order]))[0] + 1, len(codes)]
    num = den = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        idx = order[lo:hi]
        yy = y[idx]
        if yy.min() == yy.max():
            continue
        num += auc(yy, p[idx]) * len(idx)
        den += len(idx)
    return float(num / den) if den > 0 else float("nan")


def match_weights(scores: np.ndarray, offsets: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """How much each impression counts as matched: the ranker's pick (argmax of the impression's
    candidate block ``scores[offsets[i]:offsets[i+1]]``) is the shown creative (local index
    ``shown[i]``). A tie between t top candidates counts 1/t when the shown creative is one of them:
    the expectation over a uniformly random tie-break, so a ranker that gives several creatives the
    same score (the Beta prior's never-shown creatives) is scored as a random pick among them, with
    no tie-break noise. Without ties this is 1.0 or 0.0."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(offsets) - 1
    out = np.zeros(n, dtype=np.float64)
    for i in range(n):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if hi <= lo:
            continue
        block = scores[lo:hi]
        top = block.max()
        if block[shown[i]] == top:
            out[i] = 1.0 / int((block == top).sum())
    return out
