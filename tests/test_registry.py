"""The model registry: atomic publish, rejected versions kept apart, promote and rollback."""

from __future__ import annotations

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
    (info.path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RegistryError, match="cannot load"):
        reg.load()
