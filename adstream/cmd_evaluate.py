"""``adstream evaluate-ctr``: the offline incremental-learning protocol on any labelled file.

Example::

    adstream evaluate-ctr --data clicks.parquet --time-col event_time --label-col clicked \\
        --categorical user_id,ad_id,query --numeric bid --periods 10 \\
        --strategies retrain,finetune,distill,ddp-fp,ddp-mp,ddp --out out/eval
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGY_HELP = "retrain, finetune, distill, ddp-fp, ddp-mp, ddp"


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate-ctr",
        help="offline incremental CTR evaluation (DDP vs baselines) on a CSV/Parquet file",
        description=(
            "Sort by time, split into N equal-count periods, warm start on the first K, then for each "
            "later period t train on t and score AUC/LogLoss on t+1 (never seen). Every strategy's "
            "hyper-parameters are chosen by the same budgeted search (--search-trials) on the "
            "--val-periods periods after the warm start; the later (test) periods are reported, over "
            "--seeds seeds, with paired differences against fine-tuning and bootstrap 95%% intervals. "
            "Writes DIR/report.json and DIR/report.png and prints a table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="FILE", help="CSV or Parquet file, one example per row")
    p.add_argument("--time-col", required=True, metavar="COL", help="event time (number or date/time)")
    p.add_argument("--label-col", required=True, metavar="COL", help="click label (> 0 = click)")
    p.add_argument("--categorical", default="", metavar="A,B", help="categorical id columns (any value type)")
    p.add_argument("--numeric", default="", metavar="X,Y", help="numeric columns (standardised on training data)")
    p.add_argument("--periods", type=int, default=10, help="number of equal-count time periods")
    p.add_argument("--strategies", default=",".join(["finetune", "ddp"]), help=f"comma list of: {STRATEGY_HELP}")
    p.add_argument("--seeds", type=int, default=3, help="repetitions with different seeds (mean ± std reported)")
    p.add_argument("--warm-start", type=int, default=2, metavar="K", help="periods used for the warm start")
    p.add_argument("--val-periods", type=int, default=2, metavar="V",
                   help="periods after the warm start that score the search's trials (never reported)")
    p.add_argument("--search-trials", type=int, default=8, metavar="B",
                   help="trials per strategy (the same budget for every strategy); 0 = use the settings below as given")
    p.add_argument("--retrain-mode", choices=["expanding", "sliding"], default="sliding",
                   help="retrain on all periods so far or on the last W (searched unless --search-trials 0)")
    p.add_argument("--retrain-window", type=int, default=None, metavar="W", help="sliding retrain window (default K)")
    p.add_argument("--no-shuffle", action="store_true", help="train each window in time order instead of shuffled")
    p.add_argument("--backbone", choices=["deepfm", "dcn"], default="deepfm")
    p.add_argument("--epochs", type=int, default=1, help="passes over each period")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--capacity", type=int, default=1 << 15, help="embedding rows per categorical column")
    p.add_argument("--admission", type=int, default=1, help="sightings before a value gets its own row")
    p.add_argument("--emb-lr", type=float, default=0.05, help="fused RowWiseAdagrad learning rate")
    p.add_argument("--dense-lr", type=float, default=0.01, help="dense Adagrad learning rate")
    p.add_argument("--no-first-order", action="store_true", help="drop the per-value bias term (all strategies)")
    p.add_argument("--fp", choices=["learned", "count"], default="count", help="Feature Prior variant")
    p.add_argument("--fp-use", choices=["input", "logit", "both"], default="both", help="where the prior enters")
    p.add_argument("--fp-weight", type=float, default=0.2, help="weight of the learned prior's auxiliary loss")
    p.add_argument("--fp-strength", type=float, default=20.0, help="count prior: pseudo-impressions at the field CTR")
    p.add_argument("--mp", choices=["posterior", "kl", "logit"], default="posterior", help="Model Prior form")
    p.add_argument("--mp-lambda", type=float, default=1.0, help="Model Prior strength λ")
    p.add_argument("--lambda-mode", choices=["const", "count", "evidence"], default="evidence",
                   help="per-example λ: constant, saturating in the values' past sightings, or λ·(past/window sightings)")
    p.add_argument("--mp-decay", type=float, default=0.5,
                   help="evidence mode: past sightings fade by this factor per window (1 = never forget)")
    p.add_argument("--mp-adapt", choices=["off", "pv"], default="pv",
                   help="pv: scale λ per window by progressive validation of the previous update (0 = fine-tuning)")
    p.add_argument("--prior-check", choices=["ci", "off"], default="ci",
                   help="ci: ddp keeps its prior only if it beats the same settings without a prior on the "
                   "validation periods (paired bootstrap 95%% interval above 0); otherwise it falls back to fine-tuning")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-temperature", type=float, default=2.0,
                   help="softening temperature T (at T=1 distillation equals the constant-λ posterior Model Prior)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy machine)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for report.json and report.png")
    p.set_defaults(func=run)


def eval_config(args: argparse.Namespace, strategies: tuple[str, ...]) -> Any:
    from models.evaluation import EvalConfig

    return EvalConfig(
        periods=args.periods,
        strategies=strategies,
        seeds=args.seeds,
        warm_start=args.warm_start,
        val_periods=args.val_periods,
        search_trials=args.search_trials,
        retrain_mode=args.retrain_mode,
        retrain_window=args.retrain_window,
        shuffle=not args.no_shuffle,
        epochs=args.epochs,
        batch_size=args.batch_size,
        backbone=args.backbone,
        embedding_dim=args.embedding_dim,
        capacity=args.capacity,
        admission=args.admission,
        emb_lr=args.emb_lr,
        dense_lr=args.dense_lr,
        first_order=not args.no_first_order,
        fp=args.fp,
        fp_use=args.fp_use,
        fp_weight=args.fp_weight,
        fp_strength=args.fp_strength,
        mp=args.mp,
        mp_lambda=args.mp_lambda,
        mp_lambda_mode=args.lambda_mode,
        mp_count_decay=args.mp_decay,
        mp_adapt=args.mp_adapt,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        prior_check=args.prior_check,
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from models.evaluation import STRATEGIES, Columns, format_table, load_frame, protocol_steps, run_protocol, write_report

    strategies = tuple(_csv(args.strategies))
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ConfigError(f"unknown or empty --strategies {unknown or ''}; choose from {STRATEGY_HELP}")
    cols = Columns(args.time_col, args.label_col, _csv(args.categorical), _csv(args.numeric))
    ec = eval_config(args, strategies)
    ec.validate()
    if args.capacity < 2:
        raise ConfigError("--capacity must be >= 2")
    torch.set_num_threads(max(1, args.threads))
    df = load_frame(args.data, cols)
    with tqdm(total=protocol_steps(ec), desc="evaluate-ctr", unit="run", file=sys.stderr) as bar:
        report, _ = run_protocol(df, cols, ec, progress=bar.update)
    report["data"] = {"file": str(args.data), "rows": len(df), "clicks": int((df[cols.label] > 0).sum())}
    jpath, ppath = write_report(report, args.out, title=f"{args.data} ({args.backbone})")
    print(format_table(report))
    print(f"test periods {report['periods']}; validation periods {report['validation_periods']} (search only)")
    print(f"wrote {jpath} and {ppath}")
    return 0
