"""Creative images: the renderer and its broken kinds, the availability gate, the pairwise reward
model and the generate -> inspect -> rank loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.creatives import CreativeContentConfig
from core.events import CreativeChange, decode, encode
from core.images import LABELS, ImageConfig, colour_distance, from_png, scene_of, shape_mask
from core.world import DriftConfig, World, WorldConfig
from models.creative_image.encoder import ClassicalEncoder, SmallCNNEncoder
from models.creative_image.gate import AvailabilityGate, GateConfig
from models.creative_image.loop import ProductBrief, SyntheticGenerator, produce, style_table
from models.creative_image.reward import CreativeRewardModel, RewardConfig, beta_win_prob, mine_pairs
from models.state_codec import decode_state, encode_state

torch.set_num_threads(1)
IMG = ImageConfig(enabled=True)


def _world(seed: int, n_ads: int = 200, **kw) -> World:
    return World(WorldConfig(seed=seed, n_ads=n_ads, drift=DriftConfig.none(), images=ImageConfig(enabled=True, **kw),
                             creative_content=CreativeContentConfig(enabled=True)))


def _catalogue(w: World, reviewed: bool = True) -> list[dict]:
    return [w.creative_event(a, c, w.config.epoch, reviewed).to_dict() for a in w.ads for c in a.creatives]


@pytest.fixture(scope="module")
def gate() -> AvailabilityGate:
    g = AvailabilityGate(GateConfig())
    g.learn(_catalogue(_world(21, n_ads=400)))
    return g


def test_images_move_no_other_draw_and_broken_ones_cost_clicks():
    off = World(WorldConfig(seed=3, drift=DriftConfig.none()))
    on = World(WorldConfig(seed=3, drift=DriftConfig.none(), images=IMG))
    assert off.users == on.users and off.queries == on.queries
    assert [(a.id, a.bidwords, a.quality) for a in off.ads] == [(a.id, a.bidwords, a.quality) for a in on.ads]
    fx = on.image_effects
    for a0, a1 in zip(off.ads, on.ads):
        for c0, c1 in zip(a0.creatives, a1.creatives):
            assert c1.quality == pytest.approx(c0.quality + fx.main(c1.image), abs=1e-3)
    kinds = [c.image.label for a in on.ads for c in a.creatives]
    share = sum(k != "available" for k in kinds) / len(kinds)
    assert 0.08 < share < 0.25 and set(kinds) == set(LABELS)
    u = on.users[0]
    broken = [on.creative_logit(u, a, c) for a in on.ads for c in a.creatives if c.image.broken]
    fine = [on.creative_logit(u, a, c) for a in on.ads for c in a.creatives if not c.image.broken]
    assert np.mean(broken) < np.mean(fine) - 0.8


def test_each_broken_kind_looks_broken():
    w = _world(5, n_ads=300, broken_share=0.5)
    seen = set()
    for a in w.ads:
        p = w.product(a)
        for c in a.creatives:
            s, img = c.image, w.creative_image(a, c)
            m = shape_mask(s.shape, 32, s.scale, s.cx, s.cy)
            near = np.linalg.norm(img.astype(float) - np.array(p.colour), axis=-1) < 30
            if s.broken == "missing":
                assert near.mean() < 0.02 or colour_distance(p.colour, s.bg) < 60
            elif s.broken == "cutoff":
                whole = shape_mask(s.shape, 32, s.scale, 0.5, 0.5).sum()
                assert m.sum() < 0.75 * whole  # a good part of it is outside the frame
                assert m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
            elif s.broken == "low_contrast":
                assert colour_distance(s.product_colour, s.bg) < 30
            elif s.broken == "bg_mismatch":
                own = scene_of(a.category.split("/")[0], 0)
                assert colour_distance(s.bg, own) > 60 and colour_distance(s.product_colour, s.bg) >= 60
            else:
                assert colour_distance(s.product_colour, s.bg) >= 70 and m.sum() > 10
            seen.add(s.label)
    assert seen == set(LABELS)


def test_catalogue_events_carry_images_reviews_and_round_trip():
    w = World(WorldConfig(seed=4, images=IMG, drift=DriftConfig(horizon_s=600)))
    evs = [e for e in w.generate(duration_s=600, requests_per_s=1) if isinstance(e, CreativeChange)]
    assert len(evs) == sum(len(a.creatives) for a in w.ads if a.active_from <= w.config.epoch + 600)
    e = evs[0]
    back = decode(encode(e), CreativeChange)
    assert back == e and len(encode(e)) < 16_000
    a = w.ad_by_id[e.ad_id]
    assert np.array_equal(from_png(e.image), w.creative_image(a, e.creative_id))
    reviewed = [x for x in evs if x.review]
    assert 0.3 < len(reviewed) / len(evs) < 0.7  # review_share 0.5
    with pytest.raises(Exception, match="review"):
        decode(encode(CreativeChange(event_time=1.0, ad_id="a", creative_id="c", action="add", review="great")))
    # images off: no catalogue events
    assert not any(isinstance(x, CreativeChange) for x in World().generate(duration_s=60, requests_per_s=1))


def test_encoders_are_real_and_deterministic():
    w = _world(6, n_ads=20)
    imgs = np.stack([w.creative_image(a, c) for a in w.ads for c in a.creatives])
    e = ClassicalEncoder()
    x = e.encode(imgs)
    assert x.shape == (len(imgs), e.dim) and np.isfinite(x).all()
    assert np.array_equal(x, e.encode(imgs))
    cnn = SmallCNNEncoder()
    with pytest.raises(ValueError, match="not been trained"):
        cnn.encode(imgs)


def test_gate_precision_and_recall_on_broken_creatives_of_unseen_products(gate):
    held = _catalogue(_world(22, n_ads=200))
    s = gate.score(held)
    assert s["broken"] > 30
    assert s["broken_precision"] >= 0.85 and s["broken_recall"] >= 0.85, s
    assert s["false_reject_rate"] <= 0.05, s
    # state round trip through the registry format
    t, tree = encode_state(gate.state())
    g2 = AvailabilityGate.from_state(decode_state(t, tree))
    assert np.allclose(g2.predict(held[:20]), gate.predict(held[:20]))


def test_beta_soft_labels():
    assert beta_win_prob(50, 1000, 50, 1000) == pytest.approx(0.5)
    assert beta_win_prob(80, 1000, 40, 1000) > 0.99
    assert 0.5 < beta_win_prob(6, 100, 4, 100) < 0.8  # a small gap on few impressions is uncertain
    pairs = mine_pairs({"a": (1000, 80), "b": (1000, 40), "c": (10, 5)}, {"a": "x", "b": "x", "c": "x"}, 30, 0.1, 5)
    assert pairs == [("a", "b", pytest.approx(beta_win_prob(80, 1000, 40, 1000)))]


def test_reward_model_ranks_held_out_creatives_of_unseen_products():
    """Trained on the clicks of 3/4 of the ads, it orders the creatives of the other ads (which it
    never saw clicked) by their true effect well above chance."""
    w = _world(31, n_ads=200)
    df = w.to_examples_frame(duration_s=3000, requests_per_s=10)
    rng = np.random.default_rng(0)
    held = set(rng.choice([a.id for a in w.ads], size=50, replace=False))
    ex = df[~df["ad_id"].isin(held)][["creative_id", "clicked", "ad_id"]].to_dict("records")
    m = CreativeRewardModel(RewardConfig())
    m.learn(_catalogue(w, reviewed=False))
    for k in range(0, len(ex), 20000):
        stats = m.learn([dict(r, type="example") for r in ex[k:k + 20000]])
    assert stats["pairs"] > 100
    users = w.users[:100]
    ok = []
    for a in w.ads:
        if a.id not in held:
            continue
        truth = {c.id: np.mean([w.creative_logit(u, a, c) for u in users]) for c in a.creatives}
        s = dict(zip(truth, m.predict([{"creative_id": c} for c in truth])))
        ids = list(truth)
        ok += [(s[x] > s[y]) == (truth[x] > truth[y]) for i, x in enumerate(ids) for y in ids[i + 1:]]
    acc = float(np.mean(ok))
    assert len(ok) > 60 and acc > 0.62, acc
    # scoring a later window (clicks it has not learnt) and the registry round trip
    later = w.to_examples_frame(duration_s=1500, requests_per_s=10, seed=99)
    sc = m.score([dict(r, type="example") for r in later[["creative_id", "clicked"]].to_dict("records")])
    assert sc["pairs"] > 10 and sc["pair_accuracy"] > 0.5
    t, tree = encode_state(m.state())
    m2 = CreativeRewardModel.from_state(decode_state(t, tree))
    probe = [{"creative_id": c.id} for a in w.ads[:10] for c in a.creatives]
    assert np.allclose(m2.predict(probe), m.predict(probe))


def test_generate_inspect_rank_publishes_only_passing_creatives(gate):
    w = _world(41, n_ads=60)
    briefs = [ProductBrief(a.id, a.category, w.product(a), w.tops.index(a.category.split("/")[0]), "s1")
              for a in w.ads]
    gen = SyntheticGenerator(failure_rate=0.4, styles={"s1": "spot"}, tops=w.tops)
    rep = produce(briefs, gen, gate, attempts=4, want=2, seed=1)
    s = rep.summary()
    assert 0.4 < s["pass_rate"] < 0.8, s  # about 1 - failure_rate, minus the gate's mistakes
    assert s["products_served"] >= 0.95 * len(briefs)
    assert s["passed_broken"] <= 0.05 * s["passed"], s  # the gate lets few broken creatives through
    assert s["failed_broken"] >= 0.8 * (s["failed_broken"] + s["passed_broken"])
    for acc in rep.accepted.values():
        assert all(a.passed for a in acc) and len(acc) <= 2
        assert all(a.meta["bg_style"] == "spot" for a in acc)  # segment-aware background
    # the loop stops at `want`: never more than `attempts` per product
    assert s["attempts"] <= 4 * len(briefs)


def test_style_table_picks_the_segments_best_style():
    ex = ([{"creative_id": "c1", "segment": "s0", "clicked": int(i % 10 == 0)} for i in range(500)]
          + [{"creative_id": "c2", "segment": "s0", "clicked": int(i % 4 == 0)} for i in range(500)])
    assert style_table(ex, {"c1": "plain", "c2": "stripes"}) == {"s0": "stripes"}


def test_a_broken_image_file_is_a_dead_letter_is_skipped_and_is_never_served(gate):
    from core.errors import InvalidRecord
    from online.creatives import CreativeCatalogue
    from streams.creative_jobs import decode_creative

    w = _world(7, n_ads=10)
    good = w.creative_event(w.ads[0], w.ads[0].creatives[0], 1.0)
    bad = CreativeChange(**{**{k: getattr(good, k) for k in ("event_time", "ad_id", "action", "category",
                                                             "product_image", "review")},
                            "creative_id": "bad-1", "image": "bm90IGEgcG5n"})  # base64 of "not a png"
    assert decode_creative(encode(good), 2.0)[2]["creative_id"] == good.creative_id
    with pytest.raises(InvalidRecord, match="image"):
        decode_creative(encode(bad), 2.0)
    n = len(gate.buf_labels)
    stats = gate.learn([bad.to_dict()])  # skipped, the window goes on
    assert stats["examples"] == 0 and len(gate.buf_labels) == n
    cat = CreativeCatalogue("block-failed")
    cat.apply(bad)
    assert cat.verdict("bad-1") == "fail" and not cat.allowed("bad-1")
