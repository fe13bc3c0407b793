"""The vectorised id mapper (models/ctr/hashing.py) equals the per-value reference
(models/ctr/idmap_reference.py) on random streams with admission, expiry, overflow and recycling:
same rows, same fresh rows, same counters, same state after every batch, same lookups."""

from __future__ import annotations

import numpy as np
import pytest

from models.ctr.hashing import IdMapper
from models.ctr.idmap_reference import ReferenceIdMapper


def _stream(rng: np.random.Generator, n_batches: int, vocab: int, mixed: bool):
    t = 0.0
    for _ in range(n_batches):
        b = int(rng.integers(1, 300))
        ids = (rng.random(b) ** 2 * vocab).astype(int)  # skewed: a few hot values, a long tail
        vals = np.empty(b, dtype=object)
        vals[:] = [f"v{i}" for i in ids]
        if mixed:
            pick = rng.random(b)
            vals[pick < 0.05] = None
            vals[(pick >= 0.05) & (pick < 0.08)] = float("nan")
            ints = (pick >= 0.08) & (pick < 0.2)
            vals[ints] = [int(i) for i in ids[ints]]
        t += float(rng.exponential(30.0))
        times = t + rng.random(b) * 5.0 - 2.5  # slightly out of order within a batch
        yield vals, times


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in ("config", "rows", "cand", "free", "last_sweep", "totals"):
        assert sa[k] == sb[k], k
    np.testing.assert_array_equal(sa["last_seen"], sb["last_seen"])
    np.testing.assert_array_equal(sa["counts"], sb["counts"])
    assert a.stats() == b.stats()


@pytest.mark.parametrize("mode", ["dict", "hash"])
@pytest.mark.parametrize("capacity,admission,ttl,mixed", [
    (64, 1, None, False),       # small table: overflow
    (200, 3, 300.0, True),      # admission + expiry + recycling, missing and int values
    (5000, 2, 120.0, False),    # short TTL: much eviction
    (30, 5, 1000.0, True),      # tiny table, strict admission
])
def test_vectorised_mapper_equals_reference(mode, capacity, admission, ttl, mixed):
    rng = np.random.default_rng(capacity + admission)
    fast, ref = IdMapper(capacity, admission, ttl, mode), ReferenceIdMapper(capacity, admission, ttl, mode)
    probe = np.empty(50, dtype=object)
    probe[:] = [f"v{i}" for i in range(50)]
    probe[::7] = None
    for i, (vals, times) in enumerate(_stream(rng, 80, 400, mixed)):
        r1, f1 = fast.observe(vals, times)
        r2, f2 = ref.observe(vals, times)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(fast.lookup(vals), ref.lookup(vals))
        np.testing.assert_array_equal(fast.lookup(probe), ref.lookup(probe))
        if i % 10 == 0:
            _same_state(fast, ref)
    _same_state(fast, ref)
    assert fast.validate() == []
    s = fast.stats()
    if mode == "dict":
        assert s.admitted_total > 0 and (ttl is None or s.evicted_total > 0 or capacity < 100)


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    a, ref = IdMapper(300, 2, 200.0), ReferenceIdMapper(300, 2, 200.0)
    batches = list(_stream(rng, 80, 600, True))
    for vals, times in batches[:40]:
        a.observe(vals, times)
        ref.observe(vals, times)
    b = IdMapper(300, 2, 200.0)
    b.load_state_dict(a.state_dict())
    ref2 = ReferenceIdMapper(300, 2, 200.0)
    ref2.load_state_dict(ref.state_dict())  # the reference reads the vectorised mapper's state too
    for vals, times in batches[40:]:
        rb, fb = b.observe(vals, times)
        rr, fr = ref2.observe(vals, times)
        np.testing.assert_array_equal(rb, rr)
        np.testing.assert_array_equal(fb, fr)
    _same_state(b, ref2)


def test_empty_and_numpy_scalar_values():
    m, ref = IdMapper(10), ReferenceIdMapper(10)
    assert len(m.observe(np.empty(0, dtype=object), np.empty(0))[0]) == 0
    vals = np.array([np.int64(5), np.int64(5), 7], dtype=object)
    np.testing.assert_array_equal(m.observe(vals, np.zeros(3))[0], ref.observe(vals, np.zeros(3))[0])
    assert m.state_dict()["rows"] == ref.state_dict()["rows"]
    assert all(type(k) is int for k, _ in m.state_dict()["rows"])  # plain values in the state
