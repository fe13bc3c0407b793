"""Cross-domain behaviour in the synthetic world: shared taste, domain offsets, users new to a target."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from core.domains import CROSS_DOMAINS, CrossDomainConfig
from core.errors import ConfigError
from core.events import encode
from core.world import DriftConfig, World, WorldConfig
from tests.test_creative_world import DEFAULT_STREAM_EVENTS, DEFAULT_STREAM_SHA

XD = CrossDomainConfig(enabled=True)
THREE_DOMAIN_FRAME_SHA = "1fca05e85f6566bbe8df9cec7a37c5ef1313d250f55287334b5e2425183f8068"


def _world(seed: int = 5, **kw) -> World:
    return World(WorldConfig(seed=seed, domains=CROSS_DOMAINS, drift=DriftConfig(horizon_s=3600),
                             cross_domain=CrossDomainConfig(enabled=True, **kw)))


@pytest.fixture(scope="module")
def world() -> World:
    return _world()


@pytest.fixture(scope="module")
def frame(world):
    return world.to_examples_frame(duration_s=3600, requests_per_s=5)


def test_default_stream_is_unchanged_with_cross_domain_code_present():
    h = hashlib.sha256()
    n = 0
    for ev in World().generate(duration_s=600, requests_per_s=5):
        h.update(encode(ev))
        h.update(b"\n")
        n += 1
    assert (n, h.hexdigest()) == (DEFAULT_STREAM_EVENTS, DEFAULT_STREAM_SHA)
    # three domains without cross-domain behaviour: the same stream as before it existed
    w = World(WorldConfig(seed=5, domains=CROSS_DOMAINS))
    assert w.domain_effects is None and w.summary()["cross_domain"] is False
    df = w.to_examples_frame(duration_s=200, requests_per_s=5)
    # sha256 taken with the code before cross-domain behaviour existed
    assert hashlib.sha256(df.to_csv(index=False).encode()).hexdigest() == THREE_DOMAIN_FRAME_SHA


def test_cross_domain_moves_no_other_draw(world):
    off = World(WorldConfig(seed=5, domains=CROSS_DOMAINS, drift=DriftConfig(horizon_s=3600)))
    assert off.users == world.users and off.queries == world.queries
    assert [(a.id, a.quality, a.bidwords, a.creatives) for a in off.ads] == \
        [(a.id, a.quality, a.bidwords, a.creatives) for a in world.ads]


def test_taste_is_shared_plus_domain_offsets(world):
    fx = world.domain_effects
    u = world.users[17]
    for d in ("search", "feed", "video"):
        di = fx.index[d]
        expect = [p + fx.personal[17, k] + fx.domain_top[di, k] + fx.user_domain[17, di, k]
                  for k, p in enumerate(u.preference)]
        assert world.domain_taste(u, d) == pytest.approx(expect, abs=1e-3)
    a = world.ads[3]
    q = next(q for q in world.queries if q.category == a.category)
    top = world.tops.index(world.top_of(a.category))
    for d, base in (("search", 0.0), ("video", -0.5)):
        logit = (world.config.base_logit + world.domain_taste(u, d)[top] + world.config.rel_same_leaf
                 + a.quality + a.creatives[0].quality + base)
        got = world.true_ctr(u, q, a, a.creatives[0], 0, world.config.epoch, d)
        assert got == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-3)
    # the shared part dominates: a user's tastes in two domains correlate across users
    taste = np.array([[world.domain_taste(v, d) for d in ("search", "feed")] for v in world.users[:800]])
    assert np.corrcoef(taste[:, 0].ravel(), taste[:, 1].ravel())[0, 1] > 0.6


def test_users_new_to_the_target_arrive_after_new_from(world, frame):
    new = {u.id for u in world.users if world.is_new_to_target(u)}
    assert 0.2 < len(new) / len(world.users) < 0.4
    feed = frame[frame["domain"] == "feed"]
    early = feed[feed["event_time"] < world.new_target_from]
    assert not early["user_id"].isin(new).any()
    late = feed[feed["event_time"] >= world.new_target_from]
    assert late["user_id"].isin(new).sum() > 100
    # and they were active elsewhere before: the cold-start users cross-domain models are for
    before = frame[(frame["event_time"] < world.new_target_from) & frame["user_id"].isin(new)]
    assert set(before["domain"]) == {"search", "video"} and len(before) > 1000
    assert set(frame["domain"]) == {"search", "feed", "video"}


def test_queries_follow_the_taste_in_the_requests_domain(world, frame):
    """Browsing in a domain reveals the taste there: the query's top category leans to where the user's
    own and the domain's offsets (beyond the shared preference) are high."""
    tops, fx = world.tops, world.domain_effects
    lean = []
    for d in ("search", "feed", "video"):
        part = frame[frame["domain"] == d].drop_duplicates("request_id")
        for uid, top in zip(part["user_id"].to_numpy()[:3000], part["query_category"].to_numpy()[:3000]):
            off = fx.offset[world.user_by_id[uid].index, fx.index[d]]
            lean.append(off[tops.index(top.split("/")[0])] - off.mean())
    assert np.mean(lean) > 0.15, np.mean(lean)  # queries drawn by the shared preference alone: about 0


def test_bad_cross_domain_settings_are_refused():
    with pytest.raises(ConfigError, match="at least two"):
        WorldConfig(cross_domain=XD)
    with pytest.raises(ConfigError, match="target"):
        WorldConfig(domains=CROSS_DOMAINS, cross_domain=CrossDomainConfig(enabled=True, target="nope"))
