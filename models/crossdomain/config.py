"""DACDR's configuration (plain data: JSON in a registry version, a switch per open choice)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.history import BEHAVIOURS

# the model variants the cold-start evaluation compares (every one is the same network and trainer)
VARIANTS = ("dacdr", "dacdr-target", "single", "pooled")


@dataclass
class DACDRConfig:
    """What the model reads, how it attends, how it learns.

    ``variant`` only sets two switches (the evaluation's three models):

    * ``dacdr``: trained on every domain's examples, each with its own domain row (the spec's "single
      simplified end-to-end training"), attends over the user's behaviour in every domain
      (``history_domains="all"``);
    * ``dacdr-target``: the same, trained on ``target_domains`` examples only;
    * ``single``: trained on ``target_domains`` examples, sees only the behaviour of the example's own
      domain (a single-domain model with a DIN-style history: for a cold-start user it is empty);
    * ``pooled``: one model trained on every domain's examples (a shared user embedding carries what
      is learnt in one domain to another), own-domain history only.
    """

    item_fields: list[str] = field(default_factory=lambda: ["ad_id", "category"])
    context_fields: list[str] = field(default_factory=lambda: ["user_id"])
    domains: list[str] = field(default_factory=lambda: ["search"])
    target_domains: list[str] | None = None  # domains whose examples train the loss (None: every known domain)
    history_domains: str = "all"  # all | own
    behaviours: list[str] = field(default_factory=lambda: list(BEHAVIOURS))
    max_len: int = 20  # items per (domain, behaviour) history
    max_users: int = 200_000  # users whose history is kept
    dim: int = 16
    heads: int = 2
    hidden: tuple[int, ...] = (64, 32)
    domain_level: str = "types"  # types (reading 1a) | items (reading 1b)
    item_query: str = "candidate"  # candidate | candidate+domain (step 2 conditioned on step 1)
    alpha_reweight: bool = True  # step 2 logits += log α of the item's group (reading 1a)
    cross: bool = True  # False: no attention at all (z_dom = z_item = 0)
    capacity: int = 1 << 15  # embedding rows per field (row 0 = cold)
    admission: int = 1  # sightings before a value gets its own row
    emb_lr: float = 0.2  # Adagrad, embedding tables
    dense_lr: float = 0.003  # Adam, attention, encoder, head
    epochs: int = 1
    batch_size: int = 256
    seed: int = 0
    cold_threshold: int = 1  # a user with fewer own-domain views than this is cold (scores, routing)

    @classmethod
    def variant(cls, name: str, target: str | list[str], **kw: Any) -> "DACDRConfig":
        targets = [target] if isinstance(target, str) else list(target)
        if name == "dacdr":
            return cls(target_domains=None, history_domains="all", **kw)
        if name == "dacdr-target":
            return cls(target_domains=targets, history_domains="all", **kw)
        if name == "single":
            return cls(target_domains=targets, history_domains="own", **kw)
        if name == "pooled":
            return cls(target_domains=None, history_domains="own", **kw)
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")

    def validate(self) -> None:
        if not self.item_fields:
            raise ValueError("DACDR needs at least one item field")
        if self.history_domains not in ("all", "own"):
            raise ValueError(f"history_domains must be 'all' or 'own', not {self.history_domains!r}")
        if len(set(self.domains)) != len(self.domains) or not self.domains:
            raise ValueError(f"domains must be a non-empty list of distinct names, got {self.domains}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.capacity < 2 or self.admission < 1 or self.max_len < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("capacity >= 2, admission, max_len, epochs and batch_size >= 1 are required")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DACDRConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DACDR config keys {sorted(unknown)}")
        kw = dict(d)
        if "hidden" in kw:
            kw["hidden"] = tuple(kw["hidden"])
        return cls(**kw)
