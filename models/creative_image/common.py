"""What the creative-image models share: catalogue records -> arrays, pair features, text tokens."""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from core.images import from_png

TEXT_DIM = 32


def image_of(record: Mapping[str, Any], key: str, size: int) -> np.ndarray | None:
    """``record[key]`` as a uint8 ``size × size × 3`` array (an array, or base64 PNG text); None when absent."""
    v = record.get(key)
    if v is None or (isinstance(v, str) and not v):
        return None
    if isinstance(v, str):
        return from_png(v, size)
    a = np.asarray(v)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{key}: expected an image [H, W, 3], got shape {a.shape}")
    if a.shape[:2] != (size, size):
        from PIL import Image

        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
    return a.astype(np.uint8)


def top_of(category: Any) -> str:
    c = "" if category is None else str(category)
    return c.split("/", 1)[0]


def product_colour(products: np.ndarray) -> np.ndarray:
    """The product's colour in each reference image (median of the non-white pixels) ``[N, 3]`` in 0..1."""
    x = products.astype(np.float32) / 255.0
    out = np.zeros((len(x), 3), dtype=np.float32)
    for i, p in enumerate(x):
        m = np.linalg.norm(p - 1.0, axis=-1) > 0.08
        out[i] = np.median(p[m], 0) if m.any() else np.median(p.reshape(-1, 3), 0)
    return out


def pair_features(creatives: np.ndarray, products: np.ndarray) -> np.ndarray:
    """The creative judged against its product (RFNet's key idea, with cheap stand-ins for saliency):
    the share of pixels of the product's colour and how it compares with the reference, how much of
    it touches the frame, the product-vs-background colour distance, the background colour. ``[N, 13]``."""
    x = creatives.astype(np.float32) / 255.0
    ref = products.astype(np.float32) / 255.0
    cp = product_colour(products)
    n, h, w, _ = x.shape
    dist = np.linalg.norm(x - cp[:, None, None, :], axis=-1)
    mask = dist < 0.16
    area = mask.mean((1, 2))
    ref_area = (np.linalg.norm(ref - 1.0, axis=-1) > 0.08).mean((1, 2))
    b = max(1, h // 16)
    band = np.zeros((h, w), dtype=bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    on_border = (mask & band[None]).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    border_cov = (mask & band[None]).sum((1, 2)) / band.sum()
    bg = np.where(mask[..., None], 0.0, x).sum((1, 2)) / np.maximum((~mask).sum((1, 2)), 1)[:, None]
    contrast = np.linalg.norm(bg - cp, axis=1)
    near = (dist < 0.3).mean((1, 2))
    scalars = np.stack([area, area / np.maximum(ref_area, 1e-3), on_border, border_cov, contrast, near,
                        np.minimum(area, 0.02) * 50], 1)
    return np.concatenate([scalars, bg, bg - cp], 1).astype(np.float32)


def text_tokens(record: Mapping[str, Any]) -> list[str]:
    """Text-like tokens of a creative: its title words and content attributes (``cr_*``)."""
    feats = record.get("features") if isinstance(record.get("features"), Mapping) else {}
    toks = [f"w={t}" for t in str(feats.get("title") or record.get("title") or "").lower().split()]
    for k, v in sorted(feats.items()):
        if k.startswith("cr_") and v is not None and k != "cr_text_len":
            toks.append(f"{k}={v}")
    return toks


def text_features(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Hashed bag of :func:`text_tokens` (``TEXT_DIM``) plus the text length (``cr_text_len`` / 16)."""
    out = np.zeros((len(records), TEXT_DIM + 1), dtype=np.float32)
    for i, r in enumerate(records):
        for t in text_tokens(r):
            out[i, zlib.crc32(t.encode()) % TEXT_DIM] += 1.0
        feats = r.get("features") if isinstance(r.get("features"), Mapping) else {}
        try:
            out[i, TEXT_DIM] = float(feats.get("cr_text_len") or 0.0) / 16.0
        except (TypeError, ValueError):
            pass
    return out


class Standardiser:
    """Mean/sd of features, fitted on training data, stored in the model state."""

    def __init__(self, dim: int) -> None:
        self.mean = np.zeros(dim, dtype=np.float32)
        self.sd = np.ones(dim, dtype=np.float32)

    def fit(self, x: np.ndarray) -> None:
        if len(x):
            self.mean = x.mean(0).astype(np.float32)
            self.sd = np.maximum(x.std(0), 1e-3).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.sd).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd}

    def load(self, s: Mapping[str, Any]) -> None:
        self.mean = np.asarray(s["mean"], dtype=np.float32)
        self.sd = np.asarray(s["sd"], dtype=np.float32)
