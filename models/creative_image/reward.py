"""A pairwise CTR reward model for creatives (CAIG's idea, CPU-sized): which of two creatives of the
same product gets more clicks? (pure)

A :class:`~models.stream_model.StreamModel` named ``creative-reward`` that learns from two topics'
records, told apart by their ``type``:

- ``creative_change`` records (the catalogue) give each creative its features: the image encoder of
  the picture, hashed title / content tokens (``cr_*``) and the category;
- ``example`` records count impressions and clicks per creative.

Pairs: two creatives of the same ad, each with at least ``min_impressions``; the soft label is
``P(ctr_A > ctr_B)`` under their Beta(1 + clicks, 1 + non-clicks) posteriors (normal
approximation), kept when ``|y − 0.5| >= min_margin`` (this replaces CAIG's 5–20 % CTR-ratio band,
which is within noise at JD's impression counts). At most ``pairs_per_ad`` pairs per ad.

Network: a shared tower ``z = MLP(features)``, a scalar score ``s = w·z`` and a pointwise head
``ĉtr = σ(w'·z + b)``. ``P(A ≻ B) = σ(s_A − s_B)`` (Bradley–Terry: antisymmetric, ranks N candidates
in O(N)). Loss, as CAIG's CE + 0.5 · point loss: ``BCE(σ(s_A − s_B), y_soft) + 0.5 · BCE(ĉtr, clicks /
impressions)`` (the latter weighted by impressions).

``score(records)``: pairs from the window's own counts only (clicks the model has not learnt),
``pair_accuracy`` weighted by confidence ``|2y − 1|``. ``predict(inputs)``: the score ``s`` per
creative (inputs as catalogue records, or ``{"creative_id"}`` of a creative the model has seen).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.creative_image.common import Standardiser, image_of, text_features
from models.creative_image.encoder import encoder_from_state, make_encoder
from models.stream_model import Criterion, Gate

REWARD_GATE = Gate.of(Criterion("pair_accuracy", higher_is_better=True, margin=0.03, label="pairwise accuracy"))


@dataclass
class RewardConfig:
    encoder: str = "classical"
    size: int = 32
    hidden: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-2  # AdamW: a few hundred pairs, ~130 features
    epochs: int = 40
    min_impressions: int = 30
    min_margin: float = 0.1
    pairs_per_ad: int = 10
    point_weight: float = 0.5
    use_image: bool = True
    use_text: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RewardConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def beta_win_prob(c_a: float, n_a: float, c_b: float, n_b: float) -> float:
    """P(ctr_A > ctr_B) for Beta(1 + c, 1 + n − c) posteriors (normal approximation)."""
    def mv(c: float, n: float) -> tuple[float, float]:
        a, b = 1.0 + c, 1.0 + max(n - c, 0.0)
        return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    (ma, va), (mb, vb) = mv(c_a, n_a), mv(c_b, n_b)
    return 0.5 * (1.0 + math.erf((ma - mb) / math.sqrt(2.0 * (va + vb) + 1e-18)))


def mine_pairs(counts: Mapping[str, tuple[float, float]], ad_of: Mapping[str, str], min_impressions: int,
               min_margin: float, per_ad: int, rng: np.random.Generator | None = None) -> list[tuple[str, str, float]]:
    """``(creative_a, creative_b, P(a beats b))`` for creatives of the same ad (see the module docstring)."""
    by_ad: dict[str, list[str]] = defaultdict(list)
    for cid, (imps, _) in counts.items():
        if imps >= min_impressions and cid in ad_of:
            by_ad[ad_of[cid]].append(cid)
    out = []
    for ad in sorted(by_ad):
        crs = sorted(by_ad[ad])
        pairs = []
        for i in range(len(crs)):
            for j in range(i + 1, len(crs)):
                (na, ca), (nb, cb) = counts[crs[i]], counts[crs[j]]
                y = beta_win_prob(ca, na, cb, nb)
                if abs(y - 0.5) >= min_margin:
                    pairs.append((crs[i], crs[j], y))
        if len(pairs) > per_ad:
            pairs.sort(key=lambda p: -abs(p[2] - 0.5))
            pairs = pairs[:per_ad]
        out += pairs
    return out


class CreativeRewardModel:
    """See the module docstring."""

    name = "creative-reward"
    gate = REWARD_GATE
    thread_safe = True

    def __init__(self, config: RewardConfig | None = None, name: str = "creative-reward") -> None:
        self.config = cfg = config or RewardConfig()
        self.name = name
        torch.manual_seed(cfg.seed)
        self._rng = np.random.default_rng(cfg.seed)
        self.encoder = make_encoder(cfg.encoder, cfg.size)
        self.in_dim = self.encoder.dim + text_features([{}]).shape[1]
        self.std = Standardiser(self.in_dim)
        self.tower = nn.Sequential(nn.Linear(self.in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden // 2),
                                   nn.ReLU())
        self.score_head = nn.Linear(cfg.hidden // 2, 1, bias=False)
        self.point_head = nn.Linear(cfg.hidden // 2, 1)
        params = [*self.tower.parameters(), *self.score_head.parameters(), *self.point_head.parameters()]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.feats: dict[str, np.ndarray] = {}  # creative -> raw features
        self.ad_of: dict[str, str] = {}
        self.counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # creative -> [impressions, clicks]
        self.trained = False
        self._lock = threading.RLock()  # the catalogue may arrive from another thread (observe_catalogue)

    # ---- features ----------------------------------------------------------------------------
    def raw_features(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        imgs = []
        for r in records:
            img = image_of(r, "image", self.config.size)
            if img is None:
                raise ValueError(f"creative {r.get('creative_id')!r} has no image")
            imgs.append(img)
        x_img = self.encoder.encode(np.stack(imgs)) if imgs else np.zeros((0, self.encoder.dim), np.float32)
        x_txt = text_features(records)
        if not self.config.use_image:
            x_img = np.zeros_like(x_img)
        if not self.config.use_text:
            x_txt = np.zeros_like(x_txt)
        return np.concatenate([x_img, x_txt], 1).astype(np.float32)

    def _tower(self, x: np.ndarray) -> torch.Tensor:
        return self.tower(torch.as_tensor(self.std(x)))

    # ---- StreamModel -------------------------------------------------------------------------
    def observe_catalogue(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Register the features of catalogue records (``creative_change`` ``add`` with an image); safe
        to call from a thread that follows the ``creatives`` topic while the stream worker trains."""
        cat = [r for r in records if r.get("type", "creative_change") == "creative_change"
               and r.get("action") == "add" and r.get("image")]
        if not cat:
            return 0
        x = self.raw_features(cat)
        with self._lock:
            for r, row in zip(cat, x):
                self.feats[str(r["creative_id"])] = row
                self.ad_of[str(r["creative_id"])] = str(r["ad_id"])
        return len(cat)

    def _fold(self, records: Sequence[Mapping[str, Any]], counts: dict[str, list[float]]) -> None:
        self.observe_catalogue([r for r in records if r.get("type") == "creative_change"])
        for r in records:
            if r.get("type", "example") == "example" and r.get("creative_id"):
                c = counts[str(r["creative_id"])]
                c[0] += 1.0
                c[1] += float(int(r.get("clicked") or 0) > 0)

    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            return self._learn(records)

    def _learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        self._fold(records, self.counts)
        cfg = self.config
        known = {c: tuple(v) for c, v in self.counts.items() if c in self.feats}
        pairs = mine_pairs(known, self.ad_of, cfg.min_impressions, cfg.min_margin, cfg.pairs_per_ad, self._rng)
        stats = {"pairs": len(pairs), "creatives": len(self.feats), "loss": float("nan")}
        if not pairs:
            return stats
        ids = sorted({c for a, b, _ in pairs for c in (a, b)} | {c for c in known if known[c][0] >= cfg.min_impressions})
        index = {c: i for i, c in enumerate(ids)}
        x = np.stack([self.feats[c] for c in ids])
        self.std.fit(np.stack(list(self.feats.values())))
        a = torch.as_tensor([index[p[0]] for p in pairs])
        b = torch.as_tensor([index[p[1]] for p in pairs])
        y = torch.as_tensor([p[2] for p in pairs], dtype=torch.float32)
        imps = torch.as_tensor([known[c][0] for c in ids], dtype=torch.float32)
        ctr = torch.as_tensor([known[c][1] / max(known[c][0], 1.0) for c in ids], dtype=torch.float32)
        w_point = imps / imps.mean()
        losses = []
        for _ in range(cfg.epochs):
            z = self._tower(x)
            s = self.score_head(z).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(s[a] - s[b], y)
            if cfg.point_weight > 0:
                pl = F.binary_cross_entropy_with_logits(self.point_head(z).squeeze(-1), ctr, weight=w_point)
                loss = loss + cfg.point_weight * pl
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
        self.trained = True
        stats["loss"] = float(np.mean(losses[-5:]))
        return stats

    @torch.no_grad()
    def scores_of(self, x: np.ndarray) -> np.ndarray:
        return self.score_head(self._tower(x)).squeeze(-1).numpy()

    def predict(self, inputs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Score ``s`` per creative: higher = more clicks expected among creatives of one product."""
        inputs = list(inputs)
        if not inputs:
            return np.zeros(0, dtype=np.float32)
        # a creative the model has seen keeps its features (a creative id's picture does not change):
        # only unknown creatives are decoded and encoded
        rows: list[np.ndarray | None] = [self.feats.get(str(r.get("creative_id"))) if r.get("creative_id") else None
                                         for r in inputs]
        fresh = [i for i, r in enumerate(inputs) if rows[i] is None and r.get("image") is not None
                 and not (isinstance(r.get("image"), str) and r.get("image") == "")]
        if fresh:
            x = self.raw_features([inputs[i] for i in fresh])
            for i, row in zip(fresh, x):
                rows[i] = row
        for i, r in enumerate(inputs):
            if rows[i] is None:
                row = self.feats.get(str(r.get("creative_id")))
                if row is None:
                    raise KeyError(f"creative {r.get('creative_id')!r}: no image given and not in the catalogue seen")
                rows[i] = row
        return self.scores_of(np.stack(rows))  # type: ignore[arg-type]

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in records:
            if r.get("type", "example") == "example" and r.get("creative_id"):
                c = counts[str(r["creative_id"])]
                c[0] += 1.0
                c[1] += float(int(r.get("clicked") or 0) > 0)
        cfg = self.config
        known = {c: tuple(v) for c, v in counts.items() if c in self.feats}
        pairs = mine_pairs(known, self.ad_of, max(5, cfg.min_impressions // 3), cfg.min_margin, cfg.pairs_per_ad)
        if not pairs or not self.trained:
            return {"pair_accuracy": float("nan"), "pairs": len(pairs)}
        ids = sorted({c for a, b, _ in pairs for c in (a, b)})
        s = dict(zip(ids, self.scores_of(np.stack([self.feats[c] for c in ids]))))
        w = np.array([abs(2 * y - 1) for _, _, y in pairs])
        ok = np.array([(s[a] > s[b]) == (y > 0.5) for a, b, y in pairs], dtype=float)
        return {"pair_accuracy": float((w * ok).sum() / w.sum()), "pairs": len(pairs)}

    # ---- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        ids = sorted(self.feats)
        cids = sorted(self.counts)
        return {"config": self.config.to_dict(), "name": self.name, "tower": dict(self.tower.state_dict()),
                "score_head": dict(self.score_head.state_dict()), "point_head": dict(self.point_head.state_dict()),
                "opt": self.opt.state_dict(), "std": self.std.state(), "encoder": self.encoder.state(),
                "feat_ids": ids, "feat_ads": [self.ad_of.get(c, "") for c in ids],
                "feats": np.stack([self.feats[c] for c in ids]) if ids else np.zeros((0, self.in_dim), np.float32),
                "count_ids": cids, "counts": np.array([self.counts[c] for c in cids], dtype=np.float64).reshape(-1, 2),
                "trained": self.trained}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CreativeRewardModel":
        if not isinstance(state, dict) or "tower" not in state:
            raise ValueError("not a creative reward model state")
        m = cls(RewardConfig.from_dict(state["config"]), name=str(state.get("name", "creative-reward")))
        m.tower.load_state_dict(state["tower"])
        m.score_head.load_state_dict(state["score_head"])
        m.point_head.load_state_dict(state["point_head"])
        m.opt.load_state_dict(state["opt"])
        m.std.load(state["std"])
        m.encoder = encoder_from_state(state["encoder"])
        feats = np.asarray(state["feats"], dtype=np.float32)
        m.feats = {str(c): feats[i] for i, c in enumerate(state["feat_ids"])}
        m.ad_of = {str(c): str(a) for c, a in zip(state["feat_ids"], state["feat_ads"])}
        for c, row in zip(state["count_ids"], np.asarray(state["counts"])):
            m.counts[str(c)] = [float(row[0]), float(row[1])]
        m.trained = bool(state["trained"])
        return m

    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        """Back to the serving version's weights; the catalogue features and click counts are kept
        (data the stream delivered, not something learnt)."""
        other = CreativeRewardModel.from_state(states[self.name])
        with self._lock:
            for k in ("tower", "score_head", "point_head", "opt", "std", "trained"):
                setattr(self, k, getattr(other, k))

    def fingerprint(self) -> dict[str, Any]:
        c = self.config.to_dict()
        return {k: c[k] for k in ("encoder", "size", "hidden", "use_image", "use_text")}

    def meta(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "creatives": len(self.feats)}
