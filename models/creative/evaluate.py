"""Offline evaluation of creative rankers on any logged file (``adstream evaluate-creative``).

Protocol (rows in time order, or file order without a time column)::

    | fit ........................ | val ....... | test ............... |
    |<------------ pre: 1 - test_frac -------->|<---- test_frac ----->|

- Hyper-parameters are chosen on ``val`` only, with models trained on ``fit``: the Beta prior's
  strength k (grid), and for every neural ranker its learning rate (``cr_lrs`` grid) and number
  of passes (1..``max_epochs``), each ranker with the same grid. The
  rankers are then trained again on all of ``pre`` (the same way, in time order) and scored on
  ``test``, never seen before.
- Rankers: ``logged`` (always the creative that was shown: NSCTR = the logged CTR), ``beta`` (per
  creative Beta prior around the ad's CTR), ``cr`` (the light creative ranker trained alone),
  ``cr+`` (JAC's creative ranker with the ad pCTR it gets when it runs in parallel with the ad
  ranker, ``pctr_source``), ``cr+@ar`` (the same network fed the ad ranker's own pCTR of the
  impression, as in training). Ad rankers: ``ar`` (alone) and ``ar+`` (JAC's).
- Candidates of an impression: every creative seen with its ad anywhere in the file (a creative
  never shown before the test period is a candidate too; its content comes from the rows where it
  appears). Ads with a single creative are counted: every ranker matches all their impressions, so
  they add the same clicks to every ranker (``nsctr_multi`` leaves them out).
- Never-shown creatives: creatives of the test period with no impression in ``pre`` (plus a
  ``holdout_creatives`` share whose ``pre`` rows are removed on purpose). ``cold`` scores the test
  impressions that showed such a creative, among the ad's never-shown creatives only, for ads with
  at least two of them (with one, every ranker is right by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pandas as pd

from core.errors import ConfigError
from models.creative.baselines import BetaCounts
from models.creative.config import JACConfig
from models.creative.jac import JACLearner, ar_config, columns, sub_raw
from models.creative.metrics import gauc, match_weights, nsctr
from models.ctr import CTRLearner, FieldConfig, RawBatch, auc, logloss
from models.evaluation import time_to_float

RANKERS = ("logged", "beta", "cr", "cr+", "cr+@ar")
COUNTING = {
    "single_creative_ads": "counted: every ranker matches all their impressions (same clicks for all); "
                           "nsctr_multi leaves them out",
    "never_shown_creatives": "candidates like any other (content from the rows where they appear); the 'cold' "
                             "block scores impressions of never-shown creatives among the ad's never-shown "
                             "creatives, for ads with >= 2 of them",
    "unmatched_ads": "an ad whose impressions the ranker never matches is left out of both NSCTR sums "
                     "(unmatched=drop; counted in ads_unmatched) or counted with 0 clicks (unmatched=zero)",
    "propensity": "matched impressions weighted by 1/propensity (self-normalised IPS per ad) when given",
}


@dataclass
class CreativeColumns:
    ad: str
    creative: str
    label: str
    time: str | None = None
    position: str | None = None
    propensity: str | None = None
    categorical: list[str] = field(default_factory=list)  # context: both rankers
    numeric: list[str] = field(default_factory=list)  # context: both rankers
    creative_features: list[str] = field(default_factory=list)  # content (categorical): creative ranker only
    creative_numeric: list[str] = field(default_factory=list)  # content (numeric): creative ranker only
    gauc: str | None = None  # GAUC groups (default: the ad column)

    def all(self) -> list[str]:
        named = [self.ad, self.creative, self.label, self.time, self.position, self.propensity, self.gauc]
        return list(dict.fromkeys([c for c in named if c] + self.categorical + self.numeric
                                  + self.creative_features + self.creative_numeric))


@dataclass
class EvalSettings:
    test_frac: float = 0.3
    val_frac: float = 0.2  # of the rows before the test period
    seeds: int = 3
    max_epochs: int = 1
    cr_lrs: tuple[float, ...] = (0.05,)  # creative-ranker learning rates tried on validation (paper: 0.05)
    beta_strengths: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
    ad_strength: float = 20.0
    holdout_creatives: float = 0.0
    holdout_seed: int = 0
    unmatched: str = "drop"
    jac: dict[str, Any] = field(default_factory=dict)  # JACConfig overrides (ste, quant_r, pctr_source, ...)

    def validate(self) -> None:
        if not (0 < self.test_frac < 1 and 0 < self.val_frac < 1):
            raise ConfigError("test_frac and val_frac must be in (0, 1)")
        if self.seeds < 1 or self.max_epochs < 1:
            raise ConfigError("seeds and max_epochs must be >= 1")
        if not self.cr_lrs or min(self.cr_lrs) <= 0:
            raise ConfigError("cr_lrs must be positive learning rates")
        if not 0 <= self.holdout_creatives < 1:
            raise ConfigError("holdout_creatives must be in [0, 1)")
        if self.unmatched not in ("drop", "zero"):
            raise ConfigError("unmatched must be drop or zero")


# ------------------------------------------------------------------------------------------ data


def prepare(df: pd.DataFrame, cols: CreativeColumns) -> pd.DataFrame:
    """Checks the columns and values, converts types, sorts by time (stable)."""
    missing = [c for c in cols.all() if c not in df.columns]
    if missing:
        raise ConfigError(f"missing column(s) {missing}; available: {list(df.columns)}")
    roles = [cols.ad, cols.creative, cols.label, *(c for c in (cols.time, cols.position, cols.propensity) if c),
             *cols.categorical, *cols.numeric, *cols.creative_features, *cols.creative_numeric]
    dup = sorted({c for c in roles if roles.count(c) > 1})
    if dup:
        raise ConfigError(f"column(s) {dup} given in more than one role")
    df = df[cols.all()].copy()
    lab = pd.to_numeric(df[cols.label], errors="coerce")
    if lab.isna().any():
        i = int(np.flatnonzero(lab.isna().to_numpy())[0])
        raise ConfigError(f"label column {cols.label!r} has a non-numeric or missing value at row {i}: "
                          f"{df[cols.label].iloc[i]!r}")
    df[cols.label] = (lab > 0).astype(np.float32)
    if cols.propensity:
        pr = pd.to_numeric(df[cols.propensity], errors="coerce")
        if pr.isna().any() or (pr <= 0).any() or (pr > 1).any():
            raise ConfigError(f"propensity column {cols.propensity!r} must hold numbers in (0, 1]")
        df[cols.propensity] = pr.astype(np.float64)
    for c in cols.numeric + cols.creative_numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in [cols.ad, cols.creative, cols.position, *cols.categorical, *cols.creative_features]:
        if c:
            df[c] = df[c].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    if df[cols.ad].isna().any() or df[cols.creative].isna().any():
        raise ConfigError("the ad and creative columns must not have missing values")
    if cols.time:
        df[cols.time] = time_to_float(df[cols.time], cols.time)
        if df[cols.time].isna().any():
            raise ConfigError(f"time column {cols.time!r} has missing or unparseable values")
        df = df.sort_values(cols.time, kind="mergesort")
    return df.reset_index(drop=True)


@dataclass
class Catalog:
    by_ad: dict[str, list[str]]  # ad -> its creatives (sorted)
    content: pd.DataFrame  # creative -> content columns (first row where it appears)


def catalog_of(df: pd.DataFrame, cols: CreativeColumns) -> Catalog:
    by_ad = {a: sorted(g.unique().tolist()) for a, g in df.groupby(cols.ad, sort=True)[cols.creative]}
    content_cols = cols.creative_features + cols.creative_numeric
    content = df.drop_duplicates(cols.creative).set_index(cols.creative)[content_cols]
    return Catalog(by_ad, content)


@dataclass
class Expanded:
    """Every impression × every candidate creative of its ad, as model rows."""

    raw: RawBatch  # the candidate rows
    offsets: np.ndarray  # candidates of impression i: offsets[i]:offsets[i+1]
    cand: np.ndarray  # creative id of every candidate row
    shown: np.ndarray  # local index of the shown creative per impression
    rep: np.ndarray  # impression of every candidate row


def jac_config(df: pd.DataFrame, cols: CreativeColumns, mode: str, seed: int, overrides: dict[str, Any]) -> JACConfig:
    """The JAC configuration for a file: tables sized by the column's distinct values."""

    def fc(c: str) -> FieldConfig:
        return FieldConfig(c, capacity=int(min(1 << 16, 2 * df[c].nunique(dropna=False) + 16)))

    pos = [cols.position] if cols.position else []
    ar = list(dict.fromkeys(cols.categorical + [cols.ad] + pos))
    cr = list(dict.fromkeys(cols.categorical + pos + [cols.ad, cols.creative] + cols.creative_features))
    base = JACConfig(ar_fields=[fc(c) for c in ar], ar_numeric=list(cols.numeric), cr_fields=[fc(c) for c in cr],
                     cr_numeric=list(dict.fromkeys(cols.numeric + cols.creative_numeric)), ad_field=cols.ad,
                     creative_field=cols.creative, content_fields=list(cols.creative_features),
                     content_numeric=list(cols.creative_numeric), mode=mode, seed=seed)
    try:
        cfg = replace(base, **overrides)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid creative-ranker settings: {e}") from None
    return cfg


