"""Model Prior strength per example, and its per-window adaptation by empirical Bayes.

Everything here is computed *before* the learner trains on a window, from the model as it was at
the start of the window (the teacher) and the window's raw examples:

- ``before`` [B, F]: sightings of each example's values that the teacher rests on (its evidence
  arrays, possibly decayed; 0 for values it has no row for: never seen, not admitted, or admitted
  only in this window);
- ``window`` [B, F]: sightings of the same rows in the whole window;
- the per-example strength λ_i (``const``: λ; ``count``: λ·mean_f n/(n+n0); ``evidence``:
  λ·agg_f n/m, see :func:`models.ctr.losses.evidence_strength`);
- with ``mp_adapt="pv"``: one scale ``s`` per window that multiplies every λ_i, set from
  progressive validation of the *previous* update (:func:`best_step`, :func:`pv_scale`).

Progressive validation of the last update, in short: at the start of window t the learner holds
the model after window t-1 (``z_now``) and the one before it (``z_before``, a frozen copy kept for
one window). Neither has seen window t. Along the update's direction in logit space, the step
multiple α that predicts window t best says whether the last update was too timid (α > 1: the new
data carried more than the prior let in, so weaken the prior) or too bold (α < 1: it chased noise,
so strengthen it). The scale follows from α in closed form; when the data say the prior only held
learning back, it drops to 0 and the window is plain fine-tuning.
"""

from __future__ import annotations

import numpy as np
import torch

from models.ctr.losses import count_strength, evidence_strength



def window_counts(rows: list[np.ndarray], capacities: list[int]) -> list[np.ndarray]:
    """Sightings per row and field over all batches of a window (``rows``: [B, F] per batch)."""
    out = [np.zeros(c, dtype=np.float64) for c in capacities]
    for r in rows:
        for f, cnt in enumerate(out):
            np.add.at(cnt, r[:, f], 1.0)
    return out


def strengths(
    mode: str, lam: float, before: np.ndarray, window: np.ndarray, n0: float, agg: str
) -> torch.Tensor:
    """λ_i [B] for one batch (``before``, ``window``: [B, F] float arrays)."""
    b = torch.from_numpy(before)
    if mode == "const":
        return torch.full((len(before),), float(lam), dtype=torch.float32)
    if mode == "count":
        return count_strength(lam, b, n0)
    return evidence_strength(lam, b, torch.from_numpy(window), agg)


ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
MAX_SCALE = 8.0
PV_GAIN = 0.5


def best_step(z_now: np.ndarray, z_before: np.ndarray, y: np.ndarray, grid: tuple[float, ...] = ALPHA_GRID) -> float:
    """The multiple α of the last update that predicts new data best: argmin over ``grid`` of the
    LogLoss of ``z_before + α·(z_now − z_before)`` on labels ``y`` (α = 1: the update as made)."""
    y = y.astype(np.float64)
    d = z_now.astype(np.float64) - z_before.astype(np.float64)
    best, best_ll = 1.0, np.inf
    for a in grid:
        z = z_before + a * d
        ll = float(np.mean(np.logaddexp(0.0, z) - y * z))  # BCE with logits
        if ll < best_ll - 1e-12:
            best, best_ll = a, ll
    return best


def pv_scale(alpha: float, scale: float, lam_bar: float, gain: float = PV_GAIN, max_scale: float = MAX_SCALE) -> float:
    """The next window's λ scale from the last update's best step multiple α (module docstring).

    With the posterior-label Model Prior (unweighted), the step a window makes toward its data is
    about ``φ = 1/(1 + s·λ̄)`` of fine-tuning's; the step that would have predicted the next window
    best is α·φ. The controller moves φ part of the way there, ``φ' = φ·α^gain`` (``gain`` = 1:
    all the way; ½ damps the window-to-window noise of α), caps it at 1 (no prior: fine-tuning)
    and solves ``φ' = 1/(1 + s'·λ̄)`` for ``s'`` (at most ``max_scale``).
    """
    if lam_bar <= 0:
        return scale
    phi = 1.0 / (1.0 + scale * lam_bar)
    if alpha <= 0.0:
        return max_scale
    phi_new = min(1.0, phi * alpha**gain)
    if phi_new >= 1.0:
        return 0.0
    return float(min(max_scale, (1.0 / phi_new - 1.0) / lam_bar))
