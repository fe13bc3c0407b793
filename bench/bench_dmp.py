"""DistributedModelParallel scale-out: 1 vs 2 processes (gloo, CPU) vs the single-process learner.

One run, same data and settings for every row: the synthetic drift world (``core.world``, 13
categorical fields = 13 embedding tables, 3 numeric), the incremental protocol (8 periods, warm
start 2), strategies ``finetune`` and ``ddp-mp``:

- ``single``: ``models.evaluation.run_protocol`` in this process (``CTRLearner``, fused
  embedding collection, no torch.distributed);
- ``dmp-1``: ``adstream train-dist --nproc 1`` (table-wise, everything on rank 0);
- ``dmp-2-tw``: ``--nproc 2 --sharding table_wise``;
- ``dmp-2-cw``: ``--nproc 2 --sharding column_wise``.

Reports mean next-period AUC/LogLoss, training seconds (the protocol's training time on rank 0),
the protocol time and the job's wall time (process start, imports and sharding included). Writes
``bench/results/dmp.json``.

usage: PYTHONPATH=. python bench/bench_dmp.py [--rps 2.0] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adstream.cmd_train_dist import launch
from models.evaluation import Columns, EvalConfig, prepare_frame, run_protocol

STRATEGIES = ["finetune", "ddp-mp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rps", type=float, default=2.0, help="world requests per second (2.0 = ~57k examples)")
    ap.add_argument("--periods", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/dmp.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from core.world import World, WorldConfig, example_columns

    w = World(WorldConfig(seed=7))
    df = w.to_examples_frame(duration_s=w.config.drift.horizon_s, requests_per_s=args.rps)
    c = example_columns()
    cols = Columns(c["time_col"], c["label_col"], list(c["categorical"]), list(c["numeric"]))
    df = prepare_frame(df, cols)
    # the settings as given (no search), one seed, and what DMP supports for every strategy alike
    ec = dict(periods=args.periods, strategies=STRATEGIES, warm_start=2, batch_size=args.batch_size,
              embedding_dim=8, capacity=1 << 13, search_trials=0, seeds=1, first_order=False, mp_adapt="off",
              mp_lambda_mode="const")  # fmt: skip
    results: dict[str, Any] = {"examples": len(df), "tables": len(cols.categorical), "settings": ec, "rows": {}}

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rep, _ = run_protocol(df, cols, EvalConfig(**{**ec, "strategies": tuple(STRATEGIES)}))
    results["rows"]["single"] = _row(rep, time.perf_counter() - t0, None)
    print("single", results["rows"]["single"])

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "world.parquet"
        df.to_parquet(data)
        for name, nproc, sharding in (("dmp-1", 1, "table_wise"), ("dmp-2-tw", 2, "table_wise"), ("dmp-2-cw", 2, "column_wise")):
            spec = {
                "data": str(data), "out": str(Path(tmp) / name), "backend": "gloo", "sharding": sharding,
                "planner": "manual", "threads": args.threads,
                "columns": {"time": cols.time, "label": cols.label, "categorical": cols.categorical, "numeric": cols.numeric},
                "eval": ec,
            }  # fmt: skip
            r = launch(spec, nproc, echo=False)
            results["rows"][name] = _row(r, r["dist"]["wall_seconds"], r["dist"])
            print(name, results["rows"][name])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def _row(rep: dict[str, Any], wall: float, d: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"wall_seconds": round(wall, 1)}
    for s in STRATEGIES:
        r = rep["strategies"][s]
        row[s] = {"mean_auc": round(r["mean_auc"], 4), "mean_logloss": round(r["mean_logloss"], 4),
                  "train_seconds": round(r["train_seconds"], 2)}  # fmt: skip
    if d is not None:
        row["protocol_seconds"] = round(d["protocol_seconds"], 1)
        row["world_size"] = d["world_size"]
        row["sharding"] = d["sharding"]
        row["tables_per_rank"] = [sorted(x["shards"]) for x in d["ranks"]["finetune/seed0"]]
    return row


if __name__ == "__main__":
    main()
