"""Id -> embedding-row mapping for churning ids (ads, queries, bidwords, users).

One :class:`IdMapper` per categorical field turns raw values of any type into row indices of that
field's embedding table. Row 0 is the shared *cold* row: every value that has no row of its own maps
there. Two modes:

- ``"dict"`` (default): exact assignment. A value gets its own row once it has been seen
  ``admission`` times (*admission*); rows unused for longer than ``ttl`` seconds of event time are
  evicted and recycled (*expiry*). When the table is full, new values stay on the cold row and are
  counted as ``overflow``.
- ``"hash"``: row = 1 + crc32(str(value)) mod (capacity - 1). No admission; collisions share a row;
  expiry resets rows unused for ``ttl`` (the row's next user starts from a fresh row).

The mapper never reads a clock: :meth:`IdMapper.observe` takes the event times of the batch.
It is pure numpy/pandas; the learner resets the embedding rows that :meth:`observe` reports as
fresh.

Vectorised: a batch is factorised once (pandas, C), its distinct values are looked up in a
:class:`models.ctr.keytable.KeyTable` (a dict driven by C-level ``map``) and admission, overflow, expiry and
the free-row stack are decided with numpy on whole arrays, in the order the per-value reference
(``models/ctr/idmap_reference.py``) decides them one value at a time, so both give the same rows,
fresh rows, counters and state (``tests/test_idmap.py``). Python touches single values only to
normalise the keys of newly admitted values and, in ``"hash"`` mode, to crc32 values never seen
before.

Example::

    m = IdMapper(capacity=1000, admission=2, ttl=3600.0)
    rows, fresh = m.observe(np.array(["ad1", "ad2", "ad1"], dtype=object), np.array([0.0, 1.0, 2.0]))
    # rows == [1, 0, 1], fresh == [1]: "ad1" was seen twice and admitted; "ad2" stays on the cold row
"""

from __future__ import annotations

import zlib
from itertools import repeat
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from models.ctr.keytable import ABSENT, KeyTable

COLD_ROW = 0
NEVER = -np.inf


@dataclass
class MapperStats:
    """Plain counters, exported as metrics by the trainer."""

    rows_used: int
    capacity: int
    fill: float
    admitted_total: int
    evicted_total: int
    overflow_total: int
    cold_lookups_total: int
    candidates: int


SMALL_LOOKUP = 2048  # the reference mapper looks batches up to this size up value by value


def _key(v: Any) -> Any:
    """Normalise a raw value into a hashable dictionary key (NaN/None -> one missing token)."""
    if v is None or (isinstance(v, float) and v != v):
        return "__missing__"
    if isinstance(v, np.generic):
        return v.item()
    return v


