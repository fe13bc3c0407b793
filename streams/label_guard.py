"""The label-rate guard of the stream model worker: a window whose positive rate jumps far above
the recent windows' is held as *suspect*, and the candidate that learned it is rejected at the next
gate (and the learner reset to the serving model), whatever the gate's own scores say.

Why the gate alone is not enough: the gate judges the candidate trained through window k-1 on
window k. When bad labels (a click-spam burst, a replayed or broken label stream) span two windows,
the candidate that learned the first one is judged on the second, also bad, and wins there; once
published, the next candidate is compared with a bad serving model. The guard looks at the training
window itself and needs no clean hold-out.

The rule (docs/trainer.md, "Label-rate guard"): the baseline is the pooled positive rate (positives
/ records) of the last ``history`` windows not held as suspect; from ``warmup`` such windows on, a
window is suspect when its rate is at least ``ratio`` times the baseline *and* at least ``min_z``
binomial standard errors above it (so a small window's noise never trips it). Pooled, not a median
of the windows' rates: with positives at the click a window's rate says little on its own (the
clicks arrive seconds after their impressions, the negatives when the attribution window closes,
so small windows alternate between click-rich and click-free), while the pool over several windows
converges to the click rate. Only a rise is checked: a fall is what positives at the click look
like when traffic slows down, and a model that learned too few clicks under-predicts, which the
gate's calibration criterion sees. A rise that lasts ``accept_after`` windows in a row is taken as
the new click rate (a new slot, a change in what counts as a click, or traffic resuming after a
stop, when clicks run ahead of their negatives): that window is not held and the held ones become
the baseline, so the guard never stops a trainer for good.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class LabelRateGuard:
    def __init__(self, ratio: float = 4.0, min_z: float = 4.0, history: int = 8, warmup: int = 3,
                 accept_after: int = 3, label: Callable[[dict[str, Any]], Any] = lambda r: r.get("clicked")) -> None:
        if ratio <= 1:
            raise ValueError(f"label-rate guard ratio must be > 1, got {ratio}")
        if history < 1 or warmup < 1 or warmup > history:
            raise ValueError(f"label-rate guard needs 1 <= warmup <= history, got {warmup} and {history}")
        if accept_after < 1:
            raise ValueError(f"label-rate guard accept_after must be >= 1, got {accept_after}")
        self.ratio, self.min_z, self.history, self.warmup = float(ratio), float(min_z), int(history), int(warmup)
        self.accept_after = int(accept_after)
        self.label = label
        self.windows: deque[tuple[int, int]] = deque(maxlen=self.history)  # (positives, records) not held
        self.held: list[tuple[int, int]] = []  # the windows held in a row just now

    def baseline(self) -> float | None:
        if len(self.windows) < self.warmup:
            return None
        return sum(p for p, _ in self.windows) / max(1, sum(n for _, n in self.windows))

    def judge(self, records: Iterable[dict[str, Any]]) -> str | None:
        """Why this window is suspect, or None (then it joins the baseline)."""
        records = list(records)
        return self.judge_counts(sum(1 for r in records if self.label(r)), len(records))

    def judge_counts(self, pos: int, n: int) -> str | None:
        """:meth:`judge` on a window of ``n`` records, ``pos`` of them positive."""
        if n <= 0:
            return None
        rate = pos / n
        base = self.baseline()
        if base is not None:
            p0 = min(max(base, 1.0 / (4 * n)), 0.5)  # a zero baseline still has a standard error
            z = (rate - p0) / math.sqrt(p0 * (1 - p0) / n)
            if rate >= self.ratio * p0 and z >= self.min_z:
                self.held.append((pos, n))
                if len(self.held) < self.accept_after:
                    return (f"positive rate {rate:.3f} of {n} records is {rate / p0:.1f}x the recent windows' "
                            f"{base:.3f} ({z:.0f} standard errors above)")
                log.warning("positive rate %.3f: %d windows in a row far above the baseline %.3f, taken as the "
                            "new rate", rate, len(self.held), base)
                self.windows = deque(self.held, maxlen=self.history)
                self.held = []
                return None
        self.held = []
        self.windows.append((pos, n))
        return None

    def state(self) -> dict[str, Any]:
        return {"windows": [list(w) for w in self.windows], "held": [list(w) for w in self.held]}

    def restore(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.windows = deque(((int(p), int(n)) for p, n in state.get("windows", [])), maxlen=self.history)
        self.held = [(int(p), int(n)) for p, n in state.get("held", [])]


def label_guard(settings: Any) -> LabelRateGuard | None:
    """The guard of a ``core.settings.LabelGuardSettings`` (None when its ``ratio`` is None)."""
    if settings.ratio is None:
        return None
    return LabelRateGuard(settings.ratio, settings.min_z, settings.history, min(settings.warmup, settings.history),
                          settings.accept_after)
