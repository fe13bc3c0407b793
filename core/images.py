"""Creative images for the synthetic world: a product shape on a background, some of them broken.

With ``ImageConfig(enabled=True)`` every ad gets a *product* (a shape by its top category and a
colour) and every creative an :class:`ImageSpec`: where and how large the product is, the
background (a scene colour from a category palette, a style), and whether it is *broken*:

=================  ==============================================================
``missing``        the product is not in the picture
``cutoff``         the product is mostly outside the frame
``low_contrast``   the product has (almost) the background's colour
``bg_mismatch``    the background is another category's scene (a sofa on a lawn)
=================  ==============================================================

A share ``broken_share`` of the creatives is broken (kinds drawn uniformly). :func:`render` draws
a spec as a ``size × size × 3`` uint8 array (numpy only; :func:`to_png` / :func:`from_png` use
Pillow), :func:`render_product` the clean product on white (the reference an availability gate
compares against, as RFNet compares with the product image).

Ground truth (CTR-logit scale; ``ImageEffects``)::

    image(user, c) = − scale_penalty · (scale − scale_optimum)² + contrast · min(distance / 255, 1)
                     + style[bg_style] + seg_style[segment(user), bg_style] + broken_effect[kind]

Draws come from their own generator (``[seed, seed_stream]``): switching images on moves no other
draw of the world, and with images off the world's streams are unchanged.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

SHAPES = ("shoe", "screen", "house", "tent", "bottle", "pot")
TOP_SHAPES = {"shoes": "shoe", "electronics": "screen", "home": "house", "outdoor": "tent",
              "beauty": "bottle", "kitchen": "pot"}
# the scene colour of each top category's backgrounds (RGB)
TOP_SCENES = {"shoes": (196, 198, 204), "electronics": (38, 52, 96), "home": (226, 206, 168),
              "outdoor": (86, 150, 78), "beauty": (236, 176, 204), "kitchen": (222, 140, 84)}
STYLES = ("plain", "gradient", "stripes", "spot")
BROKEN_KINDS = ("missing", "cutoff", "low_contrast", "bg_mismatch")
LABELS = ("available", *BROKEN_KINDS)  # the availability gate's classes (RFNet: 5 classes)


def shape_of(top: str, top_index: int) -> str:
    return TOP_SHAPES.get(top, SHAPES[top_index % len(SHAPES)])


def scene_of(top: str, top_index: int) -> tuple[int, int, int]:
    if top in TOP_SCENES:
        return TOP_SCENES[top]
    rng = np.random.default_rng([top_index, 99])
    return tuple(int(x) for x in rng.integers(30, 226, 3))  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageConfig:
    """Switch, rendering size, share of broken creatives and effect sizes. Off by default."""

    enabled: bool = False
    size: int = 32
    broken_share: float = 0.15
    review_share: float = 0.5  # share of catalogue creatives that carry a human review label
    scale_min: float = 0.3
    scale_max: float = 0.8
    scale_optimum: float = 0.65
    scale_penalty: float = 4.0  # logit lost per squared scale unit away from the optimum
    contrast: float = 0.6  # logit per unit of product/background colour distance (0..1)
    style_sd: float = 0.2  # main effect per background style ~ N(0, sd)
    seg_style_sd: float = 0.4  # segment × style ~ N(0, sd): backgrounds segments prefer
    broken_effects: tuple[tuple[str, float], ...] = (("missing", -2.0), ("cutoff", -1.2),
                                                     ("low_contrast", -1.0), ("bg_mismatch", -0.8))
    seed_stream: int = 4

    def validate(self) -> None:
        from core.errors import ConfigError

        if not 16 <= self.size <= 256:
            raise ConfigError("image size must be in [16, 256]")
        if not 0.0 <= self.broken_share <= 1.0 or not 0.0 <= self.review_share <= 1.0:
            raise ConfigError("broken_share and review_share must be in [0, 1]")
        if not 0.05 <= self.scale_min <= self.scale_max <= 1.0:
            raise ConfigError("need 0.05 <= scale_min <= scale_max <= 1")
        if {k for k, _ in self.broken_effects} != set(BROKEN_KINDS):
            raise ConfigError(f"broken_effects must name {BROKEN_KINDS}")


@dataclass(frozen=True)
class Product:
    """What an ad sells, as a picture: a shape and a colour."""

    shape: str
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class ImageSpec:
    """Everything :func:`render` needs (plain data: it travels in events as JSON)."""

    shape: str
    product_colour: tuple[int, int, int]
    scale: float  # product height as a share of the image
    cx: float  # product centre, share of the width / height
    cy: float
    style: str
    bg: tuple[int, int, int]  # scene colour
    bg2: tuple[int, int, int]  # second colour (gradient end, stripes, spot)
    broken: str = ""  # "" or one of BROKEN_KINDS
    noise_seed: int = 0

    @property
    def label(self) -> str:
        return self.broken or "available"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("product_colour", "bg", "bg2"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSpec":
        kw = dict(d)
        for k in ("product_colour", "bg", "bg2"):
            kw[k] = tuple(int(x) for x in kw[k])
        return cls(**kw)


def colour_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


# --------------------------------------------------------------------------- rendering


def shape_mask(shape: str, size: int, scale: float, cx: float, cy: float) -> np.ndarray:
    """Boolean ``size × size`` mask of the product: coordinates relative to the centre, in units of
    half the product height."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    half = max(scale * size / 2.0, 1.0)
    x = (xs - cx * size) / half
    y = (ys - cy * size) / half
    if shape == "shoe":  # a sole and an upper
        m = ((x / 1.0) ** 2 + ((y - 0.45) / 0.4) ** 2 <= 1.0) | ((x > -0.9) & (x < 0.0) & (y > -0.9) & (y < 0.6))
    elif shape == "screen":  # a display on a stand
        m = ((np.abs(x) < 0.95) & (y > -0.9) & (y < 0.45)) | ((np.abs(x) < 0.15) & (y >= 0.45) & (y < 0.8)) \
            | ((np.abs(x) < 0.5) & (y >= 0.8) & (y < 0.95))
    elif shape == "house":  # walls and a roof
        m = ((np.abs(x) < 0.75) & (y > -0.1) & (y < 0.95)) | ((y <= -0.1) & (y > -0.95) & (np.abs(x) < (y + 0.95)))
    elif shape == "tent":  # a triangle
        m = (y > -0.95) & (y < 0.95) & (np.abs(x) < (y + 0.95) * 0.55)
    elif shape == "bottle":  # a body and a cap
        m = ((np.abs(x) < 0.4) & (y > -0.35) & (y < 0.95)) | ((np.abs(x) < 0.18) & (y > -0.95) & (y <= -0.35))
    elif shape == "pot":  # a bowl with handles
        m = ((x / 0.8) ** 2 + (y / 0.75) ** 2 <= 1.0) & (y > -0.3) | ((np.abs(x) > 0.8) & (np.abs(x) < 1.0)
                                                                       & (np.abs(y) < 0.12))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _background(spec: ImageSpec, size: int) -> np.ndarray:
    a = np.asarray(spec.bg, dtype=np.float32)
    b = np.asarray(spec.bg2, dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if spec.style == "plain":
        w = np.zeros((size, size), dtype=np.float32)
    elif spec.style == "gradient":
        w = ys
    elif spec.style == "stripes":
        w = ((np.floor(xs * size / 4) % 2) * 0.6).astype(np.float32)
    elif spec.style == "spot":
        w = np.clip(1.0 - np.hypot(xs - 0.3, ys - 0.3) * 1.6, 0, 1)
    else:
        raise ValueError(f"unknown style {spec.style!r}")
    return a[None, None, :] * (1 - w[..., None]) + b[None, None, :] * w[..., None]


def render(spec: ImageSpec, size: int = 32) -> np.ndarray:
    """The creative as ``size × size × 3`` uint8."""
    img = _background(spec, size)
    if spec.broken != "missing":
        m = shape_mask(spec.shape, size, spec.scale, spec.cx, spec.cy)
        img[m] = np.asarray(spec.product_colour, dtype=np.float32)
    rng = np.random.default_rng(spec.noise_seed)
    img = img + rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_product(product: Product, size: int = 32) -> np.ndarray:
    """The clean product, centred, on white (the reference image of a product)."""
    img = np.full((size, size, 3), 255.0, dtype=np.float32)
    img[shape_mask(product.shape, size, 0.7, 0.5, 0.5)] = np.asarray(product.colour, dtype=np.float32)
    return img.astype(np.uint8)


def to_png(img: np.ndarray) -> str:
    """A uint8 image as base64 PNG text (what catalogue events carry)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def from_png(text: str, size: int | None = None) -> np.ndarray:
    """Base64 PNG text -> RGB uint8 (resized to ``size`` when given). Raises ValueError on garbage."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=True)
        im = Image.open(io.BytesIO(raw))
        im = im.convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a base64 PNG image: {e}") from None
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------- drawing specs


def _jitter(rng: np.random.Generator, c: Sequence[int], amount: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(c) + rng.integers(-amount, amount + 1, 3), 0, 255))  # type: ignore


