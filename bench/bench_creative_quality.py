"""Creative ranking quality: NSCTR / sCTR / AUC / GAUC of every creative ranker, side by side.

- ``world``: the synthetic world with creative content on, several world seeds (each: its own
  ads, creatives, content effects and traffic); per world ``--seeds`` model seeds; 30 % of the
  creatives have their training rows removed (never shown before the test: the ``cold`` block).
  An ``oracle`` ranker (the true best creative for the user) gives the ceiling.
- ``obd``: the Open Bandit Dataset sample through ``adstream evaluate-creative`` (the command, in a
  subprocess): ad = the slot position, creative = the item, the logging propensity weights NSCTR;
  random + bts logs per campaign, in time order; with and without 30 % held-out items.

The Beta strength is chosen on each run's validation slice; the creative rankers (CR and CR+ alike)
use the paper's Adagrad learning rate 0.05 (``--cr-lrs`` tries a grid on validation instead) and one
pass over the training rows, as the stream trains.

usage: python bench/bench_creative_quality.py [--worlds 7,11,23,42,99] [--seeds 2] [--datasets world,obd]
       [--out bench/results/creative_quality.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RANKERS = ("logged", "beta", "cr", "cr+", "cr+@ar", "oracle")
WORLD_COLS = dict(ad="ad_id", creative="creative_id", label="clicked", time="event_time", position="position",
                  categorical=["user_id", "segment", "query", "bidword", "category", "advertiser", "top_category",
                               "match"], numeric=["bid"],
                  creative_features=["cr_layout", "cr_colour", "cr_price_badge"], creative_numeric=["cr_text_len"],
                  gauc="user_id")


def run_world(seed: int, args) -> dict:
    import torch

    from core.creatives import CreativeContentConfig
    from core.world import World, WorldConfig
    from models.creative.evaluate import CreativeColumns, EvalSettings, prepare, run_evaluation

    torch.set_num_threads(1)
    w = World(WorldConfig(seed=seed, creative_content=CreativeContentConfig(enabled=True)))
    df = w.to_examples_frame(duration_s=args.duration, requests_per_s=args.rps, seed=seed + 1000)
    cols = CreativeColumns(**WORLD_COLS)

    def oracle(e) -> np.ndarray:
        users, ads = e.raw.cats["user_id"], e.raw.cats["ad_id"]
        return np.array([w.creative_logit(u, a, c) for u, a, c in zip(users, ads, e.cand)])

    es = EvalSettings(seeds=args.seeds, holdout_creatives=args.holdout, cr_lrs=tuple(args.cr_lrs),
                      jac={"ste": args.ste})
    t0 = time.perf_counter()
    rep = run_evaluation(prepare(df, cols), cols, es, extra={"oracle": oracle})
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    return rep


def summarise(reports: list[dict]) -> dict:
    """Across worlds: mean ± std of each ranker's per-world mean, and how often CR+ > CR > Beta."""
    out: dict = {"rankers": {}, "cold": {}, "ad_rankers": {}, "wins": {}}
    for r in RANKERS:
        for block in ("rankers", "cold"):
            vals = {k: [rep[block][r][k] for rep in reports if r in rep[block]] for k in ("nsctr", "sctr", "auc", "gauc")
                    if all(k in rep[block].get(r, {k: 0}) for rep in reports)}
            out[block][r] = {k: float(np.nanmean(v)) for k, v in vals.items() if v} | \
                {f"{k}_std": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items() if v}
    for a in ("ar", "ar+"):
        for k in ("auc", "gauc"):
            v = [rep["ad_rankers"][a][k] for rep in reports]
            out["ad_rankers"].setdefault(a, {})[k] = float(np.mean(v))
            out["ad_rankers"][a][f"{k}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def wins(block: str, a: str, b: str) -> str:
        pairs = [(rep[block][a]["nsctr"], rep[block][b]["nsctr"]) for rep in reports if a in rep[block] and b in rep[block]]
        return f"{sum(x > y for x, y in pairs)}/{len(pairs)}"

    for a, b in (("cr+", "cr"), ("cr", "beta"), ("cr+", "beta"), ("cr+@ar", "cr")):
        out["wins"][f"nsctr {a} > {b}"] = wins("rankers", a, b)
        out["wins"][f"cold nsctr {a} > {b}"] = wins("cold", a, b)
    out["wins"]["auc ar+ > ar"] = f"{sum(r['ad_rankers']['ar+']['auc'] > r['ad_rankers']['ar']['auc'] for r in reports)}" \
                                  f"/{len(reports)}"
    return out


def obd_files(root: Path, tmp: Path) -> dict[str, Path]:
    out = {}
    for camp in ("men", "women"):
        parts = []
        for policy in ("random", "bts"):
            d = root / policy / camp
            if not (d / f"{camp}.csv").is_file():
                continue
            df = pd.read_csv(d / f"{camp}.csv", usecols=["timestamp", "item_id", "position", "click",
                                                         "propensity_score"] + [f"user_feature_{i}" for i in range(4)])
            items = pd.read_csv(d / "item_context.csv", index_col=0)
            parts.append(df.merge(items, on="item_id", how="left").assign(policy=policy))
        if parts:
            f = tmp / f"obd_{camp}.csv"
            pd.concat(parts).to_csv(f, index=False)
            out[camp] = f
    return out


def run_obd(f: Path, out_dir: Path, holdout: float, args) -> dict:
    cmd = [sys.executable, "-m", "adstream", "evaluate-creative", "--data", str(f), "--ad-col", "position",
           "--creative-col", "item_id", "--label-col", "click", "--time-col", "timestamp",
           "--propensity-col", "propensity_score", "--categorical", "user_feature_0", "user_feature_1",
           "user_feature_2", "user_feature_3", "policy", "--creative-features", "item_feature_1", "item_feature_2",
           "item_feature_3", "--creative-numeric", "item_feature_0", "--seeds", str(args.seeds),
           "--holdout-creatives", str(holdout), "--out", str(out_dir)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"evaluate-creative failed ({res.returncode}): {res.stderr[-2000:]}")
    print(res.stdout)
    rep = json.loads((out_dir / "report.json").read_text())
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    rep["command"] = "adstream " + " ".join(cmd[3:])
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="7,11,23,42,99")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--duration", type=float, default=2000.0)
    p.add_argument("--rps", type=float, default=10.0)
    p.add_argument("--holdout", type=float, default=0.3)
    p.add_argument("--cr-lrs", default="0.05", help="creative-ranker learning rates tried on validation")
    p.add_argument("--ste", default="copy", choices=["copy", "interp", "none"], help="JAC's straight-through form")
    p.add_argument("--datasets", default="world,obd")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "creative_quality.json"))
    args = p.parse_args(argv)
    args.cr_lrs = [float(x) for x in args.cr_lrs.split(",")]
    sets = set(args.datasets.split(","))
    result: dict = {"command": "python bench/bench_creative_quality.py " + " ".join(argv or sys.argv[1:]),
                    "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if "world" in sets:
        reports = {}
        for s in [int(x) for x in args.worlds.split(",")]:
            reports[s] = run_world(s, args)
            r = reports[s]["rankers"]
            print(f"world {s}: " + ", ".join(f"{k} {r[k]['nsctr']:.4f}" for k in RANKERS if k in r)
                  + f" | cold cr {reports[s]['cold']['cr']['nsctr']:.4f} cr+ {reports[s]['cold']['cr+']['nsctr']:.4f}"
                  f" beta {reports[s]['cold']['beta']['nsctr']:.4f} ({reports[s]['seconds']} s)", flush=True)
        result["world"] = {"summary": summarise(list(reports.values())), "per_world": reports}
        print(json.dumps(result["world"]["summary"], indent=1))
    if "obd" in sets:
        root = Path(args.data_dir) / "obd"
        if not root.is_dir():
            print(f"obd: no data under {root}, skipped")
        else:
            result["obd"] = {}
            with tempfile.TemporaryDirectory() as tmp:
                for camp, f in obd_files(root, Path(tmp)).items():
                    for h in (0.0, args.holdout):
                        key = f"{camp}" + (f"_holdout{h:g}" if h else "")
                        result["obd"][key] = run_obd(f, Path(tmp) / key, h, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=lambda o: None))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
