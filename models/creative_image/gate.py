"""The availability gate (RFNet's idea, CPU-sized): is a creative fit to be served? (pure)

RFNet judges a generated creative *against the clean product image and the title* and classifies it
into 5 classes (available + 4 failure kinds). Here, as a :class:`~models.stream_model.StreamModel`
named ``creative-gate`` that learns from the review labels on the ``creatives`` topic:

- input per creative: ``image`` and ``product_image`` (arrays or base64 PNG), ``category``;
- features: the image encoder of both images and their difference, :func:`pair_features` (the
  product's colour found in the creative, touching the frame, its contrast, the background colour)
  and an embedding of the top category (which scenes fit which category);
- network: an MLP over the standardised features -> 5 classes (``core.images.LABELS``), softmax CE;
- ``learn(records)``: reviewed ``creative_change`` records join a replay buffer (reservoir, at most
  ``buffer`` creatives) and the network trains ``epochs`` passes over the buffer;
- ``score(records)``: on the window's reviewed creatives, precision and recall of *broken* (a
  creative the gate rejects that review calls broken is a true positive), F1, accuracy;
- ``predict(inputs)``: P(available) per creative; :meth:`verdicts` -> ``pass`` when P >= ``tau``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.images import LABELS
from models.creative_image.common import Standardiser, image_of, pair_features, top_of
from models.creative_image.encoder import encoder_from_state, make_encoder
from models.ctr.hashing import IdMapper
from models.stream_model import Criterion, Gate

GATE_GATE = Gate.of(Criterion("broken_f1", higher_is_better=True, margin=0.02, label="broken-creative F1"))


@dataclass
class GateConfig:
    encoder: str = "classical"  # classical | cnn
    size: int = 32
    hidden: int = 64
    cat_dim: int = 8
    lr: float = 3e-3
    epochs: int = 30
    buffer: int = 2000  # reviewed creatives kept for replay (reservoir)
    tau: float = 0.5  # pass when P(available) >= tau
    use_product: bool = True  # False: the creative alone (RFNet's ablation without the product image)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GateConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _reviewed(records: Sequence[Mapping[str, Any]], size: int) -> list[Mapping[str, Any]]:
    """Reviewed records whose two images decode (one broken file never stops a window)."""
    out = []
    for r in records:
        if r.get("review") not in LABELS or r.get("image") is None or r.get("product_image") is None:
            continue
        try:
            img, prod = image_of(r, "image", size), image_of(r, "product_image", size)
        except ValueError:
            continue
        if img is not None and prod is not None:
            out.append({**r, "image": img, "product_image": prod})
    return out


class AvailabilityGate:
    """See the module docstring."""

    name = "creative-gate"
    gate = GATE_GATE
    thread_safe = True

    def __init__(self, config: GateConfig | None = None, name: str = "creative-gate") -> None:
        self.config = cfg = config or GateConfig()
        self.name = name
        torch.manual_seed(cfg.seed)
        self._rng = np.random.default_rng(cfg.seed)
        self.encoder = make_encoder(cfg.encoder, cfg.size)
        self.cats = IdMapper(256)
        self.in_dim = 3 * self.encoder.dim + 13
        self.std = Standardiser(self.in_dim)
        self.cat_emb = nn.Embedding(256, cfg.cat_dim)
        self.net = nn.Sequential(nn.Linear(self.in_dim + cfg.cat_dim, cfg.hidden), nn.ReLU(),
                                 nn.Linear(cfg.hidden, len(LABELS)))
        self.opt = torch.optim.Adam([*self.net.parameters(), *self.cat_emb.parameters()], lr=cfg.lr)
        self.buf_images = np.zeros((0, cfg.size, cfg.size, 3), dtype=np.uint8)
        self.buf_products = np.zeros((0, cfg.size, cfg.size, 3), dtype=np.uint8)
        self.buf_labels = np.zeros(0, dtype=np.int64)
        self.buf_cats: list[str] = []
        self.seen = 0  # reviewed creatives offered to the buffer
        self.trained = False

    # ---- features ----------------------------------------------------------------------------
    def arrays(self, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        size = self.config.size
        imgs, prods, cats = [], [], []
        for r in records:
            img, prod = image_of(r, "image", size), image_of(r, "product_image", size)
            if img is None or prod is None:
                raise ValueError(f"creative {r.get('creative_id')!r} has no image or product image")
            imgs.append(img)
            prods.append(prod)
            cats.append(top_of(r.get("category")))
        return (np.stack(imgs) if imgs else self.buf_images[:0], np.stack(prods) if prods else self.buf_products[:0],
                cats)

    def features(self, images: np.ndarray, products: np.ndarray) -> np.ndarray:
        a = self.encoder.encode(images)
        if not self.config.use_product:
            z = np.zeros((len(a), self.in_dim - a.shape[1]), dtype=np.float32)
            return np.concatenate([a, z], 1)
        b = self.encoder.encode(products)
        return np.concatenate([a, b, a - b, pair_features(images, products)], 1)

    def _logits(self, x: np.ndarray, cats: list[str], observe: bool = False) -> torch.Tensor:
        vals = np.array(cats, dtype=object)
        rows = self.cats.observe(vals, np.zeros(len(vals)))[0] if observe else self.cats.lookup(vals)
        z = torch.as_tensor(self.std(x))
        return self.net(torch.cat([z, self.cat_emb(torch.as_tensor(rows))], 1))

    # ---- StreamModel -------------------------------------------------------------------------
    def _add_to_buffer(self, images: np.ndarray, products: np.ndarray, labels: np.ndarray, cats: list[str]) -> None:
        cap = self.config.buffer
        for i in range(len(labels)):
            self.seen += 1
            if len(self.buf_labels) < cap:
                self.buf_images = np.concatenate([self.buf_images, images[i:i + 1]])
                self.buf_products = np.concatenate([self.buf_products, products[i:i + 1]])
                self.buf_labels = np.append(self.buf_labels, labels[i])
                self.buf_cats.append(cats[i])
            else:
                j = int(self._rng.integers(self.seen))
                if j < cap:
                    self.buf_images[j], self.buf_products[j], self.buf_labels[j] = images[i], products[i], labels[i]
                    self.buf_cats[j] = cats[i]

    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        rev = _reviewed(records, self.config.size)
        if rev:
            imgs, prods, cats = self.arrays(rev)
            labels = np.array([LABELS.index(r["review"]) for r in rev], dtype=np.int64)
            self._add_to_buffer(imgs, prods, labels, cats)
        if len(self.buf_labels) == 0:
            return {"examples": 0, "buffer": 0, "loss": float("nan")}
        cfg = self.config
        if cfg.encoder == "cnn":
            self.encoder.fit(self.buf_images, self.buf_labels, len(LABELS), epochs=max(5, cfg.epochs // 3),
                             seed=cfg.seed + self.seen)
        x = self.features(self.buf_images, self.buf_products)
        self.std.fit(x)
        y = torch.as_tensor(self.buf_labels)
        # classes weighted by inverse frequency: broken kinds are rare
        freq = np.bincount(self.buf_labels, minlength=len(LABELS)).astype(np.float32)
        wts = torch.as_tensor(np.where(freq > 0, freq.sum() / np.maximum(freq, 1) / len(LABELS), 0.0), dtype=torch.float32)
        self.net.train()
        losses = []
        for _ in range(cfg.epochs):
            order = self._rng.permutation(len(y))
            for lo in range(0, len(order), 128):
                idx = order[lo:lo + 128]
                logits = self._logits(x[idx], [self.buf_cats[i] for i in idx], observe=True)
                loss = F.cross_entropy(logits, y[idx], weight=wts)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
        self.net.eval()
        self.trained = True
        return {"examples": len(rev), "buffer": int(len(self.buf_labels)), "loss": float(np.mean(losses[-10:]))}

    @torch.no_grad()
    def proba(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Class probabilities ``[N, 5]`` (columns in ``core.images.LABELS`` order)."""
        if not records:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        if not self.trained:
            raise ValueError("the availability gate has not been trained")
        imgs, prods, cats = self.arrays(records)
        self.net.eval()
        return torch.softmax(self._logits(self.features(imgs, prods), cats), 1).numpy()

    def predict(self, inputs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """P(available) per creative."""
        return self.proba(list(inputs))[:, 0]

    def verdicts(self, inputs: Sequence[Mapping[str, Any]]) -> list[tuple[str, float]]:
        p = self.predict(inputs)
        return [("pass" if float(x) >= self.config.tau else "fail", float(x)) for x in p]

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        rev = _reviewed(records, self.config.size)
        if not rev or not self.trained:
            return {"broken_f1": float("nan"), "broken_precision": float("nan"), "broken_recall": float("nan"),
                    "accuracy": float("nan"), "examples": len(rev)}
        return gate_metrics(self.proba(rev), [r["review"] for r in rev], self.config.tau)

    # ---- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "name": self.name, "net": dict(self.net.state_dict()),
                "cat_emb": dict(self.cat_emb.state_dict()), "cats": self.cats.state_dict(), "std": self.std.state(),
                "encoder": self.encoder.state(), "opt": self.opt.state_dict(), "buf_images": self.buf_images,
                "buf_products": self.buf_products, "buf_labels": self.buf_labels, "buf_cats": list(self.buf_cats),
                "seen": self.seen, "trained": self.trained}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "AvailabilityGate":
        if not isinstance(state, dict) or "net" not in state or "config" not in state:
            raise ValueError("not an availability gate state")
        g = cls(GateConfig.from_dict(state["config"]), name=str(state.get("name", "creative-gate")))
        g.net.load_state_dict(state["net"])
        g.cat_emb.load_state_dict(state["cat_emb"])
        g.cats.load_state_dict(state["cats"])
        g.std.load(state["std"])
        g.encoder = encoder_from_state(state["encoder"])
        g.opt.load_state_dict(state["opt"])
        g.buf_images = np.asarray(state["buf_images"], dtype=np.uint8)
        g.buf_products = np.asarray(state["buf_products"], dtype=np.uint8)
        g.buf_labels = np.asarray(state["buf_labels"], dtype=np.int64)
        g.buf_cats = [str(c) for c in state["buf_cats"]]
        g.seen, g.trained = int(state["seen"]), bool(state["trained"])
        g.net.eval()
        return g

    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        """Back to the serving version's weights; the replay buffer of reviewed creatives is kept."""
        other = AvailabilityGate.from_state(states[self.name])
        for k in ("net", "cat_emb", "cats", "std", "encoder", "opt", "trained"):
            setattr(self, k, getattr(other, k))

    def fingerprint(self) -> dict[str, Any]:
        c = self.config.to_dict()
        return {k: c[k] for k in ("encoder", "size", "hidden", "cat_dim", "use_product")}

    def meta(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "buffer": int(len(self.buf_labels))}

    def warm(self) -> None:
        if self.trained:
            blank = np.full((self.config.size, self.config.size, 3), 200, dtype=np.uint8)
            p = self.predict([{"image": blank, "product_image": blank, "category": "warm"}])
            if not np.all(np.isfinite(p)):
                raise ValueError("the gate predicts non-finite values")


