"""Cold-start and overall AUC per model (DACDR, DACDR trained on the target only, single-domain,
pooled) under the cold-start protocol (``models.crossdomain.evaluation``), side by side in one run.

Datasets:

- ``world``: the cross-domain synthetic world (three domains, target ``feed``), one world per seed
  (``--world-seeds``); mean ± sd across worlds;
- ``obd``: the Open Bandit Dataset sample, men and women campaigns as two domains (each the target in
  turn), ``--obd-seeds`` protocol seeds (cold users, initialisation); hyper-parameters chosen per
  model on a validation split (``--obd-grid``).

usage: python bench/bench_crossdomain.py [--world-seeds 1,2,3] [--obd-seeds 3] [--datasets world,obd]
       [--out bench/results/crossdomain.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from models.crossdomain.evaluation import (XDColumns, XDEvalConfig, format_table, prepare_frame, run_protocol,
                                           world_frame)

MODELS = ("dacdr", "dacdr-target", "single", "pooled")


def _agg(values: list[float]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v))}


def run_world(seeds: list[int], duration: float, cold_share: float, windows: int, models: tuple[str, ...]) -> dict:
    cols = XDColumns(item_features=["category"], context=["position", "query", "match"])
    per_seed = []
    for s in seeds:
        t0 = time.perf_counter()
        df = prepare_frame(world_frame(seed=s, duration_s=duration), cols)
        ec = XDEvalConfig(targets=["feed"], variants=models, seeds=1, cold_share=cold_share, windows=windows,
                          bootstrap=300)
        rep = run_protocol(df, cols, ec)
        print(f"world seed {s} ({time.perf_counter() - t0:.0f}s)\n{format_table(rep)}", flush=True)
        per_seed.append(rep)
    out_models = {}
    for m in models:
        out_models[m] = {k: _agg([r["targets"]["feed"]["runs"][m][0][k] for r in per_seed])
                     for k in ("auc_cold", "auc_overall", "auc_warm", "seconds")}
    diffs = {m: [r["targets"]["feed"]["cold_auc_minus_single_ci95"][m][0] for r in per_seed]
             for m in models if m != "single"}
    return {"world_seeds": seeds, "duration_s": duration, "rows": [r["rows"] for r in per_seed],
            "counts": [r["targets"]["feed"]["counts"][0] for r in per_seed], "models": out_models,
            "cold_auc_minus_single_ci95_per_world": diffs,
            "wins_vs_single_cold": {m: sum(r["targets"]["feed"]["runs"][m][0]["auc_cold"]
                                           > r["targets"]["feed"]["runs"]["single"][0]["auc_cold"] for r in per_seed)
                                    for m in models if m != "single"}}


def run_obd(seeds: int, grid: dict, windows: int, models: tuple[str, ...]) -> dict:
    from adstream.cmd_evaluate_crossdomain import obd_frame

    cols = XDColumns(item_features=["item_feature_1", "item_feature_2", "item_feature_3"], context=["position"])
    df = prepare_frame(obd_frame(), cols)
    ec = XDEvalConfig(variants=models, seeds=seeds, cold_share=0.3, windows=windows, grid=grid, bootstrap=500)
    t0 = time.perf_counter()
    rep = run_protocol(df, cols, ec)
    print(f"OBD ({time.perf_counter() - t0:.0f}s)\n{format_table(rep)}", flush=True)
    for t in rep["targets"].values():
        t.pop("runs", None)
    return rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="world,obd")
    p.add_argument("--world-seeds", default="1,2,3")
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--cold-share", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--obd-seeds", type=int, default=3)
    p.add_argument("--obd-grid", default="dense_lr=0.001,0.003")
    p.add_argument("--world-models", default=",".join(MODELS))
    p.add_argument("--obd-models", default="dacdr,single,pooled")
    p.add_argument("--out", default="bench/results/crossdomain.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from adstream.cmd_evaluate_crossdomain import parse_grid

    out: dict = {"command": "python bench/bench_crossdomain.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"), "models": list(MODELS)}
    ds = [d.strip() for d in a.datasets.split(",") if d.strip()]
    if "world" in ds:
        out["world"] = run_world([int(x) for x in a.world_seeds.split(",")], a.duration, a.cold_share, a.windows,
                                 tuple(a.world_models.split(",")))
    if "obd" in ds:
        out["obd"] = run_obd(a.obd_seeds, parse_grid(a.obd_grid), a.windows, tuple(a.obd_models.split(",")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
