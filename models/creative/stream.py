"""JAC as a :class:`models.stream_model.StreamModel`: one job, two published models.

``JACStreamModel`` (job name ``jac``) learns every window jointly and publishes two parts, each
gated on the same held-out window (``parts()``):

- ``jac-ar`` (AR+): a :class:`models.ctr.stream.CTRStreamModel` around JAC's ad ranker. Its version
  is an ordinary CTR model state, so the ad ranking path serves it like any CTR model
  (``serve.model_name = jac-ar``). Gate: AUC and LogLoss (the CTR gate).
- ``jac-cr`` (CR+): :class:`CreativeRankerModel`, the parallel creative ranker. Its version holds
  the CR network, id mappers, standardiser and the per-ad pCTR cache (no optimizer state). Gate:
  NSCTR on the window (candidates: the creatives each ad showed in the window) and LogLoss of the
  shown creative's click.

``CreativeRankerModel.predict(rows)`` scores candidate rows: example-shaped dicts, one per (ad,
creative), whose creative fields (id, ``cr_*`` content) are the candidate's. With
``pctr_source="ar"`` a row's ``ad_pctr`` key is the ad ranker's pCTR (the caller waits for it);
otherwise the model's own per-ad cache (or the global mean) is used and the caller need not wait.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from models.creative.config import JACConfig
from models.creative.evaluate import CreativeColumns, Split, catalog_of, expand, ranker_metrics
from models.creative.jac import JACLearner, columns, sub_raw
from models.creative.net import CreativeCore
from models.ctr import RawBatch, auc, logloss
from models.ctr.stream import CTRStreamModel, examples_to_raw
from models.stream_model import Criterion, Gate

AR_NAME = "jac-ar"
CR_NAME = "jac-cr"
CR_GATE = Gate.of(Criterion("nsctr", higher_is_better=True, margin=0.01, label="NSCTR"),
                  Criterion("logloss", higher_is_better=False, margin=0.01, required=True, label="LogLoss"))
WARM_ROW = {"user_id": "warm-u", "ad_id": "warm-a", "creative_id": "warm-c", "category": "warm/leaf",
            "position": 0, "domain": "search", "event_time": 0.0, "features": {}}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def window_scores(cfg: JACConfig, raw: RawBatch, cats: list[str], nums: list[str], logits_fn) -> dict[str, Any]:
    """NSCTR / sCTR / matched share on a window (each ad's candidates: the creatives it showed in the
    window, content from their rows), and AUC / LogLoss of the shown creative's click."""
    frame = {c: raw.cats[c] for c in cats}
    for j, c in enumerate(nums):
        frame[c] = raw.dense[:, j]
    frame["__label"] = raw.labels
    df = pd.DataFrame(frame)
    for c in [cfg.ad_field, cfg.creative_field]:
        df[c] = df[c].map(lambda v: None if v is None else str(v))
    df = df[df[cfg.ad_field].notna() & df[cfg.creative_field].notna()].reset_index(drop=True)
    if not len(df):
        return {"nsctr": math.nan, "sctr": math.nan, "auc": math.nan, "logloss": math.nan, "examples": 0}
    cols = CreativeColumns(ad=cfg.ad_field, creative=cfg.creative_field, label="__label",
                           creative_features=list(cfg.content_fields), creative_numeric=list(cfg.content_numeric))
    e = expand(df, cols, catalog_of(df, cols), cats, nums)
    z = logits_fn(e.raw)
    m = ranker_metrics(Split(df, e, np.zeros(len(df), dtype=bool), np.zeros(len(e.cand), dtype=bool)), cols, z, "drop")
    y = df["__label"].to_numpy()
    p = _sigmoid(z[e.offsets[:-1] + e.shown])
    return {"nsctr": m["nsctr"], "sctr": m["sctr"], "matched_share": m["matched_share"], "auc": auc(y, p),
            "logloss": logloss(y, p), "calibration": float(p.sum() / y.sum()) if y.sum() > 0 else math.nan,
            "examples": int(len(df))}


