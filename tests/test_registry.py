"""The model registry: atomic publish, rejected versions kept apart, promote and rollback."""

from __future__ import annotations

import math

import pytest
import torch

from models.registry import ModelRegistry, RegistryError


def test_publish_reject_promote_rollback(tmp_path):
    reg = ModelRegistry(tmp_path, "ctr")
    assert reg.latest() is None
    with pytest.raises(RegistryError, match="no published version"):
        reg.load()
    v1 = reg.publish({"w": torch.ones(2)}, {"auc": 0.7})
    assert v1.version == "v000001" and reg.latest() == "v000001"
    bad = reg.reject({"w": torch.zeros(2)}, {"auc": 0.4})
    assert bad.version == "v000002" and reg.versions(rejected=True) == ["v000002"]
    assert reg.latest() == "v000001"  # a rejected version is never served
    v3 = reg.publish({"w": torch.full((2,), 3.0)}, {"auc": 0.72})
    assert v3.version == "v000003" and reg.latest() == "v000003"
    state, info = reg.load()
    assert torch.equal(state["w"], torch.full((2,), 3.0)) and info.meta["auc"] == 0.72
    assert reg.rollback().version == "v000001" and reg.latest() == "v000001"
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback()
    assert reg.promote("v000003").version == "v000003"
    with pytest.raises(RegistryError, match="no published version v000002"):
        reg.promote("v000002")  # rejected versions cannot be promoted
    with pytest.raises(RegistryError, match="invalid version"):
        reg.promote("../etc")
    assert [h["reason"] for h in reg.history()] == ["publish", "publish", "rollback", "promote"]
    # no temporary directories left behind
    assert not [p for p in (tmp_path / "ctr" / "versions").iterdir() if p.name.startswith(".")]


