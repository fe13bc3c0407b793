"""Image encoders for creatives: ``encode(images [N, H, W, 3] uint8) -> [N, dim] float32``.

Pluggable (:func:`make_encoder` by name; a model stores its encoder's name and state):

* ``classical`` (default): weight-free, deterministic, offline on CPU: a joint RGB histogram,
  mean colours on a 4×4 grid, gradient statistics (edge energy per image side: a product cut off by
  the frame leaves strong edges on the border), centre-vs-border contrast and colour spread.
* ``cnn``: a small CNN (3 conv blocks, ~6k parameters) trained here, from scratch, on the review
  labels of the catalogue (:meth:`SmallCNNEncoder.fit`); it refuses to encode before it was
  trained (never random weights).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

GRID = 4
HIST_BINS = 3


class ImageEncoder(Protocol):
    name: str
    dim: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...


def _as_batch(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {x.shape}")
    return x.astype(np.float32) / 255.0


class ClassicalEncoder:
    """See the module docstring (``dim`` = 27 + 48 + 12 + 6 = 93)."""

    name = "classical"
    dim = HIST_BINS ** 3 + GRID * GRID * 3 + 12 + 6

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = _as_batch(images)
        n, h, w, _ = x.shape
        # joint RGB histogram (27 bins), normalised
        q = np.minimum((x * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        code = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
        hist = np.zeros((n, HIST_BINS ** 3), dtype=np.float32)
        for i in range(n):
            hist[i] = np.bincount(code[i].ravel(), minlength=HIST_BINS ** 3)
        hist /= h * w
        # mean colour per grid cell (layout: where the product is)
        gh, gw = h // GRID, w // GRID
        grid = x[:, : gh * GRID, : gw * GRID].reshape(n, GRID, gh, GRID, gw, 3).mean((2, 4)).reshape(n, -1)
        # gradients: magnitude mean/std, edge energy on each side's outer band, inner mean
        lum = x.mean(-1)
        gx = np.zeros_like(lum)
        gy = np.zeros_like(lum)
        gx[:, :, 1:-1] = lum[:, :, 2:] - lum[:, :, :-2]
        gy[:, 1:-1, :] = lum[:, 2:, :] - lum[:, :-2, :]
        mag = np.hypot(gx, gy)
        b = max(2, h // 10)
        sides = np.stack([mag[:, :b, :].mean((1, 2)), mag[:, -b:, :].mean((1, 2)), mag[:, :, :b].mean((1, 2)),
                          mag[:, :, -b:].mean((1, 2))], 1)
        # product pixels (far from the border's median colour) touching each side
        border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # [n, 4w, 3]
        bg = np.median(border, 1)  # [n, 3]
        fg = np.linalg.norm(x - bg[:, None, None, :], axis=-1) > 0.25
        touch = np.stack([fg[:, 0].mean(1), fg[:, -1].mean(1), fg[:, :, 0].mean(1), fg[:, :, -1].mean(1)], 1)
        grad = np.stack([mag.mean((1, 2)), mag.std((1, 2)), mag[:, b:-b, b:-b].mean((1, 2)), fg.mean((1, 2))], 1)
        # centre-vs-border contrast and colour spread
        c0, c1 = h // 4, h - h // 4
        centre = x[:, c0:c1, c0:c1].reshape(n, -1, 3).mean(1)
        contrast = np.linalg.norm(centre - bg, axis=1, keepdims=True)
        spread = x.reshape(n, -1, 3).std(1)
        lum_s = np.stack([lum.mean((1, 2)), lum.std((1, 2))], 1)
        out = np.concatenate([hist, grid, sides * 4, touch, grad, contrast, spread, lum_s], 1)
        return out.astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"name": self.name}


class SmallCNNEncoder:
    """A small CNN trained on review labels (see the module docstring). ``dim`` = 32."""

    name = "cnn"
    dim = 32

    def __init__(self, size: int = 32, seed: int = 0) -> None:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.trained = False

    def _tensor(self, images: np.ndarray):
        import torch

        x = _as_batch(images)
        return torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()

    def fit(self, images: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int = 30, lr: float = 3e-3,
            seed: int = 0) -> float:
        """Supervised training on (image, class) pairs with a linear head that is then dropped;
        returns the last epoch's mean loss."""
        import torch
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(seed)
        x = self._tensor(images)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        head = torch.nn.Linear(self.dim, n_classes)
        opt = torch.optim.Adam([*self.net.parameters(), *head.parameters()], lr=lr)
        self.net.train()
        last = float("nan")
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            tot = 0.0
            for lo in range(0, len(x), 64):
                idx = perm[lo:lo + 64]
                loss = F.cross_entropy(head(self.net(x[idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
            last = tot / max(len(x), 1)
        self.net.eval()
        self.trained = True
        return last

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch

        if not self.trained:
            raise ValueError("the cnn encoder has not been trained (fit it on review labels first)")
        with torch.no_grad():
            return self.net(self._tensor(images)).numpy().astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "trained": self.trained, "net": dict(self.net.state_dict())}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "SmallCNNEncoder":
        e = cls(int(s.get("size", 32)))
        e.net.load_state_dict(s["net"])
        e.net.eval()
        e.trained = bool(s.get("trained", False))
        return e


ENCODERS = ("classical", "cnn")


def make_encoder(name: str, size: int = 32) -> Any:
    if name == "classical":
        return ClassicalEncoder()
    if name == "cnn":
        return SmallCNNEncoder(size)
    raise ValueError(f"unknown image encoder {name!r}; choose from {ENCODERS}")


def encoder_from_state(s: dict[str, Any]) -> Any:
    if s.get("name") == "classical":
        return ClassicalEncoder()
    if s.get("name") == "cnn":
        return SmallCNNEncoder.from_state(s)
    raise ValueError(f"unknown image encoder state {s.get('name')!r}")
