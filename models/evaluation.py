"""The offline incremental-learning protocol for CTR models (docs/ctr.md, "Evaluation").

1. Sort the examples by time; split them into ``N`` equal-count, time-ordered periods.
2. Warm start: train on the first ``k`` periods.
3. For every later period ``t`` (k ≤ t ≤ N-2): train on period ``t`` (initialised from the previous
   model, except ``retrain``, which trains a fresh model on the trailing ``W`` periods), then
   evaluate on period ``t+1``, which no model or prior statistic has seen.
4. Report AUC and LogLoss per evaluated period and their means, per strategy (means across seeds).

Strategies: ``retrain``, ``finetune``, ``distill``, ``ddp-fp``, ``ddp-mp``, ``ddp``. Every trained
model is audited: the largest example index it trained on, and the largest index fed to its prior
statistics, must lie before the first index of the period it is evaluated on.

Pure: a DataFrame in, plain dicts out. File reading (``load_frame``) and report writing are
small helpers the command line calls.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from core.errors import ConfigError
from models.ctr.features import RawBatch, concat, iter_batches, raw_from_frame
from models.ctr.metrics import auc, logloss
from models.ctr.model import CTRConfig, FieldConfig
from models.ctr.train_loop import CTRLearner

log = logging.getLogger(__name__)

STRATEGIES = ("retrain", "finetune", "distill", "ddp-fp", "ddp-mp", "ddp")


@dataclass
class EvalConfig:
    """Protocol and model settings shared by all strategies (strategy switches are applied on top)."""

    periods: int = 10
    strategies: tuple[str, ...] = STRATEGIES
    seeds: int = 1
    warm_start: int = 2
    retrain_window: int | None = None  # periods; None = warm_start
    epochs: int = 1
    batch_size: int = 1024
    backbone: str = "deepfm"
    embedding_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    capacity: int = 1 << 15
    admission: int = 1
    emb_lr: float = 0.05
    dense_lr: float = 0.01
    fp: str = "learned"  # Feature Prior variant for ddp-fp / ddp
    fp_use: str = "both"
    fp_weight: float = 0.5
    fp_shrink: float = 2.0
    fp_strength: float = 20.0
    mp: str = "posterior"  # Model Prior form for ddp-mp / ddp
    mp_lambda: float = 1.0
    mp_lambda_mode: str = "const"
    distill_weight: float = 1.0
    distill_temperature: float = 2.0  # at T=1, distillation with weight w IS the posterior-label MP with λ=w
    base_seed: int = 0

    def validate(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
        if self.warm_start < 1:
            raise ConfigError("--warm-start must be >= 1")
        if self.periods < self.warm_start + 2:
            raise ConfigError(
                f"--periods {self.periods} leaves nothing to evaluate: need at least warm-start + 2 "
                f"= {self.warm_start + 2} periods"
            )
        if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--seeds, --epochs and --batch-size must be >= 1")


@dataclass
class Columns:
    time: str
    label: str
    categorical: list[str]
    numeric: list[str] = field(default_factory=list)
    segment: str | None = None  # optional column: the audit gets AUC/LogLoss per segment value


def strategy_config(name: str, ec: EvalConfig, cols: Columns, seed: int) -> CTRConfig:
    """The CTRConfig a strategy trains with."""
    base = CTRConfig(
        fields=[FieldConfig(c, capacity=ec.capacity, admission=ec.admission) for c in cols.categorical],
        numeric=list(cols.numeric),
        embedding_dim=ec.embedding_dim,
        backbone=ec.backbone,
        hidden=tuple(ec.hidden),
        emb_lr=ec.emb_lr,
        dense_lr=ec.dense_lr,
        fp_use=ec.fp_use,
        fp_weight=ec.fp_weight,
        fp_shrink=ec.fp_shrink,
        fp_strength=ec.fp_strength,
        mp_lambda=ec.mp_lambda,
        mp_lambda_mode=ec.mp_lambda_mode,
        distill_temperature=ec.distill_temperature,
        epochs=ec.epochs,
        seed=seed,
    )
    if name in ("retrain", "finetune"):
        return base
    if name == "distill":
        return replace(base, distill_weight=ec.distill_weight)
    if name == "ddp-fp":
        return replace(base, fp=ec.fp)
    if name == "ddp-mp":
        return replace(base, mp=ec.mp)
    if name == "ddp":
        return replace(base, fp=ec.fp, mp=ec.mp)
    raise ConfigError(f"unknown strategy {name!r}")


def period_bounds(n: int, periods: int) -> list[tuple[int, int]]:
    """Equal-count, time-ordered [lo, hi) index ranges."""
    if n < periods:
        raise ConfigError(f"{n} rows cannot be split into {periods} periods")
    edges = np.linspace(0, n, periods + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(periods)]


def _check_hygiene(learner: CTRLearner, eval_lo: int, where: str) -> dict[str, int]:
    rec = {"trained_max_index": learner.seen_max_index, "prior_max_index": learner.prior_max_index, "eval_min_index": eval_lo}
    if learner.seen_max_index >= eval_lo or learner.prior_max_index >= eval_lo:
        raise RuntimeError(f"protocol violation in {where}: model or prior saw data of the evaluated period ({rec})")
    return rec


def _evaluate(learner: CTRLearner, data: RawBatch, batch_size: int) -> tuple[float, float, np.ndarray]:
    probs = np.concatenate([learner.predict(b) for b in iter_batches(data, max(batch_size, 4096))])
    return auc(data.labels, probs), logloss(data.labels, probs), probs


def _segment_metrics(seg: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for v in pd.unique(seg):
        m = seg == v
        out[str(v)] = {"auc": auc(y[m], p[m]), "logloss": logloss(y[m], p[m]), "n": int(m.sum())}
    return out


def run_protocol(
    df: pd.DataFrame,
    cols: Columns,
    ec: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs every strategy × seed over the periods of ``df`` (sorted by ``cols.time``).

    Returns ``(report, audit)``: the report dict of the CLI contract and one audit record per
    evaluation (strategy, seed, period, trained/prior max index, first eval index).
    ``progress(n)`` is called after each trained period.
    """
    ec.validate()
    raw = raw_from_frame(df, cols.categorical, cols.numeric, cols.label, cols.time)
    seg = df[cols.segment].to_numpy() if cols.segment else None
    bounds = period_bounds(len(raw), ec.periods)
    parts = [raw.slice(lo, hi) for lo, hi in bounds]
    k = ec.warm_start
    eval_periods = list(range(k + 1, ec.periods))
    window = ec.retrain_window or k
    audit: list[dict[str, Any]] = []
    per: dict[str, dict[str, list[list[float]]]] = {s: {"auc": [], "logloss": [], "secs": []} for s in ec.strategies}
    for s_i in range(ec.seeds):
        seed = ec.base_seed + s_i
        for name in ec.strategies:
            cfg = strategy_config(name, ec, cols, seed)
            aucs, lls, secs = [], [], 0.0
            learner = None
            if name != "retrain":
                learner = CTRLearner(cfg)
                t0 = time.perf_counter()
                learner.train_window(iter_batches(concat(parts[:k]), ec.batch_size), shuffle_seed=seed)
                secs += time.perf_counter() - t0
            for t in range(k, ec.periods - 1):
                t0 = time.perf_counter()
                if name == "retrain":
                    learner = CTRLearner(cfg)
                    learner.train_window(
                        iter_batches(concat(parts[max(0, t + 1 - window) : t + 1]), ec.batch_size), shuffle_seed=seed
                    )
                else:
                    assert learner is not None
                    learner.train_window(iter_batches(parts[t], ec.batch_size), shuffle_seed=seed)
                secs += time.perf_counter() - t0
                assert learner is not None
                rec = _check_hygiene(learner, bounds[t + 1][0], f"{name}/seed {seed}/period {t + 1}")
                a, ll, probs = _evaluate(learner, parts[t + 1], ec.batch_size)
                aucs.append(a)
                lls.append(ll)
                entry = {"strategy": name, "seed": seed, "period": t + 1, **rec, "auc": a, "logloss": ll}
                if seg is not None:
                    lo, hi = bounds[t + 1]
                    entry["segments"] = _segment_metrics(seg[lo:hi], parts[t + 1].labels, probs)
                audit.append(entry)
                if progress:
                    progress(1)
            per[name]["auc"].append(aucs)
            per[name]["logloss"].append(lls)
            per[name]["secs"].append([secs])
    return _report(eval_periods, per), audit


