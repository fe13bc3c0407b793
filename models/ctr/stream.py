"""The CTR learner as a :class:`models.stream_model.StreamModel` (pure).

``CTRStreamModel`` wraps a :class:`CTRLearner` so the one stream worker (``streams.model_worker``)
trains it window by window and the one loader (``online.models.ModelLoader``) serves it:

- ``learn(records)``: one ``train_window`` on example dicts (``Example.to_dict()``); ``retrain``
  starts from a fresh learner every window.
- ``score(records)``: AUC (and its standard error), LogLoss, calibration (predicted / observed
  clicks) and its log split into over- and under-prediction, on a window; the gate (``CTR_GATE``
  below) compares AUC, LogLoss and the two calibration sides with the serving model's.
- ``predict(examples)``: click probabilities. Read-only and thread-safe on a served copy
  (``from_state`` leaves the network in eval mode; nothing toggles it while serving).
- ``state()``: ``CTRLearner.state_dict()`` plus a ``stream`` entry (strategy, windows, examples),
  so ``CTRLearner(...).load_state_dict(state)`` still reads a registry version directly.

The window's example dicts are turned into a ``RawBatch`` once per window and field set, however
many models (candidate, serving, shadow) score or learn it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from models.ctr.features import RawBatch, iter_batches, raw_from_examples
from models.ctr.metrics import auc, auc_se, log_calibration, logloss
from models.ctr.model import CTRConfig
from models.ctr.train_loop import CTRLearner
from models.stream_model import Criterion, Gate

# The gate (docs/trainer.md, "Gate"): AUC may drop by 0.01 or by one standard error of the
# difference, whichever is larger (on a window of a few dozen clicks AUC differences are noise);
# LogLoss may rise by 0.01; and the candidate may over- or under-predict the window's clicks by a
# factor of at most e^0.4 ≈ 1.5 more than the serving model does. The last two catch a model that
# learned a poisoned window (flipped or all-clicked labels): its ranking barely moves, but its level
# of predictions does, and at a CTR of a few percent a doubled level costs only ~0.01 LogLoss.
CALIBRATION_MARGIN = 0.4
CTR_GATE = Gate.of(Criterion("auc", higher_is_better=True, margin=0.01, label="AUC", noise_key="auc_se", noise_z=1.0),
                   Criterion("logloss", higher_is_better=False, margin=0.01, required=True, label="LogLoss"),
                   Criterion("overprediction", higher_is_better=False, margin=CALIBRATION_MARGIN,
                             label="over-prediction log(Σp/Σclicks)"),
                   Criterion("underprediction", higher_is_better=False, margin=CALIBRATION_MARGIN,
                             label="under-prediction log(Σclicks/Σp)"))

WARM_EXAMPLE = {"user_id": "warm-u", "query": "warm", "ad_id": "warm-a", "creative_id": "warm-c",
                "bidword": "warm", "category": "warm/leaf", "position": 0, "bid": 1.0, "slot": "top",
                "domain": "search", "event_time": 0.0, "features": {}}


_PLAIN_NUMBERS = frozenset({int, float, bool, type(None)})


def examples_to_raw(examples: Sequence[Mapping[str, Any]], fields: Sequence[str], numeric: Sequence[str]) -> RawBatch:
    """Example dicts -> ``RawBatch`` with the semantics of :func:`raw_from_examples` (a name is looked
    up at the top level, then in ``features``; missing/invalid numbers are NaN), built column by
    column: the prediction path's hot loop."""
    n = len(examples)
    feats = [ex.get("features") or {} for ex in examples]
    cats = {}
    for f in fields:
        col = np.empty(n, dtype=object)
        col[:] = [ex[f] if f in ex else fe.get(f) for ex, fe in zip(examples, feats)]
        cats[f] = col
    dense = np.full((n, len(numeric)), np.nan, dtype=np.float32)
    for j, f in enumerate(numeric):
        vals = [ex[f] if f in ex else fe.get(f) for ex, fe in zip(examples, feats)]
        if set(map(type, vals)) <= _PLAIN_NUMBERS:  # the serving case: one numpy conversion
            try:
                col = np.array(vals, dtype=np.float64)  # None -> NaN, bool -> 0/1 as float() does
            except OverflowError:  # an int too large for a float: the general path decides
                col = None
            if col is not None:
                col[~np.isfinite(col)] = np.nan
                dense[:, j] = col
                continue
        for i, v in enumerate(vals):
            if v is None:
                continue
            if isinstance(v, (int, float)):
                try:
                    x = float(v)
                except OverflowError:
                    continue
            else:
                try:
                    x = float(v)
                except (TypeError, ValueError, OverflowError):
                    continue
            if math.isfinite(x):
                dense[i, j] = x
    times = np.array([float(ex.get("event_time") or 0.0) for ex in examples], dtype=np.float64)
    return RawBatch(cats, dense, np.zeros(n, dtype=np.float32), times, np.arange(n, dtype=np.int64))


