"""A prompt → target generator on the tiny GPT-2: training on (task, source, target, weight) rows,
sequence log-probabilities, DPO against a frozen reference, and beam decoding (free or through a
:class:`~models.rewrite.decode.TokenTrie`). MoBGM (bidwords) and GRAM (codes) are built on it.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch

from models.rewrite.decode import TokenTrie, beam_search
from models.rewrite.lm import FastLM, LMConfig, build_lm, dpo_loss, lm_loss, n_params, pack, seq_logprob, warmup_decay
from models.rewrite.tokenizer import WordPieceTokenizer

Row = tuple[str, str, str, float]  # (task token, source text, target text, weight)


class Generator:
    def __init__(self, tok: WordPieceTokenizer, cfg: LMConfig, seed: int = 0, model=None) -> None:
        self.tok = tok
        self.cfg = cfg
        self.model = model if model is not None else build_lm(cfg, tok.vocab_size, tok.pad_id, tok.eos_id, seed)
        self.model.eval()
        self._fast: FastLM | None = None
        self.steps = 0

    @property
    def n_params(self) -> int:
        return n_params(self.model)

    def fast(self) -> FastLM:
        if self._fast is None:
            self._fast = FastLM(self.model)
        return self._fast

    def copy(self) -> "Generator":
        g = Generator(self.tok, self.cfg, model=copy.deepcopy(self.model))
        g.steps = self.steps
        return g

    # ---- encoding
    def encode_rows(self, rows: Sequence[Row]):
        prompts = [self.tok.prompt(task, src, self.cfg.max_prompt) for task, src, _, _ in rows]
        targets = [self.tok.encode(tgt, self.cfg.max_target - 1) + [self.tok.eos_id] for _, _, tgt, _ in rows]
        return pack(prompts, targets, self.tok.pad_id)

    # ---- training
    def fit(self, rows: Sequence[Row], epochs: int, lr: float, batch: int = 64, seed: int = 0,
            weight_decay: float = 0.01) -> dict:
        """Target-only LM loss (prompt tokens masked: spec §4.4 'loss only on the part after <sep>')."""
        if not rows or epochs <= 0:
            return {"steps": 0, "rows": len(rows)}
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        n_steps = epochs * ((len(rows) + batch - 1) // batch)
        sched = warmup_decay(opt, lr, n_steps)
        self.model.train()
        losses = []
        for _ in range(epochs):
            order = rng.permutation(len(rows))
            for i in range(0, len(rows), batch):
                part = [rows[j] for j in order[i:i + batch]]
                b = self.encode_rows(part)
                w = torch.tensor([r[3] for r in part], dtype=torch.float32)
                loss = lm_loss(self.model, b, w)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                self.steps += 1
        self.model.eval()
        self._fast = None
        return {"steps": len(losses), "rows": len(rows), "loss_first": losses[0], "loss_last": float(np.mean(losses[-5:]))}

    @torch.no_grad()
    def logprob(self, rows: Sequence[Row], batch: int = 256) -> np.ndarray:
        was = self.model.training
        self.model.eval()
        out = [seq_logprob(self.model, self.encode_rows(rows[i:i + batch])) for i in range(0, len(rows), batch)]
        self.model.train(was)
        return torch.cat(out).numpy() if out else np.zeros(0)

    def dpo(self, pairs: Sequence[tuple[Row, Row]], reference: "Generator", epochs: int, lr: float,
            beta_w: float = 0.1, beta_l: float | None = None, sft_weight: float = 0.0, batch: int = 32,
            seed: int = 0, logprob_fn: Callable | None = None) -> dict:
        """DPO on (chosen, rejected) rows against the frozen ``reference``; an optional SFT term on
        the chosen rows guards against likelihood displacement (spec §4.3 step 4)."""
        if not pairs or epochs <= 0:
            return {"steps": 0, "pairs": len(pairs)}
        lp_fn = logprob_fn or (lambda model, rows: seq_logprob(model, self.encode_rows(rows)))
        with torch.no_grad():
            reference.model.eval()
            ref_w = torch.cat([lp_fn(reference.model, [p[0] for p in pairs[i:i + 256]]) for i in range(0, len(pairs), 256)])
            ref_l = torch.cat([lp_fn(reference.model, [p[1] for p in pairs[i:i + 256]]) for i in range(0, len(pairs), 256)])
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.model.train()
        losses, margins = [], []
        for _ in range(epochs):
            order = rng.permutation(len(pairs))
            for i in range(0, len(pairs), batch):
                idx = order[i:i + batch]
                part = [pairs[j] for j in idx]
                lw = lp_fn(self.model, [p[0] for p in part])
                ll = lp_fn(self.model, [p[1] for p in part])
                loss, z = dpo_loss(lw, ll, ref_w[idx], ref_l[idx], beta_w, beta_l)
                if sft_weight > 0:
                    loss = loss + sft_weight * lm_loss(self.model, self.encode_rows([p[0] for p in part]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                margins.append(float(z.mean()))
                self.steps += 1
        self.model.eval()
        self._fast = None
        return {"steps": len(losses), "pairs": len(pairs), "loss_first": losses[0], "loss_last": losses[-1],
                "margin_last": margins[-1]}

    def trie_logprob(self, model, rows: Sequence[Row], trie: TokenTrie) -> torch.Tensor:
        """[B] Σ log p of the targets under the distribution decoding through ``trie`` sees: at each
        step the softmax runs over the allowed tokens only (children, and <eos> where a live string
        ends). DPO in this space moves probability only among live strings."""
        b = self.encode_rows(rows)
        h = model.transformer(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[:, :-1]
        mask = b.target_mask[:, 1:] > 0
        tgt = b.input_ids[:, 1:][mask]
        logits = model.lm_head(h[mask])
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        k = 0
        eos = self.tok.eos_id
        for i in range(len(rows)):
            pos = mask[i].nonzero().flatten().tolist()
            ids = b.input_ids[i, 1:][pos].tolist()
            node = trie.root
            for j, t in enumerate(ids):
                if node is not None:
                    cand = list(node[0])
                    if node[1] is not None:
                        cand.append(eos)
                    if cand:
                        allowed[k + j, cand] = True
                    node = node[0].get(t) if t != eos else None
            k += len(ids)
        logits = logits.masked_fill(~allowed, float("-inf"))
        sel = logits.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        lp = torch.zeros(mask.shape, dtype=sel.dtype)
        lp[mask] = sel
        return lp.sum(-1)

    # ---- decoding
    def decode(self, task: str, source: str, *, beams: int = 8, trie: TokenTrie | None = None,
               should_stop: Callable[[], bool] | None = None) -> list[tuple[str, float]]:
        """``[(text, Σ log p)]`` best first: through ``trie`` (its stored strings), else free (decoded)."""
        prompt = self.tok.prompt(task, source, self.cfg.max_prompt)
        banned = [i for s, i in self.tok.special.items() if s != "<eos>"]
        found = beam_search(self.fast(), prompt, eos_id=self.tok.eos_id, beams=beams,
                            max_len=self.cfg.max_target - 1, trie=trie, banned=banned, should_stop=should_stop)
        out: list[tuple[str, float]] = []
        seen: set[str] = set()
        for ids, score in found:
            text = trie.find(ids) if trie is not None else self.tok.decode(ids)
            if text and text not in seen:
                seen.add(text)
                out.append((text, float(score)))
        return out

    def trie_of(self, strings: Sequence[str]) -> TokenTrie:
        t = TokenTrie()
        for s, ids in zip(strings, self.tok.encode_batch(list(strings), self.cfg.max_target - 1)):
            t.add(ids, s)
        return t

    # ---- state
    def state(self) -> dict:
        return {"lm": self.cfg.to_dict(), "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "steps": self.steps}

    @classmethod
    def from_state(cls, tok: WordPieceTokenizer, s: dict) -> "Generator":
        g = cls(tok, LMConfig(**s["lm"]))
        g.model.load_state_dict(s["weights"])
        g.model.eval()
        g.steps = int(s.get("steps", 0))
        return g
