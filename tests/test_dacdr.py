"""DACDR: the attention's exact properties, new domains, histories, state and serving inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.history import BehaviourHistory
from models.crossdomain.config import DACDRConfig
from models.crossdomain.model import DACDRModel
from models.crossdomain.net import DACDRNet, MaskedCrossAttention
from models.state_codec import decode_state, encode_state

torch.set_num_threads(1)
DOMAINS = ["search", "feed", "video"]


def _net(**kw) -> DACDRNet:
    torch.manual_seed(0)
    return DACDRNet([50, 20], [30], n_domains=3, n_behaviours=2, dim=8, heads=2, **kw)


def _inputs(b: int = 5, L: int = 4, empty_rows=(), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(1, 20, (b, 2), generator=g)
    ctx = torch.randint(1, 30, (b, 1), generator=g)
    dom = torch.randint(1, 4, (b,), generator=g)
    hist = torch.randint(1, 20, (b, 6, L, 2), generator=g)
    pad = torch.rand(b, 6, L, generator=g) < 0.4
    pad[:, 0, 0] = False  # at least one item per row ...
    for r in empty_rows:  # ... except the rows with no history at all
        pad[r] = True
    hist[pad] = 0
    gd = torch.tensor([1, 1, 2, 2, 3, 3])
    gb = torch.tensor([0, 1, 0, 1, 0, 1])
    return dict(item=item, ctx=ctx, dom=dom, hist=hist, hist_pad=pad, group_domain=gd, group_behaviour=gb)


def test_attention_weights_sum_to_one_and_padding_gets_zero():
    torch.manual_seed(1)
    ca = MaskedCrossAttention(8, heads=2)
    q, kv = torch.randn(4, 8), torch.randn(4, 7, 8)
    pad = torch.tensor([[0, 0, 1, 0, 1, 1, 0]] * 3 + [[1] * 7], dtype=torch.bool)
    out, w = ca(q, kv, pad)
    assert torch.allclose(w[:3].sum(-1), torch.ones(3, 2), atol=1e-6)
    assert torch.all(w[:, :, pad[0]][:3] == 0)  # padded keys: exactly zero
    assert torch.all(w[3] == 0) and torch.all(out[3] == 0)  # no key at all: zero weights, zero output
    assert torch.isfinite(out).all()


def test_both_steps_weights_sum_to_one_padding_zero_in_the_model():
    net = _net()
    x = _inputs()
    _, parts = net(**x, return_parts=True)
    gpad = x["hist_pad"].all(-1)
    assert torch.allclose(parts["alpha"].sum(-1), torch.ones(5), atol=1e-6)
    assert torch.all(parts["alpha"][gpad] == 0)  # an empty (domain, behaviour) group: zero weight
    flat_pad = x["hist_pad"].reshape(5, -1)
    w = parts["w_item"]
    assert torch.allclose(w.sum(-1), torch.ones(5, 2), atol=1e-6)
    assert torch.all(w.permute(0, 2, 1)[flat_pad] == 0)


@pytest.mark.parametrize("level", ["types", "items"])
def test_no_source_history_gives_finite_outputs_and_gradients(level):
    net = _net(domain_level=level)
    x = _inputs(empty_rows=(1, 3))
    logit, parts = net(**x, return_parts=True)
    assert torch.isfinite(logit).all()
    assert torch.all(parts["z_dom"][[1, 3]] == 0) and torch.all(parts["z_item"][[1, 3]] == 0)
    logit.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("level", ["types", "items"])
def test_shuffling_a_behaviour_sequence_changes_nothing(level):
    net = _net(domain_level=level).eval()
    x = _inputs(L=6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    y = dict(x, hist=x["hist"][:, :, perm], hist_pad=x["hist_pad"][:, :, perm])
    with torch.no_grad():
        a, pa = net(**x, return_parts=True)
        b, pb = net(**y, return_parts=True)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(pa["z_dom"], pb["z_dom"], atol=1e-5) and torch.allclose(pa["z_item"], pb["z_item"], atol=1e-5)


def test_the_domain_changes_the_domain_level_attention():
    net = _net().eval()
    x = _inputs()
    with torch.no_grad():
        _, p1 = net(**x, return_parts=True)
        _, p2 = net(**dict(x, dom=(x["dom"] % 3) + 1), return_parts=True)
    assert not torch.allclose(p1["alpha"], p2["alpha"])


# ----------------------------------------------------------------------------- the model on records

def _records(n: int, seed: int, domains=DOMAINS, t0: float = 0.0) -> list[dict]:
    """Users whose clicks in every domain follow one taste (category 'a' or 'b')."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = int(rng.integers(40))
        d = domains[int(rng.integers(len(domains)))]
        cat = "a" if rng.random() < 0.5 else "b"
        likes = "a" if u % 2 else "b"
        p = 0.5 if cat == likes else 0.05
        out.append({"user_id": f"u{u}", "ad_id": f"{cat}{int(rng.integers(5))}", "category": cat, "domain": d,
                    "clicked": int(rng.random() < p), "event_time": t0 + i})
    return out


