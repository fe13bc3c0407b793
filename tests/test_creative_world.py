"""Creative content in the synthetic world: attributes drive clicks, old seeds stay byte-identical."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest

from core.creatives import CONTENT_COLUMNS, COLOURS, LAYOUTS, CreativeContentConfig
from core.errors import ConfigError
from core.events import Example, Impression, decode, encode
from core.world import World, WorldConfig, example_columns

ON = CreativeContentConfig(enabled=True)

# sha256 of the default world's stream (World().generate(duration_s=600, requests_per_s=5), one
# encoded event per line) and of a seed-11 examples frame, taken before creative content existed
DEFAULT_STREAM_SHA = "90639899ec783a1de3f6be68be01514ef48c7952c0ea0b7f6478306d9444cb70"
DEFAULT_STREAM_EVENTS = 12653
SEED11_FRAME_SHA = "af4092b3cc9ac6d43fcaf5b48200e4dc133abdd5f975961be3384668d5cfc87a"


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=11, creative_content=ON))


@pytest.fixture(scope="module")
def frame(world):
    return world.to_examples_frame(duration_s=1500, requests_per_s=10, seed=4)


def test_default_world_stream_is_unchanged():
    h = hashlib.sha256()
    n = 0
    for ev in World().generate(duration_s=600, requests_per_s=5):
        h.update(encode(ev))
        h.update(b"\n")
        n += 1
    assert (n, h.hexdigest()) == (DEFAULT_STREAM_EVENTS, DEFAULT_STREAM_SHA)
    df = World(WorldConfig(seed=11)).to_examples_frame(duration_s=300, requests_per_s=5)
    assert hashlib.sha256(df.to_csv(index=False).encode()).hexdigest() == SEED11_FRAME_SHA


def test_content_moves_no_other_draw(world):
    off = World(WorldConfig(seed=11))
    assert [a.id for a in off.ads] == [a.id for a in world.ads]
    assert [(a.bidwords, a.quality, a.advertiser) for a in off.ads] == \
        [(a.bidwords, a.quality, a.advertiser) for a in world.ads]
    assert [[c.id for c in a.creatives] for a in off.ads] == [[c.id for c in a.creatives] for a in world.ads]
    assert off.users == world.users and off.queries == world.queries
    assert all(c.content is None for a in off.ads for c in a.creatives)
    assert all(c.content is not None for a in world.ads for c in a.creatives)  # new ads too
    assert off.summary()["creative_content"] is False and world.summary()["creative_content"] is True


def test_creative_logit_follows_the_content_formula(world):
    fx, cc = world.creative_effects, world.config.creative_content
    off = World(WorldConfig(seed=11))
    for a_off, a in list(zip(off.ads, world.ads))[:50]:
        for c_off, c in zip(a_off.creatives, a.creatives):
            assert c.quality == pytest.approx(fx.main(c.content) + cc.residual_share * c_off.quality, abs=1e-4)
    u, a = world.users[3], world.ads[5]
    seg = int(u.segment[1:])
    q = next(q for q in world.queries if q.category == a.category)
    t = world.config.epoch
    for c in a.creatives:
        expect = c.quality + fx.personal(seg, c.content)
        assert world.creative_logit(u, a, c) == pytest.approx(expect)
        logit = (world.config.base_logit + u.preference[world.tops.index(world.top_of(a.category))]
                 + world.config.rel_same_leaf + a.quality + expect)
        assert world.true_ctr(u, q, a, c, 0, t) == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-9)
    best = world.best_creative(a, u)
    assert world.creative_logit(u, a, best) == max(world.creative_logit(u, a, c) for c in a.creatives)


def test_impressions_and_examples_carry_the_content(world):
    events = list(world.generate(duration_s=60, requests_per_s=5, seed=2))
    imps = [e for e in events if isinstance(e, Impression)]
    assert imps
    for imp in imps:
        c = next(c for c in world.ad_by_id[imp.ad_id].creatives if c.id == imp.creative_id)
        assert {k: imp.features[k] for k in CONTENT_COLUMNS} == c.content.features()
    back = decode(encode(imps[0]))
    ex = Example.from_impression(back, True, False, back.event_time + 2)
    assert decode(encode(ex)).features["cr_layout"] in LAYOUTS  # survives the joiner and the topics
    # the frame has the content columns, and example_columns() names them
    df = world.to_examples_frame(duration_s=60, requests_per_s=5, seed=2)
    assert list(df.columns[-5:]) == [*CONTENT_COLUMNS, "true_ctr"]
    roles = example_columns(world)
    assert {"cr_layout", "cr_colour", "cr_price_badge"} <= set(roles["categorical"])
    assert "cr_text_len" in roles["numeric"]
    assert "cr_layout" not in example_columns()["categorical"]


def test_clicks_follow_the_content_and_its_segment_interaction(world, frame):
    fx = world.creative_effects
    # observed clicks match the truth per (segment, colour) cell ...
    for (seg, col), g in frame.groupby(["segment", "cr_colour"]):
        exp = g["true_ctr"].sum()
        assert abs(g["clicked"].sum() - exp) < 4.5 * math.sqrt(max(exp, 1.0)), (seg, col)
    # ... and the content effects are visible in the clicks: the colour the truth ranks best for a
    # segment beats its worst colour, in the clicks, in most segments
    wins = 0
    for s in range(world.config.n_segments):
        eff = {c: fx.colour[c] + fx.seg_colour[s][c] for c in COLOURS}
        hi, lo = max(eff, key=eff.get), min(eff, key=eff.get)
        g = frame[frame["segment"] == f"s{s}"]
        wins += g[g["cr_colour"] == hi]["clicked"].mean() > g[g["cr_colour"] == lo]["clicked"].mean()
    assert wins >= world.config.n_segments - 1
    badge = frame.groupby("cr_price_badge")["true_ctr"].mean()
    assert set(badge.index) == {"0", "1"}


def test_creatives_move_ctr_as_much_as_ads(world):
    rng = np.random.default_rng(0)
    within = [np.std([world.creative_logit(int(u), a, c) for c in a.creatives])
              for a in world.ads for u in rng.integers(0, len(world.users), 2)]
    assert 0.3 < float(np.mean(within)) < 0.8  # ad quality sd is 0.5


def test_bad_content_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="text_len"):
        WorldConfig(creative_content=replace(ON, text_len_min=5, text_len_max=3))
    with pytest.raises(ConfigError, match="badge_prob"):
        WorldConfig(creative_content=replace(ON, badge_prob=1.5))
