"""Offset metadata of the joiner: which offsets above a committed one are already done.

The committed offset of an input partition is the smallest record the join still needs, so the
records above it that *are* finished (an emitted impression and its clicks, a dead-lettered record)
would be read again after a restart or a hand-over: emitted impressions come out as duplicate
examples, and a click whose impression is below the committed impression offset becomes a spurious
``orphan_click``. The runtime commits the done offsets with the offset, as metadata, and the next
owner skips them (``streams.join.JoinState.set_done`` / ``is_done``).

Done offsets are handled as sorted, disjoint runs ``[start, stop)``. Format (text, ``j1:`` +
comma-separated base-36 numbers): alternating (gap, length) pairs from the committed offset: ``gap``
offsets not done, then ``length`` offsets done, and so on. Kafka bounds metadata
(``offset.metadata.max.bytes``, 4096 by default); runs that do not fit in ``max_chars`` are left
out, which is safe: those records are read again, as without metadata.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

PREFIX = "j1:"
MAX_CHARS = 3000
MAX_RUNS = MAX_CHARS // 4  # more runs than this never fit
MAX_DECODED = 50_000_000  # offsets; a longer list is not metadata this module wrote

Runs = list[tuple[int, int]]
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_DIGITS[r])
    return "".join(reversed(out))


def gaps(committed: int, end: int, needed: Iterable[int], max_runs: int = MAX_RUNS) -> Runs:
    """The runs of ``[committed, end)`` not in ``needed`` (the first ``max_runs`` of them)."""
    runs: Runs = []
    cursor = committed
    for off in sorted(o for o in needed if committed <= o < end):
        if off > cursor:
            runs.append((cursor, off))
            if len(runs) >= max_runs:
                return runs
        cursor = off + 1
    if cursor < end:
        runs.append((cursor, end))
    return runs


def encode(committed: int, runs: Sequence[tuple[int, int]], max_chars: int = MAX_CHARS) -> str:
    """The metadata for ``runs`` (sorted, disjoint; parts below ``committed`` are ignored)."""
    parts: list[str] = []
    size = len(PREFIX)
    cursor = committed
    for start, stop in runs:
        start = max(start, cursor)
        if stop <= start:
            continue
        pair = f"{_b36(start - cursor)},{_b36(stop - start)}"
        if size + len(pair) + 1 > max_chars:
            break  # the rest is read again after a restart: safe, only noisier
        parts.append(pair)
        size += len(pair) + 1
        cursor = stop
    return PREFIX + ",".join(parts) if parts else ""


def decode(committed: int, meta: str | None) -> Runs:
    """The done runs in ``meta`` (anything not in this format: none)."""
    if not meta or not meta.startswith(PREFIX):
        return []
    try:
        nums = [int(x, 36) for x in meta[len(PREFIX):].split(",") if x]
    except ValueError:
        return []
    if len(nums) % 2 or sum(nums[1::2]) > MAX_DECODED:
        return []
    runs: Runs = []
    cursor = committed
    for gap, length in zip(nums[::2], nums[1::2]):
        start = cursor + gap
        if length:
            runs.append((start, start + length))
        cursor = start + length
    return runs


def offsets(runs: Iterable[tuple[int, int]]) -> list[int]:
    """Every offset of ``runs`` (tests, small runs)."""
    return [o for a, b in runs for o in range(a, b)]


class DoneRuns:
    """Membership in sorted runs, O(log n)."""

    __slots__ = ("runs", "_starts")

    def __init__(self, runs: Sequence[tuple[int, int]]) -> None:
        self.runs = list(runs)
        self._starts = [a for a, _ in self.runs]

    def __contains__(self, offset: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self.runs[i][1]

    def __bool__(self) -> bool:
        return bool(self.runs)

    def from_offset(self, offset: int) -> Runs:
        """The runs (clipped) at or above ``offset``."""
        i = bisect.bisect_right(self._starts, offset) - 1
        out = []
        for a, b in self.runs[max(i, 0):]:
            if b > offset:
                out.append((max(a, offset), b))
        return out
