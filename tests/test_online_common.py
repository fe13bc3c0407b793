"""Helpers shared by the online-service tests (no tests here)."""

from __future__ import annotations

import time
from pathlib import Path

from core.settings import ServeSettings
from core.world import World, WorldConfig
from online.index import AdIndex, load_world_catalog, world_inventory

FIELDS = ("user_id", "query", "ad_id", "creative_id", "bidword", "category")
NUMERIC = ("ad_ctr_1h", "user_ctr_1h", "position")

_WORLD: World | None = None


def world() -> World:
    global _WORLD
    if _WORLD is None:
        _WORLD = World(WorldConfig(seed=7))
    return _WORLD


def world_index() -> AdIndex:
    idx = AdIndex()
    load_world_catalog(idx, world())
    idx.apply_many(world_inventory(world()))
    return idx


def queries(n: int = 20) -> list[str]:
    return [q.text for q in world().queries[:n]]


def train_state(seed: int, n_requests: int = 300) -> dict:
    """A small CTRLearner trained on world examples; returns its state_dict."""
    from models.ctr import CTRConfig, CTRLearner, FieldConfig

    cfg = CTRConfig(fields=[FieldConfig(f, capacity=4096) for f in FIELDS], numeric=list(NUMERIC),
                    embedding_dim=8, hidden=(16,), seed=seed)
    learner = CTRLearner(cfg)
    df = world().to_examples_frame(duration_s=n_requests / 10.0, requests_per_s=10.0, seed=seed)
    rows = df.to_dict("records")
    learner.train_window([rows[i:i + 256] for i in range(0, len(rows), 256)])
    return learner.state_dict()


def publish(root: Path, seed: int, name: str = "ctr") -> str:
    from models.registry import ModelRegistry

    return ModelRegistry(root, name).publish(train_state(seed), {"created_at": time.time(), "seed": seed}).version


def settings(**kw) -> ServeSettings:
    base = dict(model_poll_s=0.1, feature_retry_s=0.2)
    base.update(kw)
    return ServeSettings(**base)
