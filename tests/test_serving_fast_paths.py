"""The serving path's array fast paths equal their per-item reference loops on random inputs (the
same floats, the same picks, ties to the first)."""

from __future__ import annotations

import random

import pytest

from online.creative import CreativeStage, creative_stats
from online.index import AdIndex, Candidate
from online.models import BetaCreativeRanker
from tests.test_online_common import settings

ODD_COUNTS = [None, 0, 0.0, 3, 7.5, "12", "x", -4.0, float("nan"), float("inf"), 1e300, True]


def _row(rng: random.Random) -> dict | None:
    r = rng.random()
    if r < 0.1:
        return None
    if r < 0.25:  # odd values: strings, negatives, NaN, inf, absent
        return {"impressions": rng.choice(ODD_COUNTS), "clicks": rng.choice(ODD_COUNTS)}
    if r < 0.45:  # repeated counts: ties within a candidate
        return {"impressions": 100.0, "clicks": 3.0}
    if r < 0.6:  # whole counts, clicks sometimes above impressions
        imps = float(rng.randint(0, 5000))
        return {"impressions": imps, "clicks": float(rng.randint(0, int(imps) + 5))}
    imps = rng.uniform(0, 5000)  # decayed (fractional) counts: rounding differences would show
    return {"impressions": imps, "clicks": rng.uniform(0, imps * 0.2)}


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_creative_choice_equals_the_loop(seed):
    rng = random.Random(seed)
    width = rng.choice([2, 5]) if seed else 1
    n = rng.randint(20, 80) if seed != 1 else 0
    cands = [Candidate(f"a{j}", "w", 1.0, "c/l", "exact", tuple(f"a{j}-c{i}" for i in range(width)))
             for j in range(n)]
    rows = [[_row(rng) for _ in range(width)] for _ in range(n)]
    priors = [rng.choice([0.02, rng.random(), 0.0, 1.0, 1.5]) for _ in range(n)]
    k = rng.choice([0.0, 1.0, 20.0])
    stage = CreativeStage(settings(creative_exploration="off"), AdIndex(), BetaCreativeRanker(k, 0.02))
    stage.vectorised = False
    ref = stage.rank(None, lambda: [], cands, rows, priors, "r", [])
    stage.vectorised = True
    for stats in (None, [[creative_stats(r) for r in rs] for rs in rows]):
        got = stage.rank(None, lambda: [], cands, rows, priors, "r", [], stats)
        assert got.best == ref.best
        assert got.scores == ref.scores  # exactly: the same operations in the same order
        assert (got.ranker, got.version, got.degraded) == (ref.ranker, ref.version, ref.degraded)


def test_vectorised_creative_choice_falls_back_on_ragged_groups():
    cands = [Candidate("a1", "w", 1.0, "c/l", "exact", ("x", "y")), Candidate("a2", "w", 1.0, "c/l", "exact", ("z",))]
    rows = [[{"impressions": 10.0, "clicks": 1.0}, {"impressions": 10.0, "clicks": 4.0}], [None]]
    stage = CreativeStage(settings(creative_exploration="off"), AdIndex(), BetaCreativeRanker(20.0, 0.02))
    got = stage.rank(None, lambda: [], cands, rows, [0.02, 0.05], "r", [])
    assert got.best == [1, 0]
    assert got.scores[1] == [0.05]
