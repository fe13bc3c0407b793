"""``adstream evaluate-rewrite`` / ``evaluate-retrieval``: MoBGM and GRAM offline (docs/rewrite.md).

Examples::

    adstream evaluate-rewrite --synthetic --seeds 3 --out out/rewrite
    adstream evaluate-rewrite --data wands/query.csv --query-col query --target-col query_class --out out/wands
    adstream evaluate-retrieval --synthetic --seeds 3 --out out/retrieval
    adstream evaluate-retrieval --data esci_us_judgments_flat.csv --query-col query --item-col product_asin \\
        --label-col esci_label --positive E --out out/esci
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)

REWRITE_EPILOG = """\
Each seed trains, on the same training split and tokenizer: SFT-only, SFT + post-pre-training
(query <-> title pairs; needs --title-col on a file) and the aligned generator (+ discriminator + DPO),
and measures them beside the index rewriter on held-out queries in three decoding modes: free (raw
generator), trie (through the live bidword inventory) and served (trie + final re-rank by R).
Metrics: relevance rate and relevance@1, authenticity rate (outputs that are live bidwords),
expected revenue, coverage, distinct-2 and the oracle combined score R*. On a file the judge is the
file itself (a gold target = synonym, a word subset/superset of one = hypernym/hyponym).
Writes DIR/report.json (every seed and mean ± std) and DIR/report.png; prints tables.
"""

RETRIEVAL_EPILOG = """\
Recall@K of the bidword index (items whose bidwords' words are all in the query), GRAM (generated
codes -> inverted index -> S_rele scoring) and their union (round-robin interleave, deduplicated), on
held-out queries, also on the slices tail and no_literal (queries that match no bidword literally).
On a file, item text is --text-col or the training queries linked to the item, the category
--category-col or the text's last word, bidwords --bidword-col or the linked training queries.
"""


def _common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help="CSV/TSV/Parquet/JSONL file of (query, target) rows")
    src.add_argument("--synthetic", action="store_true", help="the synthetic world with the lexicon on")
    p.add_argument("--query-col", metavar="COL", help="query column (with --data)")
    p.add_argument("--label-col", metavar="COL", help="keep only rows whose label is in --positive")
    p.add_argument("--positive", default="", metavar="A,B", help="label values that count as relevant")
    p.add_argument("--weight-col", metavar="COL", help="clicks per row (default 1)")
    p.add_argument("--seeds", default="1", metavar="N|A,B", help="number of seeds (1..N) or a comma list")
    p.add_argument("--test-share", type=float, default=0.3, help="share of queries held out for test (file)")
    p.add_argument("--valid-share", type=float, default=0.1, help="share of queries for validation (file)")
    p.add_argument("--duration", type=float, default=3 * 3600.0, metavar="S", help="synthetic stream length")
    p.add_argument("--rps", type=float, default=5.0, help="synthetic requests per second")
    p.add_argument("--epochs-scale", type=float, default=1.0, metavar="X", help="scale every epoch count (quick runs)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (report.json, report.png)")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate-rewrite", help="MoBGM bidword rewriting vs the index rewriter, offline",
                              description="Train and compare the bidword rewriters on held-out queries.",
                              epilog=REWRITE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--target-col", metavar="COL", help="target (bidword) column (with --data)")
    p.add_argument("--title-col", metavar="COL", help="clicked item title: post-pre-training pairs (file)")
    p.add_argument("--bid-col", metavar="COL", help="bid per row: revenue = clicks x bid (default 1)")
    p.add_argument("--inventory", metavar="FILE", help="live bidwords, one per line (default: every target)")
    p.add_argument("--k", type=int, default=3, help="outputs per query")
    p.set_defaults(func=_run_rewrite)
    p = subparsers.add_parser("evaluate-retrieval", help="GRAM vs the bidword index: Recall@K, offline",
                              description="Train GRAM and compare Recall@K of the index, GRAM and their union.",
                              epilog=RETRIEVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--item-col", metavar="COL", help="item (ad / product) id column (with --data)")
    p.add_argument("--text-col", metavar="COL", help="item text (title) column")
    p.add_argument("--category-col", metavar="COL", help="item category column")
    p.add_argument("--bidword-col", metavar="COL", help="item bidword column")
    p.add_argument("--ks", default="5,10,20", metavar="K,K", help="cut-offs of Recall@K")
    p.set_defaults(func=_run_retrieval)


def _seeds(s: str) -> list[int]:
    try:
        if "," in s:
            return [int(x) for x in s.split(",") if x.strip()]
        n = int(s)
    except ValueError:
        raise ConfigError(f"--seeds takes a number or a comma list, not {s!r}") from None
    if n < 1:
        raise ConfigError("--seeds must be >= 1")
    return list(range(1, n + 1))


def _say(args) -> Any:
    t0 = time.perf_counter()
    if args.no_progress:
        return lambda s: log.info(s)
    return lambda s: print(f"  [{time.perf_counter() - t0:6.0f}s] {s}", file=sys.stderr, flush=True)


def _need(args, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n, None)]
    if missing:
        raise ConfigError(f"--data needs {', '.join(missing)}")


def _scaled(cfg, x: float):
    from dataclasses import replace

    if x == 1.0:
        return cfg
    fields = {f: max(1, int(round(getattr(cfg, f) * x))) for f in ("ppt_epochs", "sft_epochs", "dpo_epochs", "epochs")
              if hasattr(cfg, f)}
    if hasattr(cfg, "disc"):
        fields["disc"] = replace(cfg.disc, epochs=max(1, int(round(cfg.disc.epochs * x))))
    return replace(cfg, **fields)


def _run_rewrite(args: argparse.Namespace) -> int:
    import torch

    from models.rewrite.experiments import run_rewrite, synthetic_rewrite_data
    from models.rewrite.filedata import file_rewrite_data, read_table
    from models.rewrite.mobgm import MoBGMConfig
    from models.rewrite.report import rewrite_png, rewrite_table, summarize_rewrite

    torch.set_num_threads(1)
    if args.k < 1:
        raise ConfigError("--k must be >= 1")
    seeds = _seeds(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = None
    if args.data:
        _need(args, "query_col", "target_col")
        df = read_table(args.data)
        inventory = None
        if args.inventory:
            p = Path(args.inventory)
            if not p.is_file():
                raise ConfigError(f"no such inventory file: {p}")
            inventory = [x.strip() for x in p.read_text().splitlines() if x.strip()]
    say = _say(args)
    runs = []
    for seed in seeds:
        say(f"seed {seed}: preparing data")
        if df is not None:
            data = file_rewrite_data(df, args.query_col, args.target_col, seed=seed, title_col=args.title_col,
                                     label_col=args.label_col, positive=[x for x in args.positive.split(",") if x],
                                     weight_col=args.weight_col, bid_col=args.bid_col, inventory=inventory,
                                     test=args.test_share, valid=args.valid_share, name=Path(args.data).name)
        else:
            data = synthetic_rewrite_data(seed, args.duration, args.rps)
        cfg = _scaled(MoBGMConfig(seed=seed), args.epochs_scale)
        runs.append(run_rewrite(data, cfg, k=args.k, progress=lambda s, seed=seed: say(f"seed {seed}: {s}")))
    summary = summarize_rewrite(runs)
    name = Path(args.data).name if args.data else "synthetic world"
    report = {"command": "evaluate-rewrite", "data": name, "seeds": seeds, "k": args.k, "summary": summary,
              "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    rewrite_png(summary, out / "report.png", f"evaluate-rewrite: {name} ({len(seeds)} seeds, served mode)")
    for sl in next(iter(summary.values()))["served"]:
        print(rewrite_table(summary, sl))
        print()
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return 0


def _run_retrieval(args: argparse.Namespace) -> int:
    import torch

    from models.rewrite.experiments import run_retrieval, synthetic_retrieval_data
    from models.rewrite.filedata import file_retrieval_data, read_table
    from models.rewrite.gram import GramConfig
    from models.rewrite.report import retrieval_png, retrieval_table, summarize_retrieval

    torch.set_num_threads(1)
    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--ks takes a comma list of numbers, not {args.ks!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError("--ks needs numbers >= 1")
    seeds = _seeds(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = None
    if args.data:
        _need(args, "query_col", "item_col")
        df = read_table(args.data)
    say = _say(args)
    runs = []
    for seed in seeds:
        say(f"seed {seed}: preparing data")
        if df is not None:
            data = file_retrieval_data(df, args.query_col, args.item_col, seed=seed, text_col=args.text_col,
                                       category_col=args.category_col, bidword_col=args.bidword_col,
                                       label_col=args.label_col, positive=[x for x in args.positive.split(",") if x],
                                       weight_col=args.weight_col, test=args.test_share, valid=args.valid_share,
                                       name=Path(args.data).name)
        else:
            data = synthetic_retrieval_data(seed, args.duration, args.rps)
        cfg = _scaled(GramConfig(seed=seed), args.epochs_scale)
        runs.append(run_retrieval(data, cfg, ks, progress=lambda s, seed=seed: say(f"seed {seed}: {s}")))
    summary = summarize_retrieval(runs)
    name = Path(args.data).name if args.data else "synthetic world"
    report = {"command": "evaluate-retrieval", "data": name, "seeds": seeds, "ks": ks, "summary": summary, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    retrieval_png(summary, ks, out / "report.png", f"evaluate-retrieval: {name} ({len(seeds)} seeds)")
    print(retrieval_table(summary, ks))
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return 0
