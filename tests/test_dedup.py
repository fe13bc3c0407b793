"""De-duplication over the joiner's re-emission horizon by event time (issue 8 item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from streams.dedup import EventTimeDedup


def joiner_restart_stream(rate: float, seconds: float, reemit_s: float, seed: int = 0):
    """Keys at ``rate`` examples per second of event time; at the end a joiner restart re-emits every
    example of the last ``reemit_s`` seconds (same key, same event time), slightly shuffled."""
    n = int(rate * seconds)
    times = np.arange(n) / rate
    keys = [f"r{i}:a{i % 7}" for i in range(n)]
    first = list(zip(keys, times.tolist()))
    tail = [(k, t) for k, t in first if t >= times[-1] - reemit_s]
    rng = np.random.default_rng(seed)
    rng.shuffle(tail)
    return first, tail


@pytest.mark.parametrize("rate", [1000.0])
def test_a_joiner_restart_at_a_high_rate_trains_nothing_twice(rate):
    """660 s of re-emission at 1000 examples/s: 655k re-emitted keys, far above the old 200k-key horizon
    (which only covered the re-emission window below ~300 examples/s)."""
    horizon = 600.0 + 60.0
    first, tail = joiner_restart_stream(rate, seconds=horizon + 60.0, reemit_s=horizon - 5.0)
    d = EventTimeDedup(horizon + 120.0, max_keys=4_000_000)
    assert not any(d.seen_or_add(k, t) for k, t in first)
    dups = sum(d.seen_or_add(k, t) for k, t in tail)
    assert dups == len(tail) > 200_000
    assert d.evicted_early == 0


def test_memory_is_bounded_by_the_horizon_and_by_max_keys():
    d = EventTimeDedup(100.0, max_keys=0)
    for i in range(60_000):  # 600 s at 100/s: only the last ~100 s (+ one bucket) are kept
        d.seen_or_add(f"k{i}", i / 100.0)
    assert 10_000 <= len(d) <= 10_000 + 100 * 100 / 16 + 1
    assert "k59999" in d and "k0" not in d
    assert not d.seen_or_add("k0", 0.0)  # older than the horizon: not remembered, not a duplicate
    capped = EventTimeDedup(1000.0, max_keys=5_000)
    for i in range(20_000):
        capped.seen_or_add(f"k{i}", i / 100.0)
    assert len(capped) <= 5_000 and capped.evicted_early >= 15_000
    assert "k19999" in capped and capped.covered_s() < 1000.0


def test_state_round_trip_keeps_every_key():
    d = EventTimeDedup(50.0)
    for i in range(3_000):
        d.seen_or_add(f"k{i}", 1000.0 + i / 10.0)
    back = EventTimeDedup.from_state(d.state(), 50.0, 10_000)
    assert len(back) == len(d) and back.newest == d.newest
    assert back.seen_or_add("k2999", 1299.9) and not back.seen_or_add("k0", 1000.0)
    wider = EventTimeDedup.from_state(d.state(), 200.0, 10_000)  # another horizon: keys re-bucketed
    assert len(wider) == len(d) and "k2500" in wider
    wider.seen_or_add("new", 1400.0)
    assert "k2999" in wider and "k2500" in wider  # within 200 s of 1400
