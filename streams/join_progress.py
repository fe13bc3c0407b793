"""Which inputs of a partition are read to their end: what lets the join's watermark move on when
an input is idle (:class:`InputProgress`; pure, the runtimes pass monotonic times in)."""

from __future__ import annotations

import math
from typing import Iterable

KINDS = ("impression", "click", "conversion")


class InputProgress:
    """Which inputs of each partition are caught up (read to their end), for the watermark.

    The watermark of a partition follows the slowest input that still has records to deliver, so
    deciding "this input has nothing more" wrongly lets the watermark run ahead and turns the
    input's next records into late ones. An input counts as idle only when all of these hold:

    * the runtime asked the broker for the input's end offset (:meth:`end_offsets`) *after* the
      last record of that input arrived and after the last (re)assignment (a cached high watermark
      from an earlier fetch is not enough: it is stale while a producer keeps writing, and after a
      rebalance it can predate the partition's new start position);
    * the position (next offset to read) is at or past that end offset;
    * nothing arrived on it for ``quiet_s`` seconds.

    Even then it only stops holding the watermark back *up to its horizon*, the partition's newest
    event time when the end offset was asked: records written to it after that moment can be
    older than what another input delivers meanwhile.

    Pure: the runtime passes monotonic times in.
    """

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self.reset(0.0, {})

    def reset(self, now: float, positions: dict[tuple[str, int], int | None]) -> None:
        """A new assignment: reading restarts at ``positions`` ((kind, partition) -> offset, None =
        unknown, i.e. nothing committed yet)."""
        self.assigned_at = now
        self.position: dict[tuple[str, int], int | None] = dict(positions)
        self.last_arrival: dict[tuple[str, int], float] = {}
        self.ends: dict[tuple[str, int], tuple[int, float]] = {}

    def arrived(self, kind: str, partition: int, offset: int, now: float) -> None:
        self.position[(kind, partition)] = offset + 1
        self.last_arrival[(kind, partition)] = now

    def end_offsets(self, ends: dict[tuple[str, int], int], asked_at: float,
                    horizons: dict[int, float] | None = None) -> None:
        """End offsets (high watermarks) the broker reported for a request sent at ``asked_at``;
        ``horizons``: each partition's newest event time when the request was sent."""
        for k, e in ends.items():
            if e is not None and e >= 0:
                h = math.inf if horizons is None else horizons.get(k[1], -math.inf)
                self.ends[k] = (int(e), asked_at, h)

    def lag(self, kind: str, partition: int) -> int | None:
        e = self.ends.get((kind, partition))
        pos = self.position.get((kind, partition))
        if e is None or pos is None:
            return None
        return max(0, e[0] - pos)

    def idle_kinds(self, partition: int, now: float, kinds: Iterable[str] = KINDS) -> dict[str, float]:
        """The idle inputs of a partition, each with its horizon (see :meth:`JoinState.set_idle`)."""
        idle = {}
        for kind in kinds:
            k = (kind, partition)
            e = self.ends.get(k)
            if e is None:
                continue
            end, asked_at, horizon = e
            arrived = self.last_arrival.get(k, self.assigned_at)
            if asked_at < arrived or asked_at < self.assigned_at:
                continue  # the answer predates what we have read: it says nothing
            if now - arrived < self.quiet_s:
                continue
            pos = self.position.get(k)
            if end == 0 or (pos is not None and pos >= end):
                idle[kind] = horizon
        return idle
