"""The query classifier's pieces (models/query): graphs, semi-supervised labels, knowledge
attention, module switches, graph propagation, metrics. Pure and fast: hashed n-gram features
instead of MiniLM, one torch thread."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.query import graphs as G
from models.query.classifier import QueryClassifier, QueryData
from models.query.encoder import EncoderSpec, HashFeatures, build_encoder
from models.query.labels import LabelSpace, display_name, side_terms
from models.query.metrics import f1_scores, predict_sets, recall_at_k, tail_labels
from models.query.ssuf import SSUFConfig, SSUFNet, knowledge_fuse, semi_labels, variant_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEAVES = ["shoes/running-shoes", "shoes/sneakers", "shoes/hiking-boots", "home/sofas", "home/rugs", "home/desk-lamps"]
TRAIN = [("running shoes", ["shoes/running-shoes"]), ("trail running shoes", ["shoes/running-shoes"]),
         ("white sneakers", ["shoes/sneakers"]), ("canvas sneakers", ["shoes/sneakers"]),
         ("athletic shoes", ["shoes/running-shoes", "shoes/sneakers"]), ("hiking boots", ["shoes/hiking-boots"]),
         ("leather sofa", ["home/sofas"]), ("grey sofas", ["home/sofas"]), ("wool rugs", ["home/rugs"]),
         ("area rug", ["home/rugs"]), ("living room", ["home/sofas", "home/rugs"])]


def small(variant: str = "ssuf", **over) -> tuple[QueryClassifier, QueryData]:
    torch.manual_seed(0)
    space = LabelSpace.build(LEAVES, "/")
    enc = build_encoder(EncoderSpec(features="hash", hidden=32), features=HashFeatures(128))
    clf = QueryClassifier(variant_config(variant, **over), space, enc)
    data = QueryData([q for q, _ in TRAIN], [space.ids(ls) for _, ls in TRAIN],
                     [[ls[0].split("/")[1].replace("-", " "), "acme"] for _, ls in TRAIN])
    return clf, data


# ---- graphs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_sym_norm_adj_is_symmetric_with_spectrum_in_unit_interval(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((12, 12)) * (rng.random((12, 12)) < 0.3)  # sparse, asymmetric, non-negative
    a[3] = 0  # an isolated node
    a[:, 3] = 0
    n = G.sym_norm_adj(a)
    assert np.allclose(n, n.T, atol=1e-6)
    ev = np.linalg.eigvalsh(n.astype(np.float64))
    assert ev.min() >= -1 - 1e-6 and ev.max() <= 1 + 1e-6
    assert abs(ev.max() - 1.0) < 1e-5  # every component has eigenvalue 1 (D^-1/2 (A+I) D^-1/2)


def test_sym_norm_adj_refuses_negative_or_nonsquare():
    with pytest.raises(ValueError):
        G.sym_norm_adj(-np.eye(3))
    with pytest.raises(ValueError):
        G.sym_norm_adj(np.ones((2, 3)))


def test_cooccurrence_graph_properties():
    sets = [[0, 1], [0, 1], [0], [2, 3], [1, 3], [4]]
    pairs, counts = G.cooccurrence(sets, 5)
    for alpha in (0.0, 0.1, 0.4, 0.6):
        a = G.cooccurrence_graph(pairs, counts, alpha)
        assert np.allclose(np.diag(a), 1.0)
        assert a.min() >= 0 and a.max() <= 1
    edges = [int((G.cooccurrence_graph(pairs, counts, al) > 0).sum()) for al in (0.0, 0.2, 0.4, 0.6, 0.9)]
    assert edges == sorted(edges, reverse=True)  # raising alpha never adds an edge
    assert G.cooccurrence_graph(pairs, counts, 0.0)[0, 1] == pytest.approx(2 / 3)  # N(0,1)/N(0)


def test_hierarchy_weights():
    parents = [6, 6, 6, 7, 7, -1, -1, -1]  # leaves 0-2 under 6, 3-4 under 7
    mass = [100, 1, 1, 5, 5, 0, 0, 0]
    a = G.hierarchy_graph(parents, mass)
    w = a[a > 0]
    assert w.min() > 0 and w.max() <= 1
    for i, p in enumerate(parents):
        if p >= 0:
            kids = [j for j, q in enumerate(parents) if q == p]
            assert a[p, i] >= 1 / len(kids) - 1e-12
    assert a[6, 0] == pytest.approx(100 / 102)
    assert np.allclose(a, a.T)


# ---- semi-supervised labels -------------------------------------------------------------------
def test_semi_labels_bounds_threshold_and_no_gradient():
    torch.manual_seed(0)
    q = torch.randn(7, 16, requires_grad=True)
    c = torch.randn(5, 16, requires_grad=True)
    y_click = (torch.rand(7, 5) < 0.3).float()
    tau = 0.2
    y, y_semi = semi_labels(q, c, y_click, tau)
    s = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T
    assert torch.all(y >= y_click) and torch.all((y >= 0) & (y <= 1))
    assert torch.all(y_semi[s.detach() < tau] == 0)
    assert torch.all(y_semi[s.detach() >= tau] > 0)
    assert not y.requires_grad and not y_semi.requires_grad
    # the gradient of a loss through y only flows through the logits, never through the targets
    logits = (q @ c.T)
    F.binary_cross_entropy_with_logits(logits, y).backward()
    g1 = q.grad.clone()
    q.grad = None
    F.binary_cross_entropy_with_logits(q @ c.T, semi_labels(q.detach(), c.detach(), y_click, tau)[0]).backward()
    assert torch.allclose(g1, q.grad)


def test_semi_labels_extend_clicks_in_training():
    clf, data = small("smgcn", tau=0.3, max_epochs=1)
    clf.build(data)
    out = clf.net(clf.encoder.ids(data.queries))
    _, y = clf.net.loss(out, torch.zeros(len(data), clf.space.n_leaves))
    assert y.sum() > 0  # "running shoes" is similar to the label name "running shoes"


# ---- knowledge attention ----------------------------------------------------------------------
def test_knowledge_attention_sums_to_one_and_is_order_invariant():
    torch.manual_seed(1)
    q = torch.randn(4, 8)
    k = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    fused, alpha = knowledge_fuse(q, k, mask)
    assert torch.allclose(alpha[mask.any(1)].sum(1), torch.ones(3))
    assert torch.all(alpha[~mask] == 0)
    assert torch.allclose(fused[2], q[2])  # no knowledge: q' = q
    perm = torch.tensor([2, 0, 1, 3, 4])  # permute the valid items of row 0 (and all of row 1)
    fused_p, _ = knowledge_fuse(q, k[:, perm], mask[:, perm])
    assert torch.allclose(fused_p[:2], fused[:2], atol=1e-6)
    empty, a0 = knowledge_fuse(q, torch.zeros(4, 0, 8), torch.zeros(4, 0, dtype=torch.bool))
    assert torch.equal(empty, q)


def test_knowledge_changes_the_query_representation():
    clf, data = small("ssuf", max_epochs=1)
    clf.build(data)
    a = clf.predict_proba(["acme"], [["sofas"]])
    b = clf.predict_proba(["acme"], [["rugs"]])
    c = clf.predict_proba(["acme"], None)
    assert not np.allclose(a, b) and not np.allclose(a, c)


# ---- switches ---------------------------------------------------------------------------------
def test_all_modules_off_equals_the_baseline():
    off = variant_config("ssuf-ke-le-semi-se-label")
    assert off.modules == variant_config("baseline").modules
    assert not any(off.modules.values())
    a, data = small("baseline", max_epochs=3, patience=99)
    b, _ = small("ssuf-ke-le-semi-se-label", max_epochs=3, patience=99)
    a.fit(data, data)
    b.fit(data, data)
    qs = ["red sneakers", "rugs", "anything"]
    assert np.allclose(a.predict_proba(qs), b.predict_proba(qs))


def test_variant_names():
    assert variant_config("ssuf").graphs == ("coo", "sim", "hier")
    assert variant_config("ssuf-hier").graphs == ("coo", "sim")
    assert variant_config("smgcn+hier").graphs == ("coo", "sim", "hier")
    assert not variant_config("ssuf-ke").knowledge and variant_config("ssuf-ke").semi
    with pytest.raises(ValueError):
        variant_config("nope")
    with pytest.raises(ValueError):
        variant_config("ssuf-xyz")


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_every_module_combination_trains_and_predicts(flags):
    le, ke, semi, se = flags
    over = {"label_semantic": le or se, "side_info": le, "knowledge": ke, "semi": semi,
            "graphs": ("coo", "sim", "hier") if se else (), "max_epochs": 2, "patience": 5}
    clf, data = small("baseline", **over)
    clf.fit(data, data)
    p = clf.predict_proba(["red sneakers", "sofa"], [["sneakers"], []])
    assert p.shape == (2, len(LEAVES)) and np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert all(len(s) >= 1 for s in clf.predict(["x", "rugs"]))


# ---- graph propagation ------------------------------------------------------------------------
def _tail_gradient(edge: bool) -> float:
    """Gradient reaching the input embedding C_1 of a label with no positives from the loss terms
    of label 0 only (a popular label), with or without a co-occurrence edge 0-1."""
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec(features="hash", hidden=16), features=HashFeatures(64))
    names = ["sneakers", "wool rugs", "desk lamps"]
    cfg = SSUFConfig(label_semantic=True, graphs=("coo",), alpha=0.0, dropout=0.0)
    net = SSUFNet(cfg, enc, 3, enc.ids(names))
    a = np.zeros((3, 3))
    if edge:
        a[0, 1] = a[1, 0] = 1.0
    net.set_graphs({"coo": G.sym_norm_adj(a)})
    c = enc(net.node_ids).detach().requires_grad_(True)
    _, h = net.label_embeddings(c)
    q = enc(enc.ids(["white sneakers", "canvas sneakers"]))
    logits = net.logits(q, h)
    F.binary_cross_entropy_with_logits(logits[:, 0], torch.ones(2)).backward()
    return float(c.grad[1].abs().sum())


def test_tail_label_gets_gradient_through_the_graph():
    assert _tail_gradient(edge=True) > 1e-6
    assert _tail_gradient(edge=False) == 0.0


# ---- labels, metrics --------------------------------------------------------------------------
def test_label_space_hierarchy_and_names():
    s = LabelSpace.build(["a/b/c-d", "a/e", "f"], "/")
    assert s.leaves == ["a/b/c-d", "a/e", "f"]
    assert set(s.names[3:]) == {"a", "a/b"}
    assert s.parents[s.index["a/b/c-d"]] == s.index["a/b"] and s.parents[s.index["a/b"]] == s.index["a"]
    assert s.parents[s.index["f"]] == -1
    assert display_name("home/desk-lamps", "/") == "desk lamps"
    assert s.ids(["a/e", "zzz", "a"]) == [1]  # unknown and ancestor labels are not leaves
    terms = side_terms(["trail runners", "road runners", "red sofa"], [[0], [0], [2]], s, 3)
    assert terms[0][0] == "runners"


def test_f1_metrics_known_values():
    gold = [{0}, {0, 1}, {2}, {3}]
    pred = [{0}, {0}, {2, 1}, {0}]
    m = f1_scores(pred, gold, train_counts=[10, 0, 5, 1])
    # label 0: tp 2 fp 1 fn 0 -> 0.8; label 1: tp 0 fp 1 fn 1 -> 0; label 2: 1; label 3: 0
    assert m["macro_f1"] == pytest.approx((0.8 + 0 + 1 + 0) / 4)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert m["tail_macro_f1"] == pytest.approx((0 + 0) / 2)  # rarest half: labels 1 (0) and 3 (1)
    assert m["unseen_macro_f1"] == 0.0 and m["n_unseen_labels"] == 1
    assert tail_labels([0, 1, 2], lambda x: [5, 1, 1][x]) == [1, 2]
    assert recall_at_k(np.array([[0.1, 0.9, 0.5], [0.9, 0.1, 0.2]]), [{2}, {1, 2}], 2) == pytest.approx(0.75)
    assert predict_sets(np.array([[0.1, 0.2, 0.05]]), 0.5, 1) == [{1}]
    assert predict_sets(np.array([[0.9, 0.8, 0.7]]), 0.5, 1, 2) == [{0, 1}]


def test_vectorised_decision_rule_equals_the_brute_force_search():
    from models.query.classifier import CAPS, THRESHOLDS, best_threshold

    rng = np.random.default_rng(0)
    for _ in range(3):
        probs = rng.random((80, 12)) ** 3
        gold = [sorted(set(rng.choice(12, size=int(rng.integers(1, 4))).tolist())) for _ in range(80)]
        for sel in ("micro_f1", "macro_f1", "mean"):
            v, (t, cap) = best_threshold(probs, gold, None, sel)

            def score(m):
                return 0.5 * (m["micro_f1"] + m["macro_f1"]) if sel == "mean" else m[sel]

            assert v == pytest.approx(score(f1_scores(predict_sets(probs, t, 1, cap), gold)))
            brute = max(score(f1_scores(predict_sets(probs, tt, 1, cc), gold)) for cc in CAPS for tt in THRESHOLDS)
            assert v == pytest.approx(brute)


@pytest.mark.parametrize("kind", ["tiny-bert", "minilm-ft"])
def test_transformer_encoders_train_predict_and_round_trip(kind):
    """The other shared encoders: a small BERT from a config (MiniLM's word pieces) and MiniLM with
    its top layer trained; both load offline from the wheel."""
    from models.query.encoder import restore_encoder

    torch.manual_seed(0)
    space = LabelSpace.build(LEAVES, "/")
    spec = EncoderSpec(kind=kind, hidden=32, layers=1, heads=2, finetune_layers=1)
    enc = build_encoder(spec, texts=[q for q, _ in TRAIN] + space.texts)
    clf = QueryClassifier(variant_config("smgcn", max_epochs=2, patience=5, batch_size=8), space, enc)
    data = QueryData([q for q, _ in TRAIN], [space.ids(ls) for _, ls in TRAIN])
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    clf.fit(data, data)
    clf.net.train()
    out = clf.net(clf.encoder.ids(data.queries[:4]))
    loss, _ = clf.net.loss(out, torch.ones(4, len(LEAVES)))
    loss.backward()
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()
                             if n in before)
    if kind == "minilm-ft":  # only the top layer trains
        assert all(".layer.5." in n for n in trainable)
    clf.net.eval()
    p = clf.predict_proba(["wool rugs", "never seen words"])
    assert p.shape == (2, len(LEAVES)) and np.all(np.isfinite(p))
    again = restore_encoder(enc.export())
    assert torch.allclose(again.encode(["wool rugs"]), enc.encode(["wool rugs"]), atol=1e-5)
