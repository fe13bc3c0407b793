"""The per-value reference of :class:`models.ctr.hashing.IdMapper` (kept for tests and benchmarks).

This is the id mapper as it was before its hot path was vectorised: the same admission, expiry
and recycling rules, decided one value at a time in Python. ``tests/test_idmap.py`` checks that
the vectorised mapper gives the same rows, fresh rows, counters and state on random streams with
admission and expiry; ``bench/bench_idmap.py`` measures both.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd

from models.ctr.hashing import COLD_ROW, NEVER, SMALL_LOOKUP, MapperStats, _key


class ReferenceIdMapper:
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
        self._rows: dict[Any, int] = {}
        self._row_key: dict[int, Any] = {}
        self._cand: dict[Any, list[float]] = {}  # key -> [count, last_seen]
        self._free: list[int] = list(range(self.capacity - 1, 0, -1))  # pop() gives 1, 2, ...
        self.last_seen = np.full(self.capacity, NEVER, dtype=np.float64)
        self.counts = np.zeros(self.capacity, dtype=np.int64)  # sightings since the row was assigned
        self._last_sweep = NEVER
        self.admitted_total = 0
        self.evicted_total = 0
        self.overflow_total = 0
        self.cold_lookups_total = 0

    # ------------------------------------------------------------------ lookups
    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Rows for ``values`` without changing any state (prediction path)."""
        if len(values) <= SMALL_LOOKUP and self.mode == "dict":
            # a request's candidates: plain dict lookups beat building a pandas index
            get, rows = self._rows.get, np.empty(len(values), dtype=np.int64)
            for i, v in enumerate(values):
                if type(v) is not str:  # noqa: E721 - strings (the common case) are keys as they are
                    v = _key(v)
                rows[i] = get(v, COLD_ROW)
            return rows
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=False)
        if self.mode == "hash":
            urows = np.array([self._hash_row(_key(u)) for u in uniques], dtype=np.int64)
        else:
            urows = np.array([self._rows.get(_key(u), COLD_ROW) for u in uniques], dtype=np.int64)
        return urows[codes] if len(uniques) else np.zeros(len(values), dtype=np.int64)

    def observe(self, values: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training path: count sightings, admit, expire. Returns ``(rows, fresh_rows)``.

        ``fresh_rows`` are rows that got a new owner in this call (admitted values, rows whose
        previous owner was evicted, hash rows used for the first time or after expiry): the caller
        must reset their parameters (embedding, optimizer state, prior) before using ``rows``.
        """
        times = np.asarray(times, dtype=np.float64)
        recycled: list[int] = []
        t_max = float(times.max()) if len(times) else NEVER
        if self.ttl is not None and t_max - self._last_sweep >= self.ttl / 4:
            recycled.extend(self._sweep(t_max))
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=False)
        n_u = len(uniques)
        if n_u == 0:
            return np.zeros(0, dtype=np.int64), np.array(recycled, dtype=np.int64)
        u_cnt = np.bincount(codes, minlength=n_u)
        u_time = np.full(n_u, NEVER)
        np.maximum.at(u_time, codes, times)
        urows = np.empty(n_u, dtype=np.int64)
        for i, u in enumerate(uniques):
            urows[i] = self._assign(_key(u), int(u_cnt[i]), float(u_time[i]), recycled)
        np.add.at(self.counts, urows, u_cnt)
        np.maximum.at(self.last_seen, urows, u_time)
        rows = urows[codes]
        self.cold_lookups_total += int((rows == COLD_ROW).sum())
        return rows, np.unique(np.array(recycled, dtype=np.int64))

    # ------------------------------------------------------------------ internals
    def _hash_row(self, key: Any) -> int:
        return 1 + zlib.crc32(str(key).encode()) % (self.capacity - 1)

    def _assign(self, key: Any, n: int, t: float, recycled: list[int]) -> int:
        if self.mode == "hash":
            row = self._hash_row(key)
            if self.last_seen[row] == NEVER:
                recycled.append(row)
            elif self.ttl is not None and t - self.last_seen[row] > self.ttl:
                self._reset_row(row)
                recycled.append(row)
            return row
        owned = self._rows.get(key)
        if owned is not None:
            return owned
        cand = self._cand.get(key)
        seen = n + (int(cand[0]) if cand else 0)
        if seen < self.admission:
            if cand:
                cand[0] += n
                cand[1] = max(cand[1], t)
            else:
                self._cand[key] = [float(n), t]
            return COLD_ROW
        if not self._free:
            self.overflow_total += 1
            return COLD_ROW
        self._cand.pop(key, None)
        row = self._free.pop()
        self._rows[key] = row
        self._row_key[row] = key
        self.admitted_total += 1
        recycled.append(row)
        return row

    def _reset_row(self, row: int) -> None:
        self.last_seen[row] = NEVER
        self.counts[row] = 0
        self.evicted_total += 1

    def _sweep(self, now: float) -> list[int]:
        """Evicts rows (and drops candidates) unused for longer than the TTL."""
        self._last_sweep = now
        assert self.ttl is not None
        cutoff = now - self.ttl
        if self.mode == "hash":
            stale = np.nonzero((self.last_seen > NEVER) & (self.last_seen < cutoff))[0]
            stale = stale[stale != COLD_ROW]
            for r in stale:
                self._reset_row(int(r))
            return [int(r) for r in stale]
        stale_rows = [r for r in self._row_key if self.last_seen[r] < cutoff]
        for r in stale_rows:
            key = self._row_key.pop(r)
            del self._rows[key]
            self._reset_row(r)
            self._free.append(r)
        for key in [k for k, (_, ts) in self._cand.items() if ts < cutoff]:
            del self._cand[key]
        return stale_rows

    # ------------------------------------------------------------------ state
    def stats(self) -> MapperStats:
        used = len(self._rows) if self.mode == "dict" else int((self.last_seen[1:] > NEVER).sum())
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
            "rows": list(self._rows.items()),
            "cand": [(k, c, t) for k, (c, t) in self._cand.items()],
            "free": list(self._free),
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
        self._rows = {k: int(r) for k, r in state["rows"]}
        self._row_key = {r: k for k, r in self._rows.items()}
        self._cand = {k: [float(c), float(t)] for k, c, t in state["cand"]}
        self._free = [int(r) for r in state["free"]]
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
            if len(self._rows) + len(self._free) != self.capacity - 1:
                problems.append("rows + free rows != capacity - 1")
            if any(r == COLD_ROW for r in self._rows.values()):
                problems.append("a value owns the cold row")
        if self.last_seen.shape != (self.capacity,) or self.counts.shape != (self.capacity,):
            problems.append("per-row arrays have the wrong shape")
        return problems
