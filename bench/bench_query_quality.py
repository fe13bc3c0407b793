"""Query-classification quality: every variant on every labelled set at hand, several seeds.

Datasets (each skipped with a message when absent):

- ``synthetic``: :mod:`core.query_world` (48 leaves, 2,500 queries, gold intent sets, Matthew-effect
  clicks): train on click labels, a small gold-labelled dev set picks hyper-parameters, test on
  gold; posterior knowledge from the clicks; catalogue product words as label side information.
  One world per seed (the world seed is the split seed).
- ``wands``: WANDS ``query.csv`` (``../shared/data/wands``, 474 labelled queries, 188 classes):
  75/25 train/test per seed (a 20% validation split is held out of train); no hierarchy, no clicks.
- ``bestbuy``: the Best Buy category tree (``../shared/data/bestbuy_categories``): category names
  at depth >= 3 of the product roots classified into their depth-2 category (``root > child``, the
  root forms the hierarchy graph); 75/25 per seed. Navigation roots (Name Brands, More Categories,
  Geek Squad, ...) are left out.

ESCI (``../shared/data/esci``) has queries and product ids but no categories or product text: no
label to evaluate against, so it is listed as skipped.

Every dataset goes through :func:`models.query.evaluate.evaluate` (the code of ``adstream
evaluate-query``). Writes per dataset and variant the mean ± std over seeds of micro-, macro-,
tail-, seen- and unseen-label macro-F1, the zero-shot Recall@1/5, and the chosen settings. A run
of other variants on the same splits (same seeds) adds them to the dataset's earlier results; each
variant records the command that produced it. ``counts`` is the counts baseline
(``models/query/counts.py``).

usage: python bench/bench_query_quality.py [--datasets synthetic,wands,bestbuy] [--seeds 3]
       [--trials 4] [--variants ...] [--out bench/results/query_quality.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.query.data import Table  # noqa: E402
from models.query.encoder import EncoderSpec, MiniLMFeatures  # noqa: E402
from models.query.evaluate import METRICS, EvalConfig, evaluate, format_table  # noqa: E402

log = logging.getLogger("bench_query_quality")
NAV_ROOTS = {"Name Brands", "More Categories", "Geek Squad", "Customer Service", "Best Buy Outlet",
             "Best Buy For Business", "Gift Ideas", "Best Buy Gift Cards", "AppleCare", "Best Buy",
             "Magnolia Home Theater", "AF TestingTemplate", "Amazon Fire"}


def shared_data() -> Path:
    return Path(os.environ.get("ADSTREAM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def split(t: Table, seed: int, test: float = 0.25) -> tuple[Table, Table]:
    idx = list(range(len(t)))
    random.Random(seed).shuffle(idx)
    k = int(round(test * len(idx)))
    return t.subset(idx[k:]), t.subset(idx[:k])


def synthetic(seed: int):
    from core.query_world import QueryWorld, QueryWorldConfig, split_rows

    w = QueryWorld(QueryWorldConfig(seed=seed))
    sp = split_rows(w, seed)
    kcols = ("clicked_categories", "clicked_brands", "clicked_titles")

    def table(rows, col):
        return Table([r["query"] for r in rows], [r[col].split("|") if r[col] else [] for r in rows],
                     [[x for c in kcols for x in r[c].split("|") if x] for r in rows], "synthetic")

    return {"train": table(sp["train"], "clicked"), "val": table(sp["val"], "gold"), "test": table(sp["test"], "gold"),
            "hierarchy_sep": "/", "label_info": w.label_info(), "summary": w.summary()}


def wands(seed: int):
    f = shared_data() / "wands" / "query.csv"
    if not f.is_file():
        return None
    from models.query.data import read_table

    t = read_table(f, "query", "query_class")
    tr, te = split(t, seed)
    return {"train": tr, "val": None, "test": te, "hierarchy_sep": None, "label_info": None}


def bestbuy(seed: int):
    f = shared_data() / "bestbuy_categories" / "bestbuy_categories_flat.csv"
    if not f.is_file():
        return None
    texts, labels = [], []
    with open(f, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            path = [p.strip() for p in r["path_names"].split(" > ")]
            name = " ".join(r["name"].split())
            if int(r["depth"]) < 3 or not name or path[0] in NAV_ROOTS:
                continue
            texts.append(name)
            labels.append([" > ".join(path[:2])])
    t = Table(texts, labels, None, "bestbuy")
    tr, te = split(t, seed)
    return {"train": tr, "val": None, "test": te, "hierarchy_sep": " > ", "label_info": None}


DATASETS = {"synthetic": synthetic, "wands": wands, "bestbuy": bestbuy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="synthetic,wands,bestbuy")
    ap.add_argument("--variants", default="counts,baseline,label,smgcn,ssuf,ssuf-ke,ssuf-le,ssuf-se,ssuf-semi")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "query_quality.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    variants = tuple(x.strip() for x in a.variants.split(",") if x.strip())
    out_path = Path(a.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.setdefault("datasets", {})
    result["skipped"] = {"esci": "queries with product ids only: no category or product text to label them"}
    features = MiniLMFeatures()
    for name in [x.strip() for x in a.datasets.split(",") if x.strip()]:
        runs, t0 = [], time.time()
        for seed in range(a.seeds):
            d = DATASETS[name](seed)
            if d is None:
                print(f"{name}: data not found under {shared_data()}, skipped")
                break
            ec = EvalConfig(variants=variants, seeds=1, trials=a.trials, hierarchy_sep=d["hierarchy_sep"],
                            encoder=EncoderSpec(), max_epochs=a.max_epochs, base_seed=seed)
            rep = evaluate(d["train"], d["test"], ec, features=features, val=d["val"], label_info=d["label_info"])
            runs.append(rep)
            log.info("%s seed %d done (%.0fs)\n%s", name, seed, time.time() - t0, format_table(rep))
        if not runs:
            continue
        agg = {"seeds": len(runs), "seconds": round(time.time() - t0, 1), "data": runs[0]["data"],
               "notes": runs[0]["notes"], "variants": {}, "zero_shot": {}}
        for k in runs[0]["zero_shot"]:
            if k != "std":
                vals = [r["zero_shot"][k] for r in runs]
                agg["zero_shot"][k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
        for v in variants:
            rows = [r["variants"][v]["per_seed"][0] for r in runs]
            agg["variants"][v] = {k: {"mean": float(np.nanmean([x[k] for x in rows])),
                                      "std": float(np.nanstd([x[k] for x in rows]))} for k in METRICS}
            agg["variants"][v]["per_seed"] = rows
        agg["command"] = " ".join(["python", "bench/bench_query_quality.py", *(argv if argv is not None else sys.argv[1:])])
        prev = result["datasets"].get(name) or {}
        if prev.get("seeds") == agg["seeds"] and prev.get("data") == agg["data"]:
            # the same splits: a run of other variants adds to the earlier ones (each keeps its command)
            for v, r in prev.get("variants", {}).items():
                r.setdefault("command", prev.get("command", "not recorded"))
            for r in agg["variants"].values():
                r["command"] = agg["command"]
            agg["variants"] = {**prev.get("variants", {}), **agg["variants"]}
            agg["seconds"] = {"this_run": agg["seconds"], "earlier": prev.get("seconds")}
        result["datasets"][name] = agg
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=float))
        print(f"== {name} ({len(runs)} seeds)")
        for v, r in agg["variants"].items():
            print(f"{v:<12}" + "".join(f"{k}={r[k]['mean']:.3f}±{r[k]['std']:.3f} " for k in ("micro_f1", "macro_f1", "tail_macro_f1")))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
