"""Users who behave in several domains: a shared taste, domain-specific offsets, users new to a target.

A *domain* is a place ads are shown (search results, a recommendation feed, a video page; OBD's men
and women campaigns). With ``CrossDomainConfig(enabled=True)`` the world's users behave in every
domain of ``WorldConfig.domains`` with one shared taste and domain-specific offsets::

    taste(user, domain, top) = preference[user, top]            # shared by every domain
                               + personal[user, top]            # more personal taste, also shared
                               + domain_top[domain, top]        # the domain's own leaning, every user
                               + user_domain[user, domain, top] # the user's own offset in this domain

``taste`` replaces ``preference`` in the click logit of an impression in that domain, and a
request's query follows the user's taste *in the request's domain* (the domain is drawn first), so
what a user browses in one domain says something about their taste in another. A share
``new_user_share`` of the users is *new to the target domain*: they make no request there before
``new_from`` (a fraction of the drift horizon after the epoch), so when they arrive they have
behaviour in the other domains only: the cold-start users of cross-domain recommendation.

Everything is drawn from its own generator (``[seed, seed_stream]``), so switching cross-domain
behaviour on moves no other draw of the world, and with it off (the default) the world and its
streams are byte-identical to those before it existed (``tests/test_domain_world.py`` pins it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# a three-domain preset: (name, share of requests, base CTR-logit offset)
CROSS_DOMAINS: tuple[tuple[str, float, float], ...] = (
    ("search", 0.55, 0.0),
    ("feed", 0.3, -0.3),
    ("video", 0.15, -0.5),
)


@dataclass(frozen=True)
class CrossDomainConfig:
    """Switch and sizes (CTR-logit scale) of cross-domain behaviour. Off by default."""

    enabled: bool = False
    target: str = "feed"  # the domain some users are new to
    personal_sd: float = 0.5  # user × top-category taste ~ N(0, sd), shared by every domain
    domain_top_sd: float = 0.5  # domain × top-category leaning ~ N(0, sd), shared by every user
    user_domain_sd: float = 0.25  # user × domain × top-category offset ~ N(0, sd)
    new_user_share: float = 0.3  # share of users with no target-domain request before new_from
    new_from: float = 0.5  # fraction of the drift horizon after the epoch
    seed_stream: int = 3  # draws use np.random.default_rng([world seed, seed_stream])

    def validate(self, domain_names: list[str]) -> None:
        from core.errors import ConfigError

        if not self.enabled:
            return
        if len(domain_names) < 2:
            raise ConfigError("cross-domain behaviour needs at least two domains in WorldConfig.domains "
                              f"(for example core.domains.CROSS_DOMAINS), got {domain_names}")
        if self.target not in domain_names:
            raise ConfigError(f"cross-domain target {self.target!r} is not one of the domains {domain_names}")
        if not 0.0 <= self.new_user_share <= 1.0:
            raise ConfigError("cross-domain new_user_share must be in [0, 1]")
        if min(self.personal_sd, self.domain_top_sd, self.user_domain_sd) < 0:
            raise ConfigError("cross-domain offsets must have sd >= 0")


class DomainEffects:
    """The ground-truth offsets of one world, drawn once from ``rng``."""

    def __init__(self, cfg: CrossDomainConfig, domains: list[str], n_users: int, n_top: int,
                 rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.domains = list(domains)
        self.index = {d: i for i, d in enumerate(domains)}
        self.domain_top = rng.normal(0.0, cfg.domain_top_sd, (len(domains), n_top))
        self.user_domain = rng.normal(0.0, cfg.user_domain_sd, (n_users, len(domains), n_top))
        self.new_to_target = rng.random(n_users) < cfg.new_user_share
        self.personal = rng.normal(0.0, cfg.personal_sd, (n_users, n_top))
        self.target = cfg.target
        self.target_index = self.index[cfg.target]
        # the table the click logit reads: offset[user, domain, top]
        self.offset = self.personal[:, None, :] + self.user_domain + self.domain_top[None, :, :]

    def logit_offset(self, user: int, domain: str, top: int) -> float:
        d = self.index.get(domain)
        return 0.0 if d is None else float(self.offset[user, d, top])

    def taste(self, preference: tuple[float, ...], user: int, domain: str) -> tuple[float, ...]:
        d = self.index.get(domain)
        if d is None:
            return tuple(preference)
        return tuple(round(float(p + o), 4) for p, o in zip(preference, self.offset[user, d]))

    def top_cum(self, preference: np.ndarray, query_temperature: float = 1.5) -> np.ndarray:
        """Cumulative query-top distribution per (user, domain): softmax(temperature · taste)."""
        taste = preference[:, None, :] + self.offset
        w = np.exp(query_temperature * (taste - taste.max(-1, keepdims=True)))
        return np.cumsum(w / w.sum(-1, keepdims=True), -1)

    def summary(self) -> dict[str, Any]:
        return {"domains": self.domains, "target": self.target,
                "domain_top": [[round(float(x), 3) for x in row] for row in self.domain_top],
                "new_to_target": int(self.new_to_target.sum())}
