"""The budgeted hyper-parameter search of the CTR protocol: the same for every strategy.

Every strategy, baselines included, gets the same number of trials (``EvalConfig.search_trials``)
and the same two-stage procedure:

1. *Shared settings* (learning rates, epochs), half the budget: trial 0 is the configuration as
   given (the defaults); trial j ≥ 1 draws the shared settings from a stream seeded by ``j``
   alone, so trial j of every strategy uses the very same shared settings (common random
   numbers), with the strategy's own settings at their defaults. The trial with the best *mean*
   validation AUC over all strategies of the run is kept for all of them (the consensus): the
   training regime is chosen once, by a rule that treats every strategy alike, so the comparison
   measures the methods and not which strategy's noisy pick landed on a luckier learning rate.
2. *Own settings*, the other half: around the consensus (its learning rates multiplied by a
   log-uniform factor in [1/2, 2], the same factor for every strategy at trial j, its epochs
   kept), the strategy's own settings (retrain mode and window, distillation weight and
   temperature, the prior's strengths and where it enters) are drawn from a stream seeded by
   ``j`` and the strategy's name; a setting with a few named values cycles through them (trial j
   takes value j mod n, from a per-strategy offset), so every value is tried once the budget
   allows. Fine-tuning has no own settings: its second stage refines the learning rates only.

Each strategy takes its best trial among the consensus trial and its stage-2 trials.

*The no-prior point* (``NO_PRIOR``, ``EvalConfig.prior_check="ci"``): ``ddp`` then also runs its
chosen trial with every prior switched off (Feature Prior and Model Prior: plain fine-tuning at the
same settings) on the same validation periods, and keeps the prior only when it beats that point
beyond noise: the paired bootstrap 95 % interval of the validation AUC difference (prior − none,
:func:`models.eval_report.paired_difference`) lies above 0. Otherwise the no-prior point is
chosen: when the validation data cannot tell the prior helps, DDP falls back to fine-tuning
instead of taking a bet the search could not see (issue 10, item 4). The check is one extra
validation run; it never reads a test period.
Each trial runs the strategy on the validation prefix only (warm start, then train on period t and
score period t+1 for the ``val_periods`` periods after the warm start) and is ranked by its mean
validation AUC (ties: lower LogLoss). The test periods are never touched by the search.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Param:
    """One searched setting: ``log`` draws log-uniformly in ``values = (lo, hi)``; ``choice``
    draws one of ``values``."""

    name: str
    kind: str
    values: tuple[Any, ...]

    def draw(self, rng: np.random.Generator, j: int | None = None) -> Any:
        """A random value; for a ``choice`` with ``j`` given, the j-th value in turn."""
        if self.kind == "log":
            lo, hi = self.values
            return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        if j is not None:
            return self.values[j % len(self.values)]
        return self.values[int(rng.integers(len(self.values)))]


SHARED = (
    Param("emb_lr", "log", (0.003, 0.2)),
    Param("dense_lr", "log", (0.001, 0.05)),
    Param("epochs", "choice", (1, 2, 3)),
)
_FP = (Param("fp_use", "choice", ("both", "logit", "input")), Param("fp_strength", "log", (5.0, 200.0)),
       Param("fp_decay", "choice", (1.0, 0.8, 0.5)))
_MP = (Param("mp_lambda", "log", (0.05, 2.0)),)
OWN: dict[str, tuple[Param, ...]] = {
    "retrain": (Param("retrain_mode", "choice", ("expanding", "sliding")), Param("retrain_window", "choice", (1, 2, 3, 4))),
    "finetune": (),
    "distill": (Param("distill_weight", "log", (0.1, 3.0)), Param("distill_temperature", "choice", (1.0, 2.0, 4.0))),
    "ddp-fp": _FP,
    "ddp-mp": _MP,
    "ddp": _FP + _MP,
}


# the strategies that fall back to their no-prior point unless the prior earns it on validation
NO_PRIOR: dict[str, dict[str, Any]] = {"ddp": {"fp": "off", "mp": "off"}}


def prior_check(labels: list[np.ndarray], probs_prior: list[np.ndarray], probs_none: list[np.ndarray],
                seed: int = 0) -> dict[str, Any]:
    """Keep the prior only when its validation AUC beats the no-prior point's beyond noise: the
    paired bootstrap 95 % interval of the difference (prior − none) lies above 0."""
    from models.eval_report import paired_difference

    d = paired_difference(labels, [probs_prior], [probs_none], seed=seed)
    return {"keep_prior": bool(d["ci95"][0] > 0), "prior_minus_none": d["mean"], "ci95": d["ci95"],
            "per_period": d["per_period"]}


def stage1(n: int, search_seed: int = 0) -> list[dict[str, Any]]:
    """The first-stage trials (the same for every strategy): ``{}`` first, then shared draws."""
    return [{}] + [{p.name: p.draw(np.random.default_rng([search_seed, j])) for p in SHARED} for j in range(1, n)]


def stage2(strategy: str, winner: dict[str, Any], base: dict[str, Any], n: int, search_seed: int = 0) -> list[dict[str, Any]]:
    """Second-stage trials around the consensus stage-1 trial (``winner``: its settings, ``base``:
    the values it left at their defaults)."""
    tag = zlib.crc32(strategy.encode())
    out: list[dict[str, Any]] = []
    for j in range(n):
        rng = np.random.default_rng([search_seed, 1000 + j, tag])
        common = np.random.default_rng([search_seed, 1000 + j])  # the same factors for every strategy
        t = {**{p.name: base[p.name] for p in SHARED}, **winner}
        for lr in ("emb_lr", "dense_lr"):
            t[lr] = float(t[lr] * 2.0 ** common.uniform(-1.0, 1.0))
        t.update({p.name: p.draw(rng, j + zlib.crc32(f"{strategy}:{p.name}".encode())) for p in OWN.get(strategy, ())})
        out.append(t)
    return out


def best_trial(results: list[dict[str, Any]]) -> int:
    """Index of the trial with the highest mean validation AUC (ties: lower LogLoss; NaN last)."""

    def key(i: int) -> tuple[float, float]:
        a, ll = results[i]["val_auc"], results[i]["val_logloss"]
        return (a if a is not None and np.isfinite(a) else -np.inf, -(ll if ll is not None and np.isfinite(ll) else np.inf))

    return max(range(len(results)), key=key)
