"""The CTR network: TorchRec embeddings + optional Feature Prior + an interchangeable backbone.

::

    KJT (one row id per field) ─► FusedEmbeddingBagCollection ─► flat [B, Σd], stacked [B, F, D]
    rows [B, F] ─► FirstOrder (first_order=True, every strategy) ─► Σ_f lin_f[row]
    rows [B, F] ─► LearnedFeaturePrior (fp="learned") ─┐
    count-prior logits [B, F] (fp="count") ────────────┴► u [B, F] prior logits, c = u − field mean
    dense [B, n] (standardised numeric) ⊕ c.detach()  (fp_use in {input, both})
    backbone(flat, stacked, dense) + bias + Σ_f lin_f + Σ_f w_f·c_f  (fp_use in {logit, both}) ─► z [B]

The embedding tables are trained by the fused fbgemm kernel inside ``backward()`` (RowWiseAdagrad by
default); the first-order table and the learned prior's offsets are sparse 1-dim tables with their
own sparse Adagrad; every other parameter is dense and trained by the learner's dense optimizer.
The prior enters centred on its field mean (``c = 0`` means "no evidence beyond the field CTR"), so
the extra dense inputs are on the scale of the standardised ones. The learned prior enters the
logit *with* its gradient (trained end to end there, ``fp_e2e``); the copy that enters the dense
inputs is detached (the backbone must not reshape the prior).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torchrec
from torchrec import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from models.ctr.backbones import build_backbone
from models.ctr.ddp import LearnedFeaturePrior
from models.ctr.features import ModelInput

FP_MODES = ("off", "learned", "count")
FP_USES = ("input", "logit", "both")
MP_MODES = ("off", "posterior", "kl", "logit")
LAMBDA_MODES = ("const", "count", "evidence")
LAMBDA_AGGS = ("min", "mean")
MP_ADAPT = ("off", "pv")
EMB_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


@dataclass
class FieldConfig:
    """One categorical field: its table size, dim and the id mapper's policy."""

    name: str
    capacity: int = 1 << 16
    dim: int | None = None  # None = CTRConfig.embedding_dim
    admission: int = 1
    ttl: float | None = None  # seconds of event time; None = never expire
    mapper: str = "dict"  # dict | hash


