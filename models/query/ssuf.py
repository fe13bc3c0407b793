"""SSUF (and SMGCN, its special case) as one network with a switch per module.

    Q   = Enc(query)                                              shared encoder
    q'  = Q + Σ_j softmax(Q Kᵀ)_j K_j        (knowledge)          K = Enc(posterior knowledge items)
    C   = Enc(label name [+ side information])   (label semantic / label-enhanced)
    H   = C + Σ_k w_k GCN_k(Â_k, C)          (structure)          channels: coo, sim, hier
    ŷ   = sigmoid(s · cos(q', H_leaf) + b)   (label semantic)  |  sigmoid(W q' + b) (baseline)
    y   = min(y_click + sg[s_ij · 1(s_ij ≥ τ)], 1),  s_ij = cos(q', C_j)   (semi-supervised)

With every module off it is the plain encoder with a linear head (the baseline). Choices where the
papers are silent (residual GCN, cosine logits, channel attention, ...) are listed in docs/query.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.query.encoder import SharedEncoder

GRAPHS = ("coo", "sim", "hier")


@dataclass
class SSUFConfig:
    # module switches (all off = the plain encoder baseline)
    label_semantic: bool = False  # labels encoded from their names by the shared encoder
    side_info: bool = False  # LE: label text = name + side information
    knowledge: bool = False  # KE: posterior knowledge attention-fused into the query
    semi: bool = False  # semi-supervised labels from query-label similarity (stop-gradient)
    graphs: tuple[str, ...] = ()  # SE: any of coo, sim, hier (empty = off)
    # module hyper-parameters
    tau: float = 0.7
    semi_source: str = "frozen"  # frozen (pre-trained features, stop-gradient) | model (the trained encoder)
    alpha: float = 0.05
    beta: float = 0.6
    fusion: str = "channels"  # channels (SMGCN: a GCN per graph, attention over channels) | ssuf (one fused graph)
    gcn_layers: int = 2
    gcn_residual: bool = True
    logit_scale: float = 10.0  # initial s of the cosine logits (learned)
    label_bias: str = "per_label"  # per_label | shared
    head: str = "linear"  # head without label semantics: linear | cosine
    ke_max_items: int = 9
    side_terms: int = 8
    # training
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    batch_size: int = 32
    max_epochs: int = 60
    patience: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.graphs = tuple(self.graphs)
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad:
            raise ValueError(f"unknown graphs {bad}; choose from {GRAPHS}")
        if self.graphs and not self.label_semantic:
            raise ValueError("the structure module propagates label embeddings: it needs label_semantic")
        if self.semi_source not in ("frozen", "model"):
            raise ValueError("semi_source must be frozen or model")
        if self.fusion not in ("channels", "ssuf"):
            raise ValueError("fusion must be channels or ssuf")
        if self.label_bias not in ("per_label", "shared") or self.head not in ("linear", "cosine"):
            raise ValueError("label_bias: per_label|shared; head: linear|cosine")

    @property
    def modules(self) -> dict[str, bool]:
        return {"label_semantic": self.label_semantic, "side_info": self.side_info, "knowledge": self.knowledge,
                "semi": self.semi, "structure": bool(self.graphs)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = list(self.graphs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SSUFConfig":
        d = {k: v for k, v in dict(d).items() if k in cls.__dataclass_fields__}
        if "graphs" in d:
            d["graphs"] = tuple(d["graphs"])
        return cls(**d)


# ------------------------------------------------------------------------------------ variants
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "label": {"label_semantic": True},
    "semi": {"semi": True},
    "gcn": {"label_semantic": True, "graphs": ("coo", "sim")},
    "smgcn": {"label_semantic": True, "semi": True, "graphs": ("coo", "sim"), "fusion": "channels"},
    "ssuf": {"label_semantic": True, "semi": True, "side_info": True, "knowledge": True,
             "graphs": ("coo", "sim", "hier"), "fusion": "ssuf"},
}
_MODS = {"ke": "knowledge", "le": "side_info", "semi": "semi", "se": "graphs", "label": "label_semantic"}


def variant_config(name: str, **over: Any) -> SSUFConfig:
    """A named variant, optionally with modules removed or added: ``ssuf-ke`` (without knowledge),
    ``ssuf-hier``, ``smgcn+hier``, ``baseline+ke`` ... (modules: ke, le, semi, se, label and the
    graphs coo, sim, hier)."""
    import re

    parts = re.split(r"([+-])", name.strip())
    base = parts[0]
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: start from one of {', '.join(VARIANTS)}")
    d: dict[str, Any] = {**VARIANTS[base]}
    graphs = list(d.get("graphs", ()))
    for sign, mod in zip(parts[1::2], parts[2::2]):
        mod = mod.strip()
        on = sign == "+"
        if mod in GRAPHS:
            graphs = [g for g in graphs if g != mod] + ([mod] if on else [])
            if on:
                d["label_semantic"] = True
        elif mod == "se":
            graphs = list(GRAPHS if base != "smgcn" else ("coo", "sim")) if on else []
            if on:
                d["label_semantic"] = True
        elif mod in _MODS:
            d[_MODS[mod]] = on
            if mod == "label" and not on:
                graphs = []
        else:
            raise ValueError(f"unknown module {mod!r} in variant {name!r} (ke, le, semi, se, label, coo, sim, hier)")
    d["graphs"] = tuple(g for g in GRAPHS if g in graphs)
    d.update(over)
    return SSUFConfig(**d)


# ------------------------------------------------------------------------------------ modules
def knowledge_fuse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q' = q + Σ_j α_j k_j`` with ``α = softmax(q kᵀ)`` over the valid items (``mask``);
    rows without items keep ``q``. q: [B, d], k: [B, M, d], mask: [B, M] bool. Returns (q', α)."""
    if k.numel() == 0:
        return q, torch.zeros(q.shape[0], 0)
    att = torch.einsum("bd,bmd->bm", q, k).masked_fill(~mask, float("-inf"))
    has = mask.any(1, keepdim=True)
    alpha = torch.where(has, torch.softmax(torch.where(has, att, torch.zeros_like(att)), 1), torch.zeros_like(att))
    alpha = alpha * mask
    alpha = alpha / alpha.sum(1, keepdim=True).clamp_min(1e-12)
    return q + torch.einsum("bm,bmd->bd", alpha, k), alpha


