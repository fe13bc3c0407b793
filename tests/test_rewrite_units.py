"""MoBGM / GRAM building blocks (issue 12), pure and fast: DPO identities, target-only loss,
the fast decoder, trie-constrained decoding over a random stream of inventory changes, GRAM's JS
score, stream statistics and the world's lexicon and judge."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from models.rewrite.decode import TokenTrie, beam_search
from models.rewrite.generator import Generator
from models.rewrite.lm import LN2, FastLM, LMConfig, dpo_loss, lm_loss, pack, seq_logprob
from models.rewrite.tokenizer import WordPieceTokenizer

WORDS = ["running shoes", "red running shoes", "trainers", "hiking boots", "sofas", "leather sofas", "couch",
         "tents", "camping tent", "backpacks", "buy tents", "tents sale", "cheap sofas", "blue backpacks"]
CFG = LMConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, dropout=0.0, max_prompt=12, max_target=10)


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer.train(WORDS * 3 + ["red trainers", "big couch", "acme tents"], 300)


@pytest.fixture
def gen(tok, one_torch_thread):
    return Generator(tok, CFG, seed=0)


def test_dpo_loss_is_ln2_when_policy_equals_reference(gen):
    ref = gen.copy()
    rows_w = [("<q2b>", "red trainers", "red running shoes", 1.0), ("<q2b>", "big couch", "sofas", 1.0)]
    rows_l = [("<q2b>", "red trainers", "tents", 1.0), ("<q2b>", "big couch", "backpacks", 1.0)]
    lw, ll = seq_logprob(gen.model, gen.encode_rows(rows_w)), seq_logprob(gen.model, gen.encode_rows(rows_l))
    rw, rl = seq_logprob(ref.model, gen.encode_rows(rows_w)), seq_logprob(ref.model, gen.encode_rows(rows_l))
    loss, z = dpo_loss(lw, ll, rw, rl, 0.1, 0.1)
    assert float(loss.detach()) == pytest.approx(LN2, abs=1e-6)
    assert torch.all(z == 0)
    # β_w = β_l is standard DPO; the gradient w.r.t. the chosen log-prob is -β/2 at z = 0
    lw_ = lw.detach().clone().requires_grad_(True)
    dpo_loss(lw_, ll.detach(), rw, rl, 0.3, 0.3)[0].backward()
    assert lw_.grad.tolist() == pytest.approx([-0.3 / 2 / 2] * 2, abs=1e-6)  # mean over 2 pairs


def test_dpo_margin_grows_after_one_step_on_a_pair(gen):
    ref = gen.copy()
    pair = (("<q2b>", "red trainers", "red running shoes", 1.0), ("<q2b>", "red trainers", "tents", 1.0))

    def margin() -> float:
        with torch.no_grad():
            lw = seq_logprob(gen.model, gen.encode_rows([pair[0]]))
            ll = seq_logprob(gen.model, gen.encode_rows([pair[1]]))
            rw = seq_logprob(ref.model, gen.encode_rows([pair[0]]))
            rl = seq_logprob(ref.model, gen.encode_rows([pair[1]]))
        return float(dpo_loss(lw, ll, rw, rl, 0.1)[1])

    before = margin()
    st = gen.dpo([pair], ref, epochs=1, lr=1e-2, beta_w=0.1, batch=1)
    assert st["steps"] == 1
    assert before == pytest.approx(0.0, abs=1e-6)
    assert margin() > before + 1e-4


def test_target_only_loss_equals_masked_labels(gen, tok):
    b = gen.encode_rows([("<q2b>", "red trainers", "red running shoes", 1.0)])
    labels = b.input_ids.clone()
    labels[b.target_mask == 0] = -100  # prompt and padding labels masked: the loss covers the target only
    ref = gen.model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
    assert float(lm_loss(gen.model, b).detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    # with the prompt's labels kept, the loss would differ: the prompt's own tokens are never predicted
    everything = gen.model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.input_ids).loss
    assert abs(float(lm_loss(gen.model, b)) - float(everything)) > 1e-4
    assert b.target_mask[0, : len(tok.prompt("<q2b>", "red trainers", 12))].sum() == 0


def test_fast_decoder_matches_the_module(gen):
    ids = torch.tensor([[2, 5, 9, 7, 11, 4]])
    fast = FastLM(gen.model)
    with torch.no_grad():
        ref = gen.model(input_ids=ids).logits
        full, cache = fast.forward(ids[:, :5], 0, None)
        step, _ = fast.forward(ids[:, 5:], 5, cache)
    assert torch.allclose(full, ref[:, :5], atol=1e-5)
    assert torch.allclose(step[:, 0], ref[:, 5], atol=1e-5)


def test_trie_add_remove_prunes():
    t = TokenTrie()
    assert t.add([1, 2, 3], "a") and t.add([1, 2], "b") and not t.add([1, 2], "b")
    assert len(t) == 2 and t.find([1, 2, 3]) == "a" and t.find([1]) is None
    assert t.remove([1, 2, 3]) and not t.remove([1, 2, 3])
    assert t.find([1, 2, 3]) is None and t.find([1, 2]) == "b"
    assert 3 not in t.node([1, 2])[0]  # the dead branch is pruned
    assert t.remove([1, 2]) and t.root[0] == {}


def test_constrained_decoding_emits_only_live_strings_on_a_random_inventory_stream(gen, tok):
    """100% of outputs are live after every change of a random add/remove stream; a removed string
    disappears at once, also when it was the model's favourite."""
    rng = random.Random(3)
    pool = WORDS + [f"{a} {b}" for a in ("acme", "red", "cheap") for b in ("tents", "sofas", "boots")]
    live: set[str] = set(rng.sample(pool, 6))
    trie = TokenTrie()
    for w in live:
        trie.add(tok.encode(w), w)
    queries = ["red trainers", "big couch", "acme tents", "runing shoes"]
    outputs = 0
    for step in range(60):
        w = rng.choice(pool)
        if w in live and len(live) > 1 and rng.random() < 0.5:
            live.discard(w)
            assert trie.remove(tok.encode(w))
        elif w not in live:
            live.add(w)
            trie.add(tok.encode(w), w)
        q = queries[step % len(queries)]
        raw = beam_search(gen.fast(), tok.prompt("<q2b>", q, 12), eos_id=tok.eos_id, beams=4, max_len=9, trie=trie)
        assert raw and all(trie.find(ids) in live for ids, _ in raw)  # the decoder itself: whole live strings
        got = gen.decode("<q2b>", q, beams=4, trie=trie)
        assert got, "constrained decoding must find a live string"
        assert {b for b, _ in got} <= live
        outputs += len(got)
        top = got[0][0]
        trie.remove(tok.encode(top))
        live.discard(top)
        after = gen.decode("<q2b>", q, beams=4, trie=trie)
        assert top not in {b for b, _ in after}
        assert {b for b, _ in after} <= live
        live.add(top)
        trie.add(tok.encode(top), top)
    assert outputs > 100