def _model(**kw) -> DACDRModel:
    cfg = DACDRConfig(domains=list(DOMAINS), capacity=256, dim=8, heads=2, hidden=(16,), max_len=6,
                      batch_size=64, **kw)
    return DACDRModel(cfg)


def test_adding_a_domain_leaves_frozen_shared_tables_untouched():
    m = _model()
    m.learn(_records(600, 0))
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.add_domain("live", freeze_shared="tables")
    assert m.net.domain.num_embeddings == len(DOMAINS) + 2 and m.domains[-1] == "live"
    stats = m.learn(_records(300, 1, domains=["live"], t0=1000.0))
    assert stats["examples"] == 300
    after = m.net.state_dict()
    for k in before:
        if k.startswith(("item_tables", "ctx_tables", "behaviour")):
            assert torch.equal(before[k], after[k]), f"{k} moved although frozen"
    assert torch.equal(before["domain.weight"], after["domain.weight"][:-1])  # old rows kept (the new row may move)
    assert not torch.equal(m.net.domain.weight[-1], before["domain.weight"][1:].mean(0))  # the new row learnt
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head"))
    p = m.predict([{"user_id": "u1", "ad_id": "a1", "category": "a", "domain": "live"}])
    assert np.isfinite(p).all()
    # without freezing, the shared tables move
    m2 = _model()
    m2.learn(_records(600, 0))
    t0 = m2.net.item_tables[0].weight.clone()
    m2.add_domain("live", freeze_shared=None)
    m2.learn(_records(300, 1, domains=["live"], t0=1000.0))
    assert not torch.equal(t0, m2.net.item_tables[0].weight)


def test_state_round_trip_and_served_history_match_the_own_history():
    m = _model(target_domains=["feed"])
    m.learn(_records(800, 2))
    tensors, tree = encode_state(m.state())
    m2 = DACDRModel.from_state(decode_state(tensors, tree))
    probe = [{"user_id": f"u{u}", "ad_id": "a1", "category": "a", "domain": "feed"} for u in range(10)]
    assert np.allclose(m.predict(probe), m2.predict(probe))
    served = [dict(r, history=m.history.as_items(r["user_id"])) for r in probe]
    assert np.allclose(m.predict(probe), m.predict(served), atol=1e-6)
    assert m2.validate() == []


def test_learning_and_scoring_use_the_history_before_each_record():
    m = _model()
    recs = _records(50, 3)
    h0 = m.history.state()
    m.score(recs)  # scoring folds nothing into the model's history
    assert m.history.state()["users"] == h0["users"]
    hist = BehaviourHistory(("ad_id", "category"), max_len=6)
    snaps = hist.replay(recs, DOMAINS, mutate=True)
    assert not snaps[0].any()  # the first record sees nothing, not even itself
    u = recs[0]["user_id"]
    later = next(i for i in range(1, len(recs)) if recs[i]["user_id"] == u)
    d = DOMAINS.index(recs[0]["domain"])
    assert snaps[later, d, 0, -1] == hist.intern((recs[0]["ad_id"], recs[0]["category"]))
    hidden = BehaviourHistory(("ad_id", "category"), max_len=6)
    hidden.replay(recs, DOMAINS, mutate=True, skip=[r["user_id"] == u for r in recs])
    assert u not in hidden  # hidden records are never folded in


