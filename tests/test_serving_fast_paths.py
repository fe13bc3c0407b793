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


def _result(rng: random.Random) -> dict:
    ads = []
    for pos in range(rng.randint(0, 6)):
        pctr = rng.choice([rng.random(), 0.0, 1, float("nan"), 1e-300])
        bid = rng.choice([rng.uniform(0.1, 9), 2, 1e16])
        a = {"ad_id": f"a{pos}", "creative_id": f"a{pos}-c1", "bidword": rng.choice(["tv", "télé", "電視"]),
             "category": "c/l", "bid": bid, "pctr": pctr, "ecpm": pctr * bid, "position": pos,
             "source": rng.choice(["index", "gram", "category"])}
        if rng.random() < 0.3:
            a["code"] = "3-1-4"
        ads.append(a)
    return {"request_id": f"r{rng.randint(0, 99)}", "ads": ads,
            "model_versions": {"ctr": "v3", "creative": "beta-v1"}, "degraded": rng.choice([[], ["features"]])}


def _typed(x):
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_typed(v) for v in x]
    return type(x).__name__, x


@pytest.mark.parametrize("seed", range(20))
def test_response_encoding_equals_the_response_model(seed):
    import json

    from online.app import AdResponse
    from online.hotpath import encode_ad_response

    out = _result(random.Random(seed))
    # what FastAPI writes for a response_model (pydantic's dump_json: a non-finite float is null)
    want = json.loads(AdResponse.model_validate(out).model_dump_json())
    got = json.loads(encode_ad_response(out))
    assert _typed(got) == _typed(want)  # the same values of the same JSON types (2.0 is not 2)
    assert [list(a) for a in got["ads"]] == [list(a) for a in want["ads"]]  # field order too
    assert list(got) == list(want)


@pytest.mark.parametrize("bad", [
    lambda o: o["model_versions"].update(ctr=3),
    lambda o: o["degraded"].append(None),
    lambda o: o.update(request_id=None),
    lambda o: o["ads"] and o["ads"][0].update(pctr="0.5"),
    lambda o: o["ads"] and o["ads"][0].update(position=1.0),
    lambda o: o["ads"] and o["ads"][0].pop("bidword"),
])
def test_response_encoding_leaves_a_result_that_does_not_fit_to_the_model(bad):
    from online.hotpath import encode_ad_response

    out = _result(random.Random(1))
    out["ads"] = out["ads"] or _result(random.Random(2))["ads"]
    bad(out)
    assert encode_ad_response(out) is None