def test_corrupt_state_is_an_error_not_a_model(tmp_path):
    reg = ModelRegistry(tmp_path, "ctr")
    info = reg.publish({"w": torch.ones(1)})
    (info.path / "weights.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(RegistryError, match="cannot load"):
        reg.load()


# --------------------------------------------------------------------------- versions cannot run code


class _RunsCode:
    """Pickling this object makes unpickling it call ``open(marker, "w")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_version_crafted_to_run_code_is_refused(tmp_path):
    import pickle

    reg = ModelRegistry(tmp_path / "reg", "ctr")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunsCode(marker)})
    # an old-format version (pickle) planted in the registry
    v1 = reg.publish({"w": torch.ones(1)})
    for f in v1.path.iterdir():
        if f.name != "meta.json":
            f.unlink()
    (v1.path / "state.pt").write_bytes(payload)
    with pytest.raises(RegistryError, match="old pickle format"):
        reg.load(v1.version)
    # the pickle put in place of the new files
    v2 = reg.publish({"w": torch.ones(1)})
    (v2.path / "weights.safetensors").write_bytes(payload)
    with pytest.raises(RegistryError, match="not a safetensors file"):
        reg.load(v2.version)
    v3 = reg.publish({"w": torch.ones(1)})
    (v3.path / "state.json").write_bytes(payload)
    with pytest.raises(RegistryError, match="cannot load"):
        reg.load(v3.version)
    # a JSON tree that names a tag the decoder does not know
    v4 = reg.publish({"w": torch.ones(1)})
    (v4.path / "state.json").write_text('{"format": 1, "tree": {"x": {"__adstream__": "pickle", "b": "gASV"}}}')
    with pytest.raises(RegistryError, match="unknown tag"):
        reg.load(v4.version)
    assert not marker.exists()
    # and storing an object that is not plain data is refused before anything is written
    with pytest.raises(ValueError, match="cannot be stored"):
        reg.publish({"w": _RunsCode(marker)})
    assert reg.versions() == ["v000001", "v000002", "v000003", "v000004"]


def test_state_codec_round_trips_every_plain_type(tmp_path):
    import numpy as np

    import json

    from models.state_codec import StateFormatError, decode_state, encode_state, states_equal

    base = torch.arange(12, dtype=torch.float32)
    state = {
        "t": torch.randn(3, 4), "view_a": base[:6], "view_b": base[6:], "nc": torch.randn(4, 3).t(),
        "i64": torch.arange(5), "bool": torch.tensor([True, False]), "bytes_t": torch.ByteTensor([1, 2]),
        "np": np.arange(6, dtype=np.float64).reshape(2, 3), "npi": np.array([-1, 2], dtype=np.int64),
        "np_str": np.array(["a", "bb"]), "np_obj": np.array(["x", 3, None], dtype=object),
        "scalars": [np.float64(0.5), np.int64(7), np.float32(1.5)],
        "tuple": (1, "two", (3.0, None)), "intkeys": {0: "a", 7: [1, 2]}, "tuplekeys": {("a", 1): 2},
        "tagged": {"__adstream__": "tensor"}, "floats": [math.nan, math.inf, -math.inf, 1e-300],
        "big": 2 ** 100, "raw": b"\x00\xff", "size": torch.Size([2, 3]), "dtype": torch.float16,
        "nested": {"opt": {"state": {0: {"sum": torch.ones(2), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 0.01, "params": [0]}]}},
    }
    w, t = encode_state(state)
    back = decode_state(w, t)
    assert states_equal(back, state)
    assert isinstance(back["tuple"], tuple) and isinstance(back["scalars"][0], np.float64)
    assert isinstance(back["np"], np.ndarray) and back["np"].dtype == np.float64
    assert list(back["intkeys"]) == [0, 7] and back["tagged"] == {"__adstream__": "tensor"}
    assert not states_equal(back, {**state, "t": state["t"] + 1})  # the comparison can fail
    # views of one buffer (the fused embedding tables) are stored once, as that buffer
    from safetensors.torch import load as st_load

    stored = st_load(w)
    assert sum(v.numel() for v in stored.values()) < 12 + 12 + 12 + 5 + 2 + 2 + 6 + 2 + 2 + 12
    assert back["view_a"].untyped_storage().data_ptr() == back["view_b"].untyped_storage().data_ptr()
    # a view that reaches outside its buffer is refused, not read
    doc = json.loads(t)
    doc["tree"]["view_b"]["offset"] = 10
    with pytest.raises(StateFormatError, match="invalid view"):
        decode_state(w, json.dumps(doc).encode())


STRATEGY_VARIANTS = [
    ("retrain", {}), ("finetune", {}), ("distill", {}), ("ddp-fp", {}), ("ddp-mp", {}), ("ddp", {}),
    ("ddp", {"backbone": "deepfm", "dense_optimizer": "adam"}),
    ("ddp-fp", {"fp": "count", "fp_decay": 0.9}),
    ("ddp-mp", {"mp": "logit"}),
]


@pytest.mark.parametrize("strategy,extra", STRATEGY_VARIANTS,
                         ids=[s + ("-" + "-".join(f"{k}={v}" for k, v in e.items()) if e else "")
                              for s, e in STRATEGY_VARIANTS])
def test_every_ctr_strategy_round_trips_through_the_registry(tmp_path, strategy, extra, one_torch_thread):
    from dataclasses import replace

    import numpy as np

    from core.world import generate_examples
    from models.ctr import CTRLearner, iter_batches, raw_from_frame
    from models.evaluation import Columns, EvalConfig, strategy_config
    from models.state_codec import states_equal

    df = generate_examples(duration_s=300, requests_per_s=5.0, seed=11).head(900)
    cols = Columns(time="event_time", label="clicked", categorical=["user_id", "ad_id", "query", "position"],
                   numeric=["bid", "query_len"])
    ec = EvalConfig(backbone="dcn", embedding_dim=4, capacity=512, hidden=(8,), batch_size=128)
    cfg = replace(strategy_config(strategy, ec, cols, seed=1), **extra)
    learner = CTRLearner(cfg)
    raw = raw_from_frame(df, cols.categorical, cols.numeric, "clicked", "event_time")
    for lo in (0, 300, 600):  # three windows: optimizer states, priors, chains all populated
        part = raw_from_frame(df.iloc[lo:lo + 300], cols.categorical, cols.numeric, "clicked", "event_time")
        learner.train_window(iter_batches(part, 128))
    reg = ModelRegistry(tmp_path, "ctr")
    state = learner.state_dict()
    reg.publish(state, {"strategy": strategy})
    loaded, _ = reg.load()
    assert states_equal(loaded, state)
    twin = CTRLearner(type(cfg).from_dict(loaded["config"]))
    twin.load_state_dict(loaded)
    assert twin.validate_state() == []
    assert states_equal(twin.state_dict(), state)
    np.testing.assert_array_equal(twin.predict(raw), learner.predict(raw))
    # state_dict() is a snapshot: training on shares nothing with it (it is copied once, not twice)
    learner.train_window(iter_batches(raw_from_frame(df.iloc[:300], cols.categorical, cols.numeric, "clicked",
                                                     "event_time"), 128))
    assert states_equal(state, loaded)
    assert not states_equal(learner.state_dict(), state)


def test_a_read_only_registry_says_so(tmp_path, monkeypatch):
    import errno

    import models.registry as registry_mod
    from models.registry import RegistryReadOnly

    reg = ModelRegistry(tmp_path, "ctr")
    reg.publish({"w": torch.ones(1)})
    reg.publish({"w": torch.ones(1)})

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(registry_mod, "atomic_write", read_only)
    with pytest.raises(RegistryReadOnly, match="not writable by this process.*rollback ctr to v000001"):
        reg.rollback()
    with pytest.raises(RegistryReadOnly, match="promote"):
        reg.promote("v000001")
    monkeypatch.setattr(registry_mod.tempfile, "mkdtemp", read_only)
    with pytest.raises(RegistryReadOnly, match="store a version"):
        reg.publish({"w": torch.ones(1)})
    assert reg.latest() == "v000002"