def raw_rows(df: pd.DataFrame, cats: list[str], nums: list[str], cols: CreativeColumns) -> RawBatch:
    n = len(df)
    dense = df[nums].to_numpy(dtype=np.float32) if nums else np.zeros((n, 0), dtype=np.float32)
    times = df[cols.time].to_numpy(dtype=np.float64) if cols.time else np.arange(n, dtype=np.float64)
    return RawBatch({c: df[c].to_numpy(dtype=object) for c in cats}, dense,
                    df[cols.label].to_numpy(dtype=np.float32), times, df.index.to_numpy(dtype=np.int64))


def expand(df: pd.DataFrame, cols: CreativeColumns, cat: Catalog, cats: list[str], nums: list[str]) -> Expanded:
    ads = df[cols.ad].to_numpy(dtype=object)
    shown_ids = df[cols.creative].to_numpy(dtype=object)
    lists = [cat.by_ad[a] for a in ads]
    counts = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.r_[0, np.cumsum(counts)]
    rep = np.repeat(np.arange(len(df)), counts)
    cand = np.array([c for x in lists for c in x], dtype=object)
    shown = np.array([x.index(s) for x, s in zip(lists, shown_ids)], dtype=np.int64)
    content = set(cols.creative_features + cols.creative_numeric)
    cidx = cat.content.index.get_indexer(cand)

    def column(c: str) -> np.ndarray:
        if c == cols.creative:
            return cand
        if c in content:
            return cat.content[c].to_numpy()[cidx]
        return df[c].to_numpy()[rep]

    raw = RawBatch({c: column(c).astype(object) for c in cats},
                   np.stack([column(c).astype(np.float32) for c in nums], 1) if nums
                   else np.zeros((len(rep), 0), dtype=np.float32),
                   np.zeros(len(rep), dtype=np.float32),
                   (df[cols.time].to_numpy(dtype=np.float64) if cols.time else np.arange(len(df), dtype=np.float64))[rep],
                   rep.astype(np.int64))
    return Expanded(raw, offsets, cand, shown, rep)


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class Split:
    df: pd.DataFrame
    exp: Expanded
    cold_ok: np.ndarray  # impressions in the cold block
    cold_mask: np.ndarray  # candidate rows that are never-shown creatives


