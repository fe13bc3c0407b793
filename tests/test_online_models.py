"""The generic online loader: any StreamModel by name, warm, swap, rollback; predictions without a
global lock (concurrent = serial, the served network never toggled); the baseline with `degraded`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from models.registry import ModelRegistry
from models.stream_model import Criterion, Gate
from online.models import LoadedModel, ModelLoader, predict_or_baseline
from tests.test_online_common import publish, world


class Scale:
    """A tiny non-CTR StreamModel: predict = x * w."""

    name = "scale"
    gate = Gate.of(Criterion("err", higher_is_better=False))
    warmed = 0

    def __init__(self, w: float) -> None:
        self.w = w

    def learn(self, records):
        return {}

    def score(self, records):
        return {"err": 0.0}

    def predict(self, inputs):
        if self.w < 0:
            raise RuntimeError("broken model")
        return [x * self.w for x in inputs]

    def state(self):
        return {"w": self.w}

    @classmethod
    def from_state(cls, state):
        return cls(float(state["w"]))

    def warm(self):
        Scale.warmed += 1
        if not np.isfinite(self.w):
            raise ValueError("non-finite weight")


def test_any_model_by_name_warm_swap_rollback_and_baseline(tmp_path):
    reg = ModelRegistry(tmp_path, "scale")
    loader = ModelLoader(tmp_path, "scale", build=Scale.from_state)
    degraded: list[str] = []
    assert loader.refresh() is None
    out, v = predict_or_baseline(loader.current, [1, 2], lambda xs: [0] * len(xs), "scale", degraded)
    assert (out, v, degraded) == ([0, 0], "baseline", ["scale"])  # nothing published: the baseline

    reg.publish(Scale(2.0).state(), {"created_at": 100.0})
    warmed = Scale.warmed
    m1 = loader.refresh()
    assert m1.version == "v000001" and Scale.warmed == warmed + 1 and m1.created_at == 100.0
    degraded = []
    assert predict_or_baseline(loader.current, [1, 2], lambda xs: [0] * len(xs), "scale", degraded) == \
        ([2.0, 4.0], "v000001")
    assert degraded == []

    reg.publish(Scale(float("nan")).state())  # fails its warm-up: never served
    assert loader.refresh() is m1 and loader.failed_loads == 1 and "non-finite" in loader.last_error
    reg.publish(Scale(3.0).state())
    assert loader.refresh().version == "v000003"
    # LATEST goes back to v000002, which cannot be served: v000003 stays; one more goes to v000001
    assert loader.rollback().version == "v000003" and reg.latest() == "v000002"
    assert loader.rollback().version == "v000001"
    assert loader.promote("v000003").predict([1]) == [3.0]

    reg.publish(Scale(-1.0).state())  # loads and warms, but fails on requests
    assert loader.refresh().version == "v000004"
    degraded = []
    out, v = predict_or_baseline(loader.current, [5], lambda xs: [9], "scale", degraded)
    assert (out, v, degraded) == ([9], "baseline", ["scale"])


def test_a_model_that_is_not_thread_safe_gets_a_lock():
    class Unsafe(Scale):
        thread_safe = False

    assert LoadedModel("v1", Scale(1.0), None, 0.0)._lock is None
    assert LoadedModel("v1", Unsafe(1.0), None, 0.0)._lock is not None


def test_concurrent_ctr_predictions_equal_serial_ones_and_never_toggle_the_network(tmp_path, one_torch_thread,
                                                                                  monkeypatch):
    import torch

    publish(tmp_path, seed=3)
    loader = ModelLoader(tmp_path, "ctr")
    loaded = loader.refresh()
    assert loaded is not None and loaded._lock is None  # no per-version lock around prediction
    net = loaded.model.learner.net
    assert not net.training
    df = world().to_examples_frame(duration_s=60.0, requests_per_s=10.0, seed=21)
    rows = df.to_dict("records")
    batches = [rows[i:i + 40] for i in range(0, min(len(rows), 40 * 24), 40)]
    serial = [loaded.predict(b) for b in batches]

    toggles = []
    real_train = torch.nn.Module.train

    def spy(self, mode=True):
        if self is net:
            toggles.append(mode)
        return real_train(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", spy)
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(t: int) -> None:
        try:
            start.wait()
            for rep in range(3):
                for i in range(len(batches)):
                    j = (i + t * 5) % len(batches)  # threads work on different batches at once
                    results[(t, rep * 1000 + j)] = loaded.predict(batches[j])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[:3]
    assert len(results) == 6 * 3 * len(batches)
    for (_t, key), p in results.items():
        np.testing.assert_array_equal(p, serial[key % 1000])
    assert toggles == []  # the served copy is never switched between train and eval mode


@pytest.mark.parametrize("bad", [{"config": "x"}, {"w": 1}])
def test_a_state_that_is_not_a_ctr_model_is_not_served(tmp_path, bad):
    ModelRegistry(tmp_path, "ctr").publish(bad)
    loader = ModelLoader(tmp_path, "ctr")
    assert loader.refresh() is None and loader.failed_loads == 1


def test_pinning_threads_while_torch_is_being_imported_never_raises(monkeypatch):
    """A service starts without torch; its loader thread imports torch for the first CTR model while
    requests pin their threads. A partial module (no set_num_threads yet) is left alone, and the
    thread is pinned on the next call once the import is done (a request failed with HTTP 500
    AttributeError here)."""
    import sys
    import types

    from online import models as online_models

    calls = []
    partial = types.ModuleType("torch")
    partial.__spec__ = types.SimpleNamespace(name="torch", _initializing=True)
    monkeypatch.setitem(sys.modules, "torch", partial)
    monkeypatch.setattr(online_models, "_thread_state", threading.local())
    online_models.pin_torch_threads(3)  # no set_num_threads on the module: must not raise
    partial.set_num_threads = calls.append
    online_models.pin_torch_threads(3)  # still importing: not called
    assert calls == []
    partial.__spec__._initializing = False
    online_models.pin_torch_threads(3)
    online_models.pin_torch_threads(3)  # once per thread
    assert calls == [3]

    def broken(n):
        raise RuntimeError("cannot set threads")

    monkeypatch.setattr(online_models, "_thread_state", threading.local())
    partial.set_num_threads = broken
    online_models.pin_torch_threads(3)  # logged, never raised


def test_pinning_threads_races_a_real_torch_import():
    """The real race in a fresh interpreter: one thread imports torch while another pins its threads
    in a loop; no call may raise."""
    import subprocess
    import sys

    code = """