class IdMapper:
    """Maps raw values of one field to rows of its embedding table (see module docstring).

    Args:
        capacity: rows in the table, including the cold row 0.
        admission: sightings needed before a value gets its own row (1 = immediately).
        ttl: evict rows (and forget candidates) unused for longer than this many seconds of event
            time; ``None`` disables expiry.
        mode: ``"dict"`` or ``"hash"``.
    """

    def __init__(self, capacity: int, admission: int = 1, ttl: float | None = None, mode: str = "dict") -> None:
        if capacity < 2:
            raise ValueError("capacity must be >= 2 (row 0 is the cold row)")
        if admission < 1:
            raise ValueError("admission must be >= 1")
        if mode not in ("dict", "hash"):
            raise ValueError(f"unknown mapper mode {mode!r}")
        self.capacity = int(capacity)
        self.admission = int(admission)
        self.ttl = None if ttl is None else float(ttl)
        self.mode = mode
        self._reset_tables()
        self._free = np.arange(self.capacity - 1, 0, -1, dtype=np.int64)  # a stack: the end is popped first
        self.last_seen = np.full(self.capacity, NEVER, dtype=np.float64)
        self.counts = np.zeros(self.capacity, dtype=np.int64)  # sightings since the row was assigned
        self._last_sweep = NEVER
        self.admitted_total = 0
        self.evicted_total = 0
        self.overflow_total = 0
        self.cold_lookups_total = 0

    def _reset_tables(self) -> None:
        self._table = KeyTable()  # dict mode: key -> row; hash mode: key -> its hash row (a cache)
        self._row_key = np.empty(self.capacity, dtype=object)  # dict mode: the owner of each row
        self._row_seq = np.full(self.capacity, -1, dtype=np.int64)  # dict mode: assignment order, -1 = free
        self._seq = 0
        self._cand = KeyTable()  # dict mode: candidate -> slot in the arrays below
        self._cand_count = np.zeros(0, dtype=np.float64)
        self._cand_last = np.zeros(0, dtype=np.float64)
        self._cand_keys = np.empty(0, dtype=object)
        self._cand_n = 0

    # ------------------------------------------------------------------ lookups
    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Rows for ``values`` without changing any state (prediction path)."""
        n = len(values)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if self.mode == "dict":  # no factorising: one C-level pass over the values
            values = np.asarray(values, dtype=object)
            na = pd.isna(values)
            if na.any():
                values = values.copy()
                values[na] = "__missing__"
            rows = self._table.get(values)
            rows[rows == ABSENT] = COLD_ROW
            return rows
        codes, uniques = _factorize(values)
        return self._hash_rows(uniques, cache=False)[codes]

    def observe(self, values: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training path: count sightings, admit, expire. Returns ``(rows, fresh_rows)``.

        ``fresh_rows`` are rows that got a new owner in this call (admitted values, rows whose
        previous owner was evicted, hash rows used for the first time or after expiry): the caller
        must reset their parameters (embedding, optimizer state, prior) before using ``rows``.
        """
        times = np.asarray(times, dtype=np.float64)
        recycled: list[np.ndarray] = []
        t_max = float(times.max()) if len(times) else NEVER
        if self.ttl is not None and t_max - self._last_sweep >= self.ttl / 4:
            recycled.append(self._sweep(t_max))
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64), _unique(recycled)
        codes, uniques = _factorize(values)
        n_u = len(uniques)
        u_cnt = np.bincount(codes, minlength=n_u)
        u_time = np.full(n_u, NEVER)
        np.maximum.at(u_time, codes, times)
        if self.mode == "hash":
            urows = self._assign_hash(uniques, u_time, recycled)
        else:
            urows = self._assign_dict(uniques, u_cnt, u_time, recycled)
        np.add.at(self.counts, urows, u_cnt)
        np.maximum.at(self.last_seen, urows, u_time)
        rows = urows[codes]
        self.cold_lookups_total += int((rows == COLD_ROW).sum())
        return rows, _unique(recycled)

    # ------------------------------------------------------------------ internals
    def _hash_rows(self, uniques: np.ndarray, cache: bool = True) -> np.ndarray:
        rows = self._table.get(uniques)
        miss = rows == ABSENT
        if miss.any():
            m = self.capacity - 1
            new = np.fromiter((1 + zlib.crc32(str(_key(u)).encode()) % m for u in uniques[miss]),
                              dtype=np.int64, count=int(miss.sum()))
            rows[miss] = new
            if cache:
                self._table.set(uniques[miss], new)
        return rows

    def _assign_hash(self, uniques: np.ndarray, u_time: np.ndarray, recycled: list[np.ndarray]) -> np.ndarray:
        urows = self._hash_rows(uniques)
        # per distinct row, in the reference's order: never used -> fresh; unused longer than the
        # TTL by the newest sighting in this batch -> reset once, fresh
        rows, inv = np.unique(urows, return_inverse=True)
        t_row = np.full(len(rows), NEVER)
        np.maximum.at(t_row, inv, u_time)
        ls = self.last_seen[rows]
        never = ls == NEVER
        expired = ~never & (t_row - ls > self.ttl) if self.ttl is not None else np.zeros(len(rows), bool)
        if expired.any():
            self._reset_rows(rows[expired])
        recycled.append(rows[never | expired])
        return urows

    def _assign_dict(self, uniques: np.ndarray, u_cnt: np.ndarray, u_time: np.ndarray,
                     recycled: list[np.ndarray]) -> np.ndarray:
        urows = self._table.get(uniques)
        new = np.nonzero(urows == ABSENT)[0]  # not owned, in order of first sighting
        if not len(new):
            return urows
        keys = uniques[new]
        slot = self._cand.get(keys)
        had = slot != ABSENT
        prior = np.zeros(len(new), dtype=np.float64)
        prior[had] = self._cand_count[slot[had]]
        seen = u_cnt[new] + prior
        admit = seen >= self.admission
        # admitted in order while free rows last; the rest overflow (and stay as they were)
        ia = np.nonzero(admit)[0]
        k = min(len(ia), len(self._free))
        self.overflow_total += len(ia) - k
        got, ia = ia[:k], ia
        if k:
            rows = self._free[::-1][:k].copy()  # pop() order
            self._free = self._free[: len(self._free) - k]
            akeys = np.array([_key(x) for x in keys[got]] if _needs_key(keys[got]) else keys[got], dtype=object)
            self._table.set(akeys, rows)
            self._row_key[rows] = akeys
            self._row_seq[rows] = np.arange(self._seq, self._seq + k)
            self._seq += k
            self.admitted_total += k
            urows[new[got]] = rows
            gone = had[got]
            if gone.any():
                self._cand.delete(keys[got][gone])
            recycled.append(rows)
        # not admitted: counted as candidates (overflowed values are not counted, as in the reference)
        wait = np.nonzero(~admit)[0]
        if len(wait):
            old = wait[had[wait]]
            if len(old):
                s = slot[old]
                self._cand_count[s] += u_cnt[new[old]]
                self._cand_last[s] = np.maximum(self._cand_last[s], u_time[new[old]])
            fresh = wait[~had[wait]]
            if len(fresh):
                self._add_candidates(keys[fresh], u_cnt[new[fresh]].astype(np.float64), u_time[new[fresh]])
        urows[urows == ABSENT] = COLD_ROW
        return urows

    def _add_candidates(self, keys: np.ndarray, counts: np.ndarray, last: np.ndarray) -> None:
        n = len(keys)
        if self._cand_n + n > len(self._cand_count):
            self._compact_candidates(self._cand_n + n)
        lo, hi = self._cand_n, self._cand_n + n
        self._cand_count[lo:hi] = counts
        self._cand_last[lo:hi] = last
        self._cand_keys[lo:hi] = keys
        self._cand.set(keys, np.arange(lo, hi))
        self._cand_n = hi

    def _compact_candidates(self, need: int) -> None:
        """Drop the slots of removed candidates, and grow the arrays."""
        keys, slots = self._cand.items_arrays()
        order = np.argsort(slots, kind="stable")  # keep insertion order
        keys, slots = keys[order], slots[order]
        live = len(keys)
        size = max(16, 2 * (live + need - self._cand_n))
        cnt = np.zeros(size); last = np.zeros(size)  # noqa: E702
        ks = np.empty(size, dtype=object)
        cnt[:live] = self._cand_count[slots]
        last[:live] = self._cand_last[slots]
        ks[:live] = keys
        self._cand_count, self._cand_last, self._cand_keys = cnt, last, ks
        self._cand = KeyTable()
        self._cand.set(keys, np.arange(live))
        self._cand_n = live

    def _reset_rows(self, rows: np.ndarray) -> None:
        self.last_seen[rows] = NEVER
        self.counts[rows] = 0
        self.evicted_total += len(rows)

    def _sweep(self, now: float) -> np.ndarray:
        """Evicts rows (and drops candidates) unused for longer than the TTL; returns the rows."""
        self._last_sweep = now
        assert self.ttl is not None
        cutoff = now - self.ttl
        if self.mode == "hash":
            stale = np.nonzero((self.last_seen > NEVER) & (self.last_seen < cutoff))[0]
            stale = stale[stale != COLD_ROW]
            self._reset_rows(stale)
            return stale
        owned = np.nonzero(self._row_seq >= 0)[0]
        stale = owned[self.last_seen[owned] < cutoff]
        stale = stale[np.argsort(self._row_seq[stale], kind="stable")]  # the reference's dict order
        if len(stale):
            self._table.delete(self._row_key[stale])
            self._row_key[stale] = None
            self._row_seq[stale] = -1
            self._reset_rows(stale)
            self._free = np.concatenate([self._free, stale])
        keys, slots = self._cand.items_arrays()
        old = self._cand_last[slots] < cutoff
        if old.any():
            self._cand.delete(keys[old])
        return stale

    # ------------------------------------------------------------------ state
    def _rows_items(self) -> list[tuple[Any, int]]:
        """(key, row) in the reference's dict order (assignment order)."""
        owned = np.nonzero(self._row_seq >= 0)[0]
        owned = owned[np.argsort(self._row_seq[owned], kind="stable")]
        return list(zip(self._row_key[owned].tolist(), owned.tolist()))

    def _cand_items(self) -> list[tuple[Any, float, float]]:
        keys, slots = self._cand.items_arrays()
        order = np.argsort(slots, kind="stable")
        slots = slots[order]
        return list(zip(keys[order].tolist(), self._cand_count[slots].tolist(), self._cand_last[slots].tolist()))

    def stats(self) -> MapperStats:
        used = len(self._table) if self.mode == "dict" else int((self.last_seen[1:] > NEVER).sum())
        return MapperStats(
            rows_used=used,
            capacity=self.capacity,
            fill=used / (self.capacity - 1),
            admitted_total=self.admitted_total,
            evicted_total=self.evicted_total,
            overflow_total=self.overflow_total,
            cold_lookups_total=self.cold_lookups_total,
            candidates=len(self._cand),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {"capacity": self.capacity, "admission": self.admission, "ttl": self.ttl, "mode": self.mode},
            "rows": self._rows_items() if self.mode == "dict" else [],
            "cand": [(k, c, t) for k, c, t in self._cand_items()] if self.mode == "dict" else [],
            "free": self._free.tolist() if self.mode == "dict" else list(range(self.capacity - 1, 0, -1)),
            "last_seen": self.last_seen.copy(),
            "counts": self.counts.copy(),
            "last_sweep": self._last_sweep,
            "totals": [self.admitted_total, self.evicted_total, self.overflow_total, self.cold_lookups_total],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = state["config"]
        if cfg["capacity"] != self.capacity or cfg["mode"] != self.mode:
            raise ValueError(f"mapper state for capacity/mode {cfg} does not fit {self.capacity}/{self.mode}")
        self.admission, self.ttl = int(cfg["admission"]), cfg["ttl"]
        self._reset_tables()
        rows = list(state["rows"])
        if rows:
            keys = np.empty(len(rows), dtype=object)
            keys[:] = [k for k, _ in rows]
            rr = np.array([int(r) for _, r in rows], dtype=np.int64)
            self._table.set(keys, rr)
            self._row_key[rr] = keys
            self._row_seq[rr] = np.arange(len(rr))
            self._seq = len(rr)
        cand = list(state["cand"])
        if cand:
            keys = np.empty(len(cand), dtype=object)
            keys[:] = [k for k, _, _ in cand]
            self._add_candidates(keys, np.array([float(c) for _, c, _ in cand]), np.array([float(t) for _, _, t in cand]))
        self._free = np.array([int(r) for r in state["free"]], dtype=np.int64)
        self.last_seen = np.asarray(state["last_seen"], dtype=np.float64).copy()
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()
        self._last_sweep = float(state["last_sweep"])
        (self.admitted_total, self.evicted_total, self.overflow_total, self.cold_lookups_total) = (
            int(x) for x in state["totals"]
        )

    def validate(self) -> list[str]:
        """Consistency problems (empty list when healthy)."""
        problems = []
        if self.mode == "dict":
            if len(self._table) + len(self._free) != self.capacity - 1:
                problems.append("rows + free rows != capacity - 1")
            if self._row_seq[COLD_ROW] >= 0:
                problems.append("a value owns the cold row")
        if self.last_seen.shape != (self.capacity,) or self.counts.shape != (self.capacity,):
            problems.append("per-row arrays have the wrong shape")
        return problems


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and distinct values (first-sighting order) with the reference's key normalisation:
    None and NaN are one missing value, ``"__missing__"``."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=False)
    uniques = np.asarray(uniques, dtype=object)
    na = pd.isna(uniques)
    if na.any():
        uniques = uniques.copy()
        uniques[na] = "__missing__"
        # a literal "__missing__" and a missing value are one key, as in the reference
        if (uniques == "__missing__").sum() > 1:
            first = np.nonzero(uniques == "__missing__")[0]
            remap = np.arange(len(uniques))
            remap[first[1:]] = first[0]
            keep = np.ones(len(uniques), bool)
            keep[first[1:]] = False
            newpos = np.cumsum(keep) - 1
            codes = newpos[remap[codes]]
            uniques = uniques[keep]
    return np.asarray(codes, dtype=np.int64), uniques


def _needs_key(keys: np.ndarray) -> bool:
    """Whether any key needs :func:`_key` (numpy scalars become Python values in the state)."""
    return any(map(isinstance, keys, repeat(np.generic)))


def _unique(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
