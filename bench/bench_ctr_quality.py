"""CTR quality under the incremental protocol: every strategy on every time-ordered click log at
hand with enough clicks, plus the synthetic world, under the protocol of ``adstream evaluate-ctr``
(the same budgeted search for every strategy on a validation prefix, then ≥ 3 seeds on the test
periods, paired differences against fine-tuning with bootstrap 95 % intervals).

Datasets (each skipped with a message when absent or when it has fewer than ``--min-clicks``):

- ``world``: the synthetic drift world (``core.world``), labelled impressions with known drift;
- ``obd``: Open Bandit Dataset sample (``../shared/data/obd``): the men/women × random/bts logs in
  time order; categorical = campaign, policy, item id, position, the 4 user features, item features
  (about 200 clicks: below the default ``--min-clicks``, so skipped unless asked for);
- ``adwords``: daily keyword impressions/clicks (``../shared/data/adwords``, GPL-3: read at run
  time, never copied). Aggregates are turned into impression rows by sampling each impression with
  probability ``--adwords-rate`` (clicks drawn without replacement); categorical = keyword, weekday.

Writes one JSON (``--out``): per dataset the rows, clicks, seconds, the table (strategy → mean ±
std of the mean next-period AUC and LogLoss over the seeds, what the search chose) and the paired
comparisons; and prints the same as a Markdown table.

usage: python bench/bench_ctr_quality.py [--seeds 3] [--search-trials 8] [--datasets world,obd,adwords]
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


def markdown(results: dict) -> str:
    """One table: dataset × strategy (mean ± std over seeds), then the paired differences."""
    lines = ["| dataset (rows, clicks) | strategy | mean AUC ± std | mean LogLoss ± std | vs finetune: mean [95% CI] |",
             "|---|---|---|---|---|"]
    for name, d in results["datasets"].items():
        paired = d["report"]["paired"]
        for s, r in d["report"]["strategies"].items():
            p = paired.get(f"{s} - finetune")
            diff = f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p else ""
            lines.append(f"| {name} ({d['rows']:,}, {d['clicks']:,}) | {s} | {r['mean_auc']:.4f} ± {r['mean_auc_std']:.4f} "
                         f"| {r['mean_logloss']:.4f} ± {r['mean_logloss_std']:.4f} | {diff} |")
        p = paired.get("ddp - retrain")
        if p:
            lines.append(f"| {name} | ddp − retrain | | | {p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="world,obd,adwords")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--search-trials", type=int, default=EvalConfig.search_trials)
    ap.add_argument("--periods", type=int, default=8)
    ap.add_argument("--warm-start", type=int, default=2)
    ap.add_argument("--val-periods", type=int, default=2)
    ap.add_argument("--min-clicks", type=int, default=1000, help="skip logs with fewer clicks (too few to rank)")
    ap.add_argument("--world-rps", type=float, default=2.0, help="world requests/s over its 2 h horizon (size)")
    ap.add_argument("--adwords-rate", type=float, default=0.008, help="impression sampling rate (size)")
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
    results: dict = {"settings": vars(args), "datasets": {}, "skipped": {}}
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        got = loaders[name]()
        if got is None:
            results["skipped"][name] = "no data"
            continue
        df, cols = got
        df = prepare_frame(df, cols)
        clicks = int(df[cols.label].gt(0).sum())
        if clicks < args.min_clicks:
            msg = f"{clicks} clicks < --min-clicks {args.min_clicks}: too few to rank strategies"
            print(f"{name}: skipped ({msg})")
            results["skipped"][name] = msg
            continue
        ec = EvalConfig(periods=args.periods, strategies=tuple(args.strategies.split(",")), seeds=args.seeds,
                        warm_start=args.warm_start, val_periods=args.val_periods, search_trials=args.search_trials)
        t0 = time.perf_counter()
        report, _ = run_protocol(df, cols, ec)
        secs = time.perf_counter() - t0
        print(f"\n== {name}: {len(df):,} rows, {clicks:,} clicks, CTR {clicks / len(df):.4f}, {secs:.0f} s")
        print(format_table(report))
        results["datasets"][name] = {"rows": len(df), "clicks": clicks, "ctr": clicks / len(df), "seconds": secs,
                                     "report": report}
    results["seconds"] = time.perf_counter() - t_all
    table = markdown(results)
    results["table_markdown"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"wrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
