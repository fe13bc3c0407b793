"""``adstream evaluate-creative``: offline creative-ranker evaluation (NSCTR) on any logged file.

Example (the synthetic world with creative content; see docs/creative.md)::

    adstream evaluate-creative --data examples.csv --ad-col ad_id --creative-col creative_id \\
        --label-col clicked --time-col event_time --position-col position \\
        --categorical user_id segment query category advertiser --creative-features cr_layout cr_colour \\
        --creative-numeric cr_text_len --out out/creative
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from core.errors import ConfigError


def _cols(values: list[str] | None) -> list[str]:
    """``--x a b`` and ``--x a,b`` (and repeats) -> [a, b]."""
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return list(dict.fromkeys(out))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate-creative",
        help="offline creative ranking (NSCTR): logged, Beta prior, CR and JAC's CR+ on a CSV/Parquet file",
        description=(
            "Train creative rankers on the earlier rows and score them on the later ones with NSCTR "
            "(Peri-CR, Algorithm 1), sCTR, AUC and GAUC; also the ad rankers AR and AR+ (AUC, GAUC). "
            "Hyper-parameters (Beta strength, passes) are chosen on a validation slice. Ads with a single "
            "creative are counted (every ranker matches them; 'NSCTR multi' leaves them out); creatives never "
            "shown before the test period are candidates, scored again on their own in the 'never-shown' "
            "block. Writes DIR/report.json and DIR/report.png and prints a table."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="FILE", help="CSV or Parquet file, one impression per row")
    p.add_argument("--ad-col", required=True, metavar="COL", help="the ad (the unit whose creative is chosen)")
    p.add_argument("--creative-col", required=True, metavar="COL", help="the creative that was shown")
    p.add_argument("--label-col", required=True, metavar="COL", help="click label (> 0 = click)")
    p.add_argument("--time-col", metavar="COL", help="event time (number or date); default: file order")
    p.add_argument("--position-col", metavar="COL", help="slot position (a feature of both rankers)")
    p.add_argument("--propensity-col", metavar="COL",
                   help="logging propensity of the shown creative: NSCTR weights matched impressions by 1/p")
    ext = {"nargs": "+", "action": "extend", "default": []}
    p.add_argument("--categorical", metavar="COL", **ext, help="context columns (user, query, ...): both rankers")
    p.add_argument("--numeric", metavar="COL", **ext, help="numeric context columns: both rankers")
    p.add_argument("--creative-features", metavar="COL", **ext,
                   help="creative content columns (categorical): the creative ranker only")
    p.add_argument("--creative-numeric", metavar="COL", **ext, help="numeric creative content columns")
    p.add_argument("--gauc-col", metavar="COL", help="GAUC groups (default: the ad column)")
    p.add_argument("--seeds", type=int, default=3, help="model seeds (mean ± std are reported)")
    p.add_argument("--test-frac", type=float, default=0.3, help="latest share of rows scored")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of the earlier rows used for validation")
    p.add_argument("--max-epochs", type=int, default=1,
                   help="passes over the training rows tried on validation (1 = one pass, as the stream trains)")
    p.add_argument("--holdout-creatives", type=float, default=0.0, metavar="FRAC",
                   help="share of creatives whose training rows are removed (never shown before the test)")
    p.add_argument("--unmatched", choices=["drop", "zero"], default="drop",
                   help="an ad the ranker never matches: left out of NSCTR, or counted with no clicks")
    p.add_argument("--ste", choices=["copy", "interp", "none"], default="copy",
                   help="straight-through gradient from CR to AR in JAC")
    p.add_argument("--quant-r", type=float, default=1000.0, help="r of the pCTR quantiser (Eq. 5)")
    p.add_argument("--buckets", type=int, default=64, help="K, pCTR buckets (Eq. 5)")
    p.add_argument("--pctr-source", choices=["cached", "ar", "fixed"], default="cached",
                   help="the ad pCTR CR+ sees when it runs in parallel with AR+ (cr+@ar always uses AR's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for report.json and report.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from models.creative.evaluate import CreativeColumns, EvalSettings, prepare, run_evaluation
    from models.creative.report import format_table, write_report
    from models.evaluation import read_table

    cols = CreativeColumns(ad=args.ad_col, creative=args.creative_col, label=args.label_col, time=args.time_col,
                           position=args.position_col, propensity=args.propensity_col,
                           categorical=_cols(args.categorical), numeric=_cols(args.numeric),
                           creative_features=_cols(args.creative_features),
                           creative_numeric=_cols(args.creative_numeric), gauc=args.gauc_col)
    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    es = EvalSettings(test_frac=args.test_frac, val_frac=args.val_frac, seeds=args.seeds, max_epochs=args.max_epochs,
                      holdout_creatives=args.holdout_creatives, unmatched=args.unmatched,
                      jac={"ste": args.ste, "quant_r": args.quant_r, "buckets": args.buckets,
                           "pctr_source": args.pctr_source})
    torch.set_num_threads(args.threads)
    df = prepare(read_table(args.data), cols)
    report = run_evaluation(df, cols, es, progress=lambda m: print(f"evaluate-creative: {m}", file=sys.stderr,
                                                                   flush=True))
    jpath, ppath = write_report(report, args.out, title=f"{args.data}: creative rankers")
    print(format_table(report))
    print(f"wrote {jpath} and {ppath}")
    return 0
