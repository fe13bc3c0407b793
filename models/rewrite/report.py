"""Reports of the rewrite / retrieval evaluations: several seeds → mean ± std, a printed table and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

REWRITE_COLS = ("relevance_rate", "relevance_at_1", "authenticity_rate", "expected_revenue", "coverage", "distinct_2",
                "combined", "combined_at_1")
SHORT = {"relevance_rate": "rel", "relevance_at_1": "rel@1", "authenticity_rate": "auth", "expected_revenue": "revenue",
         "coverage": "cover", "distinct_2": "dist-2", "combined": "R*", "combined_at_1": "R*@1"}


def _agg(values: Sequence[float | None]) -> dict[str, float]:
    a = np.array([v for v in values if v is not None], dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(len(a))} if len(a) else {"mean": float("nan"), "std": 0.0, "n": 0}


def summarize_rewrite(runs: Sequence[dict]) -> dict:
    """method -> mode -> slice -> metric -> {mean, std, n} over the runs (seeds)."""
    out: dict[str, Any] = {}
    for method in runs[0]["methods"]:
        for mode in runs[0]["methods"][method]:
            for sl in runs[0]["methods"][method][mode]:
                for k, v in runs[0]["methods"][method][mode][sl].items():
                    if v is not None and not isinstance(v, (int, float)):
                        continue
                    vals = [r["methods"][method][mode][sl][k] for r in runs
                            if sl in r["methods"].get(method, {}).get(mode, {})]
                    out.setdefault(method, {}).setdefault(mode, {}).setdefault(sl, {})[k] = _agg(vals)
    return out


def summarize_retrieval(runs: Sequence[dict]) -> dict:
    out: dict[str, Any] = {}
    for src in runs[0]["sources"]:
        for sl in runs[0]["sources"][src]:
            for k, v in runs[0]["sources"][src][sl].items():
                vals = [r["sources"][src][sl][k] for r in runs if sl in r["sources"][src]]
                out.setdefault(src, {}).setdefault(sl, {})[k] = _agg(vals)
    return out


def fmt(a: dict[str, float]) -> str:
    if not a["n"]:
        return "-"
    return f"{a['mean']:.3f}±{a['std']:.3f}" if a["n"] > 1 else f"{a['mean']:.3f}"


def rewrite_table(summary: dict, sl: str = "all", modes: Sequence[str] = ("served", "trie", "free")) -> str:
    head = f"{'method':<10} {'mode':<7} " + " ".join(f"{SHORT[c]:>13}" for c in REWRITE_COLS)
    lines = [f"slice: {sl}", head, "-" * len(head)]
    for method, by_mode in summary.items():
        for mode in modes:
            m = by_mode.get(mode, {}).get(sl)
            if m is None:
                continue
            lines.append(f"{method:<10} {mode:<7} " + " ".join(f"{fmt(m[c]):>13}" for c in REWRITE_COLS))
    return "\n".join(lines)


def retrieval_table(summary: dict, ks: Sequence[int]) -> str:
    slices = list(next(iter(summary.values())).keys())
    head = f"{'source':<8} {'slice':<11} " + " ".join(f"{'R@' + str(k):>13}" for k in ks) + f" {'queries':>8}"
    lines = [head, "-" * len(head)]
    for sl in slices:
        for src, by in summary.items():
            m = by[sl]
            lines.append(f"{src:<8} {sl:<11} " + " ".join(f"{fmt(m[f'recall@{k}']):>13}" for k in ks)
                         + f" {m['queries']['mean']:>8.0f}")
    return "\n".join(lines)


def rewrite_png(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("relevance_at_1", "coverage", "combined", "expected_revenue")
    methods = [m for m in summary if "served" in summary[m]]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6))
    for ax, c in zip(axes, cols):
        for j, sl in enumerate(("all", "tail", "no_literal")):
            if sl not in summary[methods[0]]["served"]:
                continue
            vals = [summary[m]["served"][sl][c] for m in methods]
            x = np.arange(len(methods)) + (j - 1) * 0.27
            ax.bar(x, [v["mean"] for v in vals], 0.27, yerr=[v["std"] for v in vals], label=sl, capsize=2)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
        ax.set_title(SHORT[c])
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retrieval_png(summary: dict, ks: Sequence[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(next(iter(summary.values())).keys())
    fig, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 3.6), squeeze=False)
    for ax, sl in zip(axes[0], slices):
        for src, by in summary.items():
            m = [by[sl][f"recall@{k}"]["mean"] for k in ks]
            e = [by[sl][f"recall@{k}"]["std"] for k in ks]
            ax.errorbar(ks, m, yerr=e, marker="o", label=src, capsize=2)
        ax.set_title(f"{sl} ({by[sl]['queries']['mean']:.0f} queries)")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_ylim(0, 1)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