def draw_product(rng: np.random.Generator, shape: str, scene: Sequence[int]) -> Product:
    """A product colour that stands out from its category's scene."""
    for _ in range(50):
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        if colour_distance(colour, scene) > 110:
            return Product(shape, colour)  # type: ignore[arg-type]
    return Product(shape, tuple(255 - int(v) for v in scene))  # type: ignore[arg-type]


def draw_spec(rng: np.random.Generator, product: Product, scene: Sequence[int], other_scenes: Sequence[Sequence[int]],
              cfg: ImageConfig, broken: str = "", style: str | None = None) -> ImageSpec:
    """One creative of ``product``: a background of its category's ``scene`` (jittered) in ``style``
    (random when None), a scale and position; ``broken`` makes it one of :data:`BROKEN_KINDS`."""
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    scale = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    margin = scale / 2
    cx = float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5
    cy = float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5
    bg_scene = scene
    colour = product.colour
    if broken == "bg_mismatch" and other_scenes:
        far = [s for s in other_scenes if colour_distance(s, scene) > 90] or list(other_scenes)
        bg_scene = far[int(rng.integers(len(far)))]
        if colour_distance(colour, bg_scene) < 90:  # keep the product visible: only the scene is wrong
            bg_scene = max(far, key=lambda s: colour_distance(s, colour))
    bg = _jitter(rng, bg_scene, 18)
    bg2 = _jitter(rng, tuple(int(v) for v in np.clip(np.asarray(bg) + rng.integers(-60, 61, 3), 0, 255)), 0)
    if broken == "cutoff":  # at least 30 % of the product outside the frame
        scale = max(scale, 0.5)
        whole = max(int(shape_mask(product.shape, cfg.size, scale, 0.5, 0.5).sum()), 1)
        for _ in range(20):
            side = int(rng.integers(4))
            off = float(rng.uniform(-0.08, 0.08))
            x, y = [(off, cy), (1 - off, cy), (cx, off), (cx, 1 - off)][side]
            if shape_mask(product.shape, cfg.size, scale, x, y).sum() <= 0.7 * whole:
                break
        cx, cy = x, y
    elif broken == "low_contrast":
        colour = _jitter(rng, bg, 10)
        bg2 = _jitter(rng, bg, 10)
    elif broken == "":
        while colour_distance(colour, bg) < 70 or colour_distance(colour, bg2) < 70:
            bg2 = _jitter(rng, bg, 10)
            if colour_distance(colour, bg) < 70:
                bg = _jitter(rng, bg_scene, 18)
                if colour_distance(colour, bg) < 70:
                    colour = tuple(255 - v for v in bg)  # type: ignore[assignment]
    return ImageSpec(product.shape, colour, round(scale, 4), round(cx, 4), round(cy, 4), style, bg, bg2, broken,
                     int(rng.integers(2**31)))


