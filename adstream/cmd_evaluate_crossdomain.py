"""``adstream evaluate-crossdomain``: the cold-start protocol (DACDR vs a single-domain model) on any file.

Example::

    adstream evaluate-crossdomain --data clicks.parquet --user-col user_id --item-col ad_id \\
        --domain-col domain --label-col clicked --time-col event_time --item-features category \\
        --target feed --seeds 3 --out out/xd

``--data obd`` builds the file from the Open Bandit Dataset (men and women campaigns as two
domains); ``--data synthetic`` from the cross-domain synthetic world (``--world-seed``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate-crossdomain",
        help="cold-start evaluation of cross-domain CTR models (DACDR vs single-domain) on a file",
        description=(
            "Sort by time; the last --test-share is the test period. A share of the users active in the "
            "target domain and elsewhere are cold-start users: their target-domain rows are hidden from "
            "training and from every history. Each model learns the training period window by window, "
            "then predicts the test period. Writes DIR/report.json and DIR/report.png (AUC on cold-start "
            "users and overall, mean ± sd over seeds) and prints a table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="FILE",
                   help="CSV/Parquet file (one impression per row); 'obd' or 'synthetic' build one")
    p.add_argument("--user-col", default="user_id", metavar="COL")
    p.add_argument("--item-col", default="ad_id", metavar="COL")
    p.add_argument("--domain-col", default="domain", metavar="COL")
    p.add_argument("--label-col", default="clicked", metavar="COL", help="0/1 click label")
    p.add_argument("--time-col", default="event_time", metavar="COL", help="epoch seconds or a date/time")
    p.add_argument("--item-features", default="", metavar="A,B",
                   help="item-side categorical columns (shared by every domain, part of a history item)")
    p.add_argument("--categorical", default="", metavar="X,Y", help="request-side categorical columns")
    p.add_argument("--target", default="", metavar="D1,D2", help="target domain(s); default: every domain in turn")
    p.add_argument("--models", default="dacdr,single,pooled", help="comma list of: dacdr, dacdr-target, single, pooled")
    p.add_argument("--seeds", type=int, default=3, help="repetitions (cold users and initialisation)")
    p.add_argument("--test-share", type=float, default=0.2, help="last share of rows (by time) tested on")
    p.add_argument("--cold-share", type=float, default=0.3, help="share of eligible overlapping users made cold")
    p.add_argument("--windows", type=int, default=10, help="incremental training windows")
    p.add_argument("--epochs", type=int, default=1, help="passes over each window")
    p.add_argument("--dim", type=int, default=16, help="embedding size")
    p.add_argument("--max-len", type=int, default=20, help="items per (domain, behaviour) history")
    p.add_argument("--domain-level", choices=["types", "items"], default="types",
                   help="step-1 attention over behaviour groups (reading 1a) or over items (1b)")
    p.add_argument("--grid", default="", metavar="K=V1,V2;K2=...",
                   help="hyper-parameters chosen per model on a validation split, e.g. 'dense_lr=0.001,0.003'")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the cold-AUC difference")
    p.add_argument("--world-seed", type=int, default=7, help="with --data synthetic")
    p.add_argument("--duration", type=float, default=7200.0, help="with --data synthetic: seconds of traffic")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for report.json and report.png")
    p.set_defaults(func=run)


def parse_grid(spec: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--grid part {part!r} is not KEY=V1,V2")
        k, vals = part.split("=", 1)
        parsed: list[Any] = []
        for v in _csv(vals):
            try:
                parsed.append(int(v))
            except ValueError:
                try:
                    parsed.append(float(v))
                except ValueError:
                    parsed.append(v)
        if not parsed:
            raise ConfigError(f"--grid {k.strip()!r} has no values")
        out[k.strip()] = parsed
    return out


def obd_frame(data_dir: str | None = None):
    """OBD (both policies, men and women) as one impression per row: user, item, domain, label, time."""
    import pandas as pd

    from core.events import Click, Impression
    from streams.sources import obd_events

    rows, clicked = [], set()
    for ev in obd_events("all", data_dir=data_dir):
        if isinstance(ev, Impression):
            f = ev.features
            rows.append({"request_id": ev.request_id, "event_time": ev.event_time, "user_id": ev.user_id,
                         "ad_id": ev.ad_id, "domain": ev.domain, "position": str(ev.position),
                         "item_feature_1": f.get("item_feature_1"), "item_feature_2": f.get("item_feature_2"),
                         "item_feature_3": f.get("item_feature_3")})
        elif isinstance(ev, Click):
            clicked.add(ev.request_id)
    df = pd.DataFrame(rows)
    df["clicked"] = df["request_id"].isin(clicked).astype(int)
    return df


def run(args: argparse.Namespace) -> int:
    from models.crossdomain.frame import XDColumns, XDEvalConfig, prepare_frame

    models = tuple(_csv(args.models))
    ec = XDEvalConfig(targets=_csv(args.target) or None, variants=models, seeds=args.seeds,
                      test_share=args.test_share, cold_share=args.cold_share, windows=args.windows,
                      bootstrap=args.bootstrap, grid=parse_grid(args.grid),
                      model={"epochs": args.epochs, "dim": args.dim, "max_len": args.max_len,
                             "domain_level": args.domain_level})
    ec.validate()
    if args.dim < 2 or args.dim % 2:
        raise ConfigError("--dim must be an even number >= 2 (two attention heads)")
    cols = XDColumns(args.user_col, args.item_col, args.domain_col, args.label_col, args.time_col,
                     _csv(args.item_features), _csv(args.categorical))
    # the data is read and checked before torch is imported: a bad file fails at once
    if args.data == "obd":
        raw = obd_frame()
    elif args.data == "synthetic":
        from models.crossdomain.evaluation import world_frame

        raw = world_frame(seed=args.world_seed, duration_s=args.duration)
    else:
        from streams.sources import read_table

        raw = read_table(args.data)
    df = prepare_frame(raw, cols)
    unknown = [t for t in (ec.targets or []) if t not in set(df["domain"])]
    if unknown:
        raise ConfigError(f"target domain(s) {unknown} are not in the data (domains: {sorted(set(df['domain']))})")

    import torch
    from tqdm import tqdm

    from models.crossdomain.evaluation import format_table, run_protocol, write_report

    torch.set_num_threads(max(1, args.threads))
    n_targets = len(ec.targets or df["domain"].unique())
    with tqdm(total=n_targets * ec.seeds * len(models), desc="evaluate-crossdomain", unit="model",
              file=sys.stderr) as bar:
        report = run_protocol(df, cols, ec, progress=bar.update)
    report["data"] = args.data
    jpath, ppath = write_report(report, args.out, title=f"cold-start AUC: {args.data}")
    print(format_table(report))
    print(f"wrote {jpath} and {ppath}")
    return 0
