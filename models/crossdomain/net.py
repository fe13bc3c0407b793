"""DACDR's network: two-step domain-aware cross-attention over a user's behaviour in every domain.

Shapes: ``B`` examples, ``G = domains × behaviours`` behaviour groups of ``L`` items each, ``d``
embedding size. The paper's method section was not available (``docs/crossdomain.md``); the
reconstruction follows the spec (``recsys-ddp-dacdr-pericr.md`` §2.3) with its open choices as
switches:

* item embedding ``e(v) = Σ_f E_f(v_f)`` over the item fields (shared by every domain: what makes
  behaviour transferable);
* domain encoder: ``ẽ_v = MLP([e(v); D(t)])``, the candidate as seen by target domain ``t``;
* history keys: ``k = e(item) + D(source domain) + B(behaviour)``;
* step 1, domain level (``domain_level``): ``types`` (reading 1a) pools each group by a masked
  mean and attends over the ``G`` group vectors with the query ``D(t)``; ``items`` (reading 1b)
  attends over every history item with ``D(t)``. Output ``z_dom`` and group weights ``α``;
* step 2, item level: the query ``ẽ_v`` (``item_query="candidate"``) or ``W[ẽ_v; z_dom]``
  (``"candidate+domain"``) attends over every history item; with ``alpha_reweight`` (reading 1a)
  an item's logit gets ``log α`` of its group (weights ∝ α_g · exp(q·k)). Output ``z_item``;
* head: ``MLP([ẽ_v; z_dom; z_item; context embeddings]) + b(t)``.

Attention never yields NaN: padded keys get exactly zero weight, and a row with no key at all
gets all-zero weights and a zero output (a user with no history).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class MaskedCrossAttention(nn.Module):
    """Multi-head scaled dot-product cross-attention of one query per row over masked keys.

    ``forward(q [B, d], kv [B, N, d], pad [B, N] (True = padding), bias [B, N] | None)`` returns
    ``(out [B, d], weights [B, heads, N])``: weights over the non-padded keys sum to 1 per head;
    padded keys get 0; a row with every key padded gets all-zero weights and ``out = 0``."""

    def __init__(self, dim: int, heads: int = 1, qdim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dh = dim // heads
        self.wq = nn.Linear(qdim or dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = kv.shape
        h, dh = self.heads, self.dh
        qh = self.wq(q).view(b, h, dh)
        kh = self.wk(kv).view(b, n, h, dh)
        vh = self.wv(kv).view(b, n, h, dh)
        logits = torch.einsum("bhd,bnhd->bhn", qh, kh) / math.sqrt(dh)
        if bias is not None:
            logits = logits + bias[:, None, :]
        empty = pad.all(dim=1)  # [B]
        logits = logits.masked_fill(pad[:, None, :], float("-inf"))
        logits = logits.masked_fill(empty[:, None, None], 0.0)
        w = torch.softmax(logits, dim=-1) * (~pad)[:, None, :].to(logits.dtype)
        out = torch.einsum("bhn,bnhd->bhd", w, vh).reshape(b, h * dh)
        return out, w


def masked_mean(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [..., L, d]`` over the non-padded ``L`` positions (``pad [..., L]``); 0 when none."""
    keep = (~pad).to(x.dtype).unsqueeze(-1)
    return (x * keep).sum(-2) / keep.sum(-2).clamp(min=1.0)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class DACDRNet(nn.Module):
    """See the module docstring. Row 0 of every table is the cold/unknown row."""

    def __init__(self, item_caps: Sequence[int], ctx_caps: Sequence[int], n_domains: int, n_behaviours: int,
                 dim: int = 16, heads: int = 2, hidden: Sequence[int] = (64, 32), domain_level: str = "types",
                 item_query: str = "candidate", alpha_reweight: bool = True, cross: bool = True) -> None:
        super().__init__()
        if domain_level not in ("types", "items"):
            raise ValueError(f"domain_level must be 'types' or 'items', not {domain_level!r}")
        if item_query not in ("candidate", "candidate+domain"):
            raise ValueError(f"item_query must be 'candidate' or 'candidate+domain', not {item_query!r}")
        self.dim = dim
        self.domain_level = domain_level
        self.item_query = item_query
        self.alpha_reweight = alpha_reweight and domain_level == "types"
        self.cross = cross
        self.item_tables = nn.ModuleList(nn.Embedding(c, dim) for c in item_caps)
        self.ctx_tables = nn.ModuleList(nn.Embedding(c, dim) for c in ctx_caps)
        self.domain = nn.Embedding(n_domains + 1, dim)  # row 0: unknown domain
        self.domain_bias = nn.Embedding(n_domains + 1, 1)
        self.behaviour = nn.Embedding(n_behaviours, dim)
        for t in [*self.item_tables, *self.ctx_tables, self.domain, self.behaviour]:
            nn.init.normal_(t.weight, 0.0, 0.05)
        nn.init.zeros_(self.domain_bias.weight)
        self.domain_encoder = mlp([2 * dim, dim, dim])
        self.ca_domain = MaskedCrossAttention(dim, heads)
        self.ca_item = MaskedCrossAttention(dim, heads, qdim=2 * dim if item_query == "candidate+domain" else dim)
        self.head = mlp([dim * (3 + len(ctx_caps)), *hidden, 1])

    # ---- pieces ------------------------------------------------------------------------------
    def item_embedding(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [..., F_item]`` -> ``[..., d]``: the sum of the item fields' embeddings."""
        out = self.item_tables[0](rows[..., 0])
        for f in range(1, len(self.item_tables)):
            out = out + self.item_tables[f](rows[..., f])
        return out

    def attend(self, q_dom: torch.Tensor, q_item: torch.Tensor, hist: torch.Tensor, hist_pad: torch.Tensor,
               group_domain: torch.Tensor, group_behaviour: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two steps. ``hist [B, G, L, F_item]`` rows, ``hist_pad [B, G, L]``, the group's source
        domain row and behaviour index ``[G]``. Returns z_dom, z_item, alpha [B, G], item weights."""
        b, g, l_, _ = hist.shape
        kv = self.item_embedding(hist) + (self.domain(group_domain) + self.behaviour(group_behaviour))[None, :, None, :]
        flat_kv = kv.reshape(b, g * l_, self.dim)
        flat_pad = hist_pad.reshape(b, g * l_)
        if self.domain_level == "types":
            pooled = masked_mean(kv, hist_pad)  # [B, G, d]
            gpad = hist_pad.all(dim=-1)  # [B, G]
            z_dom, w_dom = self.ca_domain(q_dom, pooled, gpad)
            alpha = w_dom.mean(dim=1)  # [B, G]
        else:
            z_dom, w_dom = self.ca_domain(q_dom, flat_kv, flat_pad)
            alpha = w_dom.mean(dim=1).reshape(b, g, l_).sum(-1)
        bias = None
        if self.alpha_reweight:
            bias = torch.log(alpha.clamp(min=1e-9))[:, :, None].expand(b, g, l_).reshape(b, g * l_)
        q = q_item if self.item_query == "candidate" else torch.cat([q_item, z_dom], -1)
        z_item, w_item = self.ca_item(q, flat_kv, flat_pad, bias)
        return {"z_dom": z_dom, "z_item": z_item, "alpha": alpha, "w_domain": w_dom, "w_item": w_item}

    def forward(self, item: torch.Tensor, ctx: torch.Tensor, dom: torch.Tensor, hist: torch.Tensor,
                hist_pad: torch.Tensor, group_domain: torch.Tensor, group_behaviour: torch.Tensor,
                return_parts: bool = False):
        """``item [B, F_item]``, ``ctx [B, F_ctx]`` rows; ``dom [B]`` target-domain rows; history as in
        :meth:`attend`. Returns logits ``[B]`` (and the attention parts when asked)."""
        e_v = self.item_embedding(item)
        q_d = self.domain(dom)
        e_t = self.domain_encoder(torch.cat([e_v, q_d], -1))
        if self.cross:
            parts = self.attend(q_d, e_t, hist, hist_pad, group_domain, group_behaviour)
        else:
            z = e_t.new_zeros(e_t.shape)
            parts = {"z_dom": z, "z_item": z}
        feats = [e_t, parts["z_dom"], parts["z_item"]]
        feats += [t(ctx[:, f]) for f, t in enumerate(self.ctx_tables)]
        logit = self.head(torch.cat(feats, -1)).squeeze(-1) + self.domain_bias(dom).squeeze(-1)
        return (logit, parts) if return_parts else logit

    # ---- new domains -------------------------------------------------------------------------
    def add_domain_row(self) -> None:
        """One more domain row (domain embedding and bias); the old rows keep their values. The new
        row starts at the mean of the known domains' rows."""
        for name in ("domain", "domain_bias"):
            old: nn.Embedding = getattr(self, name)
            new = nn.Embedding(old.num_embeddings + 1, old.embedding_dim)
            with torch.no_grad():
                new.weight[:-1] = old.weight
                known = old.weight[1:] if old.num_embeddings > 1 else old.weight
                new.weight[-1] = known.mean(0)
            new.weight.requires_grad_(old.weight.requires_grad)
            setattr(self, name, new)

    def shared_parameters(self, scope: str = "tables") -> list[nn.Parameter]:
        """What ``freeze_shared`` freezes: ``tables`` = the item, context and behaviour embedding
        tables; ``all`` = every parameter except the domain rows (embedding, bias) and the domain
        encoder."""
        tables = [*self.item_tables.parameters(), *self.ctx_tables.parameters(), *self.behaviour.parameters()]
        if scope == "tables":
            return tables
        if scope == "all":
            keep = {id(p) for m in (self.domain, self.domain_bias, self.domain_encoder) for p in m.parameters()}
            return [p for p in self.parameters() if id(p) not in keep]
        raise ValueError(f"unknown freeze scope {scope!r}; use 'tables' or 'all'")
