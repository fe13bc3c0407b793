"""The CTR learner: one object that trains windows, predicts, and checkpoints completely.

:class:`CTRLearner` owns the network, its optimizers (fused embedding optimizer + dense optimizer +
Feature-Prior optimizer), the id mappers, the numeric standardiser, the count-based prior tables and
the logit-chain of frozen models (``mp="logit"``). ``state_dict()`` holds all of it, so a checkpoint
restores training exactly where it stopped.

Training on a window (``train_window``) follows ``CTRConfig``:

- loss = main loss + μ·FP loss (``fp="learned"``);
- main loss = BCE (first window, or ``mp="off"``), the Model Prior against the model as it was at
  the start of the window (``posterior`` / ``kl`` / ``logit``), or logit distillation
  (``distill_weight > 0``);
- count statistics (``fp="count"``) are updated *after* each batch's step, so a batch's prior
  inputs only use data seen before it.

The learner records the largest example index and event time it has trained on
(``seen_max_index``/``seen_max_time``) and the largest index fed to its prior statistics
(``prior_max_index``): the evaluation protocol checks these against the period it evaluates.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from models.ctr.ddp import BetaPriorTable, LearnedFeaturePrior
from models.ctr.features import ModelInput, RawBatch, RunningStandardizer, make_kjt, raw_from_examples
from models.ctr.hashing import IdMapper
from models.ctr.losses import (
    bce,
    count_strength,
    distill_loss,
    mp_kl_loss,
    mp_logit_loss,
    mp_posterior_loss,
)
from models.ctr.model import CTRConfig, CTRNet, build_net

log = logging.getLogger(__name__)


@dataclass
class WindowStats:
    """What one ``train_window`` call did (plain numbers, for logs and metrics)."""

    examples: int = 0
    batches: int = 0
    epochs: int = 0
    loss_mean: float = float("nan")
    loss_last: float = float("nan")
    seconds: float = 0.0
    used_prior_model: bool = False
    rows_reset: int = 0
    mapper: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank_within(r: np.ndarray) -> np.ndarray:
    """1-based occurrence number of each element among equal elements of ``r`` (in order)."""
    order = np.argsort(r, kind="stable")
    sr = r[order]
    start = np.r_[0, np.nonzero(np.diff(sr))[0] + 1]
    grp_start = np.repeat(start, np.diff(np.r_[start, len(sr)]))
    out = np.empty(len(r), dtype=np.int64)
    out[order] = np.arange(len(r)) - grp_start + 1
    return out


class CTRLearner:
    """Trains and serves one CTR model. See ``models/ctr/__init__.py`` for the API summary.

    Args:
        config: the model/training configuration (validated here).
        categorical_source / numeric_source: names looked up in example dicts when batches are
            given as dicts (default: the config's field and numeric names).
    """

    def __init__(self, config: CTRConfig) -> None:
        config.validate()
        self.config = config
        self.fields = [f.name for f in config.fields]
        self.net = build_net(config)
        self.mappers = [IdMapper(f.capacity, f.admission, f.ttl, f.mapper) for f in config.fields]
        self.standardizer = RunningStandardizer(len(config.numeric))
        self.beta = [BetaPriorTable(config.fp_strength) for _ in self.fields] if config.fp == "count" else None
        self.chain: list[CTRNet] = []  # frozen earlier models (mp="logit")
        self.windows_trained = 0
        self.seen_max_index = -1
        self.seen_max_time = float("-inf")
        self.prior_max_index = -1
        self._gen = torch.Generator().manual_seed(config.seed)  # re-initialises recycled rows
        self._build_optimizers()

    # ------------------------------------------------------------------ setup
    def _dense_params(self, net: CTRNet) -> list[torch.nn.Parameter]:
        return [
            p for n, p in net.named_parameters() if not n.startswith("ebc.") and not n.startswith("feature_prior.")
        ]

    def _build_optimizers(self) -> None:
        cfg = self.config
        params = self._dense_params(self.net)
        if cfg.dense_optimizer == "adam":
            self.dense_opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.dense_lr)
        else:
            self.dense_opt = torch.optim.Adagrad(params, lr=cfg.dense_lr)
        fp = self.net.feature_prior
        self.fp_opt = torch.optim.Adagrad(list(fp.parameters()), lr=cfg.fp_lr) if fp is not None else None

    def _emb_states(self) -> list[list[torch.Tensor]]:
        """Fused optimizer state tensors per table (views into the fbgemm module)."""
        out: list[list[torch.Tensor]] = []
        for m in self.net.ebc._emb_modules:
            out.extend([list(s) for s in m._emb_module.split_optimizer_states()])
        return out

    def _emb_weights(self) -> list[torch.Tensor]:
        return [self.net.ebc.embedding_bags[f"t_{f}"].weight for f in self.fields]

    def _reset_rows(self, fi: int, rows: np.ndarray) -> None:
        """A recycled/newly assigned row starts from scratch: fresh init, no optimizer history."""
        if not len(rows):
            return
        r = torch.as_tensor(rows, dtype=torch.long)
        cap = self.config.fields[fi].capacity
        bound = (1.0 / cap) ** 0.5
        with torch.no_grad():
            w = self._emb_weights()[fi]
            w[r] = torch.rand(len(r), w.shape[1], generator=self._gen) * (2 * bound) - bound
            for s in self._emb_states()[fi]:
                s[r] = 0
        fp = self.net.feature_prior
        if fp is not None:
            fp.reset_rows(fi, rows)
            st = self.fp_opt.state.get(fp.delta.weight) if self.fp_opt is not None else None
            if st and "sum" in st:
                st["sum"][r + fp.offsets[fi]] = 0

    # ------------------------------------------------------------------ encoding
    def to_raw(self, batch: RawBatch | Sequence[Mapping[str, Any]]) -> RawBatch:
        """Accepts a RawBatch or a list of example dicts (``Example.to_dict()``)."""
        if isinstance(batch, RawBatch):
            return batch
        return raw_from_examples(batch, self.fields, self.config.numeric)

    def encode(self, raw: RawBatch, train: bool) -> tuple[ModelInput, int]:
        """RawBatch -> ModelInput. ``train=True`` admits/expires ids and updates the standardiser."""
        n_reset = 0
        rows = np.empty((len(raw), len(self.fields)), dtype=np.int64)
        counts = np.empty_like(rows)
        sight = np.empty_like(rows)
        for fi, (f, m) in enumerate(zip(self.fields, self.mappers)):
            if train:
                r, fresh = m.observe(raw.cats[f], raw.times)
                self._reset_rows(fi, fresh)
                n_reset += len(fresh)
                occ = np.bincount(r, minlength=m.capacity)[r]
                counts[:, fi] = m.counts[r] - occ  # sightings before this batch
                sight[:, fi] = counts[:, fi] + _rank_within(r)
            else:
                r = m.lookup(raw.cats[f])
                counts[:, fi] = m.counts[r]
                sight[:, fi] = counts[:, fi] + 1
            rows[:, fi] = r
        if train:
            self.standardizer.update(raw.dense)
        dense = torch.from_numpy(self.standardizer.transform(raw.dense))
        prior = None
        if self.beta is not None:
            prior = torch.from_numpy(
                np.stack([t.logit(raw.cats[f]) for f, t in zip(self.fields, self.beta)], 1).astype(np.float32)
            )
        inp = ModelInput(
            kjt=make_kjt(self.fields, rows),
            rows=torch.from_numpy(rows),
            dense=dense,
            labels=torch.from_numpy(np.ascontiguousarray(raw.labels, dtype=np.float32)),
            prior_counts=prior,
            value_counts=torch.from_numpy(counts),
            sightings=torch.from_numpy(sight),
        )
        return inp, n_reset

    # ------------------------------------------------------------------ forward
    def _chain_logits(self, inp: ModelInput) -> torch.Tensor | None:
        if not self.chain:
            return None
        with torch.no_grad():
            return torch.stack([m(inp)[0] for m in self.chain]).sum(0)

    def logits_for_input(self, inp: ModelInput) -> torch.Tensor:
        """Full predictor logits (chain + live network), no gradient."""
        with torch.no_grad():
            if self.net.training:  # between training steps: predict in eval mode, then back
                self.net.eval()
                try:
                    z = self.net(inp)[0]
                finally:
                    self.net.train()
            else:  # a served copy stays in eval mode: nothing is toggled, concurrent calls are safe
                z = self.net(inp)[0]
            c = self._chain_logits(inp)
            return z if c is None else z + c

    def predict_logits(self, batch: RawBatch | Sequence[Mapping[str, Any]]) -> np.ndarray:
        inp, _ = self.encode(self.to_raw(batch), train=False)
        return self.logits_for_input(inp).numpy()

    def predict(self, batch: RawBatch | Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities [B] (float64). Changes no state."""
        z = self.predict_logits(batch)
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    # ------------------------------------------------------------------ training
    def _main_loss(self, z: torch.Tensor, inp: ModelInput, z_prev: torch.Tensor | None) -> torch.Tensor:
        cfg, y = self.config, inp.labels
        if z_prev is None:
            return bce(z, y)
        if cfg.mp == "logit":
            return mp_logit_loss(z, y, z_prev)
        if cfg.mp in ("posterior", "kl"):
            lam: float | torch.Tensor = cfg.mp_lambda
            if cfg.mp_lambda_mode == "count":
                lam = count_strength(cfg.mp_lambda, inp.value_counts, cfg.mp_count_n0)
            return mp_posterior_loss(z, y, z_prev, lam) if cfg.mp == "posterior" else mp_kl_loss(z, y, z_prev, lam)
        if cfg.distill_weight > 0:
            return distill_loss(z, y, z_prev, cfg.distill_weight, cfg.distill_temperature)
        return bce(z, y)

    def _step(self, inp: ModelInput, prev: "CTRLearner | None") -> float:
        cfg = self.config
        z_prev = None
        if cfg.mp == "logit":
            z_prev = self._chain_logits(inp)
        elif prev is not None:
            z_prev = prev.logits_for_input(inp)
        z, u, d = self.net(inp)
        loss = self._main_loss(z, inp, z_prev)
        if cfg.fp == "learned" and u is not None and d is not None:
            loss = loss + cfg.fp_weight * LearnedFeaturePrior.loss(u, d, inp.labels, inp.sightings, cfg.fp_shrink)
        self.dense_opt.zero_grad(set_to_none=True)
        if self.fp_opt is not None:
            self.fp_opt.zero_grad(set_to_none=True)
        loss.backward()  # the fused kernel updates the embedding tables here
        self.dense_opt.step()
        if self.fp_opt is not None:
            self.fp_opt.step()
        return float(loss.detach())

    def _needs_prev(self) -> bool:
        return self.config.mp in ("posterior", "kl") or self.config.distill_weight > 0

    def snapshot(self) -> "CTRLearner":
        """A frozen copy of this learner's predictor (shares nothing mutable with it)."""
        twin = copy.copy(self)
        twin.net = copy.deepcopy(self.net).eval()
        twin.chain = list(self.chain)
        return twin

    def train_window(
        self,
        batches: Iterable[RawBatch | Sequence[Mapping[str, Any]]],
        prev_model: "CTRLearner | None" = None,
        epochs: int | None = None,
        shuffle_seed: int | None = None,
    ) -> WindowStats:
        """Trains on one window of batches and returns :class:`WindowStats`.

        ``prev_model`` is the Model Prior / distillation teacher; by default the model as it was at
        the start of this window (none for the first window). It must share this learner's id
        space (an earlier state of the same learner). With ``epochs > 1`` the encoded batches of
        the first pass are replayed (shuffled when ``shuffle_seed`` is given).
        """
        t0 = time.perf_counter()
        cfg = self.config
        epochs = epochs or cfg.epochs
        prev = None
        if self._needs_prev() and self.windows_trained > 0:
            prev = prev_model if prev_model is not None else self.snapshot()
        stats = WindowStats(used_prior_model=prev is not None or bool(self.chain))
        encoded: list[ModelInput] = []
        losses: list[float] = []
        for raw in batches:
            raw = self.to_raw(raw)
            if len(raw) == 0:
                continue
            inp, n_reset = self.encode(raw, train=True)
            stats.rows_reset += n_reset
            losses.append(self._step(inp, prev))
            self._feed_prior(raw)
            self._note_seen(raw)
            stats.examples += len(raw)
            if epochs > 1:
                encoded.append(inp)
        rng = np.random.default_rng(shuffle_seed)
        for e in range(1, epochs):
            order = rng.permutation(len(encoded)) if shuffle_seed is not None else range(len(encoded))
            for i in order:
                losses.append(self._step(self._replayed(encoded[i], e), prev))
        self._end_window()
        stats.batches = len(losses)
        stats.epochs = epochs
        if losses:
            stats.loss_mean = float(np.mean(losses))
            stats.loss_last = losses[-1]
        stats.seconds = time.perf_counter() - t0
        stats.mapper = self.mapper_stats()
        return stats

    def _replayed(self, inp: ModelInput, epoch: int) -> ModelInput:
        """A batch seen again in a later epoch: its values' sighting numbers continue counting."""
        if inp.sightings is None:
            return inp
        now = np.stack([m.counts[inp.rows[:, fi].numpy()] for fi, m in enumerate(self.mappers)], 1)
        return replace(inp, sightings=inp.sightings + epoch * torch.from_numpy(now))

    def _feed_prior(self, raw: RawBatch) -> None:
        if self.beta is None:
            return
        for f, t in zip(self.fields, self.beta):
            t.update(raw.cats[f], raw.labels, None)
        self.prior_max_index = max(self.prior_max_index, int(raw.index.max()))

    def _note_seen(self, raw: RawBatch) -> None:
        self.seen_max_index = max(self.seen_max_index, int(raw.index.max()))
        self.seen_max_time = max(self.seen_max_time, float(raw.times.max()))

    def _end_window(self) -> None:
        cfg = self.config
        self.windows_trained += 1
        if self.beta is not None and cfg.fp_decay < 1:
            for t in self.beta:
                t.decay(cfg.fp_decay)
        if cfg.mp == "logit":
            self.chain.append(copy.deepcopy(self.net).eval())
            if len(self.chain) > cfg.mp_logit_max_chain:
                del self.chain[1]  # keep the base model, drop the oldest update
            self._fresh_residual()

    def _fresh_residual(self) -> None:
        """mp='logit': the next window learns a new log-likelihood-ratio net starting at 0."""
        cfg = self.config
        fresh = build_net(CTRConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1000 + self.windows_trained}))
        with torch.no_grad():
            out = fresh.backbone.out
            out.weight.zero_()
            out.bias.zero_()
            if hasattr(fresh.backbone, "dense_proj") and fresh.backbone.dense_proj is not None:
                fresh.backbone.dense_proj.weight.zero_()
                fresh.backbone.dense_proj.bias.zero_()
        if fresh.feature_prior is not None and self.net.feature_prior is not None:
            # the Feature Prior is long-term evidence: carry it into the new residual network
            fresh.feature_prior.load_state_dict(self.net.feature_prior.state_dict())
        self.net = fresh
        self._build_optimizers()

    # ------------------------------------------------------------------ state
    def mapper_stats(self) -> dict[str, dict[str, float]]:
        return {f: asdict(m.stats()) for f, m in zip(self.fields, self.mappers)}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, all optimizer states, mappers, priors, chain.

        A snapshot: it shares no tensor or array with the live learner. Every value is copied once:
        the tensors by one ``deepcopy`` (views of one buffer, such as the fused tables, stay views of
        one copied buffer); mappers, standardiser and priors copy themselves in their ``state_dict``.
        """
        live = copy.deepcopy({
            "net": self.net.state_dict(),
            "emb_opt": [[s.detach() for s in st] for st in self._emb_states()],
            "dense_opt": self.dense_opt.state_dict(),
            "fp_opt": self.fp_opt.state_dict() if self.fp_opt is not None else None,
            "chain": [m.state_dict() for m in self.chain],
        })
        return {
            "config": self.config.to_dict(),
            **live,
            "mappers": [m.state_dict() for m in self.mappers],
            "standardizer": self.standardizer.state_dict(),
            "beta": [t.state_dict() for t in self.beta] if self.beta is not None else None,
            "rng": self._gen.get_state(),
            "meta": {
                "windows_trained": self.windows_trained,
                "seen_max_index": self.seen_max_index,
                "seen_max_time": self.seen_max_time,
                "prior_max_index": self.prior_max_index,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a ``state_dict()`` taken from a learner with the same configuration."""
        cfg = CTRConfig.from_dict(state["config"])
        if cfg.to_dict() != self.config.to_dict():
            raise ValueError("checkpoint was written with a different CTRConfig")
        self.net.load_state_dict(state["net"])
        for cur, saved in zip(self._emb_states(), state["emb_opt"]):
            for c, s in zip(cur, saved):
                with torch.no_grad():
                    c.copy_(s)
        self._build_optimizers()
        self.dense_opt.load_state_dict(state["dense_opt"])
        if self.fp_opt is not None and state["fp_opt"] is not None:
            self.fp_opt.load_state_dict(state["fp_opt"])
        for m, s in zip(self.mappers, state["mappers"]):
            m.load_state_dict(s)
        self.standardizer.load_state_dict(state["standardizer"])
        if self.beta is not None:
            for t, s in zip(self.beta, state["beta"]):
                t.load_state_dict(s)
        self.chain = []
        for i, s in enumerate(state["chain"]):
            link = build_net(CTRConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1000 + i}))
            link.load_state_dict(s)
            self.chain.append(link.eval())
        self._gen.set_state(state["rng"])
        meta = state["meta"]
        self.windows_trained = int(meta["windows_trained"])
        self.seen_max_index = int(meta["seen_max_index"])
        self.seen_max_time = float(meta["seen_max_time"])
        self.prior_max_index = int(meta["prior_max_index"])

    def validate_state(self) -> list[str]:
        """Problems in the current state (empty = healthy): non-finite values, shape mismatches."""
        problems: list[str] = []
        for name, t in list(self.net.state_dict().items()) + [
            (f"chain{i}.{n}", t) for i, m in enumerate(self.chain) for n, t in m.state_dict().items()
        ]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                problems.append(f"non-finite values in {name}")
        for f, st in zip(self.fields, self._emb_states()):
            for s in st:
                if not torch.isfinite(s).all():
                    problems.append(f"non-finite optimizer state for table t_{f}")
        for f, w, fc in zip(self.fields, self._emb_weights(), self.config.fields):
            if w.shape[0] != fc.capacity:
                problems.append(f"table t_{f} has {w.shape[0]} rows, mapper capacity {fc.capacity}")
        for f, m in zip(self.fields, self.mappers):
            problems.extend(f"mapper {f}: {p}" for p in m.validate())
        if self.beta is not None:
            for f, t in zip(self.fields, self.beta):
                problems.extend(f"prior {f}: {p}" for p in t.validate())
        if not (np.isfinite(self.standardizer.mean).all() and np.isfinite(self.standardizer.m2).all()):
            problems.append("non-finite standardiser statistics")
        return problems
