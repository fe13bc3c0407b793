"""JAC and NSCTR, pure: the quantiser, the straight-through gradient, the NSCTR identities, the
learner's state and the StreamModel parts (issue 13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.creative.config import JACConfig
from models.creative.jac import JACLearner
from models.creative.metrics import gauc, match_weights, nsctr
from models.creative.quantise import PctrBucketEmbed, bucket_bounds, bucket_coordinate, bucket_index
from models.creative.stream import AR_NAME, CR_NAME, CreativeRankerModel, JACStreamModel
from models.ctr.stream import CTRStreamModel
from models.state_codec import decode_state, encode_state
from models.stream_model import gate_of, parts_of

torch.set_num_threads(1)


# ---------------------------------------------------------------- the quantiser (Eq. 5)


@pytest.mark.parametrize("k,r", [(64, 1000.0), (8192, 1000.0), (16, 1.0), (32, 1e5)])
def test_quantiser_is_monotone_and_spans_zero_to_k(k, r):
    p = np.sort(np.concatenate([np.linspace(0, 1, 20001), np.geomspace(1e-7, 1, 5000)]))
    b = bucket_index(p, k, r)
    assert (np.diff(b) >= 0).all()
    assert b[0] == 0 and b[-1] == k and bucket_index(np.array([1.0]), k, r)[0] == k
    bt = bucket_index(torch.tensor(p), k, r).numpy()
    assert (bt == b).all()  # torch and numpy agree
    assert (bucket_index(np.array([-0.5, 1.5]), k, r) == [0, k]).all()  # clamped


def test_quantiser_is_constant_within_a_bucket_and_its_bounds_invert_it():
    k, r = 64, 1000.0
    lo = bucket_bounds(k, r)
    assert lo[0] == 0 and lo[-1] == pytest.approx(1.0)
    for b in range(k):
        inside = np.linspace(lo[b] * (1 + 1e-9) + 1e-12, lo[b + 1] * (1 - 1e-9), 50)
        assert (bucket_index(inside, k, r) == b).all(), b
    emb = PctrBucketEmbed(k, 4, r, ste="none")
    with torch.no_grad():
        h = emb(torch.tensor(np.linspace(lo[10] * 1.0001, lo[11] * 0.9999, 30), dtype=torch.float32))
    assert torch.equal(h, h[:1].expand_as(h))  # one embedding for the whole bucket


def test_log_compression_gives_small_pctrs_most_buckets():
    k = 64
    share_below = lambda r: float(bucket_index(np.array([0.024]), k, r)[0]) / k  # noqa: E731
    assert share_below(1e-6) < 0.03  # r -> 0: linear, 2.4 % of the buckets
    assert share_below(1000.0) > 0.45  # the default: about half the buckets below a 2.4 % pCTR
    assert share_below(1e5) > share_below(1000.0)


# ---------------------------------------------------------------- straight-through


@pytest.mark.parametrize("ste", ["copy", "interp"])
def test_straight_through_forward_is_the_hard_bucket_embedding(ste):
    torch.manual_seed(0)
    emb = PctrBucketEmbed(64, 8, 1000.0, ste=ste)
    p = torch.rand(200, requires_grad=True) * 0.3
    p.retain_grad()
    h = emb(p)
    hard = emb.emb(bucket_index(p, 64, 1000.0))
    assert torch.equal(h, hard)
    (h * torch.randn_like(h)).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0  # the gradient reaches the pCTR


def _tiny_batch(n=256, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        ad = f"a{rng.integers(20)}"
        recs.append({"user_id": f"u{rng.integers(50)}", "query": "q", "ad_id": ad, "creative_id": f"{ad}-c{rng.integers(3)}",
                     "bidword": "b", "category": "c/l", "position": int(rng.integers(4)), "bid": 1.0, "slot": "top",
                     "domain": "search", "event_time": 1000.0 + i, "clicked": int(rng.random() < 0.2),
                     "features": {"segment": f"s{rng.integers(3)}", "match": "exact", "advertiser": "adv",
                                  "top_category": "c", "query_len": 1, "cr_layout": "grid", "cr_colour": "red",
                                  "cr_price_badge": str(rng.integers(2)), "cr_text_len": int(rng.integers(2, 16))}})
    return recs


def _ar_grads_from_cr_loss(ste: str) -> float:
    learner = JACLearner(JACConfig(ste=ste, batch_size=256))
    raw = learner.to_raw(_tiny_batch())
    rows, dense = learner.cr.encode(learner.cr_raw(raw), train=True)
    inp, _ = learner.ar.encode(learner.ar_raw(raw), train=True)
    z_ad = learner.ar.net(inp)[0]
    p = torch.sigmoid(z_ad)
    z_c = learner.cr.net(rows, dense, p if ste != "none" else p.detach())
    learner.ar.dense_opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(z_c, torch.from_numpy(raw.labels)).backward()  # the CR loss alone
    return sum(float(q.grad.abs().sum()) for q in learner.ar.net.backbone.parameters() if q.grad is not None)


def test_straight_through_passes_the_creative_loss_to_the_ad_ranker():
    assert _ar_grads_from_cr_loss("copy") > 0
    assert _ar_grads_from_cr_loss("interp") > 0
    assert _ar_grads_from_cr_loss("none") == 0  # no STE: AR learns only from its own loss


# ---------------------------------------------------------------- NSCTR (Algorithm 1)


def _log(seed=0, n_ads=12):
    rng = np.random.default_rng(seed)
    ads, shown, y = [], [], []
    for a in range(n_ads):
        n = int(rng.integers(20, 400))
        ads += [f"a{a}"] * n
        shown += list(rng.integers(0, 3, n))
        y += list((rng.random(n) < rng.uniform(0.01, 0.3)).astype(float))
    return np.array(ads, dtype=object), np.array(shown), np.array(y)


def test_nsctr_of_the_logging_policy_is_the_logged_ctr():
    ads, _, y = _log()
    r = nsctr(ads, np.ones(len(y), dtype=bool), y)
    assert r["nsctr"] == pytest.approx(y.mean(), rel=1e-12)
    assert r["sctr"] == pytest.approx(y.mean(), rel=1e-12)
    assert r["matched_share"] == 1.0 and r["ads_unmatched"] == 0
    # with a constant propensity, the IPS weights change nothing
    assert nsctr(ads, np.ones(len(y)), y, np.full(len(y), 1 / 3))["nsctr"] == pytest.approx(y.mean(), rel=1e-12)


def test_nsctr_reweights_every_ad_to_its_impression_share():
    ads, shown, y = _log(1)
    pick = {a: i % 3 for i, a in enumerate(sorted(set(ads)))}  # a fixed creative per ad
    m = np.array([s == pick[a] for a, s in zip(ads, shown)])
    r = nsctr(ads, m, y)
    # by hand: Σ_A Imp[A] · (matched CTR of A) / Σ_A Imp[A]
    num = sum((ads == a).sum() * y[(ads == a) & m].mean() for a in set(ads))
    assert r["nsctr"] == pytest.approx(num / len(y), rel=1e-12)
    assert r["sctr"] == pytest.approx(y[m].mean(), rel=1e-12)
    # duplicating every impression of one ad keeps its weight proportional to its impressions
    a0 = ads == "a0"
    ads2, m2, y2 = np.r_[ads, ads[a0]], np.r_[m, m[a0]], np.r_[y, y[a0]]
    share = (a0.sum() * 2) / len(y2)
    manual = share * y[a0 & m].mean() + sum((ads == a).sum() * y[(ads == a) & m].mean()
                                            for a in set(ads) - {"a0"}) / len(y2)
    assert nsctr(ads2, m2, y2)["nsctr"] == pytest.approx(manual, rel=1e-12)
    # one ad: NSCTR = sCTR
    one = nsctr(ads[a0], m[a0], y[a0])
    assert one["nsctr"] == pytest.approx(one["sctr"], rel=1e-12)


def test_nsctr_unmatched_ads_and_ties():
    ads = np.array(["a", "a", "b", "b"], dtype=object)
    y = np.array([1.0, 0.0, 1.0, 1.0])
    m = np.array([1, 1, 0, 0], dtype=bool)
    assert nsctr(ads, m, y, unmatched="drop")["nsctr"] == pytest.approx(0.5)
    assert nsctr(ads, m, y, unmatched="zero")["nsctr"] == pytest.approx(0.25)
    assert nsctr(ads, m, y)["ads_unmatched"] == 1
    # a tie between t top candidates counts 1/t when the shown creative is among them
    scores = np.array([1.0, 1.0, 0.0, 5.0, 2.0, 5.0, 5.0])
    w = match_weights(scores, np.array([0, 3, 7]), np.array([1, 2]))
    assert w.tolist() == [0.5, pytest.approx(1 / 3)]
    assert match_weights(scores, np.array([0, 3, 7]), np.array([2, 1])).tolist() == [0.0, 0.0]


def test_gauc_weights_groups_by_impressions_and_skips_one_class_groups():
    g = np.array(["x"] * 4 + ["y"] * 2 + ["z"] * 3, dtype=object)
    y = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.2, 0.8, 0.1, 0.2, 0.3])
    # x: AUC 0.75 over 4, y: 0 over 2, z skipped
    assert gauc(g, y, p) == pytest.approx((0.75 * 4 + 0.0 * 2) / 6)


# ---------------------------------------------------------------- the learner and its parts


def test_learner_state_round_trips_and_predictions_match():
    recs = _tiny_batch(600)
    learner = JACLearner(JACConfig(batch_size=128))
    learner.train(recs[:500])
    back = JACLearner.from_state(decode_state(*encode_state(learner.state_dict())))
    assert np.allclose(back.creative_logits(recs[500:]), learner.creative_logits(recs[500:]))
    assert np.allclose(back.ad_pctr(recs[500:]), learner.ad_pctr(recs[500:]))
    assert back.validate() == []
    # training continues identically from the restored state
    learner.train(recs[500:])
    back.train(recs[500:])
    assert np.allclose(back.creative_logits(recs[:100]), learner.creative_logits(recs[:100]), atol=1e-6)


def test_jac_job_publishes_two_parts_that_round_trip():
    recs = _tiny_batch(800)
    job = JACStreamModel(JACConfig(batch_size=128))
    job.learn(recs[:600])
    parts = parts_of(job)
    assert set(parts) == {AR_NAME, CR_NAME}
    assert isinstance(parts[AR_NAME], CTRStreamModel) and isinstance(parts[CR_NAME], CreativeRankerModel)
    assert gate_of(parts[CR_NAME]).keys == ["nsctr", "logloss"] and "auc" in gate_of(parts[AR_NAME]).keys
    for name, part in parts.items():
        s = part.score(recs[600:])
        assert math.isfinite(s["logloss"]), name
        back = type(part).from_state(decode_state(*encode_state(part.state())))
        assert np.allclose(back.predict(recs[600:650]), part.predict(recs[600:650])), name
        back.warm()
    # AR+ is an ordinary CTR model version: the ad ranking path loads it as it loads any CTR model
    from online.models import build_learner

    assert np.allclose(build_learner(parts[AR_NAME].state()).predict(recs[:20]), parts[AR_NAME].predict(recs[:20]))
    # a never-shown creative gets a score from its content, not a flat value
    new = [dict(r, creative_id="never-seen", features=dict(r["features"], cr_colour=c)) for r, c in
           zip(recs[:5], ["red", "blue", "green", "black", "white"])]
    p = parts[CR_NAME].predict(new)
    assert len(set(np.round(p, 8))) > 1


def test_grouped_batch_scores_equal_the_rows():
    """The service's grouped form (context once, ads once, creatives once) scores like the rows."""
    recs = _tiny_batch(600)
    job = JACStreamModel(JACConfig(batch_size=128))
    job.learn(recs)
    cr = parts_of(job)[CR_NAME]
    ads = [("a1", "c/l", "adv"), ("a7", "c/l", None), ("zz-new", "c/x", "adv")]
    crs = [["a1-c0", "a1-c2", "never"], ["a7-c1"], ["n1", "n2"]]
    content = {c: {"cr_layout": "grid", "cr_colour": ["red", "blue"][i % 2], "cr_price_badge": str(i % 2),
                   "cr_text_len": 3 + i} for i, c in enumerate(c for cs in crs for c in cs)}
    ctx = {"user_id": "u3", "segment": "s1", "domain": "search", "position": 0}
    rows = [{**ctx, "ad_id": a, "category": cat, "creative_id": c, "features": {"advertiser": adv, **content[c]}}
            for (a, cat, adv), cs in zip(ads, crs) for c in cs]
    grouped = {"context": ctx, "ads": {"ad_id": [a for a, _, _ in ads], "category": [c for _, c, _ in ads],
                                       "advertiser": [v for _, _, v in ads]},
               "counts": [len(cs) for cs in crs],
               "creatives": {"creative_id": [c for cs in crs for c in cs],
                             **{k: [content[c][k] for cs in crs for c in cs] for k in content["never"]}}}
    assert np.allclose(cr.predict(grouped), cr.predict(rows), atol=1e-6)


def test_jac_job_resets_to_serving_states():
    recs = _tiny_batch(600)
    job = JACStreamModel(JACConfig(batch_size=128))
    job.learn(recs[:300])
    states = {n: p.state() for n, p in parts_of(job).items()}
    before = parts_of(job)[CR_NAME].predict(recs[300:340])
    job.learn(recs[300:])
    assert not np.allclose(parts_of(job)[CR_NAME].predict(recs[300:340]), before)
    job.reset_to(states)
    assert np.allclose(parts_of(job)[CR_NAME].predict(recs[300:340]), before)


def test_bad_settings_are_clear_errors():
    from models.ctr import FieldConfig

    with pytest.raises(ValueError, match="must not see the creative"):
        JACConfig(ar_fields=[FieldConfig("creative_id")]).validate()
    with pytest.raises(ValueError, match="pctr_source"):
        JACConfig(pctr_source="later").validate()
    with pytest.raises(ValueError, match="ste"):
        PctrBucketEmbed(ste="magic")
    with pytest.raises(ValueError, match="not a creative ranker state"):
        CreativeRankerModel.from_state({"config": {}})
    assert bucket_coordinate(torch.tensor([1.0]), 8, 10.0).item() == pytest.approx(8.0)
