"""The impression ⋈ click/conversion join as pure, runtime-independent state.

The faust worker in :mod:`streams.joiner` feeds records into a :class:`JoinState` and acts on what
comes out; keeping the logic here makes it testable without a broker and reusable by any runtime.

Semantics (event time):

* Impressions, clicks and conversions are keyed by ``request_id`` and co-partitioned, so one
  partition index of each topic is joined on its own (:class:`PartitionJoin`).
* A click or conversion counts for its impression when its event time lies within
  ``attribution_window_s`` after the impression. The example of an impression is emitted when the
  partition's watermark (max event time seen − ``allowed_lateness_s``) passes the end of its window;
  non-clicked impressions become negatives then. The content depends only on the input, so
  re-processing yields the same key with the same content.
* Positives at the click (``emit_at_click``, ``join.emit_positives_at_click``; docs/speed.md
  "Fresher models"): the first click attached to an open impression emits a ``stage="click"``
  example at once (``clicked=1``, ``converted=0``, that click's time; a click can only turn a label
  from 0 to 1, so the positive is final); the impression's record at window close is then
  ``stage="close"`` (final conversion and earliest click time) instead of ``stage="full"``. The first
  attached click is the lowest-offset in-window click of the key, whatever the interleaving of the
  topics, so a re-emission after a restart has the same content.
* Records behind the watermark by more than the allowance are *late*: an impression whose window has
  already closed, or a click for an impression that was already emitted. They are dead-lettered
  with reason ``late`` and counted. A click whose impression never arrives is dead-lettered as
  ``orphan_click`` once the watermark passes it.

Bounded state: open impressions plus clicks/conversions waiting for their impression count against
``max_pending`` (``JoinSettings.max_pending``) per worker; a record that would exceed it is
dead-lettered with reason ``state_full`` (its example is never emitted; the dead letter says so).
An impression whose key (request, ad) was seen with *different* content is dead-lettered as
``duplicate_request_id`` (a client reused a request id); a byte-identical one (a producer retry) is
dropped and counted as ``duplicate_impression``.

Offsets (at-least-once without loss): every record that is still needed to rebuild the state is
*held*; the committable offset of a topic-partition is its smallest held offset. A click attached to
an impression is held until the impression's own offset is committable, so a restart from committed
offsets never sees an impression without the clicks that were joined to it. (The converse can
happen: after a crash a click may be re-read whose impression was already committed; it is then
dead-lettered as an orphan a second time, under the same dead-letter key.) To avoid that, a runtime
commits, as offset metadata, which offsets above the committed one are *done*
(:meth:`PartitionJoin.done_runs`, encoded by :mod:`streams.join_offsets`) and skips them when it
reads them again (:meth:`JoinState.skip_done`): an emitted impression with its clicks, a
dead-lettered record. Without the metadata a restart is still correct, only noisier.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from core.errors import InvalidRecord
from core.events import Click, Conversion, Event, Example, Impression
from streams.join_offsets import DoneRuns
from streams.join_progress import InputProgress  # noqa: F401  (re-exported: the runtimes import it from here)

IMPRESSION, CLICK, CONVERSION = "impression", "click", "conversion"
KINDS = (IMPRESSION, CLICK, CONVERSION)


@dataclass(slots=True)
class DeadLetter:
    """A record the join rejects: where it came from, its encoded value and why."""

    kind: str
    partition: int
    offset: int
    raw: bytes
    error: InvalidRecord


@dataclass(slots=True)
class _Pending:
    imp: Impression
    offset: int
    close_at: float
    clicked: bool = False
    click_time: float | None = None
    converted: bool = False
    early: bool = False  # a stage="click" example was emitted for it
    outcomes: list[tuple[str, int]] = field(default_factory=list)


class _HeldOffsets:
    """Offsets still needed, with O(log n) minimum (a heap with lazy deletion)."""

    __slots__ = ("_heap", "_live", "next_offset")

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._live: set[int] = set()
        self.next_offset = -1  # one past the highest offset seen; -1 = nothing seen

    def seen(self, offset: int) -> None:
        if offset + 1 > self.next_offset:
            self.next_offset = offset + 1

    def hold(self, offset: int) -> None:
        if offset not in self._live:
            self._live.add(offset)
            heapq.heappush(self._heap, offset)

    def release(self, offset: int) -> None:
        self._live.discard(offset)

    def committable(self) -> int | None:
        """The offset a consumer may commit: everything below it is no longer needed."""
        h = self._heap
        while h and h[0] not in self._live:
            heapq.heappop(h)
        if h:
            return h[0]
        return self.next_offset if self.next_offset >= 0 else None

    def __len__(self) -> int:
        return len(self._live)


class PartitionJoin:
    """Join state of one partition index across the impression/click/conversion topics."""

    def __init__(self, partition: int, window_s: float, lateness_s: float, track_inputs: bool = False,
                 is_full=None, emit_at_click: bool = False) -> None:
        self.partition = partition
        self.emit_at_click = emit_at_click
        self.is_full = is_full or (lambda: False)  # the worker's state bound (JoinState.max_pending)
        self.n_orphans = 0
        self.window_s = window_s
        self.lateness_s = lateness_s
        self.max_event_time = -math.inf
        self.max_time = {k: -math.inf for k in KINDS}
        # kinds whose input is caught up (read to the end). None = no progress information: the
        # watermark then follows the newest event of any kind (fine for one ordered input).
        # kind -> horizon: the newest event time of the partition when the input was last confirmed
        # at its end; an idle input holds the watermark back to its horizon, not further
        self.idle: dict[str, float] | None = {} if track_inputs else None
        self.pending: dict[tuple[str, str], _Pending] = {}
        self._close_heap: list[tuple[float, int, tuple[str, str]]] = []
        self.orphans: dict[tuple[str, str], list[tuple[str, Event, int]]] = {}
        self._orphan_heap: list[tuple[float, int, tuple[str, str]]] = []
        # recently emitted key -> (purge time, content signature)
        self.closed: dict[tuple[str, str], tuple[float, tuple]] = {}
        self._closed_heap: list[tuple[float, tuple[str, str]]] = []
        self.held = {k: _HeldOffsets() for k in KINDS}
        self._waiting: list[tuple[int, str, int]] = []  # (impression offset, kind, offset)
        self._seq = 0

    @property
    def watermark(self) -> float:
        """Event time up to which this partition is complete, minus the allowance. With several
        inputs it follows the slowest input that still has records to deliver, so a topic that
        is read ahead of another never closes windows the other still has clicks for."""
        if self.idle is None:
            return self.max_event_time - self.lateness_s
        idle = self.idle
        t = min(min(idle[k], self.max_event_time) if k in idle else self.max_time[k] for k in KINDS)
        return t - self.lateness_s

    # -- input -------------------------------------------------------------------------------
    def add(self, kind: str, offset: int, event: Event, out: "JoinOutput") -> None:
        self.held[kind].seen(offset)
        if kind == IMPRESSION:
            self._add_impression(offset, event, out)  # type: ignore[arg-type]
        else:
            self._add_outcome(kind, offset, event, out)
        if event.event_time > self.max_time[kind]:
            self.max_time[kind] = event.event_time
            if event.event_time > self.max_event_time:
                self.max_event_time = event.event_time

    @property
    def size(self) -> int:
        """Records held in memory: open impressions and outcomes waiting for their impression."""
        return len(self.pending) + self.n_orphans

    @staticmethod
    def _signature(imp: Impression) -> tuple:
        return (imp.event_time, imp.user_id, imp.query, imp.creative_id, imp.position, imp.bid)

    def _add_impression(self, offset: int, imp: Impression, out: "JoinOutput") -> None:
        key = (imp.request_id, imp.ad_id)
        p = self.pending.get(key)
        seen = p.imp if p is not None else None
        sig = self._signature(seen) if seen is not None else (self.closed[key][1] if key in self.closed else None)
        if sig is not None:
            if sig == self._signature(imp):
                out.stats["duplicate_impression"] += 1
            else:
                out.dead.append(DeadLetter(IMPRESSION, self.partition, offset, imp.to_json(), InvalidRecord(
                    "duplicate_request_id", f"request {imp.request_id} ad {imp.ad_id} was already served with "
                    "other content; request ids must be unique per page")))
                out.stats["duplicate_request_id"] += 1
            return
        close_at = imp.event_time + self.window_s
        if close_at <= self.watermark:
            out.dead.append(
                DeadLetter(IMPRESSION, self.partition, offset, imp.to_json(),
                           InvalidRecord("late", f"impression {close_at - self.watermark:.1f}s behind the watermark"))
            )
            out.stats["late"] += 1
            return
        if self.is_full():
            out.dead.append(DeadLetter(IMPRESSION, self.partition, offset, imp.to_json(), InvalidRecord(
                "state_full", "the joiner holds max_pending open impressions and waiting clicks; "
                "raise join.max_pending or add workers")))
            out.stats["state_full"] += 1
            return
        p = _Pending(imp, offset, close_at)
        self.pending[key] = p
        self.held[IMPRESSION].hold(offset)
        self._seq += 1
        heapq.heappush(self._close_heap, (close_at, self._seq, key))
        for kind, ev, off in self.orphans.pop(key, ()):
            self.n_orphans -= 1
            self._attach(p, kind, ev, off, out)

    def _add_outcome(self, kind: str, offset: int, ev: Event, out: "JoinOutput") -> None:
        key = (ev.request_id, ev.ad_id)  # type: ignore[attr-defined]
        p = self.pending.get(key)
        if p is not None:
            self._attach(p, kind, ev, offset, out)
            return
        if key in self.closed or ev.event_time <= self.watermark - self.window_s:
            out.dead.append(
                DeadLetter(kind, self.partition, offset, ev.to_json(),
                           InvalidRecord("late", f"{kind} after its impression's example was emitted"))
            )
            out.stats["late"] += 1
            return
        # the impression may still come (out of order): wait until the watermark passes the event
        if self.is_full():
            out.dead.append(DeadLetter(kind, self.partition, offset, ev.to_json(), InvalidRecord(
                "state_full", f"the joiner holds max_pending records; this {kind} waits for no impression")))
            out.stats["state_full"] += 1
            return
        self.n_orphans += 1
        self.held[kind].hold(offset)
        self.orphans.setdefault(key, []).append((kind, ev, offset))
        self._seq += 1
        heapq.heappush(self._orphan_heap, (ev.event_time, self._seq, key))

    def _attach(self, p: _Pending, kind: str, ev: Event, offset: int, out: "JoinOutput") -> None:
        dt = ev.event_time - p.imp.event_time
        if not (0.0 <= dt <= self.window_s):
            out.stats[f"{kind}_outside_window"] += 1
            self.held[kind].release(offset)
            return
        if kind == CLICK:
            p.clicked = True
            p.click_time = ev.event_time if p.click_time is None else min(p.click_time, ev.event_time)
            if self.emit_at_click and not p.early:
                p.early = True
                out.examples.append(Example.from_impression(p.imp, True, False, ev.event_time, stage="click"))
                out.stats["positive_at_click"] += 1
        else:
            p.converted = True
        self.held[kind].hold(offset)
        p.outcomes.append((kind, offset))
        out.stats[f"{kind}_matched"] += 1

    # -- time --------------------------------------------------------------------------------
    def advance(self, out: "JoinOutput", flush_all: bool = False) -> None:
        """Emit every impression whose window closed (all of them when ``flush_all``), dead-letter
        expired orphans, and release offsets that are no longer needed."""
        wm = math.inf if flush_all else self.watermark
        heap = self._close_heap
        while heap and heap[0][0] <= wm:
            close_at, _, key = heapq.heappop(heap)
            p = self.pending.pop(key, None)
            if p is None:
                continue
            ex = Example.from_impression(p.imp, p.clicked, p.converted, p.click_time,
                                         stage="close" if p.early else "full")
            out.examples.append(ex)
            out.stats["positive" if p.clicked else "negative"] += 1
            self.held[IMPRESSION].release(p.offset)
            for kind, off in p.outcomes:
                heapq.heappush(self._waiting, (p.offset, kind, off))
            purge = close_at + self.window_s + self.lateness_s
            self.closed[key] = (purge, self._signature(p.imp))
            heapq.heappush(self._closed_heap, (purge, key))
        oh = self._orphan_heap
        while oh and oh[0][0] < wm:
            _, _, key = heapq.heappop(oh)
            for kind, ev, off in self.orphans.pop(key, ()):
                self.n_orphans -= 1
                reason = "orphan_click" if kind == CLICK else "orphan_conversion"
                out.dead.append(
                    DeadLetter(kind, self.partition, off, ev.to_json(),
                               InvalidRecord(reason, f"no impression for request {ev.request_id} ad {ev.ad_id}"))  # type: ignore[attr-defined]
                )
                out.stats[reason] += 1
                self.held[kind].release(off)
        ch = self._closed_heap
        purge_wm = self.watermark
        while ch and ch[0][0] < purge_wm:
            _, key = heapq.heappop(ch)
            self.closed.pop(key, None)
        # outcomes are released only once their impression's offset is committable
        imp_commit = self.held[IMPRESSION].committable()
        w = self._waiting
        while w and imp_commit is not None and w[0][0] < imp_commit:
            _, kind, off = heapq.heappop(w)
            self.held[kind].release(off)

    def skip_done(self, kind: str, offset: int, event_time: float | None) -> None:
        """A record read again that an earlier owner had finished (see :meth:`done_runs`): only
        its position and event time count."""
        self.held[kind].seen(offset)
        if event_time is not None and event_time > self.max_time[kind]:
            self.max_time[kind] = event_time
            if event_time > self.max_event_time:
                self.max_event_time = event_time

    def done_runs(self, kind: str, committed: int) -> tuple[list[tuple[int, int]], int]:
        """Runs ``[start, stop)`` of offsets in ``[committed, next)`` whose effect is complete in the
        emitted output, and ``next`` (one past the highest offset seen). A restart from
        ``committed`` may skip them: emitted impressions, the clicks and conversions attached to
        them (held until the impression's offset is committable, but done), and records that were
        dropped or dead-lettered. Open impressions and the outcomes of open or missing impressions
        are not done. Only the first ``join_offsets.MAX_RUNS`` runs (what metadata can carry)."""
        from streams.join_offsets import MAX_RUNS, gaps

        h = self.held[kind]
        end = h.next_offset
        if end <= committed:
            return [], max(end, committed)
        needed = h._live
        if kind != IMPRESSION and self._waiting:
            waiting = {off for _, k, off in self._waiting if k == kind}
            needed = needed - waiting
        # the smallest needed offsets bound the first runs; more runs than fit are never used
        first = heapq.nsmallest(MAX_RUNS + 1, needed) if len(needed) > MAX_RUNS + 1 else needed
        runs = gaps(committed, end, first, MAX_RUNS)
        if len(first) < len(needed) and runs and runs[-1][1] == end:
            runs.pop()  # past the last offset considered, other needed offsets may lie in it
        return runs, end

    def committable(self) -> dict[str, int]:
        out = {}
        for kind, h in self.held.items():
            c = h.committable()
            if c is not None:
                out[kind] = c
        return out


@dataclass
class JoinOutput:
    examples: list[Example] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)

    def clear(self) -> None:
        self.examples.clear()
        self.dead.clear()
        self.stats.clear()


class JoinState:
    """Join state of every partition index this worker owns."""

    def __init__(self, window_s: float, lateness_s: float, track_inputs: bool = False,
                 max_pending: int | None = None, emit_at_click: bool = False) -> None:
        """``track_inputs``: the runtime reports which inputs are caught up (:meth:`set_idle`); until
        it does, every input counts as active, so the watermark waits for all of them.
        ``max_pending``: bound on open impressions + waiting outcomes over all partitions (None =
        unbounded); what would exceed it is dead-lettered as ``state_full``. ``emit_at_click``: emit
        each positive at its first click (``stage="click"``), see the module docstring."""
        self.track_inputs = track_inputs
        self.emit_at_click = emit_at_click
        self.max_pending = max_pending
        self.size = 0  # sum of the partitions' sizes
        self.told_done: dict[tuple[str, int], DoneRuns] = {}  # done offsets to skip, per (kind, partition)
        if window_s <= 0 or lateness_s < 0:
            raise ValueError("window must be > 0 and lateness >= 0")
        self.window_s = window_s
        self.lateness_s = lateness_s
        self.partitions: dict[int, PartitionJoin] = {}
        self.out = JoinOutput()

    def part(self, partition: int) -> PartitionJoin:
        p = self.partitions.get(partition)
        if p is None:
            p = self.partitions[partition] = PartitionJoin(
                partition, self.window_s, self.lateness_s, self.track_inputs, self._full, self.emit_at_click
            )
        return p

    def _full(self) -> bool:
        return self.max_pending is not None and self.size >= self.max_pending

    def add(self, kind: str, partition: int, offset: int, event: Event) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        p = self.part(partition)
        before = p.size
        p.add(kind, offset, event, self.out)
        self.size += p.size - before

    def skip(self, kind: str, partition: int, offset: int) -> None:
        """Record that an offset was read but carries nothing to hold (e.g. a dead-lettered record)."""
        self.part(partition).held[kind].seen(offset)

    def is_done(self, kind: str, partition: int, offset: int) -> bool:
        """Whether an earlier owner finished this record (offset metadata, :meth:`set_done`)."""
        done = self.told_done.get((kind, partition))
        return done is not None and offset in done

    def skip_done(self, kind: str, partition: int, offset: int, event_time: float | None) -> None:
        self.part(partition).skip_done(kind, offset, event_time)

    def set_done(self, kind: str, partition: int, runs: list[tuple[int, int]]) -> None:
        """Offset runs an earlier owner committed as done (decoded offset metadata): skip them."""
        if runs:
            self.told_done[(kind, partition)] = DoneRuns(runs)
        else:
            self.told_done.pop((kind, partition), None)

    def done_runs(self, kind: str, partition: int, committed: int) -> list[tuple[int, int]]:
        """Done runs at or above ``committed``: this worker's (:meth:`PartitionJoin.done_runs`)
        plus those it was told about and has not read again yet."""
        p = self.partitions.get(partition)
        runs, end = p.done_runs(kind, committed) if p is not None else ([], committed)
        told = self.told_done.get((kind, partition))
        if told is not None:
            runs = runs + told.from_offset(max(end, committed))
        return runs

    def advance(self, partitions: Iterable[int] | None = None, flush_all: bool = False) -> None:
        for p in list(self.partitions.values()) if partitions is None else [self.part(i) for i in partitions]:
            before = p.size
            p.advance(self.out, flush_all=flush_all)
            self.size += p.size - before

    def set_idle(self, partition: int, idle_kinds: dict[str, float] | set[str]) -> None:
        """Tell the join which inputs of a partition are read to their end (see watermark).

        A dict maps each idle input to its *horizon*: the partition's newest event time when the
        input was last confirmed at its end. Records produced later may carry event times up to
        there, so the watermark never passes it (an input that pauses and resumes while another
        jumps ahead in event time keeps its records on time). A set means no horizon."""
        if not isinstance(idle_kinds, dict):
            idle_kinds = {k: math.inf for k in idle_kinds}
        self.part(partition).idle = dict(idle_kinds)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget partitions handed to another worker; it rebuilds them from committed offsets."""
        for i in partitions:
            p = self.partitions.pop(i, None)
            if p is not None:
                self.size -= p.size
            for k in KINDS:
                self.told_done.pop((k, i), None)

    def committable(self) -> dict[tuple[str, int], int]:
        return {(k, i): off for i, p in self.partitions.items() for k, off in p.committable().items()}

    @property
    def pending(self) -> int:
        return sum(len(p.pending) for p in self.partitions.values())

    def horizons(self) -> dict[int, float]:
        """Newest event time per partition (what an end-offset request sent now is measured against)."""
        return {i: p.max_event_time for i, p in self.partitions.items()}

    def watermarks(self) -> dict[int, float]:
        return {i: p.watermark for i, p in self.partitions.items()}


def join_offline(
    records: Iterable[tuple[str, int, int, Event]], window_s: float, lateness_s: float,
    emit_at_click: bool = False,
) -> tuple[list[Example], list[DeadLetter]]:
    """Run the join over a finite, ordered list of (kind, partition, offset, event) and flush at the
    end. Handy for tests and for recomputing the expected output of a replay."""
    st = JoinState(window_s, lateness_s, emit_at_click=emit_at_click)
    for kind, part, off, ev in records:
        st.add(kind, part, off, ev)
        st.part(part).advance(st.out)
    st.advance(flush_all=True)
    return st.out.examples, st.out.dead


def kind_of(event: Event) -> str:
    if isinstance(event, Impression):
        return IMPRESSION
    if isinstance(event, Click):
        return CLICK
    if isinstance(event, Conversion):
        return CONVERSION
    raise ValueError(f"not a joinable event: {type(event).__name__}")
