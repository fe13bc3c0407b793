"""MoBGM (spec §4): a bidword generator aligned to relevance, authenticity and revenue.

Stages (each a method; the evaluation compares the generator after each):

1. :meth:`MoBGM.post_pretrain` — bidirectional query ↔ title reconstruction on click pairs
   (``<q2t> q <sep> t`` and ``<t2q> t <sep> q``, loss on the target side only: L_PPT);
2. :meth:`MoBGM.sft` — query → clicked ad's bidword (``<q2b> q <sep> b``: L_SFT), rows weighted by
   (decayed) clicks;
3. :meth:`MoBGM.fit_discriminator` — the three-head discriminator on relevance labels, live/not-live
   bidwords (hard negatives: the generator's own non-live outputs and word swaps of live bidwords)
   and stream revenue;
4. :meth:`MoBGM.align` — DPO against the frozen pre-alignment policy: per query, candidates from the
   policy (beam search through the live trie plus free beams), scored by the discriminator's combined
   R; pairs (chosen, rejected) with R_w − R_l > δ whose chosen is not judged incorrect; an SFT term on
   the chosen side.

Serving (:meth:`MoBGM.rewrite`): beam search through the live trie, then a final re-rank by R with
the revenue term from stream statistics (clicks × bid per bidword; the discriminator's revenue head
for bidwords the stream has not priced) and authenticity = 1 for a live bidword.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from models.rewrite.decode import TokenTrie
from models.rewrite.discriminator import RELATIONS, DiscConfig, Discriminator, RewardWeights, combined_score
from models.rewrite.generator import Generator, Row
from models.rewrite.lm import LMConfig
from models.rewrite.tokenizer import WordPieceTokenizer, normalize


@dataclass(frozen=True)
class MoBGMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    reward: RewardWeights = field(default_factory=RewardWeights)
    vocab_size: int = 1000
    lr: float = 3e-3
    batch: int = 64
    ppt_epochs: int = 4
    sft_epochs: int = 10
    dpo_epochs: int = 3
    dpo_lr: float = 1e-3
    beta: float = 0.3
    dpo_candidates: int = 8  # constrained beams per query (plus half as many free ones)
    dpo_delta: float = 0.1
    dpo_pairs_per_query: int = 6
    dpo_sft_weight: float = 0.2
    dpo_space: str = "trie"  # trie: candidates and log-probs in the live-trie space; free: unconstrained
    beams: int = 8
    top_k: int = 3
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MoBGMConfig":
        d = dict(d)
        return cls(lm=LMConfig(**d.pop("lm")), disc=DiscConfig(**d.pop("disc")),
                   reward=RewardWeights(**d.pop("reward")), **d)


def weak_relevance(pairs: Iterable[tuple[str, str]], inventory: Sequence[str], per_pair: int = 4,
                   seed: int = 0) -> list[tuple[str, str, int]]:
    """Relevance labels without a taxonomy, relative to a known correct target of the query:
    the target itself = synonym, an inventory string whose words are a proper subset of the
    target's = hypernym, a proper superset = hyponym, a random other = incorrect (a lexical
    stand-in for expert labels on real data; the synthetic world uses its judge instead)."""
    rng = np.random.default_rng(seed)
    inv = [normalize(b) for b in inventory]
    toks = [frozenset(b.split()) for b in inv]
    by_word: dict[str, list[int]] = {}
    for i, t in enumerate(toks):
        for w in t:
            by_word.setdefault(w, []).append(i)
    out = []
    for q, t in pairs:
        t = normalize(t)
        tt = frozenset(t.split())
        out.append((q, t, 0))
        near = {i for w in tt for i in by_word.get(w, ())}
        for i in near:
            if inv[i] == t:
                continue
            if toks[i] < tt:
                out.append((q, inv[i], 1))
            elif toks[i] > tt:
                out.append((q, inv[i], 2))
        for j in rng.choice(len(inv), size=min(per_pair, len(inv)), replace=False):
            if not (toks[j] & tt):
                out.append((q, inv[j], 3))
    return out


def word_swaps(live: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Plausible non-bidwords: a word of a live bidword replaced by a word of another one."""
    rng = np.random.default_rng(seed)
    live_set = set(live)
    words = sorted({w for b in live for w in b.split()})
    out: set[str] = set()
    for _ in range(n * 5):
        if len(out) >= n or not words:
            break
        b = live[int(rng.integers(len(live)))].split()
        b[int(rng.integers(len(b)))] = words[int(rng.integers(len(words)))]
        s = " ".join(b)
        if s not in live_set:
            out.add(s)
    return sorted(out)


class Rewrites(list):
    """``[(bidword, score)]`` best first; ``reranked`` says whether the final re-rank ran."""

    def __init__(self, items=(), reranked: bool = False) -> None:
        super().__init__(items)
        self.reranked = reranked