class CreativeRankerModel:
    """CR+ (or CR) on its own: the served creative ranker (see the module docstring)."""

    gate = CR_GATE
    thread_safe = True

    def __init__(self, cfg: JACConfig, core: CreativeCore | None = None, name: str = CR_NAME) -> None:
        self.cfg = cfg
        self.name = name
        self.core = core if core is not None else CreativeCore(cfg)
        self.cats, self.nums = columns(cfg)
        self._cr_cats = list(dict.fromkeys([f.name for f in cfg.cr_fields] + [cfg.ad_field]))
        self._cr_nums = list(cfg.cr_numeric)

    @property
    def pctr_source(self) -> str:
        return self.cfg.pctr_source if self.cfg.joint else "none"

    def _pctr(self, raw: RawBatch, given: np.ndarray | None) -> np.ndarray | None:
        if not self.cfg.joint:
            return None
        src = self.cfg.pctr_source
        if src == "fixed":
            return self.core.fixed_pctr(len(raw))
        p = self.core.cached_pctr(raw.cats[self.cfg.ad_field])
        if src == "ar" and given is not None:
            ok = np.isfinite(given)
            p = np.where(ok, given, p)
        return p

    def logits(self, raw: RawBatch, ad_pctr: np.ndarray | None = None) -> np.ndarray:
        cr = sub_raw(raw, self.core.fields, self.core.numeric, list(self._cr_nums))
        return self.core.logits(cr, self._pctr(raw, ad_pctr))

    # ---- StreamModel
    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError("CR+ learns inside its JAC job (JACStreamModel.learn)")

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from models.ctr import raw_from_examples

        raw = raw_from_examples(records, self._cr_cats, self._cr_nums)
        return window_scores(self.cfg, raw, self._cr_cats, self._cr_nums, lambda r: self.logits(r))

    def predict(self, inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Click probabilities of candidate rows (see the module docstring), or of a grouped batch
        ``{"context": {...}, "ads": {field: [one per ad]}, "counts": [creatives per ad],
        "creatives": {field: [one per creative]}, "ad_pctr": [one per ad] | None}`` (the service's
        form: each value looked up once at its level; the same scores as the rows)."""
        if isinstance(inputs, Mapping):
            return self._predict_grouped(inputs)
        raw = examples_to_raw(inputs, self._cr_cats, self._cr_nums)
        given = None
        if self.cfg.joint and self.cfg.pctr_source == "ar":
            given = np.array([float(r.get("ad_pctr", math.nan) or math.nan) for r in inputs], dtype=np.float64)
        return _sigmoid(self.logits(raw, given))

    def _predict_grouped(self, b: Mapping[str, Any]) -> np.ndarray:
        counts = np.asarray(b["counts"], dtype=np.int64)
        ads = b.get("ads") or {}
        p = None
        if self.cfg.joint:
            ad_ids = np.asarray(ads.get(self.cfg.ad_field, [None] * len(counts)), dtype=object)
            src = self.cfg.pctr_source
            p = self.core.fixed_pctr(len(counts)) if src == "fixed" else self.core.cached_pctr(ad_ids)
            given = b.get("ad_pctr")
            if src == "ar" and given is not None:
                g = np.asarray(given, dtype=np.float64)
                p = np.where(np.isfinite(g), g, p)
        z = self.core.logits_grouped(b.get("context") or {}, ads, counts, b.get("creatives") or {}, p)
        return _sigmoid(z)

    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "cr": self.core.state_dict(), "kind": "creative-ranker"}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CreativeRankerModel":
        if not isinstance(state, dict) or state.get("kind") != "creative-ranker":
            raise ValueError("not a creative ranker state (no kind='creative-ranker')")
        cfg = JACConfig.from_dict(state["config"])
        core = CreativeCore(cfg)
        core.load_state_dict(state["cr"])
        core.net.eval()
        return cls(cfg, core)

    # ---- hooks
    def fingerprint(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict()}

    def validate(self) -> list[str]:
        return self.core.validate()

    def meta(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "pctr_source": self.pctr_source, "ste": self.cfg.ste,
                "quant_r": self.cfg.quant_r, "buckets": self.cfg.buckets}

    def warm(self) -> None:
        p = self.predict([WARM_ROW])
        if not np.all(np.isfinite(p)):
            raise ValueError("the creative ranker predicts non-finite values")


class JACStreamModel:
    """The JAC job (see the module docstring). ``mode="cr"`` trains and publishes CR alone."""

    name = "jac"
    gate = CR_GATE  # the job's own scores (the worker gates each part with the part's gate)
    thread_safe = False

    def __init__(self, cfg: JACConfig | None = None, learner: JACLearner | None = None,
                 ar_name: str = AR_NAME, cr_name: str = CR_NAME, windows: int = 0) -> None:
        self.learner = learner if learner is not None else JACLearner(cfg or JACConfig())
        self.cfg = self.learner.cfg
        self.ar_name, self.cr_name = ar_name, cr_name
        self.windows = int(windows)

    def parts(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.learner.ar is not None:
            out[self.ar_name] = CTRStreamModel(self.learner.ar.config, name=self.ar_name, strategy="jac",
                                               batch_size=self.cfg.batch_size, learner=self.learner.ar,
                                               windows=self.windows, examples=self.learner.examples_trained)
        out[self.cr_name] = CreativeRankerModel(self.cfg, self.learner.cr, self.cr_name)
        return out

    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if self.learner.ar is not None:
            self.learner.ar.net.train()
        stats = self.learner.train(records)
        self.windows += 1
        return stats

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, part in self.parts().items():
            out.update({f"{n}.{k}": v for k, v in part.score(records).items()})
        cr = out.get(f"{self.cr_name}.nsctr")
        out["nsctr"] = cr if cr is not None else math.nan
        out["logloss"] = out.get(f"{self.cr_name}.logloss", math.nan)
        return out

    def predict(self, inputs: Any) -> Any:
        return self.parts()[self.cr_name].predict(inputs)

    def state(self) -> dict[str, Any]:
        s = self.learner.state_dict()
        s["stream"] = {"windows": self.windows, "ar_name": self.ar_name, "cr_name": self.cr_name}
        return s

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "JACStreamModel":
        learner = JACLearner.from_state(state)
        st = state.get("stream") or {}
        return cls(learner=learner, ar_name=str(st.get("ar_name", AR_NAME)), cr_name=str(st.get("cr_name", CR_NAME)),
                   windows=int(st.get("windows", 0)))

    # ---- hooks
    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        """Back to the serving versions after a rejection: AR+ fully (its version is a complete CTR
        learner state), CR+ weights, mappers, standardiser and cache (its optimizer restarts)."""
        import torch

        if self.learner.ar is not None and self.ar_name in states:
            self.learner.ar.load_state_dict(states[self.ar_name])
        if self.cr_name in states:
            s = states[self.cr_name]
            if JACConfig.from_dict(s["config"]).to_dict() != self.cfg.to_dict():
                raise ValueError("the serving creative ranker has another JACConfig")
            self.learner.cr.load_state_dict(s["cr"])
            self.learner.cr_opt = torch.optim.Adagrad(list(self.learner.cr.net.parameters()), lr=self.cfg.cr_lr)

    def fingerprint(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict()}

    def validate(self) -> list[str]:
        return self.learner.validate()

    def meta(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "pctr_source": self.cfg.pctr_source, "ste": self.cfg.ste}