class ImageEffects:
    """The ground-truth image effects of one world (drawn once from ``rng``)."""

    def __init__(self, cfg: ImageConfig, n_segments: int, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.style = {s: float(v) for s, v in zip(STYLES, rng.normal(0.0, cfg.style_sd, len(STYLES)))}
        self.seg_style = [{s: float(v) for s, v in zip(STYLES, row)}
                          for row in rng.normal(0.0, cfg.seg_style_sd, (n_segments, len(STYLES)))]
        self.broken = dict(cfg.broken_effects)

    def main(self, spec: ImageSpec) -> float:
        cfg = self.cfg
        v = -cfg.scale_penalty * (spec.scale - cfg.scale_optimum) ** 2 + self.style[spec.style]
        v += cfg.contrast * min(colour_distance(spec.product_colour, spec.bg) / 255.0, 1.0)
        if spec.broken:
            v += self.broken[spec.broken]
        return v

    def personal(self, segment: int, spec: ImageSpec) -> float:
        return self.seg_style[segment][spec.style]

    def preferred_style(self, segment: int) -> str:
        row = self.seg_style[segment]
        return max(STYLES, key=lambda s: row[s] + self.style[s])

    def summary(self) -> dict[str, Any]:
        return {"style": {k: round(v, 3) for k, v in self.style.items()},
                "seg_style": [{k: round(v, 3) for k, v in r.items()} for r in self.seg_style],
                "broken": self.broken}


@dataclass
class CreativeImage:
    """A rendered creative with what the gate and the reward model need (an event's payload)."""

    creative_id: str
    ad_id: str
    category: str
    image: np.ndarray
    product_image: np.ndarray
    spec: ImageSpec | None = None
    features: dict[str, Any] = field(default_factory=dict)
