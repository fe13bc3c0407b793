"""The cold-start protocol for cross-domain CTR models on any labelled file (docs/crossdomain.md).

Input: one row per impression with a user, an item, a domain, a 0/1 label and a time (optional:
item-side categorical columns, shared by every domain and part of a history item, and context
columns). For every target domain ``T`` and seed:

1. Sort by time; the last ``test_share`` of the rows (by time) is the test period.
2. *Overlapping* users have rows in ``T`` and in another domain; ``cold_share`` of those with a
   ``T`` row in the test period are drawn as **cold-start users**. Every ``T`` row of a cold user
   (training and test period) is hidden: never learnt, never folded into any history.
3. Each model learns the training period window by window (``DACDRModel.learn``: the same code the
   stream trainer runs), then predicts the test period, each row with the history before it.
4. AUC / LogLoss on ``T``'s test rows: of the cold users (``cold``), of the others (``warm``) and all
   (``overall``); a paired bootstrap over cold users gives a 95 % interval of each model's cold AUC
   minus the single-domain model's.

Hyper-parameters (``grid``) are chosen per model on a validation split carved from the training
period (its last ``test_share``, with its own cold users), never on the test period.

Pure: a DataFrame in, plain dicts out; :func:`write_report` writes JSON and a PNG.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from core.errors import ConfigError
from models.crossdomain.config import VARIANTS, DACDRConfig
from models.crossdomain.frame import XDColumns, XDEvalConfig, load_frame, prepare_frame
from models.crossdomain.model import DACDRModel
from models.ctr.metrics import auc, logloss

log = logging.getLogger(__name__)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return df.to_dict("records")


def draw_cold_users(df: pd.DataFrame, target: str, lo: int, hi: int, share: float,
                    rng: np.random.Generator) -> set[str]:
    """``share`` of the overlapping users (rows in ``target`` and elsewhere) that have a ``target``
    row in rows [lo, hi)."""
    is_t = df["domain"].to_numpy() == target
    users = df["user_id"].to_numpy()
    in_t, in_s = set(users[is_t]), set(users[~is_t])
    eligible = sorted((in_t & in_s) & set(users[lo:hi][is_t[lo:hi]]))
    k = int(round(share * len(eligible)))
    return set(rng.choice(eligible, size=k, replace=False).tolist()) if k else set()


def _fit_predict(cfg: DACDRConfig, recs: list[dict], hide: np.ndarray, train_hi: int, test_hi: int,
                 windows: int) -> tuple[np.ndarray, DACDRModel, float]:
    t0 = time.perf_counter()
    model = DACDRModel(cfg)
    edges = np.linspace(0, train_hi, windows + 1).round().astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            model.learn(recs[a:b], hide=hide[a:b])
    p, _ = model.predict_window(recs[train_hi:test_hi], hide=hide[train_hi:test_hi])
    return p, model, time.perf_counter() - t0


def _metrics(y: np.ndarray, p: np.ndarray, cold: np.ndarray) -> dict[str, float]:
    return {"auc_overall": auc(y, p), "auc_cold": auc(y[cold], p[cold]), "auc_warm": auc(y[~cold], p[~cold]),
            "logloss_overall": logloss(y, p), "logloss_cold": logloss(y[cold], p[cold]) if cold.any() else float("nan")}


def paired_bootstrap(users: np.ndarray, y: np.ndarray, pa: np.ndarray, pb: np.ndarray, n: int,
                     rng: np.random.Generator) -> tuple[float, float]:
    """95 % interval of AUC(pa) − AUC(pb), resampling users (their rows together)."""
    codes, uniq = pd.factorize(users)
    if len(uniq) < 2 or n < 1:
        return float("nan"), float("nan")
    rows_of = [np.nonzero(codes == i)[0] for i in range(len(uniq))]
    diffs = []
    for _ in range(n):
        pick = np.concatenate([rows_of[i] for i in rng.integers(len(uniq), size=len(uniq))])
        d = auc(y[pick], pa[pick]) - auc(y[pick], pb[pick])
        if np.isfinite(d):
            diffs.append(d)
    if len(diffs) < max(10, n // 4):
        return float("nan"), float("nan")
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def _select(base: DACDRConfig, grid: dict[str, list[Any]], recs: list[dict], df: pd.DataFrame, target: str,
            train_hi: int, ec: XDEvalConfig, rng: np.random.Generator) -> tuple[DACDRConfig, list[dict]]:
    """The grid point with the best validation cold AUC (overall AUC breaks ties / NaN)."""
    if not grid:
        return base, []
    val_lo = int(round(train_hi * (1 - ec.test_share)))
    cold = draw_cold_users(df.iloc[:train_hi], target, val_lo, train_hi, ec.cold_share, rng)
    hide = ((df["domain"].to_numpy() == target) & df["user_id"].isin(cold).to_numpy())[:train_hi]
    keys = sorted(grid)
    tried = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = replace(base, **dict(zip(keys, values)))
        p, _, _ = _fit_predict(cfg, recs, hide, val_lo, train_hi, ec.windows)
        part = df.iloc[val_lo:train_hi]
        is_t = part["domain"].to_numpy() == target
        m = _metrics(part["clicked"].to_numpy()[is_t], p[is_t], part["user_id"].isin(cold).to_numpy()[is_t])
        tried.append({"params": dict(zip(keys, values)), "val_auc_cold": m["auc_cold"],
                      "val_auc_overall": m["auc_overall"]})
    key = lambda t: (np.nan_to_num(t["val_auc_cold"], nan=-1.0), np.nan_to_num(t["val_auc_overall"], nan=-1.0))  # noqa: E731
    best = max(tried, key=key)
    return replace(base, **best["params"]), tried


def run_protocol(df: pd.DataFrame, cols: XDColumns, ec: XDEvalConfig,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The protocol of the module docstring on a frame from :func:`prepare_frame`."""
    ec.validate()
    domains = sorted(df["domain"].unique().tolist())
    targets = ec.targets or domains
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise ConfigError(f"target domain(s) {unknown} are not in the data (domains: {domains})")
    n = len(df)
    train_hi = int(round(n * (1 - ec.test_share)))
    recs = _records(df)
    y_all = df["clicked"].to_numpy()
    report: dict[str, Any] = {"rows": n, "domains": {d: int((df["domain"] == d).sum()) for d in domains},
                              "clicks": int(y_all.sum()), "test_rows": n - train_hi,
                              "config": {"test_share": ec.test_share, "cold_share": ec.cold_share,
                                         "windows": ec.windows, "seeds": ec.seeds, "grid": ec.grid,
                                         "model": ec.model},
                              "columns": {"user": cols.user, "item": cols.item, "domain": cols.domain,
                                          "label": cols.label, "time": cols.time,
                                          "item_features": cols.item_features, "context": cols.context},
                              "targets": {}}
    base_kw = dict(item_fields=["ad_id", *cols.item_features], context_fields=["user_id", *cols.context],
                   domains=domains, **ec.model)
    for target in targets:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ec.variants}
        diffs: dict[str, list[tuple[float, float]]] = {v: [] for v in ec.variants if v != "single"}
        per_seed_counts = []
        for seed in range(ec.seeds):
            rng = np.random.default_rng([seed, 17])
            cold = draw_cold_users(df, target, train_hi, n, ec.cold_share, rng)
            is_t = df["domain"].to_numpy() == target
            hide = is_t & df["user_id"].isin(cold).to_numpy()
            test = slice(train_hi, n)
            t_mask = is_t[test]
            y = y_all[test][t_mask]
            cold_rows = df["user_id"].to_numpy()[test][t_mask]
            cold_mask = np.isin(cold_rows, list(cold))
            per_seed_counts.append({"cold_users": len(cold), "cold_rows": int(cold_mask.sum()),
                                    "cold_clicks": int(y[cold_mask].sum()), "target_test_rows": int(t_mask.sum()),
                                    "target_test_clicks": int(y.sum())})
            probs = {}
            for v in ec.variants:
                base = DACDRConfig.variant(v, target, seed=seed, **base_kw)
                cfg, tried = _select(base, ec.grid, recs, df, target, train_hi, ec, np.random.default_rng([seed, 29]))
                p, model, secs = _fit_predict(cfg, recs, hide, train_hi, n, ec.windows)
                probs[v] = p[t_mask]
                m = _metrics(y, probs[v], cold_mask)
                m.update({"seed": seed, "seconds": secs, "chosen": {k: getattr(cfg, k) for k in ec.grid},
                          "validation": tried})
                runs[v].append(m)
                if progress:
                    progress(1)
            if "single" in probs:
                for v in diffs:
                    diffs[v].append(paired_bootstrap(cold_rows[cold_mask], y[cold_mask], probs[v][cold_mask],
                                                     probs["single"][cold_mask], ec.bootstrap,
                                                     np.random.default_rng([seed, 31])))
        report["targets"][target] = {"counts": per_seed_counts, "models": {v: _summarise(rs) for v, rs in runs.items()},
                                     "cold_auc_minus_single_ci95": {v: d for v, d in diffs.items()},
                                     "runs": runs}
    return report


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for k in ("auc_cold", "auc_overall", "auc_warm", "logloss_overall", "logloss_cold", "seconds"):
        vals = np.array([r[k] for r in runs], dtype=float)
        ok = vals[np.isfinite(vals)]
        out[k] = {"mean": float(ok.mean()) if len(ok) else None,
                  "std": float(ok.std(ddof=1)) if len(ok) > 1 else (0.0 if len(ok) == 1 else None), "n": int(len(ok))}
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for target, r in report["targets"].items():
        c = r["counts"][0] if r["counts"] else {}
        lines.append(f"target {target}: {c.get('cold_users', 0)} cold users, {c.get('cold_rows', 0)} cold test rows "
                     f"({c.get('cold_clicks', 0)} clicks), {c.get('target_test_rows', 0)} target test rows")
        lines.append(f"  {'model':<8} {'cold AUC':>17} {'overall AUC':>17} {'warm AUC':>17}")
        for v, s in r["models"].items():
            def f(k: str) -> str:
                m, sd = s[k]["mean"], s[k]["std"]
                return "n/a".rjust(17) if m is None else f"{m:.4f} ± {sd:.4f}".rjust(17)
            lines.append(f"  {v:<8} {f('auc_cold')} {f('auc_overall')} {f('auc_warm')}")
        for v, cis in r["cold_auc_minus_single_ci95"].items():
            txt = ", ".join("n/a" if not np.isfinite(lo) else f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in cis)
            lines.append(f"  cold AUC {v} − single, 95% CI per seed: {txt}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "report.json", out / "report.png"
    jpath.write_text(json.dumps(report, indent=2, default=_json_default))
    targets = list(report["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        models = report["targets"][t]["models"]
        names = list(models)
        x = np.arange(len(names))
        for j, (k, lab) in enumerate((("auc_cold", "cold-start users"), ("auc_overall", "overall"))):
            means = [models[m][k]["mean"] or np.nan for m in names]
            sds = [models[m][k]["std"] or 0.0 for m in names]
            ax.bar(x + (j - 0.5) * 0.38, means, 0.38, yerr=sds, capsize=3, label=lab)
        ax.set_xticks(x, names)
        vals = [models[m][k]["mean"] for m in names for k in ("auc_cold", "auc_overall") if models[m][k]["mean"]]
        if vals:
            ax.set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.05))
        lo_, hi_ = ax.get_ylim()
        if lo_ <= 0.5 <= hi_:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_ylabel("AUC (mean ± sd over seeds)")
        ax.set_title(f"target: {t}")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "cross-domain cold-start evaluation")
    fig.tight_layout()
    fig.savefig(ppath, dpi=110)
    plt.close(fig)
    return jpath, ppath


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def world_frame(seed: int = 7, duration_s: float = 7200.0, requests_per_s: float = 10.0, **xd: Any) -> pd.DataFrame:
    """The cross-domain synthetic world's examples (three domains, users new to ``feed``)."""
    from core.domains import CROSS_DOMAINS, CrossDomainConfig
    from core.world import DriftConfig, World, WorldConfig

    w = World(WorldConfig(seed=seed, domains=CROSS_DOMAINS, drift=DriftConfig(horizon_s=duration_s),
                          cross_domain=CrossDomainConfig(enabled=True, **xd)))
    return w.to_examples_frame(duration_s=duration_s, requests_per_s=requests_per_s)


__all__: Sequence[str] = ("XDColumns", "XDEvalConfig", "draw_cold_users", "format_table", "load_frame",
                          "paired_bootstrap", "prepare_frame", "run_protocol", "world_frame", "write_report")
