"""The shared StreamModel contract: the gate decision, joint decisions for several parts, hooks."""

from __future__ import annotations

import math

import pytest

from models.stream_model import (Criterion, Gate, StreamModel, gate_decision, gate_of, joint_decision, parts_of)

CTR_GATE = Gate.of(Criterion("auc", True, 0.01, label="AUC"),
                   Criterion("logloss", False, 0.01, required=True, label="LogLoss"))


def test_gate_publishes_within_margins_and_names_every_failure():
    s = {"auc": 0.70, "logloss": 0.30}
    assert gate_decision({"auc": 0.70, "logloss": 0.30}, None, CTR_GATE) == (True, "no serving model")
    assert gate_decision({"auc": 0.695, "logloss": 0.305}, s, CTR_GATE) == (True, "within margins")
    ok, why = gate_decision({"auc": 0.68, "logloss": 0.32}, s, CTR_GATE)
    assert not ok
    assert why == "AUC 0.6800 < serving 0.7000 - 0.01; LogLoss 0.3200 > serving 0.3000 + 0.01"
    ok, why = gate_decision({"auc": 0.71, "logloss": 0.3101}, s, CTR_GATE)
    assert not ok and why.startswith("LogLoss 0.3101 > serving")


def test_gate_skips_nan_but_a_required_key_must_be_finite():
    s = {"auc": math.nan, "logloss": 0.30}
    assert gate_decision({"auc": math.nan, "logloss": 0.30}, s, CTR_GATE)[0]  # one-class window
    assert gate_decision({"auc": 0.1, "logloss": 0.30}, s, CTR_GATE)[0]  # serving AUC NaN: not compared
    assert gate_decision({"auc": 0.9, "logloss": math.inf}, s, CTR_GATE) == (False, "candidate LogLoss is not finite")
    assert not gate_decision({"auc": 0.9}, s, CTR_GATE)[0]  # a missing required key rejects
    # a non-finite serving LogLoss: the candidate is not compared on it
    assert gate_decision({"auc": 0.7, "logloss": 9.0}, {"auc": 0.7, "logloss": math.nan}, CTR_GATE)[0]


def test_gate_margins_and_direction():
    g = Gate.of(Criterion("acc", True)).with_margins({"acc": 0.05})
    assert g.criteria[0].margin == 0.05
    assert g.decide({"acc": 0.56}, {"acc": 0.6})[0] and not g.decide({"acc": 0.54}, {"acc": 0.6})[0]
    with pytest.raises(ValueError, match="no criterion"):
        g.with_margins({"auc": 0.1})
    assert Gate().decide({}, {"x": 1})[0]


def test_noise_aware_margin_widens_to_the_standard_error_of_the_difference():
    g = Gate.of(Criterion("auc", True, 0.01, label="AUC", noise_key="auc_se", noise_z=1.0))
    s = {"auc": 0.70, "auc_se": 0.03}
    # one standard error of the difference of two AUCs with se 0.03 and 0.04 is 0.05
    assert g.decide({"auc": 0.655, "auc_se": 0.04}, s)[0]
    ok, why = g.decide({"auc": 0.645, "auc_se": 0.04}, s)
    assert not ok and why == "AUC 0.6450 < serving 0.7000 - 0.05"
    # a precise window: the fixed margin holds
    assert not g.decide({"auc": 0.685, "auc_se": 0.001}, {"auc": 0.70, "auc_se": 0.001})[0]
    # no standard error on a side: the fixed margin
    assert not g.decide({"auc": 0.685}, s)[0] and g.decide({"auc": 0.695}, s)[0]
    assert not g.decide({"auc": 0.685, "auc_se": math.nan}, s)[0]


def test_joint_decision():
    d = {"ad": (True, "within margins"), "creative": (False, "NSCTR 0.0100 < serving 0.0200 - 0.0")}
    each = joint_decision(d, "each")
    assert each == d
    both = joint_decision(d, "all")
    assert not both["ad"][0] and "creative: NSCTR" in both["ad"][1]
    assert both["creative"] == d["creative"]
    assert joint_decision({"a": (True, "x"), "b": (True, "y")}) == {"a": (True, "x"), "b": (True, "y")}
    with pytest.raises(ValueError):
        joint_decision(d, "any")