def ranker_metrics(split: Split, cols: CreativeColumns, scores: np.ndarray | None, unmatched: str) -> dict[str, Any]:
    """NSCTR/sCTR (all ads, multi-creative ads, cold block), AUC and GAUC of a ranker's candidate scores
    (None = the logged policy)."""
    df, e = split.df, split.exp
    y = df[cols.label].to_numpy(dtype=np.float64)
    ads = df[cols.ad].to_numpy(dtype=object)
    # inverse-propensity weights are for a deterministic ranker's matches; the logging policy is the
    # policy the propensities describe, so its own impressions all count once (NSCTR = the logged CTR)
    prop = df[cols.propensity].to_numpy(dtype=np.float64) if cols.propensity and scores is not None else None
    n_cand = np.diff(e.offsets)
    if scores is None:
        matched, cold_matched, shown_score = np.ones(len(df)), np.ones(len(df)), None
    else:
        matched = match_weights(scores, e.offsets, e.shown)
        cold_matched = match_weights(np.where(split.cold_mask, scores, -np.inf), e.offsets, e.shown)
        shown_score = scores[e.offsets[:-1] + e.shown]
    out = nsctr(ads, matched, y, prop, unmatched)
    multi = n_cand > 1
    out["nsctr_multi"] = nsctr(ads[multi], matched[multi], y[multi], None if prop is None else prop[multi],
                               unmatched)["nsctr"] if multi.any() else float("nan")
    c = split.cold_ok
    out["cold"] = nsctr(ads[c], cold_matched[c], y[c], None if prop is None else prop[c], unmatched) \
        if c.any() else None
    if shown_score is None:
        out["auc"] = out["gauc"] = float("nan")
    else:
        out["auc"] = auc(y, shown_score)
        out["gauc"] = gauc(df[cols.gauc or cols.ad].to_numpy(dtype=object), y, shown_score)
    return out


