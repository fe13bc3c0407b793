"""The offline evaluation protocol of ``adstream evaluate-query`` (docs/query.md, "Evaluation").

For every seed: split the training file into train / validation (unless a validation file is
given); for every variant, an equal budget of ``trials`` hyper-parameter settings (the first is the
default, the rest drawn at random from the variant's space) is trained on train and scored on
validation; the best one (by ``select``) is scored once on the test file. Reported: micro-F1,
macro-F1 and tail macro-F1 (rarest half of the test labels by training count), mean and std over
seeds, plus zero-shot label-semantic Recall@1/5 of the untrained encoder.

The label space is every label of the train, validation and test files (the taxonomy): a label
with no training row can only be predicted through its name.

Besides the SSUF variants, ``counts`` is the serving fallback's rule on the training rows (words of
the query vote for the labels of the training rows containing them; ``models/query/counts.py``):
no encoder, its weighting and decision rule chosen on the same validation rows.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from core.errors import ConfigError
from models.query.classifier import QueryClassifier, QueryData, label_counts
from models.query.data import Table
from models.query.encoder import EncoderSpec, build_encoder
from models.query.labels import LabelSpace
from models.query.metrics import f1_scores, recall_at_k
from models.query.ssuf import SSUFConfig, variant_config

log = logging.getLogger(__name__)

COUNTS = "counts"  # the counts baseline (models/query/counts.py), not an SSUF variant
METRICS = ("micro_f1", "macro_f1", "tail_macro_f1", "seen_macro_f1", "unseen_macro_f1")
COMMON_SPACE: dict[str, list[Any]] = {"lr": [3e-4, 1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 1e-4, 1e-2],
                                      "dropout": [0.0, 0.1, 0.3]}
MODULE_SPACE: dict[str, dict[str, list[Any]]] = {
    "baseline": {"head": ["linear", "cosine"]},
    "label_semantic": {"label_bias": ["per_label", "shared"], "logit_scale": [5.0, 10.0, 20.0]},
    "semi": {"tau": [0.5, 0.6, 0.7, 0.8]},
    "structure": {"alpha": [0.02, 0.05, 0.1], "beta": [0.5, 0.6, 0.7]},
    "side_info": {"side_terms": [4, 8]},
}


@dataclass
class EvalConfig:
    variants: tuple[str, ...] = ("baseline", "smgcn", "ssuf")
    seeds: int = 3
    trials: int = 6
    val_fraction: float = 0.2
    select: str = "macro_f1"  # micro_f1 | macro_f1 | mean
    hierarchy_sep: str | None = None
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    max_epochs: int = 60
    patience: int = 8
    base_seed: int = 0

    def validate(self) -> None:
        if not self.variants:
            raise ConfigError("no variants to evaluate")
        for v in self.variants:
            if v == COUNTS:
                continue
            try:
                variant_config(v)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.seeds < 1 or self.trials < 1:
            raise ConfigError("--seeds and --trials must be >= 1")
        if not 0.0 < self.val_fraction < 0.9:
            raise ConfigError("--val-fraction must be in (0, 0.9)")
        if self.select not in ("micro_f1", "macro_f1", "mean"):
            raise ConfigError("--select must be micro_f1, macro_f1 or mean")


def search_space(cfg: SSUFConfig) -> dict[str, list[Any]]:
    space = dict(COMMON_SPACE)
    mods = cfg.modules
    if not mods["label_semantic"]:
        space.update(MODULE_SPACE["baseline"])
    for m in ("label_semantic", "semi", "structure", "side_info"):
        if mods[m]:
            space.update(MODULE_SPACE[m])
    return space


def sample_trials(base: SSUFConfig, n: int, seed: int) -> list[SSUFConfig]:
    """``n`` settings: the defaults first, then distinct random draws from the variant's space."""
    space = search_space(base)
    rng = random.Random(seed)
    out, seen = [base], {json.dumps(_params(base, space), sort_keys=True)}
    for _ in range(50 * n):
        if len(out) >= n:
            break
        c = replace(base, **{k: rng.choice(v) for k, v in space.items()})
        key = json.dumps(_params(c, space), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _params(cfg: SSUFConfig, space: Mapping[str, Any]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in space}


def adapt_variant(name: str, has_knowledge: bool, has_hierarchy: bool, notes: list[str], **over) -> SSUFConfig:
    cfg = variant_config(name, **over)
    if cfg.knowledge and not has_knowledge:
        cfg = replace(cfg, knowledge=False)
        msg = "knowledge module off: the files carry no click statistics (knowledge columns)"
        if msg not in notes:
            notes.append(msg)
    if "hier" in cfg.graphs and not has_hierarchy:
        cfg = replace(cfg, graphs=tuple(g for g in cfg.graphs if g != "hier"))
        msg = "hierarchy graph off: the labels have no hierarchy (pass --hierarchy-sep when label ids are paths)"
        if msg not in notes:
            notes.append(msg)
    return cfg


def to_data(t: Table, space: LabelSpace) -> QueryData:
    return QueryData(list(t.texts), [space.ids(ls) for ls in t.labels], t.knowledge)


def zero_shot(encoder, space: LabelSpace, test: QueryData) -> dict[str, float]:
    """Recall@1/@5 of cos(Enc(query), Enc(label name)) with the untrained encoder, and chance."""
    import torch

    q = torch.nn.functional.normalize(encoder.encode(test.queries), dim=-1)
    c = torch.nn.functional.normalize(encoder.encode(space.texts[: space.n_leaves]), dim=-1)
    s = (q @ c.T).numpy()
    L = space.n_leaves
    return {"recall@1": recall_at_k(s, test.labels, 1), "recall@5": recall_at_k(s, test.labels, 5),
            "chance@1": 1.0 / L, "chance@5": min(1.0, 5.0 / L)}


def evaluate(train: Table, test: Table, cfg: EvalConfig, features=None, val: Table | None = None,
             label_info: Mapping[str, str] | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the protocol; returns the report (see module docstring)."""
    cfg.validate()
    notes: list[str] = []
    all_labels = sorted({x for t in (train, val, test) if t is not None for ls in t.labels for x in ls})
    space = LabelSpace.build(all_labels, cfg.hierarchy_sep)
    has_k = train.knowledge is not None
    if has_k and test.knowledge is None:
        notes.append("the test file has no knowledge columns: test queries are classified without knowledge")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in cfg.variants}
    zs: list[dict[str, float]] = []
    test_d = to_data(test, space)
    full_counts = label_counts(to_data(train, space).labels, space.n_leaves)
    unseen = {y for ls in test_d.labels for y in ls if full_counts[y] == 0}
    for s in range(cfg.seeds):
        seed = cfg.base_seed + s
        if val is None:
            idx = list(range(len(train)))
            random.Random(seed).shuffle(idx)
            k = max(1, int(round(cfg.val_fraction * len(idx))))
            tr, va = train.subset(idx[k:]), train.subset(idx[:k])
        else:
            tr, va = train, val
        tr_d, va_d = to_data(tr, space), to_data(va, space)
        if not any(tr_d.labels) or not any(va_d.labels):
            raise ConfigError(f"too few labelled rows to train and validate ({len(tr)} train, {len(va)} validation); "
                              "give more rows or a --val file")
        counts = label_counts(tr_d.labels, space.n_leaves)
        enc0 = build_encoder(cfg.encoder, features=features)
        zs.append(zero_shot(enc0, space, test_d))
        for v in cfg.variants:
            if v == COUNTS:
                from models.query.counts import fit_counts

                cb, val_metric = fit_counts(tr_d.queries, tr_d.labels, va_d.queries, va_d.labels, space.n_leaves,
                                            cfg.select)
                m = f1_scores(cb.predict(test_d.queries), test_d.labels, counts)
                m.update({"val": val_metric, "threshold": cb.threshold, "max_labels": cb.max_labels, "seed": seed,
                          "params": {"weighting": cb.weighting}})
                results[v].append(m)
                if progress is not None:
                    progress(cfg.trials)
                continue
            base = adapt_variant(v, has_k, space.has_hierarchy, notes, seed=seed, max_epochs=cfg.max_epochs,
                                 patience=cfg.patience, dropout=cfg.encoder.dropout)
            best = None
            for j, c in enumerate(sample_trials(base, cfg.trials, seed * 1000 + zlib.crc32(v.encode()) % 997)):
                enc = build_encoder(cfg.encoder, features=features)
                clf = QueryClassifier(c, space, enc, label_info)
                r = clf.fit(tr_d, va_d, select=cfg.select)
                if progress is not None:
                    progress(1)
                if best is None or r.val_metric > best[0] + 1e-9:
                    best = (r.val_metric, clf, c, r)
                log.debug("seed %d %s trial %d: val %s=%.4f", seed, v, j, cfg.select, r.val_metric)
            _, clf, c, r = best
            m = f1_scores(clf.predict(test_d.queries, test_d.knowledge), test_d.labels, counts)
            m.update({"val": r.val_metric, "epochs": r.best_epoch, "threshold": r.threshold,
                      "max_labels": clf.max_labels, "seed": seed,
                      "params": _params(c, search_space(c))})
            results[v].append(m)
    report = {"variants": {}, "zero_shot": _agg(zs, list(zs[0])), "notes": notes,
              "data": {"train_rows": len(train), "test_rows": len(test), "val_rows": len(val) if val else None,
                       "labels": space.n_leaves, "hierarchy_nodes": len(space.names) - space.n_leaves,
                       "test_labels": len({y for ls in test_d.labels for y in ls}),
                       "test_labels_unseen_in_train": len(unseen),
                       "knowledge": has_k, "train_skipped": train.skipped, "test_skipped": test.skipped},
              "config": {**asdict(cfg), "encoder": cfg.encoder.to_dict()}}
    for v, rs in results.items():
        agg = _agg(rs, METRICS)
        modules = {} if v == COUNTS else variant_config(v).modules
        report["variants"][v] = {**{k: agg[k] for k in METRICS}, "std": agg["std"], "per_seed": rs,
                                 "modules": modules}
    return report


def _agg(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"std": {}}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and np.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else None
        out["std"][k] = float(np.std(vals)) if len(vals) > 1 else 0.0
    return out


# ------------------------------------------------------------------------------------ output
def format_table(report: Mapping[str, Any]) -> str:
    head = f"{'variant':<16}{'micro-F1':>16}{'macro-F1':>16}{'tail macro-F1':>18}"
    lines = [head, "-" * len(head)]
    for v, r in report["variants"].items():
        cell = lambda k: f"{r[k]:.3f} ± {r['std'][k]:.3f}" if r[k] is not None else "n/a"  # noqa: E731
        lines.append(f"{v:<16}{cell('micro_f1'):>16}{cell('macro_f1'):>16}{cell('tail_macro_f1'):>18}")
    z = report.get("zero_shot") or {}
    if z:
        lines.append(f"zero-shot label semantics: Recall@1 {z['recall@1']:.3f}, Recall@5 {z['recall@5']:.3f} "
                     f"(chance {z['chance@5']:.3f})")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "report.json"
    jpath.write_text(json.dumps(report, indent=2, sort_keys=False, default=float))
    names = list(report["variants"])
    keys = ("micro_f1", "macro_f1", "tail_macro_f1")
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [report["variants"][n][k] or 0.0 for n in names]
        err = [report["variants"][n]["std"][k] for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * w, vals, w, yerr=err, capsize=3, label=k.replace("_", " "))
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (mean ± std over seeds)")
    ax.set_title(title or "query classification")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    ppath = out / "report.png"
    fig.savefig(ppath, dpi=110)
    plt.close(fig)
    return jpath, ppath
