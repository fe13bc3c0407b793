"""De-duplication by key over an event-time horizon, with bounded memory, for stream workers.

A joiner restart re-emits every example since its oldest open impression: event times back to about
``attribution_window + allowed_lateness`` (660 s by default) behind the newest one. Remembering a
fixed *number* of keys covers that horizon only below ``keys / horizon`` examples per second (the
old 200k keys: ~300 examples/s), so :class:`EventTimeDedup` remembers every key whose event time is
within ``horizon_s`` of the newest event time seen, whatever the rate.

- Keys are stored as 64-bit BLAKE2b digests (8 bytes of key material instead of the string; a false
  duplicate needs a 64-bit collision: with 10M keys remembered, odds about 3e-6 per run).
- Keys live in event-time buckets of ``horizon_s / 16``; a bucket is forgotten as a whole once it is
  entirely older than the horizon.
- ``max_keys`` bounds memory (about 100 bytes per key in CPython): when it is exceeded, the oldest
  buckets are forgotten early, counted in ``evicted_early`` (a metric and a warning), so an operator
  sees that the horizon no longer covers the re-emission window.
- :meth:`state` / :meth:`from_state` are two numpy arrays, for the worker's checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BUCKETS_PER_HORIZON = 16


def key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class EventTimeDedup:
    """See the module docstring. ``seen_or_add(key, event_time)`` is the one call a worker makes."""

    def __init__(self, horizon_s: float, max_keys: int = 2_000_000) -> None:
        if not horizon_s > 0:
            raise ValueError("horizon_s must be > 0")
        self.horizon_s = float(horizon_s)
        self.max_keys = int(max_keys)
        self.bucket_s = self.horizon_s / BUCKETS_PER_HORIZON
        self._where: dict[int, int] = {}  # digest -> bucket
        self._buckets: dict[int, list[int]] = {}  # bucket -> digests (insertion order)
        self.newest = -math.inf
        self.evicted_early = 0  # keys forgotten before their time because of max_keys
        self._warned = False
        self._expired_below = -math.inf  # buckets below this index are gone

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key_digest(key) in self._where

    def seen_or_add(self, key: str, event_time: float) -> bool:
        """True when ``key`` is a duplicate (then nothing changes); otherwise remembers it."""
        d = key_digest(key)
        if d in self._where:
            return True
        t = float(event_time) if math.isfinite(event_time) else self.newest
        b = int(math.floor(t / self.bucket_s)) if math.isfinite(t) else 0
        self._where[d] = b
        self._buckets.setdefault(b, []).append(d)
        if t > self.newest:
            self.newest = t
            self._expire()
        elif b < self._expired_below:  # already older than the horizon: forgotten at once
            self._drop_bucket(b)
        if self.max_keys > 0 and len(self._where) > self.max_keys:
            self._evict_early()
        return False

    def _drop_bucket(self, b: int) -> int:
        n = 0
        for d in self._buckets.pop(b, ()):
            if self._where.get(d) == b:
                del self._where[d]
                n += 1
        return n

    def _expire(self) -> None:
        # a bucket [b*w, (b+1)*w) is forgotten once all of it is older than the horizon
        below = math.floor((self.newest - self.horizon_s) / self.bucket_s)
        if below <= self._expired_below:
            return
        self._expired_below = below
        for b in [b for b in self._buckets if b < below]:
            self._drop_bucket(b)

    def _evict_early(self) -> None:
        while len(self._where) > self.max_keys and self._buckets:
            oldest = min(self._buckets)
            if len(self._buckets) == 1:  # one bucket holds everything: drop its oldest keys
                keys = self._buckets[oldest]
                extra = len(self._where) - self.max_keys
                for d in keys[:extra]:
                    self._where.pop(d, None)
                del keys[:extra]
                self.evicted_early += extra
                break
            self.evicted_early += self._drop_bucket(oldest)
        if not self._warned:
            self._warned = True
            log.warning("de-duplication: more than %d keys within the %.0fs event-time horizon; the oldest are "
                        "forgotten early (raise dedup_max_keys): a re-emitted example older than %.0fs may train "
                        "twice", self.max_keys, self.horizon_s, self.covered_s())

    def covered_s(self) -> float:
        """Seconds of event time the remembered keys cover now (``horizon_s`` unless evicted early)."""
        if not self._buckets or not math.isfinite(self.newest):
            return 0.0
        return min(self.horizon_s, self.newest - min(self._buckets) * self.bucket_s)

    # ---- checkpoint --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        n = len(self._where)
        return {"horizon_s": self.horizon_s, "newest": self.newest, "evicted_early": self.evicted_early,
                "digests": np.fromiter(self._where.keys(), dtype=np.uint64, count=n),
                "buckets": np.fromiter(self._where.values(), dtype=np.int64, count=n)}

    @classmethod
    def from_state(cls, state: dict[str, Any], horizon_s: float, max_keys: int) -> "EventTimeDedup":
        """Restores keys from a checkpoint (the horizon and cap are today's settings)."""
        out = cls(horizon_s, max_keys)
        digests = np.asarray(state["digests"], dtype=np.uint64)
        buckets = np.asarray(state["buckets"], dtype=np.int64)
        if digests.shape != buckets.shape:
            raise ValueError("de-duplication state: digests and buckets differ in length")
        old_w = float(state["horizon_s"]) / BUCKETS_PER_HORIZON
        if old_w != out.bucket_s:  # another horizon: re-bucket by each bucket's start time
            buckets = np.floor(buckets * old_w / out.bucket_s).astype(np.int64)
        order = np.argsort(buckets, kind="stable")
        for d, b in zip(digests[order].tolist(), buckets[order].tolist()):
            out._where[d] = b
            out._buckets.setdefault(b, []).append(d)
        out.newest = float(state["newest"])
        out.evicted_early = int(state.get("evicted_early", 0))
        if math.isfinite(out.newest):
            out._expire()
        return out