def _nan_mean(xs: list[float]) -> tuple[float, float]:
    v = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run_evaluation(df: pd.DataFrame, cols: CreativeColumns, es: EvalSettings,
                   progress: Callable[[str], None] | None = None,
                   extra: dict[str, Callable[[Expanded], np.ndarray]] | None = None) -> dict[str, Any]:
    """The whole protocol (module docstring) on a prepared frame; returns the report dict.
    ``extra``: more rankers, name -> candidate scores of the test split's :class:`Expanded` rows
    (the benchmark's oracle on the synthetic world)."""
    es.validate()
    say = progress or (lambda _m: None)
    n = len(df)
    n_test = int(round(n * es.test_frac))
    n_pre = n - n_test
    n_val = int(round(n_pre * es.val_frac))
    if n_test < 10 or n_pre - n_val < 10 or n_val < 10:
        raise ConfigError(f"too few rows ({n}) for a fit/validation/test split")
    cat = catalog_of(df, cols)
    rng = np.random.default_rng(es.holdout_seed)
    all_cr = df[cols.creative].unique()
    held = set(rng.choice(all_cr, size=int(round(es.holdout_creatives * len(all_cr))), replace=False).tolist()) \
        if es.holdout_creatives > 0 else set()
    pre = df.iloc[:n_pre]
    pre = pre[~pre[cols.creative].isin(held)]
    fit, val, test = pre[pre.index < n_pre - n_val], pre[pre.index >= n_pre - n_val], df.iloc[n_pre:]
    probe = jac_config(df, cols, "jac", 0, es.jac)
    cats, nums = columns(probe)

    def split(part: pd.DataFrame, seen: pd.DataFrame) -> Split:
        e = expand(part, cols, cat, cats, nums)
        shown_before = set(seen[cols.creative].unique().tolist())
        cold_mask = ~np.isin(e.cand, list(shown_before))
        n_cold = np.add.reduceat(cold_mask.astype(np.int64), e.offsets[:-1]) if len(e.cand) else np.zeros(0)
        ok = cold_mask[e.offsets[:-1] + e.shown] & (n_cold >= 2)
        return Split(part.reset_index(drop=True), e, ok, cold_mask)

    say(f"{n} rows: fit {len(fit)}, validation {len(val)}, test {len(test)}; {len(held)} creatives held out")
    s_val, s_test = split(val, fit), split(test, pre)

    # Beta: k on validation, then counts on all of pre
    beta_fit = BetaCounts(ad_strength=es.ad_strength).fit(fit[cols.ad], _pair(fit, cols), fit[cols.label])
    val_keys = _pair_keys(s_val, cols)
    val_scores = {k: ranker_metrics(s_val, cols, beta_fit.scores(s_val.df[cols.ad].to_numpy()[s_val.exp.rep],
                                                                 val_keys, k), es.unmatched)["nsctr"]
                  for k in es.beta_strengths}
    best_k = max(val_scores, key=lambda k: (np.nan_to_num(val_scores[k], nan=-1), -k))
    beta = BetaCounts(best_k, es.ad_strength).fit(pre[cols.ad], _pair(pre, cols), pre[cols.label])
    beta_scores = beta.scores(s_test.df[cols.ad].to_numpy()[s_test.exp.rep], _pair_keys(s_test, cols))
    per_seed: dict[str, list[dict[str, Any]]] = {r: [] for r in RANKERS}
    per_seed["logged"].append(ranker_metrics(s_test, cols, None, es.unmatched))
    per_seed["beta"].append(ranker_metrics(s_test, cols, beta_scores, es.unmatched))
    for name, fn in (extra or {}).items():
        per_seed[name] = [ranker_metrics(s_test, cols, np.asarray(fn(s_test.exp), dtype=np.float64), es.unmatched)]
    ad_seed: dict[str, list[dict[str, float]]] = {"ar": [], "ar+": []}
    chosen: dict[str, list[int]] = {"cr": [], "jac": [], "ar": []}
    gcol = cols.gauc or cols.ad
    for seed in range(es.seeds):
        for mode in ("cr", "jac"):
            cfg = jac_config(df, cols, mode, seed, es.jac)
            lr, ep = _tune(cfg, fit, val, s_val, cols, cats, nums, es)
            cfg = replace(cfg, cr_lr=lr)
            chosen[mode].append({"cr_lr": lr, "epochs": ep})
            learner = JACLearner(cfg)
            train_raw = raw_rows(pre, cats, nums, cols)
            for _ in range(ep):
                learner.train(train_raw)
            if mode == "cr":
                per_seed["cr"].append(ranker_metrics(s_test, cols, learner.creative_logits(s_test.exp.raw), es.unmatched))
            else:
                per_seed["cr+"].append(ranker_metrics(s_test, cols, learner.creative_logits(s_test.exp.raw), es.unmatched))
                test_raw = raw_rows(test, cats, nums, cols)
                p_ad = learner.ad_pctr(test_raw)
                per_seed["cr+@ar"].append(ranker_metrics(
                    s_test, cols, learner.creative_logits(s_test.exp.raw, ar_pctr=p_ad[s_test.exp.rep], source="ar"),
                    es.unmatched))
                y = test[cols.label].to_numpy()
                ad_seed["ar+"].append({"auc": auc(y, p_ad), "gauc": gauc(test[gcol].to_numpy(dtype=object), y, p_ad)})
            say(f"seed {seed}: {mode} trained (lr {lr:g}, {ep} pass(es) chosen on validation)")
        ar = _train_ar(jac_config(df, cols, "jac", seed, es.jac), fit, val, pre, cols, cats, nums, es, chosen["ar"])
        p = ar.predict(_ar_view(probe, raw_rows(test, cats, nums, cols), nums))
        y = test[cols.label].to_numpy()
        ad_seed["ar"].append({"auc": auc(y, p), "gauc": gauc(test[gcol].to_numpy(dtype=object), y, p)})
        say(f"seed {seed}: ar trained")
    return _report(df, cols, es, per_seed, ad_seed, chosen, best_k, val_scores, s_test, held, len(fit), len(val))


