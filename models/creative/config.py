"""Configuration of JAC (joint ad and creative ranking) and of the creative ranker alone.

Plain data: validated once, serialisable (``to_dict``/``from_dict``), stored with every version.
Every choice the Peri-CR paper leaves open is a field here (docs/creative.md says which we took).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from models.ctr import FieldConfig
from models.creative.quantise import STE_MODES

PCTR_SOURCES = ("cached", "ar", "fixed")
MODES = ("jac", "cr")

# The stream's example fields (core.events.Example + features): what each ranker sees.
AR_FIELDS = ("user_id", "segment", "query", "ad_id", "bidword", "category", "advertiser", "top_category", "match",
             "domain", "position")
AR_NUMERIC = ("bid", "query_len")
CR_FIELDS = ("user_id", "segment", "domain", "position", "ad_id", "category", "advertiser", "creative_id",
             "cr_layout", "cr_colour", "cr_price_badge")
CR_NUMERIC = ("cr_text_len",)
# table rows per field for the stream (the rest get SMALL_TABLE)
LARGE_FIELDS = {"user_id": 1 << 15, "query": 1 << 13, "ad_id": 1 << 13, "bidword": 1 << 13, "creative_id": 1 << 14,
                "advertiser": 1 << 11}
SMALL_TABLE = 256


def default_fields(names: tuple[str, ...] | list[str]) -> list[FieldConfig]:
    return [FieldConfig(n, capacity=LARGE_FIELDS.get(n, SMALL_TABLE)) for n in names]


@dataclass
class JACConfig:
    """Everything that defines a JAC learner (``mode="jac"``) or an independent creative ranker
    (``mode="cr"``: the same CR network without the ad pCTR input, trained alone).

    AR (ad ranker) is a ``models.ctr`` CTR network (TorchRec embeddings + DCN) over ``ar_fields`` /
    ``ar_numeric``: it never sees the creative. CR (creative ranker) is a light MLP over small
    embeddings of ``cr_fields`` / ``cr_numeric`` (which include the creative and its content) plus,
    in JAC, the embedding of the quantised ad pCTR."""

    ar_fields: list[FieldConfig] = field(default_factory=lambda: default_fields(AR_FIELDS))
    ar_numeric: list[str] = field(default_factory=lambda: list(AR_NUMERIC))
    cr_fields: list[FieldConfig] = field(default_factory=lambda: default_fields(CR_FIELDS))
    cr_numeric: list[str] = field(default_factory=lambda: list(CR_NUMERIC))
    ad_field: str = "ad_id"  # the per-ad pCTR cache key
    creative_field: str = "creative_id"
    content_fields: list[str] = field(default_factory=lambda: ["cr_layout", "cr_colour", "cr_price_badge"])
    content_numeric: list[str] = field(default_factory=lambda: ["cr_text_len"])
    mode: str = "jac"
    # AR (a models.ctr.CTRConfig is built from these)
    ar_backbone: str = "dcn"
    ar_embedding_dim: int = 8
    ar_hidden: tuple[int, ...] = (64, 32)
    ar_emb_lr: float = 0.05
    ar_dense_lr: float = 0.05
    # CR (paper: embedding dim 4, MLP 128x64x32, Adagrad lr 0.05)
    cr_dim: int = 4
    cr_hidden: tuple[int, ...] = (128, 64, 32)
    cr_lr: float = 0.05
    cold_dropout: float = 0.1  # share of training rows whose creative id is replaced by the cold row
    # the coupling (Eq. 5 + straight-through)
    buckets: int = 64  # K (paper: 8192 for 18 B samples; ours are thousands of times fewer)
    bucket_dim: int = 8
    quant_r: float = 1000.0  # r: not given in the paper
    ste: str = "copy"  # copy | interp | none
    ste_scale: float = 1.0
    cr_loss_weight: float = 1.0  # L = BCE(AR) + w·BCE(CR)
    # where CR+ gets an ad pCTR when it runs in parallel with AR+ (not given in the paper)
    pctr_source: str = "cached"  # cached (per-ad running mean of AR+'s pCTR) | ar (sequential) | fixed
    cache_decay: float = 0.99  # EMA weight of the old per-ad value, per training example of the ad
    cache_max: int = 200_000  # per-ad entries kept (least recently trained dropped)
    # training
    batch_size: int = 512
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        cr_names = [f.name for f in self.cr_fields]
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.mode == "cr" or len(self.ar_fields) > 0, "JAC needs at least one ad-ranker field"),
            (len(self.cr_fields) > 0, "the creative ranker needs at least one field"),
            (self.creative_field in cr_names, f"the creative field {self.creative_field!r} must be a CR field"),
            (self.creative_field not in [f.name for f in self.ar_fields], "the ad ranker must not see the creative"),
            (not set(self.content_fields) & {f.name for f in self.ar_fields}, "the ad ranker must not see content"),
            (not set(self.content_numeric) & set(self.ar_numeric), "the ad ranker must not see content"),
            (set(self.content_fields) <= set(cr_names) and set(self.content_numeric) <= set(self.cr_numeric),
             "content fields must be creative-ranker inputs"),
            (self.ste in STE_MODES, f"ste must be one of {STE_MODES}"),
            (self.pctr_source in PCTR_SOURCES, f"pctr_source must be one of {PCTR_SOURCES}"),
            (self.buckets >= 1 and self.bucket_dim >= 1, "buckets and bucket_dim must be >= 1"),
            (self.quant_r > 0, "quant_r must be > 0"),
            (0 <= self.cold_dropout < 1, "cold_dropout must be in [0, 1)"),
            (0 <= self.cache_decay < 1, "cache_decay must be in [0, 1)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (len(self.cr_hidden) > 0 and len(self.ar_hidden) > 0, "hidden layers must not be empty"),
            (self.cr_loss_weight >= 0, "cr_loss_weight must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def joint(self) -> bool:
        return self.mode == "jac"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JACConfig":
        d = dict(d)
        for k in ("ar_fields", "cr_fields"):
            d[k] = [FieldConfig(**f) if isinstance(f, dict) else f for f in d[k]]
        for k in ("ar_hidden", "cr_hidden"):
            d[k] = tuple(d[k])
        return cls(**d)