class MoBGM:
    def __init__(self, tok: WordPieceTokenizer, cfg: MoBGMConfig, gen: Generator | None = None,
                 disc: Discriminator | None = None) -> None:
        self.tok = tok
        self.cfg = cfg
        self.gen = gen or Generator(tok, cfg.lm, cfg.seed)
        self.disc = disc
        self.stages: list[str] = []
        self.history: list[dict] = []

    @classmethod
    def create(cls, corpus: Iterable[str], cfg: MoBGMConfig | None = None) -> "MoBGM":
        cfg = cfg or MoBGMConfig()
        return cls(WordPieceTokenizer.train(corpus, cfg.vocab_size), cfg)

    # ---- stages
    def post_pretrain(self, pairs: Sequence[tuple[str, str, float]], epochs: int | None = None) -> dict:
        rows: list[Row] = []
        for q, t, w in pairs:
            rows.append(("<q2t>", q, t, w))
            rows.append(("<t2q>", t, q, w))
        st = self.gen.fit(rows, self.cfg.ppt_epochs if epochs is None else epochs, self.cfg.lr, self.cfg.batch,
                          self.cfg.seed)
        self._log("ppt", st)
        return st

    def sft(self, pairs: Sequence[tuple[str, str, float]], epochs: int | None = None, lr: float | None = None) -> dict:
        rows: list[Row] = [("<q2b>", q, b, w) for q, b, w in pairs]
        st = self.gen.fit(rows, self.cfg.sft_epochs if epochs is None else epochs, lr or self.cfg.lr,
                          self.cfg.batch, self.cfg.seed + 1)
        self._log("sft", st)
        return st

    def fit_discriminator(self, rel: Sequence[tuple[str, str, int]], live: Sequence[str],
                          revenue: Mapping[str, float], queries: Sequence[str], seed: int = 0) -> dict:
        """``rel``: (query, bidword, class index in RELATIONS); ``live``: the live inventory;
        ``revenue``: bidword -> log(1 + Σ clicks × bid); ``queries``: prompts for hard negatives."""
        rng = np.random.default_rng(seed)
        live = sorted(set(live))
        live_set = set(live)
        qs = list(queries) or ["?"]
        auth: list[tuple[str, str, int]] = []
        for b in live:
            auth.append((qs[int(rng.integers(len(qs)))], b, 1))
        fakes: set[str] = set(word_swaps(live, len(live), seed))
        for q in qs[: min(len(qs), 200)]:
            for text, _ in self.gen.decode("<q2b>", q, beams=4):
                if text not in live_set:
                    fakes.add(text)
        for b in sorted(fakes):
            auth.append((qs[int(rng.integers(len(qs)))], b, 0))
        rev = []
        for b, v in revenue.items():
            if b in live_set:
                rev.append((qs[int(rng.integers(len(qs)))], b, float(v)))
        if self.disc is None:
            self.disc = Discriminator(self.cfg.disc, self.tok.vocab_size, self.tok.pad_id, self.cfg.seed)
        st = self.disc.fit(self.tok, {"rel": list(rel), "auth": auth, "rev": rev}, seed)
        st["fakes"] = len(fakes)
        self._log("disc", st)
        return st

    def score(self, query: str, bidwords: Sequence[str], revenue: Mapping[str, float],
              live: Callable[[str], bool] | None = None) -> np.ndarray:
        """The combined R of ``bidwords`` for one query (needs the discriminator)."""
        if not bidwords:
            return np.zeros(0)
        h = self.disc.heads(self.tok, [query] * len(bidwords), list(bidwords))
        auth = h["auth"].copy()
        if live is not None:
            auth = np.array([1.0 if live(b) else a for b, a in zip(bidwords, auth)])
        rev = np.array([revenue.get(b, h["rev"][i]) for i, b in enumerate(bidwords)], dtype=float)
        return combined_score(h["rel"], auth, rev, self.cfg.reward)

    def preference_pairs(self, queries: Sequence[str], trie: TokenTrie, revenue: Mapping[str, float]
                         ) -> list[tuple[Row, Row, float, float]]:
        """(chosen, rejected, R_w, R_l) per query (spec §4.3 steps 1–3): candidates from the policy
        (beams through the live trie; with ``dpo_space="free"`` also free beams), scored by R; every
        pair with R_w − R_l > δ whose chosen is not judged incorrect, the largest gaps first, at most
        ``dpo_pairs_per_query`` per query and each candidate chosen or rejected at most twice."""
        c = self.cfg
        out = []
        for q in queries:
            cands = [t for t, _ in self.gen.decode("<q2b>", q, beams=c.dpo_candidates, trie=trie)]
            if c.dpo_space == "free":
                cands += [t for t, _ in self.gen.decode("<q2b>", q, beams=max(1, c.dpo_candidates // 2))
                          if t not in cands]
            if len(cands) < 2:
                continue
            h = self.disc.heads(self.tok, [q] * len(cands), cands)
            auth = h["auth"] if c.dpo_space == "free" else np.ones(len(cands))
            rev = np.array([revenue.get(b, h["rev"][i]) for i, b in enumerate(cands)], dtype=float)
            r = combined_score(h["rel"], auth, rev, c.reward)
            incorrect = h["rel"].argmax(-1) == RELATIONS.index("incorrect")
            gaps = sorted(((r[i] - r[j], i, j) for i in range(len(cands)) for j in range(len(cands))
                           if not incorrect[i] and r[i] - r[j] > c.dpo_delta), reverse=True)
            used: dict[int, int] = {}
            made = 0
            for _gap, i, j in gaps:
                if made >= c.dpo_pairs_per_query:
                    break
                if used.get(i, 0) >= 2 or used.get(j, 0) >= 2:
                    continue
                used[i] = used.get(i, 0) + 1
                used[j] = used.get(j, 0) + 1
                out.append((("<q2b>", q, cands[i], 1.0), ("<q2b>", q, cands[j], 1.0), float(r[i]), float(r[j])))
                made += 1
        return out

    def align(self, queries: Sequence[str], trie: TokenTrie, revenue: Mapping[str, float],
              epochs: int | None = None) -> dict:
        if self.disc is None:
            raise RuntimeError("align() needs a discriminator: call fit_discriminator() first")
        pairs = self.preference_pairs(queries, trie, revenue)
        reference = self.gen.copy()
        lp_fn = (lambda model, rows: self.gen.trie_logprob(model, rows, trie)) if self.cfg.dpo_space == "trie" else None
        st = self.gen.dpo([(w, lo) for w, lo, _, _ in pairs], reference, self.cfg.dpo_epochs if epochs is None else epochs,
                          self.cfg.dpo_lr, self.cfg.beta, self.cfg.beta, self.cfg.dpo_sft_weight,
                          seed=self.cfg.seed + 2, logprob_fn=lp_fn)
        st["queries"] = len(queries)
        if pairs:
            st["reward_gap"] = float(np.mean([a - b for _, _, a, b in pairs]))
        self._log("dpo", st)
        return st

    # ---- serving
    def rewrite(self, query: str, trie: TokenTrie | None, revenue: Mapping[str, float], *,
                k: int | None = None, rerank: bool = True, live: Callable[[str], bool] | None = None,
                should_stop: Callable[[], bool] | None = None) -> list[tuple[str, float]]:
        """Top-``k`` bidwords for one query: beams (through ``trie`` when given) re-ranked by R."""
        k = k or self.cfg.top_k
        cands = self.gen.decode("<q2b>", query, beams=self.cfg.beams, trie=trie, should_stop=should_stop)
        if not cands:
            return []
        if not rerank or self.disc is None:
            return cands[:k]
        if should_stop is not None and should_stop():
            return Rewrites(cands[:k], reranked=False)  # no time left for the re-rank: the beam's order
        words = [b for b, _ in cands]
        r = self.score(query, words, revenue, live)
        lp = np.array([s for _, s in cands])
        # a bidword the discriminator gates out (P(incorrect) above the gate: R = 0) is not served
        order = sorted((i for i in range(len(words)) if r[i] > 0 or self.cfg.reward.incorrect_gate > 1.0),
                       key=lambda i: (-r[i], -lp[i]))
        return Rewrites([(words[i], float(r[i])) for i in order[:k]], reranked=True)

    def _log(self, stage: str, st: dict) -> None:
        self.stages.append(stage)
        self.history.append({"stage": stage, **{k: v for k, v in st.items() if isinstance(v, (int, float, str))}})

    # ---- state
    def state(self) -> dict:
        s = {"config": self.cfg.to_dict(), "tokenizer": self.tok.to_json(), "generator": self.gen.state(),
             "stages": list(self.stages), "history": list(self.history)}
        if self.disc is not None:
            s["discriminator"] = {k: v.detach().clone() for k, v in self.disc.state_dict().items()}
        return s

    @classmethod
    def from_state(cls, s: dict) -> "MoBGM":
        cfg = MoBGMConfig.from_dict(s["config"])
        tok = WordPieceTokenizer.from_json(s["tokenizer"])
        m = cls(tok, cfg, Generator.from_state(tok, s["generator"]))
        if s.get("discriminator") is not None:
            m.disc = Discriminator(cfg.disc, tok.vocab_size, tok.pad_id)
            m.disc.load_state_dict(s["discriminator"])
            m.disc.eval()
        m.stages = list(s.get("stages", []))
        m.history = list(s.get("history", []))
        return m


def relation_index(name: str) -> int:
    return RELATIONS.index(name)


__all__ = ["MoBGM", "MoBGMConfig", "relation_index", "weak_relevance", "word_swaps"]
