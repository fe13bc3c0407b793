"""The Beta-prior creative ranker as an offline baseline (the online one is
``online.models.BetaCreativeRanker``; both score ``(clicks_c + k·m_ad) / (impressions_c + k)``).

``m_ad`` is the ad's own CTR shrunk toward the global CTR with ``ad_strength`` pseudo-impressions,
``k`` the creative prior strength. A creative never shown scores exactly ``m_ad``: the flat guess
every never-shown creative of an ad shares.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


class BetaCounts:
    """Click and impression counts per creative and per ad."""

    def __init__(self, strength: float = 20.0, ad_strength: float = 20.0) -> None:
        self.strength = float(strength)
        self.ad_strength = float(ad_strength)
        self.cr: dict[Any, list[float]] = defaultdict(lambda: [0.0, 0.0])  # creative -> [clicks, imps]
        self.ad: dict[Any, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.clicks = 0.0
        self.impressions = 0.0

    def fit(self, ads: np.ndarray, creatives: np.ndarray, labels: np.ndarray) -> "BetaCounts":
        for a, c, y in zip(np.asarray(ads, dtype=object).tolist(), np.asarray(creatives, dtype=object).tolist(),
                           np.asarray(labels, dtype=np.float64).tolist()):
            s = self.cr[c]
            s[0] += y
            s[1] += 1
            t = self.ad[a]
            t[0] += y
            t[1] += 1
            self.clicks += y
            self.impressions += 1
        return self

    def ad_mean(self, ad: Any) -> float:
        g = self.clicks / self.impressions if self.impressions else 0.0
        c, n = self.ad.get(ad, (0.0, 0.0))
        return (c + self.ad_strength * g) / (n + self.ad_strength) if n + self.ad_strength > 0 else g

    def scores(self, ads: np.ndarray, creatives: np.ndarray, strength: float | None = None) -> np.ndarray:
        k = self.strength if strength is None else float(strength)
        out = np.empty(len(ads), dtype=np.float64)
        means: dict[Any, float] = {}
        for i, (a, c) in enumerate(zip(np.asarray(ads, dtype=object).tolist(),
                                       np.asarray(creatives, dtype=object).tolist())):
            m = means.get(a)
            if m is None:
                m = means[a] = self.ad_mean(a)
            clk, n = self.cr.get(c, (0.0, 0.0))
            out[i] = (clk + k * m) / (n + k) if n + k > 0 else m
        return out

    def shown(self, creative: Any) -> bool:
        return self.cr.get(creative, (0.0, 0.0))[1] > 0
