"""The tiny causal LM of the generators (MoBGM's bidword writer, GRAM's code writer): a
``transformers`` GPT-2 built from a config (no weights downloaded), the batch packing of
``prompt <sep> target <eos>`` sequences, the losses (target-only LM loss, sequence log-probability,
DPO) and a fast inference path with a KV cache for beam search on a CPU.

:class:`FastLM` reads the GPT-2 module's weights and runs the same arithmetic without the
``transformers`` call overhead (one decoding step of 8 beams: ~0.6 ms instead of ~2–6 ms here);
``tests/test_rewrite_lm.py`` checks it against the module's logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@dataclass(frozen=True)
class LMConfig:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 96
    n_positions: int = 48
    dropout: float = 0.05  # GRAM's value (spec §5.3)
    max_prompt: int = 24  # tokens of <task> text <sep>
    max_target: int = 20  # tokens of target <eos>

    def to_dict(self) -> dict:
        return asdict(self)


def build_lm(cfg: LMConfig, vocab_size: int, pad_id: int, eos_id: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    conf = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                      embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eos_id,
                      eos_token_id=eos_id, pad_token_id=pad_id)
    return GPT2LMHeadModel(conf)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Packed:
    input_ids: torch.Tensor  # [B, T] prompt ++ target, right-padded
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] 1 on target tokens (incl. <eos>)


def pack(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int) -> Packed:
    """Right-padded ``prompt ++ target`` rows; ``target_mask`` marks the target tokens."""
    rows = [list(p) + list(t) for p, t in zip(prompts, targets)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    tm = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        att[i, :n] = 1
        tm[i, len(p):n] = 1.0
    return Packed(ids, att, tm)


def token_logprobs(model, b: Packed) -> torch.Tensor:
    """[B, T-1] log p(token t+1 | ≤ t) masked to target tokens."""
    h = model.transformer(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[:, :-1]
    mask = b.target_mask[:, 1:] > 0
    tgt = b.input_ids[:, 1:][mask]
    logits = model.lm_head(h[mask])  # the vocabulary projection only where a target token is predicted
    sel = logits.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    lp = torch.zeros(mask.shape, dtype=sel.dtype)
    lp[mask] = sel
    return lp


def seq_logprob(model, b: Packed) -> torch.Tensor:
    """[B] Σ log p over the target tokens (prompt and padding masked out) — spec §1.4."""
    return token_logprobs(model, b).sum(-1)


def lm_loss(model, b: Packed, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per target token (optionally weighted per row)."""
    lp = token_logprobs(model, b)
    n = b.target_mask[:, 1:].sum(-1).clamp_min(1.0)
    per_row = -lp.sum(-1) / n
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-9)


def dpo_loss(lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta_w: float = 0.1, beta_l: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised DPO (GRAM Eq. 6: separate β for the chosen and the rejected side; standard DPO
    when equal). Returns (loss, implicit reward margin z per pair). ln 2 when policy = reference."""
    beta_l = beta_w if beta_l is None else beta_l
    z = beta_w * (lp_w - ref_w) - beta_l * (lp_l - ref_l)
    return -F.logsigmoid(z).mean(), z.detach()


def warmup_decay(opt, lr: float, n_steps: int):
    """One-cycle schedule (warm-up then cosine decay) for runs of 20+ steps, a constant rate below."""
    if n_steps < 20:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps, pct_start=0.1)


class FastLM:
    """Inference-only GPT-2 forward with a KV cache (same arithmetic as the module, eval mode)."""

    def __init__(self, model) -> None:
        tr = model.transformer
        self.cfg = model.config
        self.D = self.cfg.n_embd
        self.H = self.cfg.n_head
        self.hd = self.D // self.H
        self.max_pos = self.cfg.n_positions
        self.wte = tr.wte.weight.detach()
        self.wpe = tr.wpe.weight.detach()
        self.lnf = (tr.ln_f.weight.detach(), tr.ln_f.bias.detach(), tr.ln_f.eps)
        self.blocks = []
        for blk in tr.h:
            self.blocks.append({
                "ln1": (blk.ln_1.weight.detach(), blk.ln_1.bias.detach(), blk.ln_1.eps),
                "ln2": (blk.ln_2.weight.detach(), blk.ln_2.bias.detach(), blk.ln_2.eps),
                "attn_w": blk.attn.c_attn.weight.detach(), "attn_b": blk.attn.c_attn.bias.detach(),
                "proj_w": blk.attn.c_proj.weight.detach(), "proj_b": blk.attn.c_proj.bias.detach(),
                "fc_w": blk.mlp.c_fc.weight.detach(), "fc_b": blk.mlp.c_fc.bias.detach(),
                "fc2_w": blk.mlp.c_proj.weight.detach(), "fc2_b": blk.mlp.c_proj.bias.detach(),
            })

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, cache: list | None) -> tuple[torch.Tensor, list]:
        """Logits [B, T, V] of ``ids`` [B, T] placed at positions pos0.. after ``cache``."""
        B, T = ids.shape
        D, H, hd = self.D, self.H, self.hd
        x = self.wte[ids] + self.wpe[pos0:pos0 + T]
        new = []
        for li, b in enumerate(self.blocks):
            h = F.layer_norm(x, (D,), *b["ln1"][:2], b["ln1"][2])
            qkv = torch.addmm(b["attn_b"], h.reshape(-1, D), b["attn_w"]).view(B, T, 3, H, hd)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            if cache is not None:
                pk, pv = cache[li]
                k = torch.cat([pk, k], 2)
                v = torch.cat([pv, v], 2)
            new.append((k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and T > 1)
            x = x + torch.addmm(b["proj_b"], a.transpose(1, 2).reshape(B * T, D), b["proj_w"]).view(B, T, D)
            h = F.layer_norm(x, (D,), *b["ln2"][:2], b["ln2"][2])
            h = F.gelu(torch.addmm(b["fc_b"], h.reshape(-1, D), b["fc_w"]), approximate="tanh")
            x = x + torch.addmm(b["fc2_b"], h, b["fc2_w"]).view(B, T, D)
        x = F.layer_norm(x, (D,), *self.lnf[:2], self.lnf[2])
        return x @ self.wte.T, new

    @staticmethod
    def select(cache: list, idx: torch.Tensor) -> list:
        return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