def gate_metrics(proba: np.ndarray, reviews: Sequence[str], tau: float) -> dict[str, Any]:
    """Broken-creative precision / recall / F1 at ``tau`` (rejected = P(available) < tau), accuracy
    of the 5 classes and the recall per broken kind."""
    truth_broken = np.array([r != "available" for r in reviews])
    rejected = proba[:, 0] < tau
    tp = int((rejected & truth_broken).sum())
    prec = tp / rejected.sum() if rejected.any() else float("nan")
    rec = tp / truth_broken.sum() if truth_broken.any() else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if np.isfinite(prec) and np.isfinite(rec) and prec + rec > 0 else float("nan")
    pred = proba.argmax(1)
    y = np.array([LABELS.index(r) for r in reviews])
    per_kind = {k: float(rejected[np.array(reviews) == k].mean()) for k in LABELS[1:] if (np.array(reviews) == k).any()}
    return {"broken_f1": float(f1), "broken_precision": float(prec), "broken_recall": float(rec),
            "accuracy": float((pred == y).mean()), "examples": len(reviews), "broken": int(truth_broken.sum()),
            "rejected": int(rejected.sum()), "recall_by_kind": per_kind,
            "false_reject_rate": float(rejected[~truth_broken].mean()) if (~truth_broken).any() else float("nan")}