def _nan_to_none(xs: Sequence[float]) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in xs]


def _report(periods: list[int], per: dict[str, dict[str, list[list[float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"periods": periods, "strategies": {}}
    for name, d in per.items():
        a = np.array(d["auc"], dtype=np.float64)  # [seeds, periods]
        ll = np.array(d["logloss"], dtype=np.float64)
        with np.errstate(all="ignore"), _quiet():
            mean_a_per_seed = np.nanmean(a, axis=1)
            mean_ll_per_seed = np.nanmean(ll, axis=1)
            r: dict[str, Any] = {
                "auc": _nan_to_none(np.nanmean(a, axis=0)),
                "logloss": _nan_to_none(np.nanmean(ll, axis=0)),
                "mean_auc": _f(np.nanmean(mean_a_per_seed)),
                "mean_logloss": _f(np.nanmean(mean_ll_per_seed)),
                "train_seconds": float(np.mean([s[0] for s in d["secs"]])),
            }
            if a.shape[0] > 1:  # across-seed spread (extra keys only with several seeds)
                r.update(
                    auc_std=_nan_to_none(np.nanstd(a, axis=0)),
                    mean_auc_std=_f(np.nanstd(mean_a_per_seed)),
                    mean_logloss_std=_f(np.nanstd(mean_ll_per_seed)),
                    seeds=int(a.shape[0]),
                )
            out["strategies"][name] = r
    return out


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


class _quiet:
    """Silences numpy's 'mean of empty slice' warnings for all-NaN periods."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._w.__exit__(*exc)


# ---------------------------------------------------------------------- file helpers (edges call these)


def load_frame(path: str | Path, cols: Columns) -> pd.DataFrame:
    """Reads a CSV or Parquet file, checks the columns, sorts by time.

    Raises ConfigError for a missing/unreadable file or missing columns. Rows with a missing time
    or label are dropped (logged); the time column becomes float (datetimes -> epoch seconds).
    """
    return prepare_frame(read_table(path), cols)


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV or Parquet file as a DataFrame; ConfigError for a missing, unreadable or unknown file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".gz", ".txt", ".tsv"):
            return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", low_memory=False)
        raise ConfigError(f"unsupported data file type {suffix!r}: use .csv or .parquet")
    except ConfigError:
        raise
    except Exception as e:  # pandas raises many different types for unreadable files
        raise ConfigError(f"cannot read {p}: {e}") from e


def prepare_frame(df: pd.DataFrame, cols: Columns) -> pd.DataFrame:
    """Column checks, time conversion, row filtering and time sort for an in-memory frame."""
    needed = [cols.time, cols.label, *cols.categorical, *cols.numeric]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise ConfigError(f"missing column(s) {missing}; available: {list(df.columns)}")
    if not cols.categorical:
        raise ConfigError("at least one categorical column is required (--categorical a,b,...)")
    overlap = set(cols.categorical) & set(cols.numeric) | ({cols.label, cols.time} & set(cols.categorical + cols.numeric))
    if overlap:
        raise ConfigError(f"column(s) {sorted(overlap)} given in more than one role")
    df = df.copy()
    df[cols.time] = time_to_float(df[cols.time], cols.time)
    df[cols.label] = pd.to_numeric(df[cols.label], errors="coerce")
    bad = df[cols.time].isna() | df[cols.label].isna()
    if bad.any():
        log.warning("dropping %d rows with a missing/invalid time or label", int(bad.sum()))
        df = df[~bad]
    if len(df) == 0:
        raise ConfigError("no usable rows (every row has a missing time or label)")
    return df.sort_values(cols.time, kind="mergesort").reset_index(drop=True)


def time_to_float(s: pd.Series, name: str) -> pd.Series:
    """A time column as float epoch seconds (numbers kept as they are; dates parsed, naive = UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        return (s.astype("int64") / 1e9).astype(np.float64)
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() >= 0.5 * max(1, s.notna().sum()):
        return num.astype(np.float64)
    dt = pd.to_datetime(s, errors="coerce", utc=True)
    if dt.notna().sum() == 0:
        raise ConfigError(f"time column {name!r} is neither numeric nor a date/time")
    return pd.Series(dt.astype("int64") / 1e9, index=s.index).where(dt.notna())


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per strategy with mean AUC/LogLoss and training time."""
    lines = [f"{'strategy':<10} {'mean_auc':>9} {'±':>7} {'mean_logloss':>13} {'±':>7} {'train_s':>8}"]
    for name, r in report["strategies"].items():
        fmt = lambda x, w, d: f"{x:>{w}.{d}f}" if isinstance(x, (int, float)) else f"{'n/a':>{w}}"  # noqa: E731
        lines.append(
            f"{name:<10} {fmt(r['mean_auc'], 9, 4)} {fmt(r.get('mean_auc_std'), 7, 4)} "
            f"{fmt(r['mean_logloss'], 13, 4)} {fmt(r.get('mean_logloss_std'), 7, 4)} {fmt(r['train_seconds'], 8, 1)}"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Writes ``report.json`` and ``report.png`` (AUC per period, one line per strategy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "report.json"
    jpath.write_text(json.dumps(report, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in report["strategies"].items():
        ys = [np.nan if v is None else v for v in r["auc"]]
        ax.plot(report["periods"], ys, marker="o", label=name)
    ax.set_xlabel("evaluated period")
    ax.set_ylabel("AUC (next period)")
    ax.set_title(title or "next-period AUC per strategy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ppath = out / "report.png"
    fig.savefig(ppath, dpi=100)
    plt.close(fig)
    return jpath, ppath