def _ar_view(cfg: JACConfig, raw: RawBatch, nums: list[str]) -> RawBatch:
    return sub_raw(raw, [f.name for f in cfg.ar_fields], cfg.ar_numeric, nums)


def _pair(part: pd.DataFrame, cols: CreativeColumns) -> np.ndarray:
    return (part[cols.ad].astype(str) + "\x1f" + part[cols.creative].astype(str)).to_numpy(dtype=object)


def _pair_keys(s: Split, cols: CreativeColumns) -> np.ndarray:
    ads = s.df[cols.ad].to_numpy(dtype=object)[s.exp.rep]
    return np.array([f"{a}\x1f{c}" for a, c in zip(ads, s.exp.cand)], dtype=object)


AUC_TOLERANCE = 0.002  # JAC's passes: the best validation NSCTR among those within this of the best AR AUC


def _tune(cfg: JACConfig, fit: pd.DataFrame, val: pd.DataFrame, s_val: Split, cols: CreativeColumns,
          cats: list[str], nums: list[str], es: EvalSettings) -> tuple[float, int]:
    """Learning rate and passes over the training rows, chosen on validation by the creative
    ranker's LogLoss on the shown creatives (NSCTR counts only the matched impressions, about
    1/candidates of them: too noisy to choose between nearby settings; LogLoss uses every
    impression); for JAC, whose two halves are trained and published together, the best LogLoss
    among the settings whose ad-ranker AUC is within AUC_TOLERANCE of the best (so CR+ cannot be
    bought with an overfitted AR+). Nothing to try: the single setting, untrained."""
    if len(es.cr_lrs) == 1 and es.max_epochs == 1:
        return es.cr_lrs[0], 1
    raw = raw_rows(fit, cats, nums, cols)
    vraw = raw_rows(val, cats, nums, cols) if cfg.joint else None
    runs: list[tuple[float, int, float, float]] = []
    for lr in es.cr_lrs:
        learner = JACLearner(replace(cfg, cr_lr=lr))
        for ep in range(1, es.max_epochs + 1):
            learner.train(raw)
            z = learner.creative_logits(s_val.exp.raw)[s_val.exp.offsets[:-1] + s_val.exp.shown]
            v = -logloss(s_val.df[cols.label].to_numpy(), 1.0 / (1.0 + np.exp(-z)))
            a = auc(vraw.labels, learner.ad_pctr(vraw)) if vraw is not None else 0.0
            runs.append((lr, ep, v if math.isfinite(v) else -np.inf, a if math.isfinite(a) else 0.0))
    top_auc = max(r[3] for r in runs)
    ok = [r for r in runs if r[3] >= top_auc - AUC_TOLERANCE]
    best = max(ok, key=lambda r: (r[2], -r[1]))
    return best[0], best[1]


