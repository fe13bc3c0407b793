"""Reporting for the incremental CTR protocol: per-strategy summaries, paired comparisons with a
bootstrap confidence interval, the printed table and the report files.

Paired comparison (``A − B``, e.g. ``ddp − finetune``): both strategies are scored on the same
test examples of the same periods with the same seeds. Per period, the difference of AUCs is
averaged over seeds; the reported figure is the mean over the test periods. Its 95 % interval is
a paired bootstrap: every replicate redraws the test examples of each period (Poisson(1) weights,
the same weights for both strategies, so the pairing is kept) and the seeds (with replacement),
and recomputes the mean AUC difference. The interval therefore covers both test-sample noise and
seed-to-seed training noise; the periods themselves are fixed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

N_BOOT = 1000
_CHUNK = 100


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC under example weights, for many weight vectors at once (ties count ½).

    ``y`` [n] labels, ``p`` [n] scores, ``w`` [B, n] non-negative weights -> [B] AUCs (NaN where a
    replicate has no positive or no negative weight). With all weights 1 it equals :func:`auc`.
    """
    order = np.argsort(p, kind="mergesort")
    ps, ys, ws = p[order], y[order].astype(bool), w[:, order]
    starts = np.r_[0, np.nonzero(np.diff(ps))[0] + 1]
    pos = np.add.reduceat(np.where(ys, ws, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, ws), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def paired_difference(
    labels: Sequence[np.ndarray],
    pred_a: Sequence[Sequence[np.ndarray]],
    pred_b: Sequence[Sequence[np.ndarray]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """``A − B`` in next-period AUC with a paired bootstrap 95 % interval (module docstring).

    ``labels[t]``: the labels of test period t; ``pred_a[s][t]`` / ``pred_b[s][t]``: probabilities
    of seed s on period t.
    """
    n_seeds, n_per = len(pred_a), len(labels)
    ones = [np.ones((1, len(y))) for y in labels]
    point = np.array([[weighted_auc(labels[t], pred_a[s][t], ones[t])[0]
                       - weighted_auc(labels[t], pred_b[s][t], ones[t])[0] for t in range(n_per)]
                      for s in range(n_seeds)])  # [seeds, periods]
    rng = np.random.default_rng(seed)
    reps: list[np.ndarray] = []
    for lo in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - lo)
        seeds = rng.integers(0, n_seeds, (b, n_seeds))
        diff = np.zeros((b, n_per))
        for t, y in enumerate(labels):
            w = rng.poisson(1.0, (b, len(y))).astype(np.float64)
            d = np.stack([weighted_auc(y, pred_a[s][t], w) - weighted_auc(y, pred_b[s][t], w) for s in range(n_seeds)], 1)
            diff[:, t] = np.take_along_axis(d, seeds, 1).mean(1)
        reps.append(np.nanmean(diff, 1))
    r = np.concatenate(reps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_period = np.nanmean(point, 0)
        lo_, hi_ = np.nanpercentile(r, [2.5, 97.5])
    mean = float(np.nanmean(per_period))
    return {
        "mean": mean,
        "ci95": [float(lo_), float(hi_)],
        "per_period": [_f(x) for x in per_period],
        "per_seed": [_f(x) for x in np.nanmean(point, 1)],
        "periods_better": int((per_period > 0).sum()),
        "n_boot": n_boot,
    }


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def nan_to_none(xs: Sequence[float]) -> list[float | None]:
    return [_f(x) for x in xs]


def summarise(per: dict[str, dict[str, list[list[float]]]]) -> dict[str, dict[str, Any]]:
    """Per strategy: per-period means over seeds, the mean over periods, its std across seeds."""
    out: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, d in per.items():
            a = np.array(d["auc"], dtype=np.float64)  # [seeds, periods]
            ll = np.array(d["logloss"], dtype=np.float64)
            ma, ml = np.nanmean(a, axis=1), np.nanmean(ll, axis=1)
            out[name] = {
                "auc": nan_to_none(np.nanmean(a, axis=0)),
                "logloss": nan_to_none(np.nanmean(ll, axis=0)),
                "mean_auc": _f(np.nanmean(ma)),
                "mean_logloss": _f(np.nanmean(ml)),
                "train_seconds": float(np.mean([s[0] for s in d["secs"]])),
                "seeds": int(a.shape[0]),
                "auc_std": nan_to_none(np.nanstd(a, axis=0)),
                "mean_auc_std": _f(np.nanstd(ma)),
                "mean_logloss_std": _f(np.nanstd(ml)),
            }
    return out


def _num(x: Any, w: int, d: int) -> str:
    return f"{x:>{w}.{d}f}" if isinstance(x, (int, float)) else f"{'n/a':>{w}}"


def format_table(report: dict[str, Any]) -> str:
    """Plain text: one row per strategy (mean ± std over seeds), then the paired comparisons."""
    lines = [f"{'strategy':<10} {'mean_auc':>9} {'±':>7} {'mean_logloss':>13} {'±':>7} {'train_s':>8}  chosen on validation"]
    for name, r in report["strategies"].items():
        chosen = r.get("chosen")
        ch = ", ".join(f"{k}={_short(v)}" for k, v in chosen.items()) if chosen else "(defaults)"
        lines.append(
            f"{name:<10} {_num(r['mean_auc'], 9, 4)} {_num(r.get('mean_auc_std'), 7, 4)} "
            f"{_num(r['mean_logloss'], 13, 4)} {_num(r.get('mean_logloss_std'), 7, 4)} {_num(r['train_seconds'], 8, 1)}  {ch}"
        )
    paired = report.get("paired") or {}
    if paired:
        lines.append("")
        lines.append(f"{'paired AUC difference':<24} {'mean':>8} {'95% CI':>21}  periods better / per period")
        for key, p in paired.items():
            per = " ".join(_num(x, 7, 4).strip() for x in p["per_period"])
            lines.append(
                f"{key:<24} {p['mean']:>+8.4f} [{p['ci95'][0]:>+8.4f}, {p['ci95'][1]:>+8.4f}]  "
                f"{p['periods_better']}/{len(p['per_period'])}: {per}"
            )
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Writes ``report.json`` and ``report.png`` (AUC per test period, one line per strategy)."""
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
    ax.set_xlabel("test period (after the validation prefix)")
    ax.set_ylabel("AUC (next period, mean over seeds)")
    ax.set_title(title or "next-period AUC per strategy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ppath = out / "report.png"
    fig.savefig(ppath, dpi=100)
    plt.close(fig)
    return jpath, ppath
