"""The offline incremental-learning protocol for CTR models (docs/ctr.md, "Evaluation").

1. The examples must be sorted by time (``prepare_frame`` sorts and says so; ``run_protocol``
   refuses an unsorted frame). They are split into ``N`` equal-count, time-ordered periods.
2. Warm start on the first ``k`` periods; then, for every later period ``t``, train on period ``t``
   (initialised from the previous model; ``retrain`` trains a fresh model on an expanding or a
   sliding window of periods) and score period ``t+1``, which no model or prior statistic has seen.
3. Hyper-parameters of *every* strategy are chosen by the same budgeted search
   (:mod:`models.eval_search`) on a validation prefix: the ``val_periods`` periods after the warm
   start. The test periods (all later ones) are never used for any choice.
4. With the chosen settings, every strategy runs ``seeds`` times over all periods; the report
   holds AUC / LogLoss per test period (mean over seeds), the mean over the test periods with its
   std across seeds, what was chosen and on what, and the paired differences against fine-tuning
   with a bootstrap 95 % interval (:mod:`models.eval_report`).

Strategies: ``retrain``, ``finetune``, ``distill``, ``ddp-fp``, ``ddp-mp``, ``ddp``. Every trained
model is audited: the largest example index it trained on, and the largest index fed to its prior
statistics, must lie before the first index of the period it is scored on.

Training windows are shuffled row-wise with a seed derived from (seed, period)
(:func:`window_batches`); the DMP protocol uses the same function.

Pure: a DataFrame in, plain dicts out. File reading (``load_frame``) and report writing are small
helpers the command line calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from core.errors import ConfigError
from models.ctr.features import RawBatch, concat, iter_batches, raw_from_frame
from models.ctr.metrics import auc, logloss
from models.ctr.model import CTRConfig, FieldConfig
from models.ctr.train_loop import CTRLearner
from models.eval_data import Columns, check_sorted, load_frame, prepare_frame, read_table, time_to_float
from models.eval_report import format_table, paired_difference, summarise, write_report
from models.eval_search import NO_PRIOR, OWN, best_trial, prior_check, stage1, stage2

log = logging.getLogger(__name__)

STRATEGIES = ("retrain", "finetune", "distill", "ddp-fp", "ddp-mp", "ddp")
RETRAIN_MODES = ("expanding", "sliding")
REFERENCE = "finetune"  # paired differences are taken against this strategy

__all__ = [
    "check_sorted", "read_table", "time_to_float",
    "Columns", "EvalConfig", "STRATEGIES", "format_table", "load_frame", "prepare_frame", "run_protocol",
    "strategy_config", "write_report",
]  # fmt: skip


@dataclass
class EvalConfig:
    """Protocol and model settings shared by all strategies (strategy switches are applied on top).

    The model settings are the starting point (trial 0) of the search; with ``search_trials=0``
    they are used as given and every period after the warm start is a test period.
    """

    periods: int = 10
    strategies: tuple[str, ...] = STRATEGIES
    seeds: int = 3
    warm_start: int = 2
    val_periods: int = 2  # periods after the warm start on which the search scores its trials
    search_trials: int = 8  # per strategy (the same for all); 0 = no search
    retrain_mode: str = "sliding"  # expanding | sliding
    retrain_window: int | None = None  # sliding window in periods; None = warm_start
    epochs: int = 1
    batch_size: int = 1024
    shuffle: bool = True  # shuffle the rows of each training window (seeded by seed and period)
    backbone: str = "deepfm"
    embedding_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    capacity: int = 1 << 15
    admission: int = 1
    emb_lr: float = 0.05
    dense_lr: float = 0.01
    first_order: bool = True
    fp: str = "count"  # Feature Prior variant for ddp-fp / ddp
    fp_use: str = "both"
    fp_weight: float = 0.2
    fp_shrink: float = 2.0
    fp_strength: float = 20.0
    fp_decay: float = 1.0
    fp_update: str = "batch"
    mp: str = "posterior"  # Model Prior form for ddp-mp / ddp
    mp_lambda: float = 1.0
    mp_lambda_mode: str = "evidence"
    mp_count_agg: str = "min"
    mp_count_decay: float = 0.5  # the evidence behind the prior halves per window: λ_i stays on one scale over time
    mp_weighted: bool = False
    mp_adapt: str = "pv"
    distill_weight: float = 1.0
    distill_temperature: float = 2.0  # at T=1, distillation with weight w IS the posterior-label MP with λ=w
    base_seed: int = 0
    prior_check: str = "ci"  # ci: ddp keeps its prior only if it beats no prior on validation (eval_search)

    def validate(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
        if not self.strategies:
            raise ConfigError("no strategies given")
        if self.warm_start < 1:
            raise ConfigError("--warm-start must be >= 1")
        if self.search_trials < 0 or self.val_periods < 0:
            raise ConfigError("--search-trials and --val-periods must be >= 0")
        if self.search_trials > 0 and self.val_periods < 1:
            raise ConfigError("the search needs --val-periods >= 1 (or --search-trials 0)")
        need = self.warm_start + self.validation() + 2
        if self.periods < need:
            raise ConfigError(
                f"--periods {self.periods} leaves nothing to test: need at least warm-start "
                f"({self.warm_start}) + validation periods ({self.validation()}) + 2 = {need} periods"
            )
        if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--seeds, --epochs and --batch-size must be >= 1")
        if self.retrain_mode not in RETRAIN_MODES:
            raise ConfigError(f"--retrain-mode must be one of {RETRAIN_MODES}")
        if self.prior_check not in ("ci", "off"):
            raise ConfigError("--prior-check must be ci or off")
        if self.retrain_window is not None and self.retrain_window < 1:
            raise ConfigError("--retrain-window must be >= 1")

    def validation(self) -> int:
        """Validation periods actually used (none without a search)."""
        return self.val_periods if self.search_trials > 0 else 0

    def test_periods(self) -> list[int]:
        """The periods the report scores: after the warm start and the validation prefix."""
        return list(range(self.warm_start + self.validation() + 1, self.periods))

    def validation_periods(self) -> list[int]:
        return list(range(self.warm_start + 1, self.warm_start + self.validation() + 1))


def strategy_config(name: str, ec: EvalConfig, cols: Columns, seed: int) -> CTRConfig:
    """The CTRConfig a strategy trains with (``ec`` may carry a search trial's settings)."""
    base = CTRConfig(
        fields=[FieldConfig(c, capacity=ec.capacity, admission=ec.admission) for c in cols.categorical],
        numeric=list(cols.numeric),
        embedding_dim=ec.embedding_dim,
        backbone=ec.backbone,
        hidden=tuple(ec.hidden),
        emb_lr=ec.emb_lr,
        dense_lr=ec.dense_lr,
        first_order=ec.first_order,
        fp_use=ec.fp_use,
        fp_weight=ec.fp_weight,
        fp_shrink=ec.fp_shrink,
        fp_strength=ec.fp_strength,
        fp_decay=ec.fp_decay,
        fp_update=ec.fp_update,
        mp_lambda=ec.mp_lambda,
        mp_lambda_mode=ec.mp_lambda_mode,
        mp_count_agg=ec.mp_count_agg,
        mp_count_decay=ec.mp_count_decay,
        mp_weighted=ec.mp_weighted,
        mp_adapt=ec.mp_adapt,
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


def window_batches(raw: RawBatch, batch_size: int, seed: int, period: int, shuffle: bool = True) -> Iterator[RawBatch]:
    """The batches of one training window (``period`` -1 = the warm start), rows shuffled with a
    seed from (seed, period) when ``shuffle``. The single-process and the DMP protocol both
    train through this function, so they see the same batches."""
    return iter_batches(raw, batch_size, shuffle_seed=(seed * 1_000_003 + period + 1) if shuffle else None)


def _check_hygiene(learner: Any, eval_lo: int, where: str) -> dict[str, int]:
    rec = {"trained_max_index": learner.seen_max_index, "prior_max_index": learner.prior_max_index, "eval_min_index": eval_lo}
    if learner.seen_max_index >= eval_lo or learner.prior_max_index >= eval_lo:
        raise RuntimeError(f"protocol violation in {where}: model or prior saw data of the evaluated period ({rec})")
    return rec


def _predict(learner: CTRLearner, data: RawBatch, batch_size: int) -> np.ndarray:
    return np.concatenate([learner.predict(b) for b in iter_batches(data, max(batch_size, 4096))])


def _segment_metrics(seg: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for v in pd.unique(seg):
        m = seg == v
        out[str(v)] = {"auc": auc(y[m], p[m]), "logloss": logloss(y[m], p[m]), "n": int(m.sum())}
    return out


def run_strategy(
    name: str,
    ec: EvalConfig,
    cols: Columns,
    parts: list[RawBatch],
    bounds: list[tuple[int, int]],
    seed: int,
    scored: list[int],
    tick: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """One strategy, one seed, over ``parts`` (all periods, or a prefix): returns one record per
    period in ``scored`` (auc, logloss, probs, audit fields) and the training seconds."""
    cfg = strategy_config(name, ec, cols, seed)
    k = ec.warm_start
    out: list[dict[str, Any]] = []
    secs = 0.0
    learner = None
    if name != "retrain":
        learner = CTRLearner(cfg)
        t0 = time.perf_counter()
        learner.train_window(window_batches(concat(parts[:k]), ec.batch_size, seed, -1, ec.shuffle), shuffle_seed=seed)
        secs += time.perf_counter() - t0
    last = max(scored)
    for t in range(k, last):
        t0 = time.perf_counter()
        if name == "retrain":
            w = ec.retrain_window or k
            lo = 0 if ec.retrain_mode == "expanding" else max(0, t + 1 - w)
            learner = CTRLearner(cfg)
            learner.train_window(window_batches(concat(parts[lo : t + 1]), ec.batch_size, seed, t, ec.shuffle), shuffle_seed=seed)
        elif learner is not None:
            learner.train_window(window_batches(parts[t], ec.batch_size, seed, t, ec.shuffle), shuffle_seed=seed)
        secs += time.perf_counter() - t0
        if t + 1 not in scored:
            continue
        assert learner is not None
        rec = _check_hygiene(learner, bounds[t + 1][0], f"{name}/seed {seed}/period {t + 1}")
        probs = _predict(learner, parts[t + 1], ec.batch_size)
        y = parts[t + 1].labels
        out.append({"period": t + 1, **rec, "auc": auc(y, probs), "logloss": logloss(y, probs), "probs": probs,
                    "mp_scales": list(getattr(learner, "mp_scales", []))})
        if tick:
            tick()
    return out, secs


def search(
    df_parts: list[RawBatch],
    bounds: list[tuple[int, int]],
    cols: Columns,
    ec: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs the budgeted search for every strategy on the validation prefix (see eval_search).

    Stage 1 runs the same shared trials for every strategy and keeps the one with the best mean
    validation AUC over the strategies (the consensus); stage 2 searches each strategy's own
    settings around it. Each strategy then takes its best trial among the consensus one and its
    stage-2 trials.
    """
    scored = ec.validation_periods()
    n1 = (ec.search_trials + 1) // 2
    base = {k: getattr(ec, k) for k in ("emb_lr", "dense_lr", "epochs")}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in ec.strategies}
    probs: dict[str, list[list[np.ndarray]]] = {name: [] for name in ec.strategies}

    def run(name: str, trial: dict[str, Any], stage: int) -> None:
        recs, secs = run_strategy(name, replace(ec, **trial), cols, df_parts, bounds, ec.base_seed, scored)
        probs[name].append([r["probs"] for r in recs])
        a = [r["auc"] for r in recs]
        ll = [r["logloss"] for r in recs]
        results[name].append({"settings": trial, "stage": stage, "val_auc": _nanmean(a), "val_logloss": _nanmean(ll),
                              "seconds": secs})
        if progress:
            progress(1)

    first = stage1(n1, ec.base_seed)
    for name in ec.strategies:
        for trial in first:
            run(name, trial, 1)
    means = [_nanmean([results[n][j]["val_auc"] for n in ec.strategies if results[n][j]["val_auc"] is not None] or [np.nan])
             for j in range(n1)]
    consensus = int(np.nanargmax([m if m is not None else -np.inf for m in means]))
    log.info("search: shared trial %d chosen by the mean validation AUC over %d strategies (%s)", consensus,
             len(ec.strategies), first[consensus] or "as given")
    out: dict[str, dict[str, Any]] = {}
    for name in ec.strategies:
        for trial in stage2(name, first[consensus], base, ec.search_trials - n1, ec.base_seed):
            run(name, trial, 2)
        eligible = [consensus, *range(n1, len(results[name]))]
        best = eligible[best_trial([results[name][i] for i in eligible])]
        r = results[name]
        out[name] = {"chosen": r[best]["settings"], "trial": best, "val_auc": r[best]["val_auc"], "trials": r,
                     "consensus_trial": consensus, "consensus_mean_auc": means[consensus]}
        if _checks_prior(name, ec):  # the no-prior point: one more validation run, outside the trial budget
            own = {p.name for p in OWN[name]}  # the prior's own settings: inert once it is off
            off = {**{k: v for k, v in r[best]["settings"].items() if k not in own}, **NO_PRIOR[name]}
            recs, _ = run_strategy(name, replace(ec, **off), cols, df_parts, bounds, ec.base_seed, scored)
            if progress:
                progress(1)
            check = prior_check([df_parts[t].labels for t in scored], probs[name][best], [x["probs"] for x in recs],
                                ec.base_seed)
            check.update(settings=off, val_auc=_nanmean([x["auc"] for x in recs]))
            out[name]["prior_check"] = check
            log.info("search %s: prior - no prior on validation %+.4f [%+.4f, %+.4f]: %s", name,
                     check["prior_minus_none"], *check["ci95"], "prior kept" if check["keep_prior"] else
                     "no prior (fine-tuning at the chosen settings)")
            if not check["keep_prior"]:
                out[name].update(chosen=off, trial=None, val_auc=check["val_auc"])
        log.info("search %s: trial %d of %d, validation AUC %.4f, %s", name, best, len(r),
                 r[best]["val_auc"] or float("nan"), r[best]["settings"] or "as given")
    return out


def _checks_prior(name: str, ec: EvalConfig) -> bool:
    """Whether ``name`` gets the no-prior check (eval_search.NO_PRIOR): only if it has a prior."""
    return ec.prior_check == "ci" and name in NO_PRIOR and (ec.fp != "off" or ec.mp != "off")


def _nanmean(xs: list[float]) -> float | None:
    v = np.array(xs, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def protocol_steps(ec: EvalConfig) -> int:
    """Progress units of :func:`run_protocol` (search trials + scored test periods)."""
    checks = sum(_checks_prior(n, ec) for n in ec.strategies) if ec.search_trials > 0 else 0
    return len(ec.strategies) * (ec.search_trials + ec.seeds * len(ec.test_periods())) + checks


def run_protocol(
    df: pd.DataFrame,
    cols: Columns,
    ec: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Search, then every strategy × seed over the periods of ``df`` (sorted by ``cols.time``).

    Returns ``(report, audit)``: the report dict of the CLI contract and one audit record per
    scored test period (strategy, seed, period, trained/prior max index, first eval index).
    ``progress(n)`` is called after each search trial and each scored period.
    """
    ec.validate()
    check_sorted(df, cols.time)
    raw = raw_from_frame(df, cols.categorical, cols.numeric, cols.label, cols.time)
    seg = df[cols.segment].to_numpy() if cols.segment else None
    bounds = period_bounds(len(raw), ec.periods)
    parts = [raw.slice(lo, hi) for lo, hi in bounds]
    val_end = ec.warm_start + ec.validation() + 1
    chosen = search(parts[:val_end], bounds, cols, ec, progress) if ec.search_trials > 0 else {}
    test = ec.test_periods()
    audit: list[dict[str, Any]] = []
    per: dict[str, dict[str, list[list[float]]]] = {s: {"auc": [], "logloss": [], "secs": []} for s in ec.strategies}
    preds: dict[str, list[list[np.ndarray]]] = {s: [] for s in ec.strategies}
    tick = (lambda: progress(1)) if progress else None
    for s_i in range(ec.seeds):
        seed = ec.base_seed + s_i
        for name in ec.strategies:
            settings = chosen.get(name, {}).get("chosen", {})
            recs, secs = run_strategy(name, replace(ec, **settings), cols, parts, bounds, seed, test, tick)
            per[name]["auc"].append([r["auc"] for r in recs])
            per[name]["logloss"].append([r["logloss"] for r in recs])
            per[name]["secs"].append([secs])
            preds[name].append([r["probs"] for r in recs])
            for r in recs:
                entry = {"strategy": name, "seed": seed, **{k: v for k, v in r.items() if k != "probs"}}
                if seg is not None:
                    lo, hi = bounds[r["period"]]
                    entry["segments"] = _segment_metrics(seg[lo:hi], parts[r["period"]].labels, r["probs"])
                audit.append(entry)
    report = _report(ec, per, chosen)
    labels = [parts[t].labels for t in test]
    report["paired"] = {
        f"{a} - {b}": paired_difference(labels, preds[a], preds[b], seed=ec.base_seed)
        for a, b in comparisons(ec.strategies)
    }
    return report, audit


def comparisons(strategies: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Every strategy against fine-tuning, and DDP against retraining."""
    out = [(s, REFERENCE) for s in strategies if s != REFERENCE and REFERENCE in strategies]
    if "ddp" in strategies and "retrain" in strategies:
        out.append(("ddp", "retrain"))
    return out


def _report(ec: EvalConfig, per: dict[str, dict[str, list[list[float]]]], chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    strategies = summarise(per)
    for name, r in strategies.items():
        c = chosen.get(name)
        r["chosen"] = c["chosen"] if c else {}
        if c:
            r["validation_auc"] = c["val_auc"]
            r["search_consensus"] = c["consensus_trial"]
            r["search"] = [{k: v for k, v in t.items()} for t in c["trials"]]
            if "prior_check" in c:
                r["prior_check"] = c["prior_check"]
    return {
        "periods": ec.test_periods(),
        "validation_periods": ec.validation_periods(),
        "strategies": strategies,
        "protocol": {
            "periods": ec.periods, "warm_start": ec.warm_start, "val_periods": ec.validation(),
            "search_trials": ec.search_trials, "seeds": ec.seeds, "base_seed": ec.base_seed,
            "selection": "mean next-period AUC on the validation periods (one seed), same trials budget per strategy",
            "prior_check": ec.prior_check,
        },
    }  # fmt: skip
