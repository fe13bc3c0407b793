"""JAC: the ad ranker (AR) and the light creative ranker (CR) trained jointly (Peri-CR paper, §3.3).

::

    AR fields ─► models.ctr CTR network (TorchRec + DCN) ─► z_ad ─► pCTR_ad = σ(z_ad)
                                                                        │ Eq. 5 bucket, embedding,
                                                                        ▼ straight-through gradient
    CR fields (creative id, content, user, ad) ─► small embeddings ⊕ bucket embedding ─► MLP ─► z_c

    L = BCE(z_ad, y) + w · BCE(z_c, y)           (the paper does not state the loss; this is the sum)

One pass over each window in arrival order, batches of ``batch_size`` (paper: 512, Adagrad 0.05,
one epoch). The two halves are deployed separately: AR+ (``self.ar``, a ``models.ctr.CTRLearner``:
it serves on the ordinary ad ranking path) and CR+ (``self.cr``, a :class:`CreativeCore`: the
parallel creative ranker). ``mode="cr"`` trains CR alone, without the pCTR input (the paper's
independently trained CR baseline).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.creative.config import JACConfig
from models.creative.net import CreativeCore
from models.ctr import CTRConfig, CTRLearner, RawBatch, raw_from_examples


def ar_config(cfg: JACConfig) -> CTRConfig:
    """The ``models.ctr`` configuration of the ad ranker (BCE only: no Feature/Model Prior)."""
    return CTRConfig(fields=copy.deepcopy(cfg.ar_fields), numeric=list(cfg.ar_numeric), backbone=cfg.ar_backbone,
                     embedding_dim=cfg.ar_embedding_dim, hidden=tuple(cfg.ar_hidden), emb_lr=cfg.ar_emb_lr,
                     dense_lr=cfg.ar_dense_lr, seed=cfg.seed)


def columns(cfg: JACConfig) -> tuple[list[str], list[str]]:
    """Categorical and numeric names a record must provide (AR ∪ CR, order kept)."""
    cats = list(dict.fromkeys([f.name for f in cfg.cr_fields] + ([f.name for f in cfg.ar_fields] if cfg.joint else [])
                              + [cfg.ad_field]))
    nums = list(dict.fromkeys(list(cfg.cr_numeric) + (list(cfg.ar_numeric) if cfg.joint else [])))
    return cats, nums


def sub_raw(raw: RawBatch, cats: Sequence[str], nums: Sequence[str], all_nums: Sequence[str]) -> RawBatch:
    """The columns one ranker reads, in its order."""
    idx = [list(all_nums).index(n) for n in nums]
    return RawBatch({c: raw.cats[c] for c in cats}, raw.dense[:, idx], raw.labels, raw.times, raw.index)


class JACLearner:
    """Trains AR and CR jointly (or CR alone), predicts both, checkpoints everything."""

    def __init__(self, cfg: JACConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.cats, self.nums = columns(cfg)
        self.ar = CTRLearner(ar_config(cfg)) if cfg.joint else None
        self.cr = CreativeCore(cfg)
        self.cr_opt = torch.optim.Adagrad(list(self.cr.net.parameters()), lr=cfg.cr_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)
        self.examples_trained = 0
        self.batches_trained = 0

    # ---- inputs
    def to_raw(self, batch: RawBatch | Sequence[Mapping[str, Any]]) -> RawBatch:
        if isinstance(batch, RawBatch):
            return batch
        return raw_from_examples(batch, self.cats, self.nums)

    def ar_raw(self, raw: RawBatch) -> RawBatch:
        assert self.ar is not None
        return sub_raw(raw, self.ar.fields, self.ar.config.numeric, self.nums)

    def cr_raw(self, raw: RawBatch) -> RawBatch:
        return sub_raw(raw, self.cr.fields, self.cr.numeric, self.nums)

    # ---- training
    def train_batch(self, raw: RawBatch) -> dict[str, float]:
        cfg, y = self.cfg, torch.from_numpy(np.ascontiguousarray(raw.labels, dtype=np.float32))
        rows, dense = self.cr.encode(self.cr_raw(raw), train=True, gen=self.gen,
                                     on_fresh=lambda fi, r: self.cr.reset_rows(fi, r, self.cr_opt))
        out: dict[str, float] = {}
        if self.ar is not None:
            inp, _ = self.ar.encode(self.ar_raw(raw), train=True)
            z_ad = self.ar.net(inp)[0]
            p = torch.sigmoid(z_ad)
            z_c = self.cr.net(rows, dense, p if cfg.ste != "none" else p.detach())
            l_ad = F.binary_cross_entropy_with_logits(z_ad, y)
            l_cr = F.binary_cross_entropy_with_logits(z_c, y)
            loss = l_ad + cfg.cr_loss_weight * l_cr
            self.ar.dense_opt.zero_grad(set_to_none=True)
            self.cr_opt.zero_grad(set_to_none=True)
            loss.backward()  # AR's fused embedding optimizer steps inside backward()
            self.ar.dense_opt.step()
            self.cr_opt.step()
            self.cr.update_cache(raw.cats[cfg.ad_field], p.detach().numpy().astype(np.float64))
            out = {"loss_ar": float(l_ad.detach()), "loss_cr": float(l_cr.detach())}
        else:
            z_c = self.cr.net(rows, dense, None)
            l_cr = F.binary_cross_entropy_with_logits(z_c, y)
            self.cr_opt.zero_grad(set_to_none=True)
            l_cr.backward()
            self.cr_opt.step()
            out = {"loss_cr": float(l_cr.detach())}
        self.examples_trained += len(raw)
        self.batches_trained += 1
        return out

    def train(self, data: RawBatch | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One pass over a window (records or a RawBatch), in order, in batches of ``batch_size``."""
        t0 = time.perf_counter()
        raw = self.to_raw(data)
        losses: dict[str, list[float]] = {}
        bs = self.cfg.batch_size
        for lo in range(0, len(raw), bs):
            for k, v in self.train_batch(raw.slice(lo, min(len(raw), lo + bs))).items():
                losses.setdefault(k, []).append(v)
        if self.ar is not None and len(raw):
            self.ar.windows_trained += 1
            self.ar.seen_max_index = max(self.ar.seen_max_index, int(raw.index.max()))
            self.ar.seen_max_time = max(self.ar.seen_max_time, float(raw.times.max()))
        return {"examples": len(raw), "seconds": time.perf_counter() - t0,
                **{k: float(np.mean(v)) for k, v in losses.items()}}

    # ---- prediction
    def ad_pctr(self, data: RawBatch | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """AR+'s click probabilities."""
        if self.ar is None:
            raise ValueError("mode 'cr' has no ad ranker")
        return self.ar.predict(self.ar_raw(self.to_raw(data)))

    def pctr_for(self, raw: RawBatch, ar_pctr: np.ndarray | None = None, source: str | None = None) -> np.ndarray | None:
        """The ad pCTR CR+ sees for these rows, by ``source`` (default: the configured one):
        ``cached`` per-ad running mean, ``ar`` the ad ranker's own prediction (given, or computed
        here), ``fixed`` the global mean. None for ``mode="cr"``."""
        if not self.cfg.joint:
            return None
        source = source or self.cfg.pctr_source
        if source == "ar":
            return ar_pctr if ar_pctr is not None else self.ad_pctr(raw)
        if source == "fixed":
            return self.cr.fixed_pctr(len(raw))
        return self.cr.cached_pctr(raw.cats[self.cfg.ad_field])

    def creative_logits(self, data: RawBatch | Sequence[Mapping[str, Any]], ar_pctr: np.ndarray | None = None,
                        source: str | None = None) -> np.ndarray:
        """CR(+) logits of each row's creative in each row's context."""
        raw = self.to_raw(data)
        return self.cr.logits(self.cr_raw(raw), self.pctr_for(raw, ar_pctr, source))

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "ar": self.ar.state_dict() if self.ar is not None else None,
            "cr": self.cr.state_dict(),
            "cr_opt": copy.deepcopy(self.cr_opt.state_dict()),
            "rng": self.gen.get_state(),
            "meta": {"examples_trained": self.examples_trained, "batches_trained": self.batches_trained},
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if JACConfig.from_dict(s["config"]).to_dict() != self.cfg.to_dict():
            raise ValueError("the state was written with a different JACConfig")
        if self.ar is not None:
            self.ar.load_state_dict(s["ar"])
        self.cr.load_state_dict(s["cr"])
        self.cr_opt = torch.optim.Adagrad(list(self.cr.net.parameters()), lr=self.cfg.cr_lr)
        self.cr_opt.load_state_dict(s["cr_opt"])
        self.gen.set_state(s["rng"])
        self.examples_trained = int(s["meta"]["examples_trained"])
        self.batches_trained = int(s["meta"]["batches_trained"])

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> "JACLearner":
        learner = cls(JACConfig.from_dict(s["config"]))
        learner.load_state_dict(s)
        return learner

    def validate(self) -> list[str]:
        return (self.ar.validate_state() if self.ar is not None else []) + self.cr.validate()
