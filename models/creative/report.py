"""The printed table and the PNG of an ``evaluate-creative`` report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _f(x: Any, d: int = 4) -> str:
    return f"{x:.{d}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _pm(r: dict[str, Any], k: str) -> str:
    v, s = r.get(k), r.get(f"{k}_std")
    if not (isinstance(v, (int, float)) and math.isfinite(v)):
        return "n/a"
    return f"{v:.4f}±{s:.4f}" if isinstance(s, (int, float)) and math.isfinite(s) and s > 0 else f"{v:.4f}"


def format_table(report: dict[str, Any]) -> str:
    d = report["data"]
    lines = [f"test: {d['test_rows']} impressions, {d['test_clicks']} clicks (CTR {_f(d['test_ctr'])}), "
             f"{d['ads']} ads, {d['creatives']} creatives, {d['mean_candidates']:.1f} candidates per impression, "
             f"{100 * d['single_creative_impression_share']:.1f}% of impressions in single-creative ads",
             f"{'ranker':<8} {'NSCTR':>15} {'sCTR':>15} {'AUC':>15} {'GAUC':>15} {'NSCTR multi':>15} "
             f"{'never-shown':>15} {'unmatched ads':>13}"]
    for name, r in report["rankers"].items():
        cold = report["cold"].get(name)
        lines.append(f"{name:<8} {_pm(r, 'nsctr'):>15} {_pm(r, 'sctr'):>15} {_pm(r, 'auc'):>15} {_pm(r, 'gauc'):>15} "
                     f"{_pm(r, 'nsctr_multi'):>15} {_pm(cold, 'nsctr') if cold else 'n/a':>15} "
                     f"{r.get('ads_unmatched', 0):>13}")
    c = next(iter(report["cold"].values()), None)
    lines.append(f"never-shown block: {c['impressions']} test impressions of {c['ads']} ads" if c else
                 "never-shown block: no test impression of an ad with >= 2 never-shown creatives (nothing to rank)")
    if report.get("ad_rankers"):
        lines.append(f"{'ad ranker':<10} {'AUC':>15} {'GAUC':>15}")
        for name, r in report["ad_rankers"].items():
            lines.append(f"{name:<10} {_pm(r, 'auc'):>15} {_pm(r, 'gauc'):>15}")
    ch = report["chosen"]
    lines.append(f"chosen on validation: Beta strength {ch['beta_strength']:g}; {ch['neural']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """``report.json`` and ``report.png`` (NSCTR per ranker, all and never-shown creatives; ad AUC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "report.json"
    jpath.write_text(json.dumps(report, indent=2, default=lambda o: None))
    names = list(report["rankers"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, block, label in ((axes[0], report["rankers"], "NSCTR (test)"),
                             (axes[1], report["cold"], "NSCTR, never-shown creatives")):
        vals = [block.get(n, {}).get("nsctr", math.nan) for n in names]
        errs = [block.get(n, {}).get("nsctr_std", 0.0) or 0.0 for n in names]
        ax.bar(names, [v if v == v else 0 for v in vals], yerr=errs, capsize=3,
               color=["grey", "tab:orange", "tab:blue", "tab:green", "tab:olive"][: len(names)])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        finite = [v for v in vals if v == v]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 0.3 * (hi - lo + 1e-9) - 0.002), hi + 0.3 * (hi - lo + 1e-9) + 0.002)
        else:
            ax.text(0.5, 0.5, "nothing to rank", ha="center", transform=ax.transAxes)
    ar = report.get("ad_rankers") or {}
    if ar:
        axes[2].bar(list(ar), [r["auc"] for r in ar.values()], yerr=[r.get("auc_std", 0) for r in ar.values()],
                    capsize=3, color=["tab:purple", "tab:red"])
        vals = [r["auc"] for r in ar.values() if r["auc"] == r["auc"]]
        if vals:
            axes[2].set_ylim(min(vals) - 0.02, max(vals) + 0.02)
        axes[2].set_title("ad ranker AUC (test)")
    fig.suptitle(title or "creative rankers")
    fig.tight_layout()
    ppath = out / "report.png"
    fig.savefig(ppath, dpi=100)
    plt.close(fig)
    return jpath, ppath