import sys, threading, time
from online.models import pin_torch_threads
import online.models as m
errors, calls = [], 0
def importer():
    import torch  # noqa: F401
t = threading.Thread(target=importer)
t.start()
while t.is_alive() or calls == 0:
    m._thread_state.torch_threads = 0  # pin again on every call
    try:
        pin_torch_threads(1)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    calls += 1
    time.sleep(0.0002)  # let the importer run
t.join()
print(len(errors), calls, errors[:1])
sys.exit(1 if errors else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("fails", [False, True])
def test_the_loader_preloads_before_its_first_look_and_readiness(tmp_path, fails):
    """The serving CTR loader imports torch before its first look at the registry (``preload``), so a
    service is ready only once a model can be loaded without a seconds-long import under traffic.
    A failing preload is logged; the loader goes on (loading a version says what is wrong)."""
    ModelRegistry(tmp_path, "scale").publish(Scale(2.0).state())
    release = threading.Event()
    order = []

    def preload():
        release.wait(10)
        order.append("preload")
        if fails:
            raise ImportError("no such module")

    loader = ModelLoader(tmp_path, "scale", poll_s=0.05, build=Scale.from_state, preload=preload).start()
    try:
        assert not loader.checked.wait(0.3) and loader.current is None  # held by the preload
        release.set()
        assert loader.checked.wait(10) and order == ["preload"]
        assert loader.current.version == "v000001"
    finally:
        loader.stop()


def test_the_services_ctr_loader_preloads_before_create_app_returns(tmp_path, monkeypatch):
    """``create_app`` looks at the registry once before it returns: the CTR loader's preload (torch)
    runs there, before the loader is ``checked`` (readiness), even with nothing published yet."""
    import online.app as online_app
    from core.settings import ServeSettings
    from online.models import preload_ctr

    assert online_app.preload_ctr is preload_ctr
    seen = []

    def recording_preload():
        seen.append(("preload", app_loader[0].checked.is_set() if app_loader else None))

    app_loader = []
    real_init = ModelLoader.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        app_loader.append(self)

    monkeypatch.setattr(ModelLoader, "__init__", init)
    monkeypatch.setattr(online_app, "preload_ctr", recording_preload)
    app = online_app.create_app(ServeSettings(model_poll_s=0.05), registry_root=tmp_path)
    try:
        assert seen == [("preload", False)]  # ran once, before the first look
        assert app.state.loader.checked.is_set()
        time.sleep(0.2)
        assert seen == [("preload", False)]  # the loader's thread does not run it again
    finally:
        app.state.close()
