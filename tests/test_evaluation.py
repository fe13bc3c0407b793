"""The incremental protocol: hygiene, DDP vs fine-tuning under drift, and the evaluate-ctr CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from models.ctr import CTRLearner, auc, iter_batches
from models.eval_report import paired_difference, weighted_auc
from models.evaluation import (STRATEGIES, Columns, EvalConfig, _check_hygiene, period_bounds, prepare_frame,
                               run_protocol, strategy_config)


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
    ec = EvalConfig(periods=5, warm_start=2, batch_size=256, fp="count", embedding_dim=4, hidden=(8,), search_trials=0,
                    seeds=1)
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
    with pytest.raises(ConfigError, match="nothing to test"):
        EvalConfig(periods=3, warm_start=2, search_trials=0).validate()
    with pytest.raises(ConfigError, match="nothing to test"):  # the validation prefix needs its own periods
        EvalConfig(periods=5, warm_start=2, val_periods=2).validate()
    with pytest.raises(ConfigError, match="unknown strategies"):
        EvalConfig(strategies=("magic",)).validate()


def test_unsorted_input_is_sorted_or_refused(caplog) -> None:
    df = drift_frame(0, periods=3, per_period=200)
    shuffled = df.sample(frac=1.0, random_state=0)
    ec = EvalConfig(periods=3, warm_start=1, search_trials=0, seeds=1, embedding_dim=4, hidden=(8,))
    with pytest.raises(ConfigError, match="not sorted by 'time'"):
        run_protocol(shuffled, COLS, ec)
    with caplog.at_level("WARNING"):
        fixed = prepare_frame(shuffled, COLS)
    assert "not sorted" in caplog.text
    assert fixed["time"].is_monotonic_increasing and fixed["time"].tolist() == df["time"].tolist()
    run_protocol(fixed, COLS, ec)  # accepted once sorted


# The regime where incremental updates overfit the newest window: several epochs per period at a
# high learning rate (docs/ctr.md). λ = 2 for the Model Prior, learned Feature Prior.
DRIFT_SETTINGS = dict(epochs=3, emb_lr=0.3, dense_lr=0.05, mp_lambda=2.0, warm_start=2, periods=8, search_trials=0, seeds=1)


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
    df = drift_frame(2, periods=5, per_period=500)
    df.loc[5, "pos"] = np.nan  # NaN numeric values are fine
    df["when"] = pd.to_datetime(df["time"], unit="s")  # a date/time column works as time
    path = tmp_path / f"tiny.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    out = tmp_path / "out"
    rc = _cli(["evaluate-ctr", "--data", str(path), "--time-col", "when", "--label-col", "clicked",
               "--categorical", "ad,user,stable", "--numeric", "pos", "--periods", "5", "--warm-start", "1",
               "--val-periods", "1", "--search-trials", "2", "--seeds", "3",
               "--strategies", "retrain,finetune,distill,ddp-fp,ddp-mp,ddp", "--batch-size", "128",
               "--embedding-dim", "4", "--capacity", "512", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert {"periods", "validation_periods", "strategies", "paired", "protocol", "data"} <= set(rep)
    assert rep["periods"] == [3, 4] and rep["validation_periods"] == [2]
    assert set(rep["strategies"]) == {"retrain", "finetune", "distill", "ddp-fp", "ddp-mp", "ddp"}
    for name, r in rep["strategies"].items():
        assert {"auc", "logloss", "mean_auc", "mean_logloss", "train_seconds", "mean_auc_std", "seeds", "chosen",
                "validation_auc", "search"} <= set(r)
        assert r["seeds"] == 3 and len(r["auc"]) == 2 and len(r["search"]) == 2
        # the drift world is learnable: every strategy ranks clearly better than a constant (0.5)
        assert r["mean_auc"] > 0.6, (name, r["mean_auc"])
        assert r["mean_auc"] == pytest.approx(np.mean(r["auc"]), abs=1e-9)
    assert set(rep["paired"]) == {"retrain - finetune", "distill - finetune", "ddp-fp - finetune", "ddp-mp - finetune",
                                  "ddp - finetune", "ddp - retrain"}
    for key, p in rep["paired"].items():
        a, b = key.split(" - ")
        assert p["mean"] == pytest.approx(rep["strategies"][a]["mean_auc"] - rep["strategies"][b]["mean_auc"], abs=1e-9)
        assert p["ci95"][0] <= p["mean"] <= p["ci95"][1] and len(p["per_period"]) == 2
    assert (out / "report.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "mean_auc" in printed and "ddp - finetune" in printed and "95% CI" in printed


def test_cli_bad_columns_and_files(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.csv"
    drift_frame(2, periods=3, per_period=50).to_csv(path, index=False)
    base = ["evaluate-ctr", "--data", str(path), "--time-col", "time", "--label-col", "clicked",
            "--periods", "3", "--warm-start", "1", "--search-trials", "0", "--out", str(tmp_path / "o")]
    assert _cli(base + ["--categorical", "ad,colour"]) == 1
    assert "missing column(s) ['colour']" in capsys.readouterr().err
    assert _cli([*base[:2], str(tmp_path / "none.csv"), *base[3:], "--categorical", "ad"]) == 1
    assert "not found" in capsys.readouterr().err
    assert _cli(base + ["--categorical", "ad", "--strategies", "finetune,best"]) == 1
    assert "unknown" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


# ------------------------------------------------------------------------------------ protocol


def _small(**kw) -> EvalConfig:
    base = dict(periods=6, warm_start=1, val_periods=2, search_trials=2, seeds=1, batch_size=256, embedding_dim=4,
                hidden=(8,), capacity=1024)
    return EvalConfig(**{**base, **kw})


def test_search_never_sees_the_test_periods() -> None:
    """The choice is made on the validation prefix only: scrambling every label of the test
    periods changes the reported numbers and nothing about what the search chose."""
    cols = Columns("time", "clicked", ["ad", "user"], ["pos"])
    df = prepare_frame(drift_frame(3, periods=6, per_period=500), cols)
    ec = _small(strategies=("finetune", "ddp"), search_trials=4)
    rep, _ = run_protocol(df, cols, ec)
    bounds = period_bounds(len(df), 6)
    scrambled = df.copy()
    lo = bounds[ec.test_periods()[0]][0]
    scrambled.loc[lo:, "clicked"] = np.random.default_rng(0).permutation(scrambled.loc[lo:, "clicked"].to_numpy())
    rep2, _ = run_protocol(scrambled, cols, ec)
    for s in ("finetune", "ddp"):
        assert rep2["strategies"][s]["chosen"] == rep["strategies"][s]["chosen"]
        assert [t["val_auc"] for t in rep2["strategies"][s]["search"]] == [t["val_auc"] for t in rep["strategies"][s]["search"]]
        assert abs(rep2["strategies"][s]["mean_auc"] - rep["strategies"][s]["mean_auc"]) > 0.02
    # stage 1 (trials 0, 1): the same shared settings for both strategies; stage 2 (2, 3): their own
    trials = {s: rep["strategies"][s]["search"] for s in ("finetune", "ddp")}
    assert [t["stage"] for t in trials["ddp"]] == [1, 1, 2, 2]
    assert trials["ddp"][1]["settings"] == trials["finetune"][1]["settings"] and trials["ddp"][1]["settings"]
    assert "mp_lambda" in trials["ddp"][2]["settings"] and "mp_lambda" not in trials["finetune"][2]["settings"]
    for j in (2, 3):  # stage 2 refines the learning rates by the same factors for both
        assert trials["ddp"][j]["settings"]["emb_lr"] == trials["finetune"][j]["settings"]["emb_lr"]
    # the shared settings were kept for both by their mean validation AUC over the strategies
    mean = [np.mean([trials[s][j]["val_auc"] for s in trials]) for j in (0, 1)]
    consensus = int(np.argmax(mean))
    for s in ("finetune", "ddp"):
        assert rep["strategies"][s]["search_consensus"] == consensus
        options = [trials[s][j]["settings"] for j in (consensus, 2, 3)]
        if s == "ddp":  # or its no-prior point: its pick with every prior off
            options.append(rep["strategies"][s]["prior_check"]["settings"])
        assert rep["strategies"][s]["chosen"] in options


def test_the_prior_check_keeps_a_prior_only_when_it_wins_beyond_noise() -> None:
    from models.eval_search import prior_check

    rng = np.random.default_rng(0)
    y = [(rng.random(3000) < 0.1).astype(int) for _ in range(2)]
    informative = [np.clip(0.1 + 0.08 * (2 * t - 1) + rng.normal(0, 0.05, len(t)), 0.01, 0.99) for t in y]
    noise = [rng.random(len(t)) for t in y]
    assert prior_check(y, informative, noise)["keep_prior"]
    assert not prior_check(y, noise, informative)["keep_prior"]
    assert not prior_check(y, informative, informative)["keep_prior"]  # a tie keeps no prior
    a, b = ([p + rng.normal(0, 0.02, len(p)) for p in informative] for _ in range(2))  # equally good
    c = prior_check(y, a, b)
    assert c["ci95"][0] < 0 < c["ci95"][1] and not c["keep_prior"]


def test_ddp_falls_back_to_fine_tuning_when_validation_cannot_see_its_prior_help() -> None:
    """Labels carry no signal: the prior cannot earn its place on validation, so ``ddp`` takes its
    no-prior point, which is fine-tuning's configuration at ddp's chosen settings."""
    cols = Columns("time", "clicked", ["ad", "user"], ["pos"])
    df = prepare_frame(drift_frame(4, periods=6, per_period=600), cols)
    df["clicked"] = (np.random.default_rng(1).random(len(df)) < 0.2).astype(int)
    ec = _small(strategies=("finetune", "ddp"), search_trials=2, fp="count")
    rep, _ = run_protocol(df, cols, ec)
    d = rep["strategies"]["ddp"]
    check = d["prior_check"]
    assert not check["keep_prior"] and check["ci95"][0] <= 0, check
    assert len(d["search"]) == 2 and d["chosen"] == check["settings"]  # outside the trial budget
    assert d["chosen"]["fp"] == "off" and d["chosen"]["mp"] == "off"
    chosen = replace(ec, **d["chosen"])
    assert strategy_config("ddp", chosen, cols, 0) == strategy_config("finetune", chosen, cols, 0)
    # switched off, the check leaves ddp with its prior
    rep_off, _ = run_protocol(df, cols, replace(ec, prior_check="off"))
    assert "prior_check" not in rep_off["strategies"]["ddp"]
    assert rep_off["strategies"]["ddp"]["chosen"].get("fp", "count") != "off"


@pytest.mark.parametrize("mode,window,expect", [("expanding", None, lambda t: 0), ("sliding", 2, lambda t: t - 1)])
def test_retrain_trains_fresh_on_an_expanding_or_sliding_window(monkeypatch, mode, window, expect) -> None:
    seen: list[tuple[int, int]] = []
    real = CTRLearner.train_window

    def spy(self, batches, *a, **kw):
        batches = list(batches)
        idx = np.concatenate([b.index for b in batches])
        seen.append((int(idx.min()), int(idx.max())))
        assert self.windows_trained == 0  # a fresh model every time
        return real(self, batches, *a, **kw)

    monkeypatch.setattr(CTRLearner, "train_window", spy)
    df = drift_frame(0, periods=5, per_period=200)
    ec = _small(periods=5, warm_start=1, search_trials=0, strategies=("retrain",), retrain_mode=mode, retrain_window=window)
    run_protocol(df, COLS, ec)
    bounds = period_bounds(len(df), 5)
    assert [s for s in seen] == [(bounds[expect(t)][0], bounds[t][1] - 1) for t in range(1, 4)]


def test_every_strategy_has_the_first_order_term_and_ablations_differ_by_one_switch() -> None:
    ec = EvalConfig()
    cfgs = {s: strategy_config(s, ec, COLS, 0).to_dict() for s in STRATEGIES}
    assert all(c["first_order"] for c in cfgs.values())
    ft = cfgs["finetune"]

    def diff(s: str) -> set[str]:
        return {k for k in ft if cfgs[s][k] != ft[k]}

    assert diff("retrain") == set()
    assert diff("distill") == {"distill_weight"}
    assert diff("ddp-fp") == {"fp"}
    assert diff("ddp-mp") == {"mp"}
    assert diff("ddp") == {"fp", "mp"}


def test_weighted_auc_and_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.2).astype(float)
    p = np.round(rng.random(3000) * 20) / 20 + 0.1 * y  # many ties
    assert weighted_auc(y, p, np.ones((1, 3000)))[0] == pytest.approx(auc(y, p), abs=1e-12)
    w = rng.integers(0, 3, 3000)  # integer weights = the data set with each row repeated w times
    rep = np.repeat(np.arange(3000), w)
    assert weighted_auc(y, p, w[None].astype(float))[0] == pytest.approx(auc(y[rep], p[rep]), abs=1e-12)
    # a strategy against itself: exactly 0; a clearly better one: an interval above 0
    labels = [y[:1500], y[1500:]]
    a = [[p[:1500], p[1500:]]] * 3
    same = paired_difference(labels, a, a, n_boot=200)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    better = [[p[:1500] + 0.3 * y[:1500], p[1500:] + 0.3 * y[1500:]]] * 3
    d = paired_difference(labels, better, a, n_boot=200)
    assert d["ci95"][0] > 0.01 and d["periods_better"] == 2
    noise = [[p[:1500] + rng.normal(0, 0.3, 1500), p[1500:] + rng.normal(0, 0.3, 1500)] for _ in range(3)]
    d2 = paired_difference(labels, noise, a, n_boot=200)
    assert d2["ci95"][1] < 0 and d2["ci95"][0] < d2["mean"] < d2["ci95"][1]
