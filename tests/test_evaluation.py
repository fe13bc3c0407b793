"""The incremental protocol: hygiene, DDP vs fine-tuning under drift, and the evaluate-ctr CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from models.ctr import CTRLearner, iter_batches
from models.evaluation import Columns, EvalConfig, _check_hygiene, period_bounds, prepare_frame, run_protocol, strategy_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def drift_frame(seed: int, periods: int = 8, per_period: int = 4000, n_ads: int = 300, drift_share: float = 0.3) -> pd.DataFrame:
    """Known per-ad CTR logits. A random 30 % of ads re-draw their CTR at every period boundary
    (drift); the other ads never change (``stable``). Users and positions have fixed effects."""
    rng = np.random.default_rng(seed)
    logit_ad = rng.normal(-1.5, 1.0, n_ads)
    drifting = np.zeros(n_ads, bool)
    drifting[rng.choice(n_ads, int(drift_share * n_ads), replace=False)] = True
    seg = rng.normal(0, 0.5, 10)
    frames = []
    for t in range(periods):
        if t >= 1:
            logit_ad[drifting] = rng.normal(-1.5, 1.0, drifting.sum())
        ads = rng.integers(0, n_ads, per_period)
        users = rng.integers(0, 10, per_period)
        pos = rng.integers(0, 3, per_period)
        z = logit_ad[ads] + seg[users] - 0.4 * pos
        y = (rng.random(per_period) < 1 / (1 + np.exp(-z))).astype(int)
        frames.append(pd.DataFrame({
            "time": t * per_period + np.arange(per_period), "ad": [f"ad{a}" for a in ads], "user": users,
            "pos": pos.astype(float), "clicked": y, "stable": np.where(drifting[ads], "drifted", "stable"),
        }))
    return pd.concat(frames, ignore_index=True)


COLS = Columns("time", "clicked", ["ad", "user"], ["pos"], segment="stable")


def test_protocol_hygiene_every_strategy() -> None:
    df = drift_frame(0, periods=5, per_period=600)
    ec = EvalConfig(periods=5, warm_start=2, batch_size=256, fp="count", embedding_dim=4, hidden=(8,))
    report, audit = run_protocol(df, COLS, ec)
    bounds = period_bounds(len(df), 5)
    assert report["periods"] == [3, 4]
    assert len(audit) == len(ec.strategies) * 2
    for rec in audit:
        lo = bounds[rec["period"]][0]
        assert rec["eval_min_index"] == lo
        assert rec["trained_max_index"] == lo - 1  # trained up to the end of period t, not beyond
        if rec["strategy"] in ("ddp-fp", "ddp"):  # count prior: fed with data <= t only, up to t
            assert rec["prior_max_index"] == lo - 1
        else:
            assert rec["prior_max_index"] == -1


def test_hygiene_check_can_fail() -> None:
    df = prepare_frame(drift_frame(1, periods=3, per_period=300), COLS)
    from models.ctr import raw_from_frame

    raw = raw_from_frame(df, COLS.categorical, COLS.numeric, COLS.label, COLS.time)
    cfg = strategy_config("ddp", EvalConfig(fp="count", embedding_dim=4, hidden=(8,)), COLS, 0)
    learner = CTRLearner(cfg)
    learner.train_window(iter_batches(raw.slice(0, 650), 128))  # leaks 50 rows of period 2
    with pytest.raises(RuntimeError, match="protocol violation"):
        _check_hygiene(learner, 600, "test")


def test_bad_inputs_are_config_errors() -> None:
    df = drift_frame(0, periods=2, per_period=50)
    with pytest.raises(ConfigError, match="missing column"):
        prepare_frame(df, Columns("time", "clicked", ["nope"]))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(periods=3, warm_start=2).validate()
    with pytest.raises(ConfigError, match="unknown strategies"):
        EvalConfig(strategies=("magic",)).validate()


# The regime where incremental updates overfit the newest window: several epochs per period at a
# high learning rate (docs/ctr.md). λ = 2 for the Model Prior, learned Feature Prior.
DRIFT_SETTINGS = dict(epochs=3, emb_lr=0.3, dense_lr=0.05, mp_lambda=2.0, warm_start=2, periods=8)


def test_ddp_beats_finetune_under_drift_and_keeps_stable_knowledge() -> None:
    auc_gain, stable_ll_gain, stable_auc_gain, wins = [], [], [], 0
    for seed in range(3):
        df = drift_frame(seed)
        ec = EvalConfig(strategies=("finetune", "ddp"), base_seed=seed, **DRIFT_SETTINGS)
        report, audit = run_protocol(df, Columns("time", "clicked", ["ad", "user", "pos"], [], segment="stable"), ec)
        s = report["strategies"]
        auc_gain.append(s["ddp"]["mean_auc"] - s["finetune"]["mean_auc"])
        wins += s["ddp"]["mean_auc"] > s["finetune"]["mean_auc"]

        def seg_mean(strategy: str, metric: str) -> float:
            return float(np.mean([r["segments"]["stable"][metric] for r in audit if r["strategy"] == strategy]))

        stable_ll_gain.append(seg_mean("finetune", "logloss") - seg_mean("ddp", "logloss"))
        stable_auc_gain.append(seg_mean("ddp", "auc") - seg_mean("finetune", "auc"))
    # DDP: higher next-period AUC than fine-tuning, on average and for every seed
    assert np.mean(auc_gain) > 0.005, auc_gain
    assert wins == 3, auc_gain
    # on the ads that never drifted, DDP keeps the long-term estimate that fine-tuning overwrites
    assert np.mean(stable_ll_gain) > 0.002, stable_ll_gain
    assert np.mean(stable_auc_gain) > 0.005, stable_auc_gain


# ------------------------------------------------------------------------------------ CLI


def _cli(argv: list[str]) -> int:
    from adstream.cli import main

    return main(argv)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cli_writes_contract_report(tmp_path, fmt: str, capsys) -> None:
    df = drift_frame(2, periods=4, per_period=300)
    df.loc[5, "pos"] = np.nan  # NaN numeric values are fine
    df["when"] = pd.to_datetime(df["time"], unit="s")  # a date/time column works as time
    path = tmp_path / f"tiny.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    out = tmp_path / "out"
    rc = _cli(["evaluate-ctr", "--data", str(path), "--time-col", "when", "--label-col", "clicked",
               "--categorical", "ad,user,stable", "--numeric", "pos", "--periods", "4", "--warm-start", "1",
               "--strategies", "retrain,finetune,distill,ddp-fp,ddp-mp,ddp", "--batch-size", "128",
               "--embedding-dim", "4", "--capacity", "512", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) == {"periods", "strategies"}
    assert rep["periods"] == [2, 3]
    assert set(rep["strategies"]) == {"retrain", "finetune", "distill", "ddp-fp", "ddp-mp", "ddp"}
    for r in rep["strategies"].values():
        assert set(r) == {"auc", "logloss", "mean_auc", "mean_logloss", "train_seconds"}
        assert len(r["auc"]) == 2 and len(r["logloss"]) == 2 and 0.4 < r["mean_auc"] < 1.0
    assert (out / "report.png").stat().st_size > 1000
    assert "mean_auc" in capsys.readouterr().out


def test_cli_bad_columns_and_files(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.csv"
    drift_frame(2, periods=3, per_period=50).to_csv(path, index=False)
    base = ["evaluate-ctr", "--data", str(path), "--time-col", "time", "--label-col", "clicked",
            "--periods", "3", "--warm-start", "1", "--out", str(tmp_path / "o")]
    assert _cli(base + ["--categorical", "ad,colour"]) == 1
    assert "missing column(s) ['colour']" in capsys.readouterr().err
    assert _cli([*base[:2], str(tmp_path / "none.csv"), *base[3:], "--categorical", "ad"]) == 1
    assert "not found" in capsys.readouterr().err
    assert _cli(base + ["--categorical", "ad", "--strategies", "finetune,best"]) == 1
    assert "unknown" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()
