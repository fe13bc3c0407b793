"""``adstream evaluate-creative`` on any file of that shape: the report contract, bad input, OBD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adstream.cli import main
from core.creatives import CreativeContentConfig
from core.world import World, WorldConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "obd"


@pytest.fixture(scope="module")
def world_csv(tmp_path_factory) -> Path:
    w = World(WorldConfig(seed=5, n_ads=60, creative_content=CreativeContentConfig(enabled=True)))
    df = w.to_examples_frame(duration_s=500, requests_per_s=10, seed=2)
    f = tmp_path_factory.mktemp("ec") / "examples.csv"
    df.to_csv(f, index=False)
    return f


def _run(args: list[str]) -> int:
    return main(["evaluate-creative", *args])


def test_report_contract_on_a_world_file(world_csv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _run(["--data", str(world_csv), "--ad-col", "ad_id", "--creative-col", "creative_id", "--label-col", "clicked",
               "--time-col", "event_time", "--position-col", "position", "--categorical", "user_id", "segment",
               "--creative-features", "cr_layout,cr_colour", "cr_price_badge", "--creative-numeric", "cr_text_len",
               "--holdout-creatives", "0.3", "--seeds", "1", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000
    assert set(rep["rankers"]) >= {"logged", "beta", "cr", "cr+"}
    for name, r in rep["rankers"].items():
        assert {"nsctr", "sctr", "auc", "gauc"} <= set(r), name
    # the logging policy's NSCTR is the logged test CTR; the rankers pick other creatives
    assert rep["rankers"]["logged"]["nsctr"] == pytest.approx(rep["data"]["test_ctr"])
    assert rep["rankers"]["cr+"]["matched_share"] < 0.6
    assert math.isfinite(rep["rankers"]["cr+"]["auc"]) and math.isfinite(rep["ad_rankers"]["ar+"]["auc"])
    # never-shown creatives were counted, and how everything is counted is written down
    assert rep["data"]["held_out_creatives"] > 0 and rep["cold"]["cr+"]["impressions"] > 0
    assert rep["cold"]["beta"]["nsctr"] == pytest.approx(rep["cold"]["logged"]["nsctr"], rel=0.35)
    assert {"single_creative_ads", "never_shown_creatives"} <= set(rep["counting"])
    printed = capsys.readouterr().out
    assert "NSCTR" in printed and "cr+" in printed and "never-shown block" in printed


def test_any_file_of_that_shape_works(tmp_path):
    # no time column, no content, numeric ids, a single-creative ad: file order, ids as strings
    rng = np.random.default_rng(0)
    n = 3000
    ad = rng.integers(0, 8, n)
    cr = np.where(ad == 0, 0, rng.integers(0, 3, n))
    y = (rng.random(n) < 0.05 + 0.05 * (cr == 1)).astype(int)
    f = tmp_path / "tiny.parquet"
    pd.DataFrame({"a": ad, "c": cr, "y": y, "u": rng.integers(0, 50, n), "p": rng.uniform(0.1, 0.9, n)}).to_parquet(f)
    out = tmp_path / "o"
    assert _run(["--data", str(f), "--ad-col", "a", "--creative-col", "c", "--label-col", "y", "--categorical", "u",
                 "--propensity-col", "p", "--seeds", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    # the logging policy is what the propensities describe: its NSCTR is the logged CTR, unweighted
    assert rep["rankers"]["logged"]["nsctr"] == pytest.approx(rep["data"]["test_ctr"])
    assert 0 < rep["data"]["single_creative_impression_share"] < 0.3
    assert rep["rankers"]["beta"]["nsctr_multi"] != rep["rankers"]["beta"]["nsctr"]


@pytest.mark.parametrize("args,msg", [
    (["--ad-col", "nope"], "missing column"),
    (["--label-col", "segment"], "label column"),
    (["--propensity-col", "bid"], "propensity"),
    (["--categorical", "ad_id"], "more than one role"),
])
def test_bad_input_is_a_clear_error(world_csv, tmp_path, capsys, args, msg):
    base = {"--ad-col": "ad_id", "--creative-col": "creative_id", "--label-col": "clicked"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    assert _run(["--data", str(world_csv), *flat, "--out", str(tmp_path / "o")]) == 1
    assert msg in capsys.readouterr().err
    assert _run(["--data", str(tmp_path / "missing.csv"), "--ad-col", "a", "--creative-col", "c", "--label-col", "y",
                 "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "random" / "men" / "men.csv").is_file(), reason="OBD sample not in ../shared/data")
def test_obd_through_evaluate_creative(tmp_path):
    """OBD's shape (items in 3 slots, propensities) goes through the command; the numbers are reported
    in docs/creative.md, here only that they are what the data allow (a tiny matched sample)."""
    d = SHARED / "random" / "men"
    df = pd.read_csv(d / "men.csv", usecols=["timestamp", "item_id", "position", "click", "propensity_score",
                                             "user_feature_0", "user_feature_1"])
    df = df.merge(pd.read_csv(d / "item_context.csv", index_col=0), on="item_id")
    f = tmp_path / "obd_men.csv"
    df.to_csv(f, index=False)
    out = tmp_path / "o"
    assert _run(["--data", str(f), "--ad-col", "position", "--creative-col", "item_id", "--label-col", "click",
                 "--time-col", "timestamp", "--propensity-col", "propensity_score", "--categorical", "user_feature_0",
                 "user_feature_1", "--creative-features", "item_feature_1", "item_feature_2", "--creative-numeric",
                 "item_feature_0", "--seeds", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["ads"] == 3 and rep["data"]["mean_candidates"] > 30
    logged = rep["rankers"]["logged"]
    assert logged["nsctr"] == pytest.approx(rep["data"]["test_ctr"])  # uniform propensities: IPS = plain
    for name in ("beta", "cr", "cr+"):
        r = rep["rankers"][name]
        assert r["matched_clicks"] < 20 and r["nsctr_se"] > 0  # what "too sparse to tell" looks like
