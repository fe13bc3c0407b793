"""Stream statistics the rewriters learn from (spec §1.3, §4.6): exponentially decayed counters over
event time, fed with ``examples`` records (plain dicts).

* per bidword: impressions, clicks and revenue = Σ clicks × bid (CPC billing) — the revenue term of
  the re-rank and the discriminator's revenue target;
* per (query, bidword): clicks — the SFT pairs (query → clicked ad's bidword);
* per (query, ad): clicks — the click links of post-pre-training (query ↔ clicked ad's title) and
  GRAM's code sharing.

``c ← c · exp(−λ (t − t_last)) + x`` with ``λ = ln 2 / half_life``; counters are stored with their
last update time, decayed lazily on read (``at`` = the reader's event time, never a clock). Records
with a missing or non-finite time or a non-string query are skipped and counted (``skipped``).
Replaying a record id twice counts once (``seen`` keeps the ids of a bounded recent window).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Iterable

LN2 = math.log(2.0)


def _decayed(v: float, t0: float, t: float, lam: float) -> float:
    return v * math.exp(-lam * (t - t0)) if t > t0 else v


class DecayedCounter:
    """key -> (value, last time); ``add`` and ``get`` at event times."""

    def __init__(self, half_life_s: float) -> None:
        self.lam = LN2 / half_life_s if half_life_s and math.isfinite(half_life_s) else 0.0
        self.data: dict[Any, list[float]] = {}

    def add(self, key: Any, x: float, t: float) -> None:
        cur = self.data.get(key)
        if cur is None:
            self.data[key] = [float(x), float(t)]
            return
        v, t0 = cur
        if t >= t0:
            cur[0] = _decayed(v, t0, t, self.lam) + x
            cur[1] = t
        else:  # a late event: decay its contribution to the counter's time
            cur[0] = v + x * math.exp(-self.lam * (t0 - t))

    def get(self, key: Any, at: float | None = None) -> float:
        cur = self.data.get(key)
        if cur is None:
            return 0.0
        return cur[0] if at is None else _decayed(cur[0], cur[1], at, self.lam)

    def items(self, at: float | None = None) -> Iterable[tuple[Any, float]]:
        for k, (v, t0) in list(self.data.items()):
            yield k, v if at is None else _decayed(v, t0, at, self.lam)

    def state(self) -> dict:
        return {"lam": self.lam, "keys": [list(k) if isinstance(k, tuple) else k for k in self.data],
                "values": [v for v, _ in self.data.values()], "times": [t for _, t in self.data.values()]}

    @classmethod
    def from_state(cls, s: dict) -> "DecayedCounter":
        c = cls(float("inf"))
        c.lam = float(s["lam"])
        for k, v, t in zip(s["keys"], s["values"], s["times"]):
            c.data[tuple(k) if isinstance(k, list) else k] = [float(v), float(t)]
        return c


class StreamStats:
    def __init__(self, half_life_s: float = 6 * 3600.0, seen_window: int = 200_000) -> None:
        self.half_life_s = half_life_s
        self.imps = DecayedCounter(half_life_s)
        self.clicks = DecayedCounter(half_life_s)
        self.revenue = DecayedCounter(half_life_s)
        self.pair_clicks = DecayedCounter(half_life_s)  # (query, bidword)
        self.ad_clicks = DecayedCounter(half_life_s)  # (query, ad)
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.seen_window = seen_window
        self.last_time = float("-inf")
        self.skipped = 0
        self.applied = 0

    def update(self, records: Iterable[dict]) -> dict[str, int]:
        """Apply a window of example records; returns how many were applied, duplicates, skipped."""
        applied = dup = skipped = 0
        for r in records:
            t = r.get("event_time")
            q, b = r.get("query"), r.get("bidword")
            if not isinstance(t, (int, float)) or not math.isfinite(t) or not isinstance(q, str) \
                    or not isinstance(b, str) or not b:
                skipped += 1
                continue
            rid = f"{r.get('request_id', '')}:{r.get('ad_id', '')}"
            if rid != ":" and rid in self.seen:
                dup += 1
                continue
            if rid != ":":
                self.seen[rid] = None
                if len(self.seen) > self.seen_window:
                    self.seen.popitem(last=False)
            q = " ".join(q.lower().split())
            b = " ".join(b.lower().split())
            clicked = 1.0 if r.get("clicked") else 0.0
            bid = r.get("bid")
            bid = float(bid) if isinstance(bid, (int, float)) and math.isfinite(bid) and bid >= 0 else 0.0
            self.imps.add(b, 1.0, t)
            if clicked:
                self.clicks.add(b, 1.0, t)
                self.revenue.add(b, bid, t)
                self.pair_clicks.add((q, b), 1.0, t)
                ad = r.get("ad_id")
                if isinstance(ad, str) and ad:
                    self.ad_clicks.add((q, ad), 1.0, t)
            self.last_time = max(self.last_time, float(t))
            applied += 1
        self.skipped += skipped
        self.applied += applied
        return {"applied": applied, "duplicates": dup, "skipped": skipped}

    def at(self) -> float | None:
        return self.last_time if math.isfinite(self.last_time) else None

    def bidword_revenue(self) -> dict[str, float]:
        """bidword -> log(1 + decayed Σ clicks × bid)."""
        at = self.at()
        return {b: math.log1p(max(v, 0.0)) for b, v in self.revenue.items(at)}

    def sft_pairs(self, min_clicks: float = 0.5) -> list[tuple[str, str, float]]:
        at = self.at()
        return [(q, b, v) for (q, b), v in self.pair_clicks.items(at) if v >= min_clicks]

    def click_links(self, min_clicks: float = 0.5) -> list[tuple[str, str, float]]:
        at = self.at()
        return [(q, a, v) for (q, a), v in self.ad_clicks.items(at) if v >= min_clicks]

    def state(self) -> dict:
        return {"half_life_s": self.half_life_s, "imps": self.imps.state(), "clicks": self.clicks.state(),
                "revenue": self.revenue.state(), "pair_clicks": self.pair_clicks.state(),
                "ad_clicks": self.ad_clicks.state(), "last_time": self.last_time if self.at() is not None else None,
                "skipped": self.skipped, "applied": self.applied}

    @classmethod
    def from_state(cls, s: dict) -> "StreamStats":
        st = cls(float(s["half_life_s"]))
        for k in ("imps", "clicks", "revenue", "pair_clicks", "ad_clicks"):
            setattr(st, k, DecayedCounter.from_state(s[k]))
        st.last_time = float(s["last_time"]) if s.get("last_time") is not None else float("-inf")
        st.skipped, st.applied = int(s.get("skipped", 0)), int(s.get("applied", 0))
        return st
