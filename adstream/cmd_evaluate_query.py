"""``adstream evaluate-query``: SSUF / SMGCN / the plain encoder on any file of short texts and labels.

Example::

    adstream evaluate-query --train train.csv --test test.csv --text-col query --label-col labels \\
        --label-sep '|' --variants baseline,smgcn,ssuf --seeds 3 --out out/query
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate-query",
        help="evaluate query classifiers (plain encoder, SMGCN, SSUF) on a CSV/TSV of texts and labels",
        description=(
            "Train every variant on --train (a validation split is held out of it for early stopping, "
            "the threshold and an equal-budget hyper-parameter search) and score it on --test: "
            "micro-F1, macro-F1 and tail macro-F1 (the rarest half of the labels by training count), "
            "mean ± std over seeds. Writes DIR/report.json and DIR/report.png and prints a table. "
            "Variants: baseline, label, semi, gcn, smgcn, ssuf; remove or add modules with -/+ "
            "(ssuf-ke, ssuf-hier, smgcn+hier; modules ke, le, semi, se, label, coo, sim, hier); "
            "counts: the serving fallback's rule (query words vote for the labels of the training rows "
            "that contain them), no encoder."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--train", required=True, metavar="FILE", help="CSV/TSV with a text and a label column")
    p.add_argument("--test", required=True, metavar="FILE", help="CSV/TSV scored once per variant and seed")
    p.add_argument("--val", metavar="FILE", help="validation file (without it, --val-fraction of --train is held out)")
    p.add_argument("--text-col", required=True, metavar="COL")
    p.add_argument("--label-col", required=True, metavar="COL")
    p.add_argument("--test-label-col", metavar="COL", help="label column of --test/--val (default --label-col)")
    p.add_argument("--label-sep", metavar="SEP", help="separator of several labels in one cell (multi-label)")
    p.add_argument("--hierarchy-sep", metavar="SEP",
                   help="label ids are paths (e.g. '/' or ' > '): their prefixes form the hierarchy graph")
    p.add_argument("--knowledge-cols", metavar="A,B",
                   help="columns with click statistics per row (items separated by '|'); default: columns "
                        "named knowledge*/clicked_categories/clicked_brands/clicked_titles; 'none' to ignore")
    p.add_argument("--label-info", metavar="FILE", help="CSV label,text: side information per label (LE module)")
    p.add_argument("--variants", default="counts,baseline,smgcn,ssuf", help="comma list of variants")
    p.add_argument("--seeds", type=int, default=3, help="repetitions (splits and initialisations)")
    p.add_argument("--trials", type=int, default=6, help="hyper-parameter settings tried per variant and seed")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--select", choices=["macro_f1", "micro_f1", "mean"], default="macro_f1",
                   help="validation metric that picks the hyper-parameters and the threshold")
    p.add_argument("--encoder", choices=["adapter", "minilm-ft", "tiny-bert"], default="adapter",
                   help="shared encoder: frozen features + adapter, MiniLM fine-tuned, or a small BERT from scratch")
    p.add_argument("--features", choices=["minilm", "hash"], default="minilm",
                   help="frozen features of the adapter encoder (minilm: the packaged MiniLM, offline)")
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for report.json and report.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from models.query.data import read_label_info, read_table
    from models.query.encoder import EncoderSpec, MiniLMFeatures, make_features
    from models.query.evaluate import EvalConfig, evaluate, format_table, write_report

    variants = tuple(_csv(args.variants))
    spec = EncoderSpec(kind=args.encoder, features=args.features)
    ec = EvalConfig(variants=variants, seeds=args.seeds, trials=args.trials, val_fraction=args.val_fraction,
                    select=args.select, hierarchy_sep=args.hierarchy_sep, encoder=spec, max_epochs=args.max_epochs)
    ec.validate()
    kcols = None if args.knowledge_cols is None else ([] if args.knowledge_cols == "none" else _csv(args.knowledge_cols))
    test_col = args.test_label_col or args.label_col
    train = read_table(args.train, args.text_col, args.label_col, args.label_sep, kcols, encoding=args.encoding)
    test = read_table(args.test, args.text_col, test_col, args.label_sep, kcols, encoding=args.encoding)
    val = read_table(args.val, args.text_col, test_col, args.label_sep, kcols, encoding=args.encoding) if args.val else None
    info = read_label_info(args.label_info, args.encoding) if args.label_info else None
    for t in (train, test, val):
        if t is not None and t.skipped:
            log.warning("%s: skipped rows %s", t.source, t.skipped)
    if train.knowledge is None and any("ke" in v or v.startswith("ssuf") for v in variants):
        print("knowledge module: off (no click statistics in the files: no knowledge columns)", file=sys.stderr)
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[str, np.ndarray] = {}
    cache_file = out / "embedding-cache.npz"
    if spec.kind == "adapter" and spec.features == "minilm" and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            cache = dict(zip(z["texts"].tolist(), z["vectors"]))
    features = MiniLMFeatures(cache=cache) if spec.features == "minilm" else make_features(spec.features)
    total = ec.seeds * len(variants) * ec.trials
    with tqdm(total=total, desc="evaluate-query", unit="fit", file=sys.stderr, disable=args.no_progress) as bar:
        report = evaluate(train, test, ec, features=features if spec.kind == "adapter" else None, val=val,
                          label_info=info, progress=bar.update)
    if cache:
        texts = list(cache)
        np.savez(cache_file, texts=np.array(texts), vectors=np.stack([cache[t] for t in texts]))
    report["data"].update({"train": str(args.train), "test": str(args.test)})
    jpath, ppath = write_report(report, out, title=f"{Path(args.test).name}: {', '.join(variants)}")
    print(format_table(report))
    print(f"wrote {jpath} and {ppath}")
    return 0
