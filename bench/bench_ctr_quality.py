"""CTR quality under the incremental protocol: every strategy on every dataset at hand, ≥3 seeds.

Datasets (each skipped with a message when absent):

- ``world``: the synthetic drift world (``core.world``), labelled impressions with known drift;
- ``obd``: Open Bandit Dataset sample (``../shared/data/obd``): the men/women × random/bts logs in
  time order; categorical = campaign, policy, item id, position, the 4 user features, item features;
- ``adwords``: daily keyword impressions/clicks (``../shared/data/adwords``, GPL-3: read at run
  time, never copied). Aggregates are turned into impression rows by sampling each impression with
  probability ``--adwords-rate`` (clicks drawn without replacement); categorical = keyword, weekday.

Writes mean ± std (across seeds) of the mean next-period AUC and LogLoss per strategy and dataset.

usage: python bench/bench_ctr_quality.py [--seeds 3] [--datasets world,obd,adwords] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.evaluation import STRATEGIES, Columns, EvalConfig, format_table, prepare_frame, run_protocol

log = logging.getLogger("bench_ctr_quality")


def world_frame(rps: float, seed: int = 7) -> tuple[pd.DataFrame, Columns] | None:
    try:
        from core.world import World, WorldConfig, example_columns
    except ImportError:
        print("world: core/world.py not available, skipped")
        return None
    w = World(WorldConfig(seed=seed))
    df = w.to_examples_frame(duration_s=w.config.drift.horizon_s, requests_per_s=rps)
    c = example_columns()
    return df, Columns(c["time_col"], c["label_col"], list(c["categorical"]), list(c["numeric"]))


def obd_frame(root: Path) -> tuple[pd.DataFrame, Columns] | None:
    parts = []
    for policy in ("random", "bts"):
        for camp in ("men", "women"):
            f = root / policy / camp / f"{camp}.csv"
            if not f.is_file():
                continue
            d = pd.read_csv(f, usecols=["timestamp", "item_id", "position", "click"] + [f"user_feature_{i}" for i in range(4)])
            items = pd.read_csv(root / policy / camp / "item_context.csv", index_col=0)
            d = d.merge(items[["item_id", "item_feature_1", "item_feature_2", "item_feature_3"]], on="item_id", how="left")
            d["item_id"] = camp + ":" + d["item_id"].astype(str)
            d["campaign"], d["policy"] = camp, policy
            parts.append(d)
    if not parts:
        print(f"obd: no data under {root}, skipped")
        return None
    df = pd.concat(parts, ignore_index=True)
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    cats = ["campaign", "policy", "item_id", "position", *[f"user_feature_{i}" for i in range(4)],
            "item_feature_1", "item_feature_2", "item_feature_3"]
    return df, Columns("timestamp", "click", cats, [])


def adwords_frame(root: Path, rate: float, seed: int = 0) -> tuple[pd.DataFrame, Columns] | None:
    files = sorted(root.glob("adwords_daily_*.csv"))
    if not files:
        print(f"adwords: no data under {root}, skipped")
        return None
    agg = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    agg = agg[agg["impressions"] > 0]
    clicks = np.minimum(agg["clicks"].to_numpy(), agg["impressions"].to_numpy())  # 16 rows have clicks > imps
    rng = np.random.default_rng(seed)
    n = rng.binomial(agg["impressions"].to_numpy(), rate)
    c = rng.hypergeometric(clicks, agg["impressions"].to_numpy() - clicks, np.maximum(n, 0))
    keep = n > 0
    reps = n[keep]
    date = np.repeat(agg["date"].to_numpy()[keep], reps)
    kw = np.repeat(agg["keyword_id"].to_numpy()[keep], reps)
    label = np.concatenate([np.r_[np.ones(ci), np.zeros(ni - ci)] for ni, ci in zip(reps, c[keep])])
    df = pd.DataFrame({"date": pd.to_datetime(date), "keyword": kw, "clicked": label})
    df["weekday"] = df["date"].dt.dayofweek
    # rows of one day share a timestamp: shuffle within the day so periods are not ordered by keyword
    df = df.sample(frac=1.0, random_state=seed).sort_values("date", kind="mergesort").reset_index(drop=True)
    return df, Columns("date", "clicked", ["keyword", "weekday"], [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="world,obd,adwords")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--periods", type=int, default=8)
    ap.add_argument("--warm-start", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--emb-lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=0.01)
    ap.add_argument("--mp-lambda", type=float, default=1.0)
    ap.add_argument("--world-rps", type=float, default=2.0, help="world requests/s over its 2 h horizon (size)")
    ap.add_argument("--adwords-rate", type=float, default=0.004, help="impression sampling rate (size)")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/ctr_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data_root)
    loaders = {
        "world": lambda: world_frame(args.world_rps),
        "obd": lambda: obd_frame(root / "obd"),
        "adwords": lambda: adwords_frame(root / "adwords", args.adwords_rate),
    }
    results: dict = {"settings": vars(args), "datasets": {}}
    for name in args.datasets.split(","):
        got = loaders[name]()
        if got is None:
            continue
        df, cols = got
        df = prepare_frame(df, cols)
        ec = EvalConfig(periods=args.periods, strategies=tuple(args.strategies.split(",")), seeds=args.seeds,
                        warm_start=args.warm_start, epochs=args.epochs, emb_lr=args.emb_lr, dense_lr=args.dense_lr,
                        mp_lambda=args.mp_lambda)
        t0 = time.perf_counter()
        report, _ = run_protocol(df, cols, ec)
        secs = time.perf_counter() - t0
        print(f"\n== {name}: {len(df):,} rows, CTR {df[cols.label].gt(0).mean():.4f}, {secs:.0f} s")
        print(format_table(report))
        results["datasets"][name] = {
            "rows": len(df),
            "ctr": float(df[cols.label].gt(0).mean()),
            "seconds": secs,
            "summary": {s: {"mean_auc": r["mean_auc"], "mean_auc_std": r.get("mean_auc_std"),
                            "mean_logloss": r["mean_logloss"], "mean_logloss_std": r.get("mean_logloss_std")}
                        for s, r in report["strategies"].items()},
            "report": report,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
