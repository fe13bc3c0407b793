"""MoBGM's discriminator (spec §4.2): a tiny BERT cross-encoder ``<cls> query <sep> bidword <sep>``
with three heads on the ``<cls>`` vector:

* relevance: 4 classes (synonym, hypernym, hyponym, incorrect), cross-entropy;
* authenticity: P(the bidword is a real, live bidword), binary cross-entropy;
* revenue: standardised log(1 + revenue) of the bidword, mean squared error.

The multi-task loss is their sum (weights are switches). :meth:`Discriminator.combined` turns the
heads into the alignment reward of spec §4.3::

    R(q, b) = w_rel · Σ_c P(c) · reward(c) + w_auth · P_auth + w_rev · norm(revenue)

with reward = synonym 1.0, hyponym 0.8, hypernym 0.6, incorrect 0 and ``norm`` a per-query min–max
over the candidates being compared. The revenue may be passed in (stream statistics at serving);
the head's prediction stands in for bidwords the stream has not priced yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.rewrite.lm import warmup_decay
from models.rewrite.tokenizer import normalize

RELATIONS = ("synonym", "hypernym", "hyponym", "incorrect")
N_LEX = 5


def lexical_features(query: str, bidword: str) -> list[float]:
    """Word-overlap features beside the <cls> vector: equal, share of the bidword's words in the
    query, share of the query's words in the bidword, proper subset, proper superset."""
    q, b = set(query.lower().split()), set(bidword.lower().split())
    if not q or not b:
        return [0.0] * N_LEX
    inter = len(q & b)
    return [float(q == b), inter / len(b), inter / len(q), float(b < q), float(b > q)]
REWARD = torch.tensor([1.0, 0.6, 0.8, 0.0])  # in RELATIONS order


@dataclass(frozen=True)
class DiscConfig:
    encoder: str = "minilm"  # minilm: frozen all-MiniLM-L6-v2 embeddings; tiny-bert: a cross-encoder from scratch
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    max_len: int = 40
    epochs: int = 20
    batch: int = 64
    lr: float = 2e-3
    w_rel_loss: float = 1.0
    w_auth_loss: float = 1.0
    w_rev_loss: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