@dataclass
class CTRConfig:
    """Everything that defines a CTR learner. Plain data: validated once, serialisable."""

    fields: list[FieldConfig]
    numeric: list[str] = field(default_factory=list)
    embedding_dim: int = 16
    backbone: str = "deepfm"  # deepfm | dcn
    hidden: tuple[int, ...] = (64, 32)
    cross_layers: int = 2
    cross_low_rank: int | None = None
    emb_optimizer: str = "rowwise_adagrad"
    emb_lr: float = 0.05
    dense_optimizer: str = "adagrad"  # adagrad | adam
    dense_lr: float = 0.01
    first_order: bool = False  # a per-value bias per field (the FM first-order term); on in every evaluate-ctr/trainer preset
    init_from_data: bool = True  # output bias and prior field means start at logit(CTR of the first batch)
    # Feature Prior
    fp: str = "off"  # off | learned | count
    fp_use: str = "both"  # input | logit | both
    fp_weight: float = 0.5  # μ: weight of the auxiliary FP loss (learned)
    fp_shrink: float = 2.0  # γ: shrinkage of a value's offset toward its field mean (learned)
    fp_lr: float = 0.1
    fp_init_ctr: float = 0.05  # field CTR before any data (init_from_data replaces it at the first batch)
    fp_e2e: bool = True  # the learned prior's logit term passes the main loss's gradient to the prior
    fp_strength: float = 20.0  # κ: Beta prior pseudo-impressions (count)
    fp_decay: float = 1.0  # multiply count statistics by this after every window (count)
    fp_update: str = "batch"  # count: batch = a batch's labels reach the prior after its step; window = when the window ends
    # Model Prior
    mp: str = "off"  # off | posterior | kl | logit
    mp_lambda: float = 1.0
    mp_lambda_mode: str = "const"  # const | count | evidence (see losses.evidence_strength)
    mp_count_n0: float = 20.0  # count: λ_i = λ·mean_f n/(n + n0)
    mp_count_agg: str = "min"  # evidence: how the fields' evidence ratios combine (min | mean)
    mp_count_decay: float = 1.0  # evidence: the sightings behind the prior fade by this factor per window
    mp_weighted: bool = True  # posterior/kl: weight (1+λ_i) per example (False: only the target moves)
    mp_adapt: str = "off"  # off | pv: scale λ per window by progressive validation (models/ctr/prior_strength.py)
    mp_logit_max_chain: int = 8
    # Distillation baseline
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    # training
    epochs: int = 1
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        checks = [
            (len(self.fields) > 0, "at least one categorical field is required"),
            (len({f.name for f in self.fields}) == len(self.fields), "field names must be unique"),
            (self.backbone in ("deepfm", "dcn"), f"backbone must be deepfm or dcn, not {self.backbone!r}"),
            (self.fp in FP_MODES, f"fp must be one of {FP_MODES}"),
            (self.fp_use in FP_USES, f"fp_use must be one of {FP_USES}"),
            (self.fp_update in ("window", "batch"), "fp_update must be window or batch"),
            (self.mp in MP_MODES, f"mp must be one of {MP_MODES}"),
            (self.mp_lambda >= 0, "mp_lambda must be >= 0"),
            (self.mp_lambda_mode in LAMBDA_MODES, f"mp_lambda_mode must be one of {LAMBDA_MODES}"),
            (self.mp_count_agg in LAMBDA_AGGS, f"mp_count_agg must be one of {LAMBDA_AGGS}"),
            (0 < self.mp_count_decay <= 1, "mp_count_decay must be in (0, 1]"),
            (self.mp_adapt in MP_ADAPT, f"mp_adapt must be one of {MP_ADAPT}"),
            (self.distill_temperature > 0, "distill_temperature must be > 0"),
            (self.emb_optimizer in EMB_OPTIMIZERS, f"emb_optimizer must be one of {EMB_OPTIMIZERS}"),
            (self.dense_optimizer in ("adagrad", "adam"), "dense_optimizer must be adagrad or adam"),
            (len(self.hidden) > 0, "hidden needs at least one layer"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (0 < self.fp_decay <= 1, "fp_decay must be in (0, 1]"),
            (0 < self.fp_init_ctr < 1, "fp_init_ctr must be in (0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def field_dims(self) -> list[int]:
        return [f.dim or self.embedding_dim for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CTRConfig":
        d = dict(d)
        d["fields"] = [FieldConfig(**f) for f in d["fields"]]
        d["hidden"] = tuple(d.get("hidden", (64, 32)))
        return cls(**d)


def _emb_optimizer(name: str) -> type[torch.optim.Optimizer]:
    return {
        "rowwise_adagrad": torchrec.optim.RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
    }[name]


def build_ebc(cfg: CTRConfig) -> FusedEmbeddingBagCollection:
    """One fused table per field, ``t_<field>``; the optimizer runs inside backward()."""
    tables = [
        EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=d, num_embeddings=f.capacity, feature_names=[f.name])
        for f, d in zip(cfg.fields, cfg.field_dims())
    ]
    return FusedEmbeddingBagCollection(
        tables=tables,
        optimizer_type=_emb_optimizer(cfg.emb_optimizer),
        optimizer_kwargs={"lr": cfg.emb_lr},
        device=torch.device("cpu"),
    )


class FirstOrder(nn.Module):
    """The FM first-order term: one scalar per value of every field, ``Σ_f w_f[row_f]``.

    A sparse ``nn.Embedding`` over all fields' rows (same row space as the id mappers), zero at
    start; the learner trains it with sparse Adagrad at ``emb_lr`` and zeroes recycled rows.
    """

    def __init__(self, capacities: Sequence[int]) -> None:
        super().__init__()
        offs = [0, *itertools.accumulate(capacities)][:-1]
        self.register_buffer("offsets", torch.tensor(offs, dtype=torch.long), persistent=False)
        self.weight = nn.Embedding(int(sum(capacities)), 1, sparse=True)
        nn.init.zeros_(self.weight.weight)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight(rows + self.offsets).squeeze(-1).sum(1)

    def reset_rows(self, field: int, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.weight[rows + self.offsets[field]] = 0.0


class CTRNet(nn.Module):
    """The network. Parts are handed in (embedding collection, backbone, optional prior).

    Args:
        ebc: the fused embedding collection (one table per field, in ``field_names`` order).
        backbone: any module with ``forward(flat, stacked, dense) -> logit``.
        field_names: categorical fields.
        field_dims: embedding dim per field.
        n_numeric: standardised numeric inputs.
        fp: ``off`` | ``learned`` | ``count``; ``feature_prior`` is required for ``learned``.
        fp_use: where prior logits enter: ``input`` | ``logit`` | ``both``.
        first_order: the per-value bias term (None = off).
        fp_e2e: the prior's logit term passes gradients to the prior (learned prior only).
    """

    def __init__(
        self,
        ebc: FusedEmbeddingBagCollection,
        backbone: nn.Module,
        field_names: Sequence[str],
        field_dims: Sequence[int],
        n_numeric: int,
        fp: str = "off",
        fp_use: str = "both",
        feature_prior: LearnedFeaturePrior | None = None,
        first_order: FirstOrder | None = None,
        fp_e2e: bool = True,
    ) -> None:
        super().__init__()
        self.first_order = first_order
        self.fp_e2e = fp_e2e
        self.ebc = ebc
        self.backbone = backbone
        self.field_names = list(field_names)
        self.n_numeric = n_numeric
        self.fp = fp
        self.fp_use = fp_use
        self.feature_prior = feature_prior
        d = max(field_dims)
        self.common_dim = d
        self.proj = (
            None
            if len(set(field_dims)) == 1
            else nn.ModuleList(nn.Identity() if fd == d else nn.Linear(fd, d, bias=False) for fd in field_dims)
        )
        self._splits = list(field_dims)
        n_f = len(self.field_names)
        self.prior_w = nn.Parameter(torch.zeros(n_f)) if fp != "off" and fp_use in ("logit", "both") else None
        self.bias = nn.Parameter(torch.zeros(1))

    def prior_inputs(self) -> int:
        """Dense columns the prior adds."""
        return len(self.field_names) if self.fp != "off" and self.fp_use in ("input", "both") else 0

    def forward(self, inp: ModelInput) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns ``(z, u, d)``: logits [B], prior logits [B, F] (or None), learned offsets (or None)."""
        flat = self.ebc(inp.kjt).values()  # [B, Σd]
        b = flat.shape[0]
        if self.proj is None:
            stacked = flat.view(b, len(self.field_names), self.common_dim)
        else:
            parts = torch.split(flat, self._splits, dim=1)
            stacked = torch.stack([p(x) for p, x in zip(self.proj, parts)], 1)
        u = d = c = None
        if self.fp == "learned":
            assert self.feature_prior is not None
            u, d = self.feature_prior(inp.rows)
            c = d  # the value's deviation from its field mean
        elif self.fp == "count":
            u = c = inp.prior_counts  # already centred on the field mean by the learner
        dense = inp.dense
        if c is not None and self.fp_use in ("input", "both"):
            dense = torch.cat([dense, c.detach()], 1)
        z = self.backbone(flat, stacked, dense) + self.bias
        if self.first_order is not None:
            z = z + self.first_order(inp.rows)
        if c is not None and self.prior_w is not None:
            z = z + ((c if self.fp_e2e else c.detach()) * self.prior_w).sum(1)
        return z, u, d


def build_net(cfg: CTRConfig) -> CTRNet:
    """A fresh network for ``cfg`` (seeded by ``cfg.seed``)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    dims = cfg.field_dims()
    n_f = len(cfg.fields)
    prior_cols = n_f if cfg.fp != "off" and cfg.fp_use in ("input", "both") else 0
    dense_dim = len(cfg.numeric) + prior_cols
    backbone = build_backbone(
        cfg.backbone, n_f, max(dims), sum(dims), dense_dim, cfg.hidden, cfg.cross_layers, cfg.cross_low_rank
    )
    caps = [f.capacity for f in cfg.fields]
    fp = LearnedFeaturePrior(caps, cfg.fp_init_ctr) if cfg.fp == "learned" else None
    lin = FirstOrder(caps) if cfg.first_order else None
    return CTRNet(build_ebc(cfg), backbone, [f.name for f in cfg.fields], dims, len(cfg.numeric), cfg.fp, cfg.fp_use,
                  fp, lin, cfg.fp_e2e)