def test_free_decoding_may_leave_the_inventory(gen):
    out = gen.decode("<q2b>", "red trainers", beams=4)
    assert out and all(isinstance(s, float) and s <= 0 for _, s in out)


def test_beam_search_stops_when_asked(gen):
    from models.rewrite.decode import DecodeAborted

    with pytest.raises(DecodeAborted):
        beam_search(FastLM(gen.model), [2, 5, 7], eos_id=gen.tok.eos_id, beams=4, should_stop=lambda: True)


def test_js_term_and_relevance_score():
    from models.rewrite.gram import js_terms, relevance_score

    for p, q in [(0.3, 0.3), (0.5, 0.1), (1.0, 0.0), (0.0, 0.7), (0.2, 0.9)]:
        v = js_terms(p, q)
        assert 0.0 <= v <= LN2 + 1e-12
        assert v == pytest.approx(js_terms(q, p))
        assert (v == 0) == (p == q)
    assert js_terms(1.0, 0.0) == pytest.approx(LN2)
    same = relevance_score({"a": 0.7, "a|x": 0.3}, {"a": 0.7, "a|x": 0.3}, 2)
    near = relevance_score({"a": 0.7, "a|x": 0.3}, {"a": 0.5, "a|y": 0.5}, 2)
    far = relevance_score({"a": 0.7, "a|x": 0.3}, {"b": 1.0}, 2)
    assert same == 0.0 and same > near > far


