"""The label-rate guard (streams/label_guard.py) on its own: what it holds as suspect, what it lets
through, and that its baseline survives a checkpoint."""

from __future__ import annotations

import random

import pytest

from streams.label_guard import LabelRateGuard


def window(n: int, rate: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"clicked": int(rng.random() < rate)} for _ in range(n)]


def test_nothing_is_judged_before_the_warmup():
    g = LabelRateGuard(warmup=3)
    assert g.judge(window(200, 1.0, 0)) is None  # no baseline yet: even all clicks pass
    assert g.baseline() is None


def test_a_click_burst_is_held_and_stays_out_of_the_baseline():
    g = LabelRateGuard()
    for s in range(4):
        assert g.judge(window(300, 0.05, s)) is None
    base = g.baseline()
    assert 0.03 < base < 0.07
    why = g.judge(window(300, 0.45, 9))  # part of the window is poison: 45 % clicked
    assert why is not None and why.startswith("positive rate 0.4"), why
    assert g.baseline() == base  # the held window did not move the baseline
    assert g.judge(window(300, 1.0, 10)) is not None
    assert g.judge(window(300, 0.05, 11)) is None


@pytest.mark.parametrize("records", [window(300, 0.10, 7), window(300, 0.15, 7),
                                     [{"clicked": 1}] * 3 + [{"clicked": 0}] * 7],
                         ids=["2x", "3x", "6x-in-10-records"])
def test_real_drift_and_small_window_noise_pass(records):
    """2-3x more clicks in a big window, or 6x in a window of 10 (under 4 standard errors), are not held."""
    g = LabelRateGuard()
    for s in range(5):
        g.judge(window(300, 0.05, s))
    assert g.judge(records) is None


def test_a_rise_that_lasts_becomes_the_new_rate():
    """Two windows far above the baseline are held; the third in a row is the new click rate (and
    the baseline); a clean window in between starts the count again."""
    g = LabelRateGuard(accept_after=3)
    for s in range(4):
        g.judge(window(300, 0.05, s))
    assert g.judge(window(300, 0.5, 10)) is not None
    assert g.judge(window(300, 0.05, 11)) is None  # not in a row
    assert g.judge(window(300, 0.5, 12)) is not None
    assert g.judge(window(300, 0.5, 13)) is not None
    assert g.judge(window(300, 0.5, 14)) is None
    assert 0.4 < g.baseline() < 0.6
    assert g.judge(window(300, 0.5, 15)) is None


def test_a_fall_in_the_click_rate_is_not_held():
    g = LabelRateGuard()
    for s in range(5):
        g.judge(window(300, 0.2, s))
    assert g.judge(window(300, 0.0, 9)) is None


def rate_window(n: int, positives: int) -> list[dict]:
    return [{"clicked": 1}] * positives + [{"clicked": 0}] * (n - positives)


def test_the_baseline_pools_windows_that_positives_at_the_click_skew():
    """The windows of a short drill with positives at the click, in order (clicks arrive at once,
    negatives when the attribution window closes): one window click-rich, the next click-free. A
    median of the windows' rates (0.14) let the first half of the burst (0.48, 3.4x) through; the
    pooled rate (0.067) holds both halves and nothing else."""
    g = LabelRateGuard()
    for positives in (21, 23, 0, 16, 0, 0):  # 0.14, 0.153, 0, 0.107, 0, 0
        assert g.judge(rate_window(150, positives)) is None
    assert abs(g.baseline() - 60 / 900) < 1e-9
    assert g.judge(rate_window(150, 72)) is not None  # 0.48: the burst's first half
    assert g.judge(rate_window(150, 110)) is not None  # 0.733: its second half
    assert g.judge(rate_window(150, 14)) is None  # 0.093: clean again
    assert abs(g.baseline() - 74 / 1050) < 1e-9  # the held windows stayed out of the pool


def test_a_tiny_baseline_still_holds_a_burst():
    g = LabelRateGuard()
    for s in range(3):
        g.judge([{"clicked": 1}] + [{"clicked": 0}] * 999)
    assert g.judge(window(300, 0.2, 1)) is not None


def test_the_baseline_survives_a_checkpoint():
    g = LabelRateGuard(history=4)
    for s in range(6):
        g.judge(window(300, 0.05 + 0.01 * s, s))
    assert g.judge(window(300, 0.6, 2)) is not None  # one held: the count in a row is state too
    h = LabelRateGuard(history=4)
    h.restore(g.state())
    assert h.baseline() == g.baseline() and len(h.windows) == 4 and h.held == g.held
    burst = window(300, 0.6, 3)
    assert (g.judge(burst) is None) == (h.judge(burst) is None) is False


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LabelRateGuard(ratio=1.0)
    with pytest.raises(ValueError):
        LabelRateGuard(warmup=5, history=3)
    with pytest.raises(ValueError):
        LabelRateGuard(accept_after=0)
