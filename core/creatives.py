"""Creative content for the synthetic world: attributes that drive click probability.

With ``CreativeContentConfig(enabled=True)`` every creative of :class:`core.world.World` carries
content (layout, colour, text length, price badge) and its logit effect becomes a function of that
content, so a model can generalise to creatives it has never shown::

    creative logit = quality + personal(segment, content)
    quality        = main(content) + residual_share · q0            # q0: the creative's old N(0, sd) draw
    main(c)        = layout[c.layout] + colour[c.colour]
                     − text_len_penalty · (c.text_len − text_len_optimum)² + price_badge · c.price_badge
    personal(s, c) = seg_colour[s, c.colour] + seg_badge[s] · c.price_badge + seg_layout[s, c.layout]

Everything here is drawn from its own generator (``[seed, seed_stream]``), so switching content on
does not move any other draw of the world, and with content off (the default) the world and its
streams are byte-identical to a world built before content existed.

To add a kind of content (images, say): add a field to :class:`CreativeContent` with its draw in
:meth:`CreativeEffects.draw`, its effect in :meth:`CreativeEffects.main` / :meth:`personal`, and its
example column in :data:`CONTENT_COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LAYOUTS = ("grid", "banner", "carousel", "video")
COLOURS = ("red", "blue", "green", "black", "white")
# example / impression feature name -> role ("categorical" or "numeric")
CONTENT_COLUMNS: dict[str, str] = {
    "cr_layout": "categorical",
    "cr_colour": "categorical",
    "cr_text_len": "numeric",
    "cr_price_badge": "categorical",
}


@dataclass(frozen=True)
class CreativeContentConfig:
    """Switch and effect sizes (CTR-logit scale) of creative content. Off by default."""

    enabled: bool = False
    layout_sd: float = 0.35  # main effect per layout ~ N(0, sd)
    colour_sd: float = 0.25  # main effect per colour ~ N(0, sd)
    text_len_min: int = 2
    text_len_max: int = 16
    text_len_optimum: float = 7.0
    text_len_penalty: float = 0.012  # logit lost per squared word away from the optimum
    badge_prob: float = 0.4  # share of creatives with a price badge
    price_badge: float = 0.15  # main effect of a badge
    seg_colour_sd: float = 0.45  # segment × colour interaction ~ N(0, sd)
    seg_badge_sd: float = 0.35  # segment × badge interaction ~ N(0, sd)
    seg_layout_sd: float = 0.2  # segment × layout interaction ~ N(0, sd)
    residual_share: float = 0.25  # weight of the creative's own (content-free) quality draw
    seed_stream: int = 2  # content draws use np.random.default_rng([world seed, seed_stream])

    def validate(self) -> None:
        from core.errors import ConfigError

        if not 1 <= self.text_len_min <= self.text_len_max:
            raise ConfigError("creative content needs 1 <= text_len_min <= text_len_max")
        if not 0.0 <= self.badge_prob <= 1.0:
            raise ConfigError("creative content badge_prob must be in [0, 1]")
        if min(self.layout_sd, self.colour_sd, self.seg_colour_sd, self.seg_badge_sd, self.seg_layout_sd,
               self.residual_share, self.text_len_penalty) < 0:
            raise ConfigError("creative content effect sizes must be >= 0")


@dataclass(frozen=True)
class CreativeContent:
    """What a creative looks like."""

    layout: str
    colour: str
    text_len: int  # words of ad text
    price_badge: int  # 0 | 1

    def features(self) -> dict[str, Any]:
        """The flat feature dict impressions and examples carry (keys of :data:`CONTENT_COLUMNS`)."""
        return {"cr_layout": self.layout, "cr_colour": self.colour, "cr_text_len": self.text_len,
                "cr_price_badge": str(self.price_badge)}


class CreativeEffects:
    """The ground-truth effect tables of one world, drawn once from ``rng``."""

    def __init__(self, cfg: CreativeContentConfig, n_segments: int, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.layout = {k: float(v) for k, v in zip(LAYOUTS, rng.normal(0.0, cfg.layout_sd, len(LAYOUTS)))}
        self.colour = {k: float(v) for k, v in zip(COLOURS, rng.normal(0.0, cfg.colour_sd, len(COLOURS)))}
        self.seg_colour = [{k: float(v) for k, v in zip(COLOURS, row)}
                           for row in rng.normal(0.0, cfg.seg_colour_sd, (n_segments, len(COLOURS)))]
        self.seg_badge = [float(v) for v in rng.normal(0.0, cfg.seg_badge_sd, n_segments)]
        self.seg_layout = [{k: float(v) for k, v in zip(LAYOUTS, row)}
                           for row in rng.normal(0.0, cfg.seg_layout_sd, (n_segments, len(LAYOUTS)))]

    def draw(self, rng: np.random.Generator) -> CreativeContent:
        cfg = self.cfg
        return CreativeContent(
            layout=LAYOUTS[int(rng.integers(len(LAYOUTS)))],
            colour=COLOURS[int(rng.integers(len(COLOURS)))],
            text_len=int(rng.integers(cfg.text_len_min, cfg.text_len_max + 1)),
            price_badge=int(rng.random() < cfg.badge_prob),
        )

    def main(self, c: CreativeContent) -> float:
        """The content's effect for every user (part of the creative's ``quality``)."""
        cfg = self.cfg
        return (self.layout[c.layout] + self.colour[c.colour]
                - cfg.text_len_penalty * (c.text_len - cfg.text_len_optimum) ** 2
                + cfg.price_badge * c.price_badge)

    def personal(self, segment: int, c: CreativeContent) -> float:
        """The content's effect that depends on the user's segment."""
        return (self.seg_colour[segment][c.colour] + self.seg_badge[segment] * c.price_badge
                + self.seg_layout[segment][c.layout])

    def summary(self) -> dict[str, Any]:
        r = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
        return {"layout": r(self.layout), "colour": r(self.colour),
                "seg_colour": [r(d) for d in self.seg_colour], "seg_badge": [round(v, 3) for v in self.seg_badge],
                "seg_layout": [r(d) for d in self.seg_layout]}