def semi_labels(q: torch.Tensor, c: torch.Tensor, y_click: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = min(y_click + s·1[s ≥ τ], 1)`` with ``s = cos(q, c)``, under stop-gradient.
    Returns (y, y_semi); neither carries a gradient."""
    with torch.no_grad():
        s = F.normalize(q.detach(), dim=-1) @ F.normalize(c.detach(), dim=-1).T
        y_semi = torch.where(s >= tau, s, torch.zeros_like(s)).clamp(0.0, 1.0)
        y = torch.clamp(y_click + y_semi, max=1.0)
    return y, y_semi


class GCNChannel(nn.Module):
    """``H_{l+1} = σ(Â H_l W_l)`` (ReLU between layers, none after the last), identity-initialised."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.ws = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        for w in self.ws:
            nn.init.eye_(w.weight)

    def forward(self, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(self.ws):
            h = a @ w(h)
            if i < len(self.ws) - 1:
                h = F.relu(h)
        return h


class SSUFNet(nn.Module):
    """The network over a fixed node set. ``node_ids``: encoder row ids of the node texts (leaves
    first); ``adj``: normalised ``[N, N]`` matrices per channel (set with :meth:`set_graphs`)."""

    def __init__(self, cfg: SSUFConfig, encoder: SharedEncoder, n_leaves: int, node_ids: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.n_leaves = n_leaves
        self.register_buffer("node_ids", node_ids.clone(), persistent=False)
        d = encoder.dim
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.label_semantic:
            self.log_scale = nn.Parameter(torch.tensor(float(np.log(cfg.logit_scale))))
            nb = n_leaves if cfg.label_bias == "per_label" else 1
            self.bias = nn.Parameter(torch.full((nb,), -3.0))
        else:
            self.head = nn.Linear(d, n_leaves)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.constant_(self.head.bias, -3.0)
            if cfg.head == "cosine":
                self.log_scale = nn.Parameter(torch.tensor(float(np.log(cfg.logit_scale))))
        self.channels = list(cfg.graphs) if cfg.fusion == "channels" else (["ssuf"] if cfg.graphs else [])
        self.gcn = nn.ModuleDict({c: GCNChannel(d, cfg.gcn_layers) for c in self.channels})
        self.chan_att = nn.Parameter(torch.zeros(max(1, len(self.channels))))
        self.adj: dict[str, torch.Tensor] = {}

    def set_graphs(self, adj: dict[str, np.ndarray]) -> None:
        missing = [c for c in self.channels if c not in adj]
        if missing:
            raise ValueError(f"graphs missing for channels {missing}")
        self.adj = {c: torch.from_numpy(np.asarray(adj[c], dtype=np.float32)) for c in self.channels}

    # ---- pieces
    def label_embeddings(self, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, H): encoded node texts (or the given ``c``) and their graph-propagated embeddings
        (H = C without SE)."""
        c = self.encoder(self.node_ids) if c is None else c
        if not self.channels:
            return c, c
        w = torch.softmax(self.chan_att, 0)
        prop = sum(w[i] * self.gcn[ch](self.adj[ch], c) for i, ch in enumerate(self.channels))
        h = c + prop if self.cfg.gcn_residual else prop
        return c, h

    def query_repr(self, q_ids: torch.Tensor | None, k_ids: torch.Tensor | None = None,
                   q_vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.encoder(q_ids) if q_vec is None else q_vec
        alpha = None
        if self.cfg.knowledge and k_ids is not None and k_ids.numel():
            mask = k_ids >= 0
            k = self.encoder(k_ids.clamp_min(0).reshape(-1)).reshape(*k_ids.shape, -1)
            q, alpha = knowledge_fuse(q, k, mask)
        return q, alpha

    def logits(self, q: torch.Tensor, h_leaf: torch.Tensor) -> torch.Tensor:
        q = self.drop(q)
        if self.cfg.label_semantic:
            s = self.log_scale.exp()
            return s * (F.normalize(q, dim=-1) @ F.normalize(h_leaf, dim=-1).T) + self.bias
        if self.cfg.head == "cosine":
            return self.log_scale.exp() * (F.normalize(q, dim=-1) @ F.normalize(self.head.weight, dim=-1).T) \
                + self.head.bias
        return self.head(q)

    def forward(self, q_ids: torch.Tensor, k_ids: torch.Tensor | None = None,
                q_vec: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q, alpha = self.query_repr(q_ids, k_ids, q_vec)
        c, h = self.label_embeddings() if (self.cfg.label_semantic or self.cfg.semi) else (None, None)
        hl = h[: self.n_leaves] if h is not None else None
        out = {"q": q, "logits": self.logits(q, hl)}
        if c is not None:
            out["c_leaf"] = c[: self.n_leaves]
        if self.cfg.semi and self.cfg.semi_source == "frozen" and q_vec is None:
            fq = self.encoder.frozen(q_ids)
            fc = self.encoder.frozen(self.node_ids[: self.n_leaves])
            if fq is not None and fc is not None:
                if self.cfg.knowledge and k_ids is not None and k_ids.numel():
                    fk = self.encoder.frozen(k_ids.clamp_min(0).reshape(-1)).reshape(*k_ids.shape, -1)
                    fq, _ = knowledge_fuse(fq, fk, k_ids >= 0)
                out["semi_q"], out["semi_c"] = fq, fc
        if alpha is not None:
            out["alpha"] = alpha
        return out

    def loss(self, out: dict[str, torch.Tensor], y_click: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE against ``y`` (click labels, fused with semi-supervised labels when on), summed over
        labels, averaged over the batch (weighted by ``weight`` when given). Returns (loss, y)."""
        y = y_click
        if self.cfg.semi:
            if "semi_q" in out:
                y, _ = semi_labels(out["semi_q"], out["semi_c"], y_click, self.cfg.tau)
            else:
                y, _ = semi_labels(out["q"], out["c_leaf"], y_click, self.cfg.tau)
        per = F.binary_cross_entropy_with_logits(out["logits"], y, reduction="none").sum(1)
        if weight is not None:
            return (per * weight).sum() / weight.sum().clamp_min(1e-12), y
        return per.mean(), y


def graph_inputs(cfg: SSUFConfig, n_leaves: int, parents: Sequence[int], train_labels: Sequence[Sequence[int]],
                 label_emb: np.ndarray, weights: Sequence[float] | None = None,
                 pair_counts: np.ndarray | None = None, label_counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Normalised adjacency per channel over all nodes, from training label sets (or counts the
    stream keeps) and the current label embeddings."""
    from models.query import graphs as G

    n = len(parents)
    if pair_counts is None or label_counts is None:
        pair_counts, label_counts = G.cooccurrence(train_labels, n_leaves, weights)
    raw: dict[str, np.ndarray] = {}
    if "coo" in cfg.graphs:
        raw["coo"] = G.pad_to(G.cooccurrence_graph(pair_counts, label_counts, cfg.alpha), n)
    if "sim" in cfg.graphs:
        raw["sim"] = G.similarity_graph(label_emb, cfg.beta)
    if "hier" in cfg.graphs:
        mass = np.zeros(n)
        mass[:n_leaves] = np.asarray(label_counts)[:n_leaves] + 1.0
        for i in range(n_leaves):  # an ancestor's mass is the mass of the leaves below it
            p = parents[i]
            seen = 0
            while p is not None and p >= 0 and seen < n:
                mass[p] += mass[i]
                p = parents[p]
                seen += 1
        raw["hier"] = G.hierarchy_graph(parents, mass)
    if cfg.fusion == "ssuf":
        a = G.fuse_ssuf(raw.get("coo"), raw.get("sim"), raw.get("hier"), n)
        return {"ssuf": G.sym_norm_adj(a)} if cfg.graphs else {}
    return {k: G.sym_norm_adj(v) for k, v in raw.items()}