class Discriminator(torch.nn.Module):
    def __init__(self, cfg: DiscConfig, vocab_size: int, pad_id: int, seed: int = 0) -> None:
        super().__init__()
        if cfg.encoder not in ("minilm", "tiny-bert"):
            raise ValueError(f"unknown discriminator encoder {cfg.encoder!r} (minilm or tiny-bert)")
        torch.manual_seed(seed)
        self.cfg = cfg
        self.pad_id = pad_id
        self.bert = None
        if cfg.encoder == "tiny-bert":
            from transformers import BertConfig, BertModel
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            self.bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden,
                                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                             intermediate_size=cfg.intermediate,
                                             max_position_embeddings=cfg.max_len + 2, pad_token_id=pad_id,
                                             hidden_dropout_prob=0.05, attention_probs_dropout_prob=0.05),
                                  add_pooling_layer=False)
            d = cfg.hidden + N_LEX
        else:
            from models.rewrite.textenc import DIM

            d = 4 * DIM + N_LEX
        self.trunk = torch.nn.Sequential(torch.nn.Linear(d, 2 * cfg.hidden), torch.nn.GELU(), torch.nn.Dropout(0.1))
        self.rel = torch.nn.Linear(2 * cfg.hidden, len(RELATIONS))
        self.auth = torch.nn.Linear(2 * cfg.hidden, 1)
        self.rev = torch.nn.Linear(2 * cfg.hidden, 1)
        # the revenue head predicts a standardised value; these bring it back to log(1 + revenue)
        self.register_buffer("rev_mean", torch.zeros(()))
        self.register_buffer("rev_std", torch.ones(()))

    def encode(self, tok, queries: Sequence[str], bidwords: Sequence[str]):
        lex = torch.tensor([lexical_features(q, b) for q, b in zip(queries, bidwords)], dtype=torch.float32)
        if self.bert is None:
            from models.rewrite.textenc import MiniLM

            enc = MiniLM.shared()
            u = torch.from_numpy(enc.embed([normalize(q) for q in queries]))
            v = torch.from_numpy(enc.embed([normalize(b) for b in bidwords]))
            return (torch.cat([u, v, u * v, (u - v).abs(), lex], -1),)
        half = self.cfg.max_len // 2 - 1
        qs = tok.encode_batch(list(queries), half)
        bs = tok.encode_batch(list(bidwords), half)
        rows, types = [], []
        for q, b in zip(qs, bs):
            rows.append([tok.cls_id, *q, tok.sep_id, *b, tok.sep_id])
            types.append([0] * (len(q) + 2) + [1] * (len(b) + 1))
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        tt = torch.zeros((len(rows), T), dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, types)):
            ids[i, :len(r)] = torch.tensor(r)
            tt[i, :len(t)] = torch.tensor(t)
            att[i, :len(r)] = 1
        return ids, tt, att, lex

    def forward(self, *inputs):
        if self.bert is None:
            x = inputs[0]
        else:
            ids, tt, att, lex = inputs
            h = self.bert(input_ids=ids, token_type_ids=tt, attention_mask=att).last_hidden_state[:, 0]
            x = torch.cat([h, lex], -1)
        h = self.trunk(x)
        return self.rel(h), self.auth(h).squeeze(-1), self.rev(h).squeeze(-1)

    @torch.no_grad()
    def heads(self, tok, queries: Sequence[str], bidwords: Sequence[str], batch: int = 256) -> dict[str, np.ndarray]:
        """P(relation) [N, 4], P(authentic) [N], predicted log(1 + revenue) [N]."""
        was = self.training
        self.eval()
        rel, auth, rev = [], [], []
        for i in range(0, len(queries), batch):
            r, a, v = self(*self.encode(tok, queries[i:i + batch], bidwords[i:i + batch]))
            rel.append(r.softmax(-1))
            auth.append(torch.sigmoid(a))
            rev.append(v * self.rev_std + self.rev_mean)
        self.train(was)
        if not rel:
            return {"rel": np.zeros((0, 4)), "auth": np.zeros(0), "rev": np.zeros(0)}
        return {"rel": torch.cat(rel).numpy(), "auth": torch.cat(auth).numpy(), "rev": torch.cat(rev).numpy()}

    def fit(self, tok, data: dict, seed: int = 0, log=None) -> dict:
        """``data``: rel (list of (q, b, class index)), auth (list of (q, b, 0/1)), rev (list of
        (q, b, log1p revenue)). Each head learns from its own list; batches mix the three."""
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        revs = np.array([x[2] for x in data.get("rev", [])], dtype=float)
        if len(revs):
            self.rev_mean.fill_(float(revs.mean()))
            self.rev_std.fill_(float(max(revs.std(), 1e-3)))
        rows = ([("rel", *x) for x in data.get("rel", [])] + [("auth", *x) for x in data.get("auth", [])]
                + [("rev", *x) for x in data.get("rev", [])])
        if not rows:
            return {"steps": 0}
        counts = np.bincount([x[2] for x in data.get("rel", [])], minlength=len(RELATIONS)).astype(float)
        # class-balanced relevance loss (labels are mostly "incorrect"): weight ∝ 1/sqrt(frequency)
        cw = torch.tensor(np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1.0)), 0.0), dtype=torch.float32)
        cw = cw / (cw[counts > 0].mean() if (counts > 0).any() else 1.0)
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=0.01)
        n_steps = self.cfg.epochs * ((len(rows) + self.cfg.batch - 1) // self.cfg.batch)
        sched = warmup_decay(opt, self.cfg.lr, n_steps)
        self.train()
        steps, last = 0, float("nan")
        for _ep in range(self.cfg.epochs):
            order = rng.permutation(len(rows))
            for i in range(0, len(rows), self.cfg.batch):
                part = [rows[j] for j in order[i:i + self.cfg.batch]]
                r, a, v = self(*self.encode(tok, [p[1] for p in part], [p[2] for p in part]))
                loss = torch.zeros(())
                for kind, w in (("rel", self.cfg.w_rel_loss), ("auth", self.cfg.w_auth_loss),
                                ("rev", self.cfg.w_rev_loss)):
                    m = [k for k, p in enumerate(part) if p[0] == kind]
                    if not m or w == 0:
                        continue
                    idx = torch.tensor(m)
                    y = torch.tensor([part[k][3] for k in m])
                    if kind == "rel":
                        loss = loss + w * F.cross_entropy(r[idx], y.long(), weight=cw)
                    elif kind == "auth":
                        loss = loss + w * F.binary_cross_entropy_with_logits(a[idx], y.float())
                    else:
                        loss = loss + w * F.mse_loss(v[idx], (y.float() - self.rev_mean) / self.rev_std)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                steps += 1
                last = float(loss.detach())
        self.eval()
        return {"steps": steps, "loss": last, "n_rel": len(data.get("rel", [])),
                "n_auth": len(data.get("auth", [])), "n_rev": len(data.get("rev", []))}


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the combined objective R (spec §4.3); switches, defaults equal-ish."""

    rel: float = 1.0
    auth: float = 0.5
    rev: float = 0.5
    incorrect_gate: float = 0.5  # P(incorrect) above this: R = 0 (spec §4.3 alternative); > 1 turns it off


def minmax(x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return x
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def combined_score(rel_probs: np.ndarray, auth: np.ndarray, rev_log: np.ndarray, w: RewardWeights) -> np.ndarray:
    """R for the candidates of ONE query (the revenue term is min–max normalised among them)."""
    r_rel = rel_probs @ REWARD.numpy()
    p_ok = 1.0 - rel_probs[:, RELATIONS.index("incorrect")]
    # the revenue a bidword brings materialises only when its ads are relevant: weighted by P(not incorrect)
    r = w.rel * r_rel + w.auth * auth + w.rev * p_ok * minmax(np.asarray(rev_log, dtype=float))
    if w.incorrect_gate <= 1.0:
        r = np.where(rel_probs[:, RELATIONS.index("incorrect")] > w.incorrect_gate, 0.0, r)
    return r
