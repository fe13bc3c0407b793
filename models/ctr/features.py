"""Raw examples -> model inputs.

A :class:`RawBatch` holds plain numpy columns (categorical values of any type, numeric values that
may be NaN, labels, event times, and a row index used to audit what training has seen). The
learner turns it into a :class:`ModelInput` (a ``KeyedJaggedTensor`` of embedding rows, one id per
field, plus a dense tensor) with its id mappers and its :class:`RunningStandardizer`.

``raw_from_examples`` accepts the dicts that ``core.events.Example.to_dict()`` produces;
``raw_from_frame`` accepts a pandas DataFrame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torchrec import KeyedJaggedTensor

EXAMPLE_FIELDS = ("user_id", "query", "ad_id", "creative_id", "bidword", "category", "position", "domain", "slot")
EXAMPLE_LABEL = "clicked"
EXAMPLE_TIME = "event_time"


@dataclass
class RawBatch:
    """Plain columns of one batch. ``cats[f]`` has one value per example (any type, None = missing)."""

    cats: dict[str, np.ndarray]
    dense: np.ndarray  # float32 [B, n_numeric], NaN = missing
    labels: np.ndarray  # float32 [B]
    times: np.ndarray  # float64 [B], event time (seconds or any monotone number)
    index: np.ndarray  # int64 [B], position of each example in its source (audit)

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, lo: int, hi: int) -> "RawBatch":
        return RawBatch(
            {k: v[lo:hi] for k, v in self.cats.items()},
            self.dense[lo:hi],
            self.labels[lo:hi],
            self.times[lo:hi],
            self.index[lo:hi],
        )

    def take(self, idx: np.ndarray) -> "RawBatch":
        return RawBatch(
            {k: v[idx] for k, v in self.cats.items()}, self.dense[idx], self.labels[idx], self.times[idx], self.index[idx]
        )


@dataclass
class ModelInput:
    """Tensors the network consumes. ``rows`` is [B, F] (embedding row per field)."""

    kjt: KeyedJaggedTensor
    rows: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    prior_counts: torch.Tensor | None = None  # [B, F] FP-count prior logits minus the field mean's (when enabled)
    value_counts: torch.Tensor | None = None  # [B, F] sightings of each value before this batch
    sightings: torch.Tensor | None = None  # [B, F] k: this example is the k-th sighting of its value


def concat(batches: Sequence[RawBatch]) -> RawBatch:
    """Concatenates batches with the same columns."""
    keys = list(batches[0].cats)
    return RawBatch(
        {k: np.concatenate([b.cats[k] for b in batches]) for k in keys},
        np.concatenate([b.dense for b in batches]),
        np.concatenate([b.labels for b in batches]),
        np.concatenate([b.times for b in batches]),
        np.concatenate([b.index for b in batches]),
    )


def iter_batches(raw: RawBatch, batch_size: int, shuffle_seed: int | None = None) -> Iterator[RawBatch]:
    """Yields consecutive batches (in time order unless ``shuffle_seed`` is given)."""
    n = len(raw)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)
        raw = raw.take(order)
    for lo in range(0, n, batch_size):
        yield raw.slice(lo, min(n, lo + batch_size))


def _lookup(ex: Mapping[str, Any], name: str) -> Any:
    if name in ex:
        return ex[name]
    feats = ex.get("features") or {}
    return feats.get(name)


def _to_float(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return float("nan") if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def raw_from_examples(
    examples: Sequence[Mapping[str, Any]],
    categorical: Sequence[str] = EXAMPLE_FIELDS,
    numeric: Sequence[str] = (),
    label: str = EXAMPLE_LABEL,
    time: str = EXAMPLE_TIME,
    index_offset: int = 0,
) -> RawBatch:
    """Turns example dicts (``core.events.Example.to_dict()``) into a :class:`RawBatch`.

    A name is looked up at the top level first, then inside ``features``. Missing categorical
    values become None (their own "missing" row), missing/invalid numeric values NaN, a missing
    label 0.
    """
    n = len(examples)
    cats = {f: np.empty(n, dtype=object) for f in categorical}
    dense = np.full((n, len(numeric)), np.nan, dtype=np.float32)
    labels = np.zeros(n, dtype=np.float32)
    times = np.zeros(n, dtype=np.float64)
    for i, ex in enumerate(examples):
        for f in categorical:
            cats[f][i] = _lookup(ex, f)
        for j, f in enumerate(numeric):
            dense[i, j] = _to_float(_lookup(ex, f))
        labels[i] = 1.0 if _to_float(ex.get(label)) > 0 else 0.0
        t = _to_float(ex.get(time))
        times[i] = 0.0 if math.isnan(t) else t
    return RawBatch(cats, dense, labels, times, np.arange(index_offset, index_offset + n, dtype=np.int64))


def raw_from_frame(
    df: pd.DataFrame, categorical: Sequence[str], numeric: Sequence[str], label: str, time: str | None
) -> RawBatch:
    """A :class:`RawBatch` from DataFrame columns (the frame's row order is kept; index = 0..n-1).

    ``time`` must already be numeric (see ``models.evaluation.load_frame``); labels > 0 count as
    clicks; numeric columns are coerced (invalid -> NaN).
    """
    n = len(df)
    cats = {c: df[c].to_numpy(dtype=object) for c in categorical}
    dense = np.empty((n, len(numeric)), dtype=np.float32)
    for j, c in enumerate(numeric):
        col = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
        col[~np.isfinite(col)] = np.nan
        dense[:, j] = col
    lab = pd.to_numeric(df[label], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    times = df[time].to_numpy(dtype=np.float64) if time else np.arange(n, dtype=np.float64)
    return RawBatch(cats, dense, (lab > 0).astype(np.float32), times, np.arange(n, dtype=np.int64))


class RunningStandardizer:
    """Running mean/variance (Chan/Welford) per numeric column, updated with training data only.

    ``transform`` standardises and replaces NaN (missing) with 0, the training mean. Values are
    clipped to ±``clip`` standard deviations so one outlier cannot blow up a step.
    """

    def __init__(self, n: int, clip: float = 10.0) -> None:
        self.n = n
        self.clip = clip
        self.count = np.zeros(n, dtype=np.float64)
        self.mean = np.zeros(n, dtype=np.float64)
        self.m2 = np.zeros(n, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        if self.n == 0 or len(x) == 0:
            return
        ok = np.isfinite(x)
        cnt = ok.sum(0).astype(np.float64)
        xs = np.where(ok, x, 0.0).astype(np.float64)
        safe = np.maximum(cnt, 1)
        bmean = xs.sum(0) / safe
        bm2 = (np.where(ok, xs - bmean, 0.0) ** 2).sum(0)
        tot = self.count + cnt
        delta = bmean - self.mean
        w = np.where(tot > 0, cnt / np.maximum(tot, 1), 0.0)
        self.mean = self.mean + delta * w
        self.m2 = self.m2 + bm2 + delta**2 * self.count * w
        self.count = tot

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.n == 0:
            return np.zeros((len(x), 0), dtype=np.float32)
        std = np.sqrt(self.m2 / np.maximum(self.count - 1, 1))
        std = np.where(std > 1e-12, std, 1.0)
        z = (x - self.mean) / std
        z = np.where(np.isfinite(z), z, 0.0)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.copy(), "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = (np.asarray(s[k], dtype=np.float64).copy() for k in ("count", "mean", "m2"))


def make_kjt(fields: Sequence[str], rows: np.ndarray) -> KeyedJaggedTensor:
    """One id per example per field: ``rows`` [B, F] -> KJT with keys ``fields``."""
    b, f = rows.shape
    values = torch.from_numpy(np.ascontiguousarray(rows.T).reshape(-1).astype(np.int64))
    return KeyedJaggedTensor(
        keys=list(fields), values=values, lengths=torch.ones(b * f, dtype=torch.int32)
    )


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Groups an iterable into lists of ``size`` (the last may be shorter)."""
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
