"""Data-Driven Prior, Feature Prior half: per-feature-value click estimates.

Two variants (switch ``CTRConfig.fp``):

- :class:`LearnedFeaturePrior` (``"learned"``): a 1-dim embedding per value, parameterised as
  ``b_{f,v} = m_f + d_{f,v}`` (field mean logit + value offset), trained with an auxiliary BCE on
  the label. The offset has a Gaussian prior ``γ·d²`` (MAP shrinkage toward the field mean), spread
  over the value's occurrences: the k-th sighting carries ``γ/(k(k+1))``, and these weights sum to
  ``γ·(1 - 1/(n+1))`` after ``n`` sightings. The likelihood grows with ``n`` while the prior stays
  ≈ ``γ``: rare values stay near the field mean, frequent ones converge to their empirical CTR (the
  minimiser of a value's BCE is ``logit(mean y)``).
- :class:`RowCountPrior` (``"count"``, what the learner uses): cumulative clicks/impressions per
  embedding row of every field and the Beta posterior mean ``(c + α)/(n + α + β)`` with
  ``α = κ·m``, ``β = κ·(1-m)``, ``m`` the field CTR and ``κ`` the prior strength. It lives in the id
  mappers' row space, so it is bounded by the tables' capacity and a recycled row (id expiry)
  starts from zero counts, exactly like its embedding.
- :class:`BetaPriorTable`: the same estimate keyed by raw values (unbounded), for callers that
  hold aggregates by value (e.g. the feature store). Pure: fed with :meth:`BetaPriorTable.update`.

The Model Prior half lives in :mod:`models.ctr.losses`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ctr.hashing import _key


class LearnedFeaturePrior(nn.Module):
    """Per-value click logits ``u[b, f] = m_f + d_f[row]`` for rows [B, F] of every field.

    Args:
        capacities: rows per field (same row space as the id mappers).
        init_ctr: initial field CTR (sets ``m_f``).
    """

    def __init__(self, capacities: Sequence[int], init_ctr: float = 0.05) -> None:
        super().__init__()
        offs = np.r_[0, np.cumsum(capacities)[:-1]]
        self.register_buffer("offsets", torch.tensor(offs, dtype=torch.long), persistent=False)
        self.delta = nn.Embedding(int(sum(capacities)), 1, sparse=True)
        nn.init.zeros_(self.delta.weight)
        init = float(np.log(init_ctr / (1 - init_ctr)))
        self.field_mean = nn.Parameter(torch.full((len(capacities),), init))

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(u, d)``: prior logits [B, F] and the value offsets [B, F]."""
        d = self.delta(rows + self.offsets).squeeze(-1)
        return self.field_mean + d, d

    @staticmethod
    def loss(u: torch.Tensor, d: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
        """Auxiliary loss: BCE(u_f, y) + γ/(k(k+1))·d², mean over batch and fields.

        ``counts`` [B, F]: k, the sighting number of each value (1 for its first sighting).
        """
        bce = F.binary_cross_entropy_with_logits(u, y[:, None].expand_as(u), reduction="none")
        k = counts.clamp(min=1).to(u.dtype)
        shrink = gamma * d.pow(2) / (k * (k + 1))
        return (bce + shrink).mean()

    def set_field_means(self, logit: float) -> None:
        """Sets every field mean (the data-driven start: logit of the first batch's CTR)."""
        with torch.no_grad():
            self.field_mean.fill_(float(logit))

    def reset_rows(self, field: int, rows: np.ndarray | torch.Tensor) -> None:
        """Puts recycled rows back to the field mean (offset 0)."""
        if len(rows):
            with torch.no_grad():
                self.delta.weight[torch.as_tensor(rows, dtype=torch.long) + self.offsets[field]] = 0.0

    def estimate(self, field: int, rows: np.ndarray) -> np.ndarray:
        """σ(b) for rows of one field (plain numpy, for inspection and tests)."""
        with torch.no_grad():
            r = torch.as_tensor(rows, dtype=torch.long) + self.offsets[field]
            return torch.sigmoid(self.field_mean[field] + self.delta.weight[r, 0]).numpy()


class BetaPriorTable:
    """Cumulative per-value clicks/impressions of one field and their Beta posterior means.

    Args:
        strength: κ, the prior's pseudo-impressions (α + β).
        prior_mean: fixed field CTR ``m``; ``None`` = the table's own running field CTR.
        smoothing: pseudo-counts on the field CTR itself (keeps ``m`` defined on an empty table).

    Example::

        t = BetaPriorTable(strength=20)
        t.update(np.array(["a", "b"]), clicks=np.array([3, 0]), impressions=np.array([10, 1]))
        t.estimate(np.array(["a", "zzz"]))  # (3+α)/(10+20), and the field mean for an unseen value
    """

    def __init__(self, strength: float = 20.0, prior_mean: float | None = None, smoothing: float = 1.0) -> None:
        if strength <= 0:
            raise ValueError("strength must be > 0")
        self.strength = float(strength)
        self.prior_mean = prior_mean
        self.smoothing = float(smoothing)
        self._index: dict[Any, int] = {}
        self._clicks = np.zeros(1024, dtype=np.float64)
        self._imps = np.zeros(1024, dtype=np.float64)
        self.total_clicks = 0.0
        self.total_impressions = 0.0

    def __len__(self) -> int:
        return len(self._index)

    def field_mean(self) -> float:
        if self.prior_mean is not None:
            return float(self.prior_mean)
        s = self.smoothing
        return (self.total_clicks + 0.05 * s) / (self.total_impressions + s)

    def _ids(self, values: np.ndarray, create: bool) -> np.ndarray:
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=False)
        uid = np.empty(len(uniques), dtype=np.int64)
        for i, u in enumerate(uniques):
            k = _key(u)
            j = self._index.get(k)
            if j is None:
                if not create:
                    uid[i] = -1
                    continue
                j = len(self._index)
                self._index[k] = j
                if j >= len(self._clicks):
                    self._clicks = np.resize(self._clicks, 2 * len(self._clicks))
                    self._imps = np.resize(self._imps, 2 * len(self._imps))
                    self._clicks[j:] = 0
                    self._imps[j:] = 0
            uid[i] = j
        return uid[codes] if len(uniques) else np.zeros(0, dtype=np.int64)

    def update(self, values: np.ndarray, clicks: np.ndarray, impressions: np.ndarray | None = None) -> None:
        """Adds clicks and impressions per value (one row per value occurrence or per aggregate)."""
        clicks = np.asarray(clicks, dtype=np.float64)
        imps = np.ones_like(clicks) if impressions is None else np.asarray(impressions, dtype=np.float64)
        ids = self._ids(np.asarray(values, dtype=object), create=True)
        np.add.at(self._clicks, ids, clicks)
        np.add.at(self._imps, ids, imps)
        self.total_clicks += float(clicks.sum())
        self.total_impressions += float(imps.sum())

    def estimate(self, values: np.ndarray) -> np.ndarray:
        """Posterior mean CTR per value; unseen values get the field mean."""
        m = self.field_mean()
        a, b = self.strength * m, self.strength * (1 - m)
        ids = self._ids(np.asarray(values, dtype=object), create=False)
        c = np.where(ids >= 0, self._clicks[np.maximum(ids, 0)], 0.0)
        n = np.where(ids >= 0, self._imps[np.maximum(ids, 0)], 0.0)
        return (c + a) / (n + a + b)

    def logit(self, values: np.ndarray) -> np.ndarray:
        p = np.clip(self.estimate(values), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    def counts(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) per value (0 for unseen)."""
        ids = self._ids(np.asarray(values, dtype=object), create=False)
        ok = ids >= 0
        return (np.where(ok, self._clicks[np.maximum(ids, 0)], 0.0), np.where(ok, self._imps[np.maximum(ids, 0)], 0.0))

    def decay(self, factor: float) -> None:
        """Multiplies every count by ``factor`` (0 < factor <= 1): older evidence weighs less."""
        if not 0 < factor <= 1:
            raise ValueError("decay factor must be in (0, 1]")
        n = len(self._index)
        self._clicks[:n] *= factor
        self._imps[:n] *= factor
        self.total_clicks *= factor
        self.total_impressions *= factor

    def state_dict(self) -> dict[str, Any]:
        n = len(self._index)
        return {
            "strength": self.strength,
            "prior_mean": self.prior_mean,
            "smoothing": self.smoothing,
            "keys": list(self._index),
            "clicks": self._clicks[:n].copy(),
            "imps": self._imps[:n].copy(),
            "totals": [self.total_clicks, self.total_impressions],
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.strength, self.prior_mean, self.smoothing = float(s["strength"]), s["prior_mean"], float(s["smoothing"])
        self._index = {k: i for i, k in enumerate(s["keys"])}
        n = max(1024, 2 * len(self._index))
        self._clicks = np.zeros(n)
        self._imps = np.zeros(n)
        self._clicks[: len(self._index)] = s["clicks"]
        self._imps[: len(self._index)] = s["imps"]
        self.total_clicks, self.total_impressions = (float(x) for x in s["totals"])

    def validate(self) -> list[str]:
        n = len(self._index)
        bad = []
        if not (np.isfinite(self._clicks[:n]).all() and np.isfinite(self._imps[:n]).all()):
            bad.append("non-finite counts")
        if (self._imps[:n] < 0).any() or (self._clicks[:n] < 0).any():
            bad.append("negative counts")
        return bad


class RowCountPrior:
    """Clicks and impressions per embedding row of every field, and their Beta posterior means.

    Args:
        capacities: rows per field (the id mappers' row space).
        strength: κ, the prior's pseudo-impressions around the field CTR.
        smoothing: pseudo-impressions on the field CTR itself (defined before any data).

    Row 0 (the mappers' cold row, shared by every value without a row) always returns the field
    mean. The learner calls :meth:`reset` for rows the mappers recycle, :meth:`update` *after* a
    batch's step (so a batch's inputs only hold earlier labels) and :meth:`decay` after a window.
    State is plain numpy arrays and floats.
    """

    def __init__(self, capacities: Sequence[int], strength: float = 20.0, smoothing: float = 1.0) -> None:
        if strength <= 0:
            raise ValueError("strength must be > 0")
        self.strength = float(strength)
        self.smoothing = float(smoothing)
        self.clicks = [np.zeros(int(c)) for c in capacities]
        self.imps = [np.zeros(int(c)) for c in capacities]
        self.totals = np.zeros((len(capacities), 2))  # per field: clicks, impressions

    def field_mean(self, field: int) -> float:
        c, n = self.totals[field]
        return float((c + 0.05 * self.smoothing) / (n + self.smoothing))

    def update(self, rows: np.ndarray, labels: np.ndarray) -> None:
        """Adds one impression (and its click) per example for every field; ``rows`` [B, F]."""
        y = np.asarray(labels, dtype=np.float64)
        for f in range(rows.shape[1]):
            np.add.at(self.clicks[f], rows[:, f], y)
            np.add.at(self.imps[f], rows[:, f], 1.0)
        self.totals[:, 0] += y.sum()
        self.totals[:, 1] += len(y)

    def logits(self, rows: np.ndarray, centred: bool = False) -> np.ndarray:
        """Prior logits [B, F] (float32); the cold row and unseen rows give the field mean.
        ``centred``: minus the field mean's logit (0 = no evidence beyond the field CTR)."""
        out = np.empty(rows.shape, dtype=np.float64)
        for f in range(rows.shape[1]):
            m = self.field_mean(f)
            r = rows[:, f]
            c = np.where(r > 0, self.clicks[f][r], 0.0)
            n = np.where(r > 0, self.imps[f][r], 0.0)
            out[:, f] = (c + self.strength * m) / (n + self.strength)
        p = np.clip(out, 1e-6, 1 - 1e-6)
        z = np.log(p / (1 - p))
        if centred:
            m = np.clip([self.field_mean(f) for f in range(rows.shape[1])], 1e-6, 1 - 1e-6)
            z = z - np.log(m / (1 - m))
        return z.astype(np.float32)

    def merge(self, other: "RowCountPrior") -> None:
        """Adds another table's counts (same row space) to this one."""
        for f in range(len(self.clicks)):
            self.clicks[f] += other.clicks[f]
            self.imps[f] += other.imps[f]
        self.totals += other.totals

    def clear(self) -> None:
        for c, n in zip(self.clicks, self.imps):
            c[:] = 0.0
            n[:] = 0.0
        self.totals[:] = 0.0

    def reset(self, field: int, rows: np.ndarray) -> None:
        """Recycled rows forget their previous owner's counts."""
        self.clicks[field][rows] = 0.0
        self.imps[field][rows] = 0.0

    def decay(self, factor: float) -> None:
        """Multiplies every count by ``factor`` (0 < factor <= 1): older evidence weighs less."""
        if not 0 < factor <= 1:
            raise ValueError("decay factor must be in (0, 1]")
        for c, n in zip(self.clicks, self.imps):
            c *= factor
            n *= factor
        self.totals *= factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "smoothing": self.smoothing,
            "clicks": [c.copy() for c in self.clicks],
            "imps": [n.copy() for n in self.imps],
            "totals": self.totals.copy(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if [len(c) for c in s["clicks"]] != [len(c) for c in self.clicks]:
            raise ValueError("count prior state has other table sizes")
        self.strength, self.smoothing = float(s["strength"]), float(s["smoothing"])
        self.clicks = [np.asarray(c, dtype=np.float64).copy() for c in s["clicks"]]
        self.imps = [np.asarray(n, dtype=np.float64).copy() for n in s["imps"]]
        self.totals = np.asarray(s["totals"], dtype=np.float64).copy()

    def validate(self) -> list[str]:
        bad = []
        arrays = [*self.clicks, *self.imps, self.totals]
        if not all(np.isfinite(a).all() for a in arrays):
            bad.append("non-finite counts")
        if any((a < 0).any() for a in arrays):
            bad.append("negative counts")
        return bad