def _train_ar(cfg: JACConfig, fit: pd.DataFrame, val: pd.DataFrame, pre: pd.DataFrame, cols: CreativeColumns,
              cats: list[str], nums: list[str], es: EvalSettings, chosen: list[int]) -> CTRLearner:
    """The ad ranker alone (same network and settings as JAC's, BCE only); passes chosen on val AUC."""
    def batches(part: pd.DataFrame):
        raw = _ar_view(cfg, raw_rows(part, cats, nums, cols), nums)
        return [raw.slice(i, min(len(raw), i + cfg.batch_size)) for i in range(0, len(raw), cfg.batch_size)]

    learner = CTRLearner(ar_config(cfg))
    vraw = _ar_view(cfg, raw_rows(val, cats, nums, cols), nums)
    best, best_v = 1, -1.0
    for ep in range(1, es.max_epochs + 1 if es.max_epochs > 1 else 1):
        learner.train_window(batches(fit), epochs=1)
        v = auc(vraw.labels, learner.predict(vraw))
        if math.isfinite(v) and v > best_v + 1e-12:
            best, best_v = ep, v
    chosen.append(best)
    learner = CTRLearner(ar_config(cfg))
    for _ in range(best):
        learner.train_window(batches(pre), epochs=1)
    return learner


def _report(df, cols, es, per_seed, ad_seed, chosen, best_k, val_scores, s_test, held, n_fit, n_val) -> dict[str, Any]:
    keys = ("nsctr", "sctr", "auc", "gauc", "nsctr_multi", "matched_share", "nsctr_se", "matched_impressions",
            "matched_clicks")
    rankers: dict[str, Any] = {}
    cold: dict[str, Any] = {}
    for name, runs in per_seed.items():
        r: dict[str, Any] = {}
        for k in keys:
            r[k], r[f"{k}_std"] = _nan_mean([x[k] for x in runs])
        r["ads_unmatched"] = int(np.mean([x["ads_unmatched"] for x in runs]))
        r["runs"] = len(runs)
        rankers[name] = r
        cs = [x["cold"] for x in runs if x["cold"] is not None]
        if cs:
            m, s = _nan_mean([c["nsctr"] for c in cs])
            cold[name] = {"nsctr": m, "nsctr_std": s, "nsctr_se": _nan_mean([c["nsctr_se"] for c in cs])[0],
                          "matched_clicks": _nan_mean([c["matched_clicks"] for c in cs])[0],
                          "impressions": cs[0]["impressions"], "ads": cs[0]["ads"]}
    ad_rankers = {name: {k: _nan_mean([x[k] for x in runs])[0] for k in ("auc", "gauc")}
                  | {f"{k}_std": _nan_mean([x[k] for x in runs])[1] for k in ("auc", "gauc")}
                  for name, runs in ad_seed.items()}
    e = s_test.exp
    n_cand = np.diff(e.offsets)
    tdf = s_test.df
    return {
        "rankers": rankers,
        "cold": cold,
        "ad_rankers": ad_rankers,
        "data": {
            "rows": len(df), "fit_rows": n_fit, "validation_rows": n_val, "test_rows": len(tdf),
            "ads": int(df[cols.ad].nunique()), "creatives": int(df[cols.creative].nunique()),
            "test_ctr": float(tdf[cols.label].mean()), "test_clicks": int(tdf[cols.label].sum()),
            "mean_candidates": float(n_cand.mean()) if len(n_cand) else 0.0,
            "single_creative_impression_share": float((n_cand == 1).mean()) if len(n_cand) else 0.0,
            "held_out_creatives": len(held),
            "never_shown_candidate_share": float(s_test.cold_mask.mean()) if len(s_test.cold_mask) else 0.0,
            "cold_block_impressions": int(s_test.cold_ok.sum()),
        },
        "chosen": {"beta_strength": best_k, "beta_validation_nsctr": {str(k): v for k, v in val_scores.items()},
                   "neural": chosen},
        "counting": COUNTING,
        "settings": {k: v for k, v in es.__dict__.items()},
        "columns": cols.__dict__,
    }
