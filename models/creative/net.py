"""The light creative ranker (CR): small embeddings ⊕ content ⊕ [quantised ad pCTR] → MLP → logit.

:class:`CreativeCore` is everything CR needs to train and to serve: the network, one
:class:`models.ctr.IdMapper` per field (row 0 = the shared cold row every unseen value maps to), the
numeric standardiser, and the per-ad cache of the ad ranker's pCTR (where CR+ gets its ad pCTR when
it runs in parallel with the ad ranker, ``pctr_source="cached"``).

A creative never shown maps to the cold creative-id row; ``cold_dropout`` trains that row (a share of
training rows see their creative id as unknown), so a new creative is scored from its content and
context, not from an untrained row.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from models.creative.config import JACConfig
from models.creative.quantise import PctrBucketEmbed
from models.ctr import IdMapper, RawBatch
from models.ctr.features import RunningStandardizer


def _float(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return float("nan")
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x if math.isfinite(x) else float("nan")


class CRNet(nn.Module):
    """``forward(rows [B, F], dense [B, n], p [B] | None) -> logit [B]``."""

    def __init__(self, capacities: Sequence[int], dim: int, n_numeric: int, hidden: Sequence[int],
                 bucket: PctrBucketEmbed | None) -> None:
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(c, dim) for c in capacities)
        for e in self.embs:
            nn.init.normal_(e.weight, 0.0, 0.05)
        self.bucket = bucket
        width = len(capacities) * dim + n_numeric + (bucket.emb.embedding_dim if bucket is not None else 0)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor, dense: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        parts = [e(rows[:, i]) for i, e in enumerate(self.embs)]
        parts.append(dense)
        if self.bucket is not None:
            if p is None:
                raise ValueError("this creative ranker needs an ad pCTR (it was trained jointly with the ad ranker)")
            parts.append(self.bucket(p))
        return self.mlp(torch.cat(parts, 1)).squeeze(-1)


class CreativeCore:
    """The CR network with its id mappers, standardiser and per-ad pCTR cache (see module docstring)."""

    def __init__(self, cfg: JACConfig) -> None:
        self.cfg = cfg
        self.fields = [f.name for f in cfg.cr_fields]
        self.numeric = list(cfg.cr_numeric)
        self.creative_index = self.fields.index(cfg.creative_field)
        torch.manual_seed(cfg.seed + 1)
        bucket = (PctrBucketEmbed(cfg.buckets, cfg.bucket_dim, cfg.quant_r, cfg.ste, cfg.ste_scale)
                  if cfg.joint else None)
        self.net = CRNet([f.capacity for f in cfg.cr_fields], cfg.cr_dim, len(self.numeric), cfg.cr_hidden, bucket)
        self.mappers = [IdMapper(f.capacity, f.admission, f.ttl, f.mapper) for f in cfg.cr_fields]
        self.std = RunningStandardizer(len(self.numeric))
        self.cache: dict[Any, list[float]] = {}  # ad -> [pCTR EMA, last update step]
        self.global_pctr = float("nan")
        self.step = 0

    # ---- encoding
    def encode(self, raw: RawBatch, train: bool, gen: torch.Generator | None = None,
               on_fresh=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RawBatch (with at least the CR fields and numeric columns, in ``self.numeric`` order) ->
        (rows [B, F], standardised dense [B, n]). ``train`` admits ids, updates the standardiser
        and applies cold dropout to the creative id."""
        rows = np.empty((len(raw), len(self.fields)), dtype=np.int64)
        for fi, (f, m) in enumerate(zip(self.fields, self.mappers)):
            if train:
                r, fresh = m.observe(raw.cats[f], raw.times)
                if len(fresh) and on_fresh is not None:
                    on_fresh(fi, fresh)
            else:
                r = m.lookup(raw.cats[f])
            rows[:, fi] = r
        t_rows = torch.from_numpy(rows)
        if train and self.cfg.cold_dropout > 0:
            drop = torch.rand(len(raw), generator=gen) < self.cfg.cold_dropout
            t_rows[drop, self.creative_index] = 0
        if train:
            self.std.update(raw.dense)
        return t_rows, torch.from_numpy(self.std.transform(raw.dense))

    def encode_grouped(self, context: Mapping[str, Any], ads: Mapping[str, Sequence[Any]], counts: np.ndarray,
                       creatives: Mapping[str, Sequence[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving: (rows, dense) of ``counts.sum()`` candidate rows given at three levels, each value
        looked up once at its level and broadcast: ``context`` (one value: the request), ``ads`` (one
        per ad), ``creatives`` (one per row, ads' creatives in order). A field given nowhere is
        missing (its own row). The same rows as :meth:`encode` of the flattened rows."""
        n = int(counts.sum())

        def column(f: str, dtype) -> tuple[np.ndarray, str]:
            if f in creatives:
                return np.asarray(creatives[f], dtype=dtype), "creative"
            if f in ads:
                return np.asarray(ads[f], dtype=dtype), "ad"
            return np.asarray([context.get(f)], dtype=dtype), "context"

        def spread(v: np.ndarray, level: str) -> np.ndarray:
            return v if level == "creative" else np.repeat(v, counts) if level == "ad" else np.repeat(v, n)

        rows = np.empty((n, len(self.fields)), dtype=np.int64)
        for fi, (f, m) in enumerate(zip(self.fields, self.mappers)):
            vals, level = column(f, object)
            rows[:, fi] = spread(m.lookup(vals), level)
        dense = np.empty((n, len(self.numeric)), dtype=np.float32)
        for j, f in enumerate(self.numeric):
            vals, level = column(f, object)
            dense[:, j] = spread(np.array([_float(v) for v in vals], dtype=np.float32), level)
        return torch.from_numpy(rows), torch.from_numpy(self.std.transform(dense))

    def logits_grouped(self, context: Mapping[str, Any], ads: Mapping[str, Sequence[Any]], counts: np.ndarray,
                       creatives: Mapping[str, Sequence[Any]], p_ad: np.ndarray | None) -> np.ndarray:
        rows, dense = self.encode_grouped(context, ads, counts, creatives)
        pt = None if p_ad is None else torch.as_tensor(np.repeat(np.asarray(p_ad, dtype=np.float32), counts))
        with torch.no_grad():
            return self.net(rows, dense, pt).numpy().astype(np.float64)

    def reset_rows(self, fi: int, rows: np.ndarray, opt: torch.optim.Optimizer | None) -> None:
        """A row that got a new owner starts fresh (init values, no optimizer history)."""
        w = self.net.embs[fi].weight
        r = torch.as_tensor(rows, dtype=torch.long)
        with torch.no_grad():
            w[r] = torch.randn(len(r), w.shape[1]) * 0.05
        st = opt.state.get(w) if opt is not None else None
        if st and "sum" in st:
            st["sum"][r] = 0

    # ---- the ad pCTR CR+ sees
    def update_cache(self, ads: np.ndarray, p: np.ndarray) -> None:
        """Per-ad and global EMA of the ad ranker's pCTR on training examples."""
        d = self.cfg.cache_decay
        self.step += 1
        keys = np.asarray(ads, dtype=object)
        uniq, inv = np.unique(keys.astype(str), return_inverse=True)
        sums = np.bincount(inv, weights=p)
        cnts = np.bincount(inv)
        for k, s, n in zip(uniq.tolist(), sums, cnts):
            mean, w = s / n, d ** n
            cur = self.cache.get(k)
            self.cache[k] = [mean if cur is None else w * cur[0] + (1 - w) * mean, float(self.step)]
        bm = float(p.mean())
        self.global_pctr = bm if math.isnan(self.global_pctr) else 0.99 * self.global_pctr + 0.01 * bm
        if len(self.cache) > self.cfg.cache_max:
            keep = sorted(self.cache.items(), key=lambda kv: -kv[1][1])[: self.cfg.cache_max]
            self.cache = dict(keep)

    def cached_pctr(self, ads: np.ndarray) -> np.ndarray:
        g = self.global_pctr if not math.isnan(self.global_pctr) else 0.02
        get = self.cache.get
        return np.array([(get(str(a)) or (g,))[0] for a in ads], dtype=np.float64)

    def fixed_pctr(self, n: int) -> np.ndarray:
        return np.full(n, self.global_pctr if not math.isnan(self.global_pctr) else 0.02, dtype=np.float64)

    # ---- scoring
    def logits(self, raw: RawBatch, p: np.ndarray | None) -> np.ndarray:
        rows, dense = self.encode(raw, train=False)
        pt = None if p is None else torch.as_tensor(np.asarray(p, dtype=np.float32))
        with torch.no_grad():
            return self.net(rows, dense, pt).numpy().astype(np.float64)

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "mappers": [m.state_dict() for m in self.mappers],
            "std": self.std.state_dict(),
            "cache": [[k, v[0], v[1]] for k, v in self.cache.items()],
            "global_pctr": self.global_pctr,
            "step": self.step,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.net.load_state_dict(s["net"])
        for m, ms in zip(self.mappers, s["mappers"]):
            m.load_state_dict(ms)
        self.std.load_state_dict(s["std"])
        self.cache = {str(k): [float(v), float(t)] for k, v, t in s["cache"]}
        self.global_pctr = float(s["global_pctr"])
        self.step = int(s["step"])

    def validate(self) -> list[str]:
        out = [f"non-finite values in cr.{n}" for n, t in self.net.state_dict().items()
               if t.is_floating_point() and not torch.isfinite(t).all()]
        for f, m, e in zip(self.fields, self.mappers, self.net.embs):
            out += [f"cr mapper {f}: {p}" for p in m.validate()]
            if e.weight.shape[0] != m.capacity:
                out.append(f"cr table {f} has {e.weight.shape[0]} rows, mapper capacity {m.capacity}")
        return out