def test_source_history_lets_dacdr_rank_a_cold_users_target_clicks():
    """Tastes are shared across domains: users whose 'feed' records are hidden from training are
    ranked far better by a model that sees their other domains than by one that does not."""
    train = _records(6000, 4)
    cold = {f"u{u}" for u in range(0, 40, 5)}  # both tastes
    hide = [r["domain"] == "feed" and r["user_id"] in cold for r in train]
    test = [dict(r, event_time=r["event_time"] + 10_000) for r in _records(3000, 5)]
    test = [r for r in test if r["domain"] != "feed" or r["user_id"] in cold]
    hide_t = [r["domain"] == "feed" for r in test]
    res = {}
    for name in ("dacdr", "single"):
        m = DACDRModel(DACDRConfig.variant(name, "feed", domains=list(DOMAINS), capacity=256, dim=8, heads=2,
                                           hidden=(16,), max_len=6, batch_size=64, context_fields=[], epochs=3))
        m.learn(train, hide=hide)
        p, _ = m.predict_window(test, hide=hide_t)
        sel = np.array(hide_t)
        y = np.array([r["clicked"] for r in test])[sel]
        from models.ctr.metrics import auc
        res[name] = auc(y, p[sel])
    assert res["dacdr"] > res["single"] + 0.1, res


def test_hidden_records_are_never_learnt_nor_folded_into_a_history():
    """The cold-start protocol: a cold user's target-domain records reach neither the loss nor any
    history, in learning and in scoring."""
    recs = _records(1500, 6)
    cold = {"u3", "u8"}
    hide = [r["domain"] == "feed" and r["user_id"] in cold for r in recs]
    m = _model(target_domains=["feed"])
    stats = m.learn(recs, hide=hide)
    assert stats["examples"] == sum(r["domain"] == "feed" and not h for r, h in zip(recs, hide))
    assert all(m.history.count(u, "feed") == 0 for u in cold)
    assert all(m.history.count(u, "search") > 0 for u in cold)  # their other domains are there
    later = _records(300, 7, t0=5000.0)
    hide_l = [r["domain"] == "feed" and r["user_id"] in cold for r in later]
    p, is_cold = m.predict_window(later, hide=hide_l)
    assert all(c for c, h in zip(is_cold, hide_l) if h)  # still cold at every one of their records
    assert np.isfinite(p).all()


@pytest.mark.slow
def test_dacdr_beats_the_single_domain_model_on_cold_users_of_the_synthetic_world():
    """Several worlds (seeds 11, 12; the bench uses 1-3): users' target-domain history hidden, DACDR
    (every domain's behaviour) ranks their target clicks better than the single-domain model."""
    from core.domains import CROSS_DOMAINS, CrossDomainConfig
    from core.world import DriftConfig, World, WorldConfig
    from models.crossdomain.evaluation import XDColumns, XDEvalConfig, prepare_frame, run_protocol

    cols = XDColumns(item_features=["category"], context=["position", "query", "match"])
    diffs = []
    for seed in (11, 12):
        w = World(WorldConfig(seed=seed, n_users=2000, domains=CROSS_DOMAINS, drift=DriftConfig(horizon_s=2400),
                              cross_domain=CrossDomainConfig(enabled=True)))
        df = prepare_frame(w.to_examples_frame(duration_s=2400, requests_per_s=10), cols)
        rep = run_protocol(df, cols, XDEvalConfig(targets=["feed"], variants=("dacdr", "single"), seeds=1,
                                                  cold_share=0.5, windows=6, bootstrap=0))
        runs = rep["targets"]["feed"]["runs"]
        assert rep["targets"]["feed"]["counts"][0]["cold_clicks"] > 80
        diffs.append(runs["dacdr"][0]["auc_cold"] - runs["single"][0]["auc_cold"])
    assert all(d > 0 for d in diffs) and np.mean(diffs) > 0.005, diffs