class Mean:
    """A tiny StreamModel: predicts the mean label."""

    name = "mean"
    gate = Gate.of(Criterion("err", higher_is_better=False))

    def __init__(self, s=0.0, n=0):
        self.s, self.n = s, n

    def learn(self, records):
        self.s += sum(r["y"] for r in records)
        self.n += len(records)
        return {"n": len(records)}

    def score(self, records):
        p = self.s / self.n if self.n else 0.5
        return {"err": sum(abs(r["y"] - p) for r in records) / len(records)}

    def predict(self, inputs):
        return [self.s / self.n if self.n else 0.5 for _ in inputs]

    def state(self):
        return {"s": self.s, "n": self.n}

    @classmethod
    def from_state(cls, state):
        return cls(state["s"], state["n"])


class Pair:
    name = "pair"

    def __init__(self):
        self.a, self.b = Mean(), Mean()
        self.a.name, self.b.name = "pair-a", "pair-b"

    def parts(self):
        return {"pair-a": self.a, "pair-b": self.b}


def test_protocol_and_hooks():
    m = Mean()
    assert isinstance(m, StreamModel)
    assert not isinstance(object(), StreamModel)
    assert parts_of(m) == {"mean": m}
    p = Pair()
    assert list(parts_of(p)) == ["pair-a", "pair-b"]
    assert gate_of(m) is Mean.gate
    with pytest.raises(TypeError, match="declares no `gate`"):
        gate_of(p)


def test_the_plug_in_example_of_the_architecture_doc_works(tmp_path):
    """docs/architecture.md's TopShare example is a working StreamModel: published through the
    registry and served by the generic loader (the worker part runs in tests/test_model_worker.py)."""
    import re
    from pathlib import Path

    from models.registry import ModelRegistry
    from online.models import ModelLoader, predict_or_baseline

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = re.search(r"```python\n(from models\.stream_model import.*?)\n# stream:", doc, re.S)
    assert block, "the plug-in example moved; update this test"
    ns: dict = {}
    exec(block.group(1), ns)  # noqa: S102 - our own documentation
    TopShare = ns["TopShare"]
    m = TopShare()
    assert isinstance(m, StreamModel)
    recs = [{"position": i % 4} for i in range(100)]
    m.learn(recs)
    assert m.p == 0.25 and m.score(recs)["brier"] == pytest.approx(0.1875)
    assert gate_of(m).decide(m.score(recs), TopShare(0.9).score(recs))[0]
    ModelRegistry(tmp_path, m.name).publish(m.state())
    loaded = ModelLoader(tmp_path, m.name, build=TopShare.from_state).refresh()
    degraded: list[str] = []
    assert predict_or_baseline(loaded, [1, 2], lambda xs: [0.0] * len(xs), m.name, degraded) == ([0.25, 0.25],
                                                                                                  "v000001")
    assert degraded == []


def test_ctr_gate_rejects_a_model_that_over_or_under_predicts_the_windows_clicks():
    import numpy as np

    from models.ctr.metrics import auc_se, log_calibration
    from models.ctr.stream import CTR_GATE as ctr_gate

    y = np.array([1] * 20 + [0] * 480)
    p_ok = np.full(500, 0.04)
    assert abs(log_calibration(y, p_ok) - math.log(20.5 / 20.5)) < 1e-12
    assert abs(log_calibration(y, 2 * p_ok) - math.log(40.5 / 20.5)) < 1e-12
    # Hanley-McNeil: AUC 0.5 on 20 / 480 is about 0.066; more data, smaller error
    assert 0.06 < auc_se(0.5, 20, 480) < 0.075 and auc_se(0.5, 200, 4800) < auc_se(0.5, 20, 480) / 3
    assert math.isnan(auc_se(0.7, 0, 500))

    def scores(lc: float) -> dict:
        return {"auc": 0.70, "auc_se": 0.03, "logloss": 0.17, "overprediction": max(lc, 0.0),
                "underprediction": max(-lc, 0.0)}

    serving = scores(0.1)
    assert ctr_gate.decide(scores(0.45), serving)[0]  # 1.4x more over-prediction: within e^0.4
    ok, why = ctr_gate.decide(scores(math.log(2.0)), serving)  # twice the clicks, same AUC and LogLoss
    assert not ok and why.startswith("over-prediction"), why
    ok, why = ctr_gate.decide(scores(-0.5), serving)  # 0.6x the clicks
    assert not ok and why.startswith("under-prediction"), why