class _WindowCache:
    """The RawBatch of the latest window per field set (holds the list, so its id stays unique)."""

    def __init__(self) -> None:
        self._records: Any = None
        self._raws: dict[tuple, RawBatch] = {}

    def get(self, records: Sequence[Mapping[str, Any]], fields: Sequence[str], numeric: Sequence[str]) -> RawBatch:
        if records is not self._records:
            self._records, self._raws = records, {}
        key = (tuple(fields), tuple(numeric))
        raw = self._raws.get(key)
        if raw is None:
            raw = self._raws[key] = raw_from_examples(records, fields, numeric)
        return raw


_WINDOWS = _WindowCache()


class CTRStreamModel:
    """See the module docstring. ``name`` is the registry name; ``strategy`` only changes ``learn``
    (``retrain`` = a fresh learner per window)."""

    gate = CTR_GATE
    thread_safe = True

    def __init__(self, config: CTRConfig, name: str = "ctr", strategy: str = "", batch_size: int = 512,
                 learner: CTRLearner | None = None, windows: int = 0, examples: int = 0) -> None:
        self.config = config
        self.name = name
        self.strategy = strategy
        self.batch_size = int(batch_size)
        self.learner = learner if learner is not None else CTRLearner(config)
        self.windows = int(windows)  # windows learned (also after a retrain reset)
        self.examples = int(examples)  # examples learned (the RawBatch index offset: training audit)

    @property
    def fields(self) -> list[str]:
        return self.learner.fields

    # ---- StreamModel -------------------------------------------------------------------------
    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raw = _WINDOWS.get(records, self.learner.fields, self.config.numeric)
        raw = replace(raw, index=raw.index + self.examples)
        if self.strategy == "retrain":
            self.learner = CTRLearner(self.config)
        self.learner.net.train()
        stats = self.learner.train_window(iter_batches(raw, self.batch_size),
                                          shuffle_seed=self.config.seed + self.windows)
        self.windows += 1
        self.examples += len(raw)
        return {"examples": stats.examples, "seconds": stats.seconds, "loss": stats.loss_mean,
                "rows_reset": stats.rows_reset}

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raw = _WINDOWS.get(records, self.learner.fields, self.config.numeric)
        p = self.learner.predict(raw)
        y = raw.labels
        clicks = float(y.sum())
        a = auc(y, p)
        lc = log_calibration(y, p)
        return {"auc": a, "auc_se": auc_se(a, int(clicks), len(y) - int(clicks)), "logloss": logloss(y, p),
                "calibration": float(p.sum()) / clicks if clicks > 0 else float("nan"),
                "overprediction": max(lc, 0.0), "underprediction": max(-lc, 0.0)}

    def predict(self, inputs: Sequence[Mapping[str, Any]] | RawBatch) -> np.ndarray:
        raw = inputs if isinstance(inputs, RawBatch) else examples_to_raw(inputs, self.learner.fields,
                                                                         self.config.numeric)
        return self.learner.predict(raw)

    def state(self) -> dict[str, Any]:
        s = self.learner.state_dict()
        s["stream"] = {"name": self.name, "strategy": self.strategy, "batch_size": self.batch_size,
                       "windows": self.windows, "examples": self.examples}
        return s

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CTRStreamModel":
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError("the state has no 'config' (not a CTR model state)")
        cfg = CTRConfig.from_dict(state["config"])
        learner = CTRLearner(cfg)
        learner.load_state_dict(state)
        learner.net.eval()  # a served copy never toggles train/eval: concurrent predictions are safe
        st = state.get("stream") or {}
        return cls(cfg, name=str(st.get("name", "ctr")), strategy=str(st.get("strategy", "")),
                   batch_size=int(st.get("batch_size", 512)), learner=learner,
                   windows=int(st.get("windows", learner.windows_trained)),
                   examples=int(st.get("examples", learner.seen_max_index + 1)))

    # ---- optional hooks ----------------------------------------------------------------------
    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        """Back to the serving version's full state (weights, optimizer states, mappers, priors)."""
        s = states[self.name]
        if CTRConfig.from_dict(s["config"]).to_dict() != self.config.to_dict():
            raise ValueError("the serving model has another CTRConfig")
        self.learner.load_state_dict(s)

    def fingerprint(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def validate(self) -> list[str]:
        return self.learner.validate_state()

    def meta(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "config": self.config.to_dict()}

    def warm(self) -> None:
        p = self.predict([WARM_EXAMPLE])
        if not np.all(np.isfinite(p)):
            raise ValueError("the model predicts non-finite values")