def test_codebook_codes_and_granularity():
    from models.rewrite.gram import CodeBook

    items = {"a1": ("acme red running shoes mesh", "shoes/running-shoes"),
             "a2": ("zento black sofas modern", "home/sofas"), "a3": ("acme red sofas", "home/sofas"),
             "a4": ("zento red running shoes", "shoes/running-shoes")}
    book = CodeBook.build(items, min_attr_categories=2, max_attrs=2)
    assert book.categories == {"running shoes", "sofas"}
    assert {"acme", "zento", "red"} <= book.attrs and "mesh" not in book.attrs
    cat, attrs = book.ner("red acme running shoes size 9")
    assert cat == "running shoes" and attrs == ("acme", "red")
    codes = book.codes(cat, attrs)
    assert codes == ["running shoes", "running shoes|acme", "running shoes|red", "running shoes|acme|red"]
    assert all(c.count("|") <= 2 for c in codes)


def test_stream_stats_incremental_equals_batch_and_replays_are_idempotent():
    from models.rewrite.stats import StreamStats

    rng = np.random.default_rng(0)
    recs = [{"request_id": f"r{i}", "ad_id": f"a{i % 7}", "event_time": 1000.0 + 10 * i, "query": f"q{i % 5}",
             "bidword": f"b{i % 4}", "bid": float(rng.uniform(0.5, 2)), "clicked": int(rng.random() < 0.4)}
            for i in range(300)]
    one, many = StreamStats(600.0), StreamStats(600.0)
    one.update(recs)
    for i in range(0, 300, 37):
        many.update(recs[i:i + 37])
    again = many.update(recs[:100])
    assert again["duplicates"] == 100 and again["applied"] == 0
    a, b = one.bidword_revenue(), many.bidword_revenue()
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k]) for k in a)
    p1, p2 = sorted(one.sft_pairs(0.0)), sorted(many.sft_pairs(0.0))
    assert [x[:2] for x in p1] == [x[:2] for x in p2]
    assert [x[2] for x in p1] == pytest.approx([x[2] for x in p2])
    bad = many.update([{"event_time": "x", "query": "q", "bidword": "b"}, {"event_time": math.nan}])
    assert bad["skipped"] == 2


def test_lexicon_world_tail_queries_and_relations():
    from core.lexicon import LexiconConfig, RewriteJudge
    from core.world import World, WorldConfig
    from online.index import AdIndex, world_inventory

    w = World(WorldConfig(seed=5, lexicon=LexiconConfig(enabled=True)))
    tail = [q for q in w.queries if q.kind != "base"]
    assert len(tail) == w.config.n_top * w.config.n_leaf_per_top * w.config.lexicon.n_tail_per_leaf
    idx = AdIndex()
    idx.apply_many(world_inventory(w))
    for q in tail:  # a synonym query matches no bidword literally; every tail query has a gold concept
        if q.kind in ("synonym", "attr_synonym", "brand_synonym"):
            assert idx.match_bidwords(q.text) == [], q.text
    assert all(a.title for a in w.ads)
    j = RewriteJudge(w)
    q = next(t for t in w.lexicon.tail if t.kind == "attr_synonym")
    leaf = w.category_by_id[q.leaf].name
    attr = next(iter(q.attrs))
    assert j.relation(q.text, leaf) == "hypernym"
    assert j.relation(q.text, f"buy {leaf}") == "hypernym"
    assert j.relation(q.text, f"{attr} {leaf}") == "synonym"
    other = next(c.name for c in w.categories if c.id != q.leaf)
    assert j.relation(q.text, other) == "incorrect"
    base = next(x for x in w.queries if x.kind == "base" and x.text == w.category_by_id[x.category].name)
    assert j.relation(base.text, f"red {base.text}") == "hyponym"
    # the default world is untouched: no lexicon, no titles, the same queries
    d = World(WorldConfig(seed=5))
    assert d.lexicon is None and all(not a.title for a in d.ads)
    assert [x.text for x in d.queries] == [x.text for x in w.queries if x.kind == "base"]


def test_combined_score_gates_incorrect_and_weights_revenue_by_relevance():
    from models.rewrite.discriminator import RewardWeights, combined_score

    rel = np.array([[0.9, 0.05, 0.05, 0.0], [0.0, 0.0, 0.0, 1.0], [0.1, 0.6, 0.0, 0.3]])
    r = combined_score(rel, np.ones(3), np.array([1.0, 9.0, 5.0]), RewardWeights())
    assert r[1] == 0.0  # judged incorrect: gated to 0 whatever its revenue
    assert r[0] > 0 and r[2] > 0
    r2 = combined_score(rel, np.ones(3), np.array([1.0, 9.0, 5.0]), RewardWeights(incorrect_gate=2.0))
    assert r2[1] == pytest.approx(0.5)  # no gate: authenticity only (revenue needs relevance)
