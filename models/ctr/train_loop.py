"""The CTR learner: one object that trains windows, predicts, and checkpoints completely.

:class:`CTRLearner` owns the network, its optimizers (fused embedding optimizer, dense optimizer,
sparse Adagrad for the first-order table and for the learned Feature Prior), the id mappers, the
numeric standardiser, the count-based prior table, the Model Prior's evidence arrays and the
logit-chain of frozen models (``mp="logit"``). ``state_dict()`` holds all of it (tensors, numpy
arrays and plain data), so a checkpoint restores training exactly where it stopped.

Training on a window (``train_window``) follows ``CTRConfig``:

1. *Teacher pass* (Model Prior / distillation, from the second window on): before the learner
   touches the window, the model as it is at the start of the window (or ``prev_model``) scores
   every example with read-only lookups. That gives the teacher's logits, the evidence behind them
   (sightings of each value *before* the window; values it has no row for get none), the window's
   own sightings of the same values, the per-example strength λ_i and, with ``mp_adapt="pv"``, the
   window's scale of λ from progressive validation of the previous update on this window
   (``models/ctr/prior_strength.py``). The teacher is thereby
   frozen by construction, and ids admitted or recycled during the window never reach it.
2. Per batch: encode (admit/expire ids, reset recycled rows everywhere, standardise), step on
   main loss + μ·FP loss, then feed the count prior and the evidence arrays with the batch (so a
   batch's own labels never reach its inputs).

main loss = BCE (first window, or ``mp="off"``), the Model Prior (``posterior`` / ``kl`` /
``logit``), or logit distillation (``distill_weight > 0``).

The learner records the largest example index and event time it has trained on
(``seen_max_index``/``seen_max_time``) and the largest index fed to its prior statistics
(``prior_max_index``): the evaluation protocol checks these against the period it evaluates.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from models.ctr.ddp import LearnedFeaturePrior, RowCountPrior
from models.ctr.features import ModelInput, RawBatch, RunningStandardizer, make_kjt, raw_from_examples
from models.ctr.hashing import COLD_ROW, IdMapper
from models.ctr.learner_state import StateMixin
from models.ctr.losses import bce, distill_loss, mp_kl_loss, mp_logit_loss, mp_posterior_loss
from models.ctr.model import CTRConfig, CTRNet, build_net
from models.ctr.prior_strength import best_step, pv_scale, strengths, window_counts

log = logging.getLogger(__name__)
# torch's Adagrad builds sparse COO gradients for the first-order and prior tables and says, once per
# process, that it does not check their invariants; the indices come from our own mappers
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


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
    mp_lambda_mean: float = float("nan")  # mean per-example Model Prior strength used on the window
    mp_scale: float = float("nan")  # the progressive-validation scale of λ (mp_adapt="pv")
    mp_step: float = float("nan")  # the best step multiple of the previous update on this window
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


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


class CTRLearner(StateMixin):
    """Trains and serves one CTR model. See ``models/ctr/__init__.py`` for the API summary.

    Args:
        config: the model/training configuration (validated here).
    """

    def __init__(self, config: CTRConfig) -> None:
        config.validate()
        self.config = config
        self.fields = [f.name for f in config.fields]
        self.capacities = [f.capacity for f in config.fields]
        self.net = build_net(config)
        self.mappers = [IdMapper(f.capacity, f.admission, f.ttl, f.mapper) for f in config.fields]
        self.standardizer = RunningStandardizer(len(config.numeric))
        self.count_prior = RowCountPrior(self.capacities, config.fp_strength) if config.fp == "count" else None
        # fp_update="window": the current window's counts, added to the prior when the window ends
        self._pending = RowCountPrior(self.capacities, config.fp_strength) if config.fp == "count" else None
        # sightings behind the model, per row (Model Prior strength), reset with the row, decayed per window
        self.evidence = (
            [np.zeros(c, dtype=np.float64) for c in self.capacities] if self._uses_evidence() else None
        )
        self.chain: list[CTRNet] = []  # frozen earlier models (mp="logit")
        self.windows_trained = 0
        self.data_initialised = False
        self.seen_max_index = -1
        self.seen_max_time = float("-inf")
        self.prior_max_index = -1
        self.mp_scale = 1.0  # the current λ scale (mp_adapt="pv")
        self.mp_scales: list[float] = []  # the scale used on each window (mp_adapt="pv")
        self.prev_net: CTRNet | None = None  # the model at the start of the previous window (mp_adapt="pv")
        self._gen = torch.Generator().manual_seed(config.seed)  # re-initialises recycled rows
        self._build_optimizers()

    # ------------------------------------------------------------------ setup
    def _uses_evidence(self) -> bool:
        c = self.config
        return c.mp in ("posterior", "kl") and c.mp_lambda_mode in ("count", "evidence")

    def _dense_params(self, net: CTRNet) -> list[torch.nn.Parameter]:
        sparse = ("ebc.", "feature_prior.", "first_order.")
        return [p for n, p in net.named_parameters() if not n.startswith(sparse)]

    def _build_optimizers(self) -> None:
        cfg = self.config
        params = self._dense_params(self.net)
        if cfg.dense_optimizer == "adam":
            self.dense_opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.dense_lr)
        else:
            self.dense_opt = torch.optim.Adagrad(params, lr=cfg.dense_lr)
        fp = self.net.feature_prior
        self.fp_opt = torch.optim.Adagrad(list(fp.parameters()), lr=cfg.fp_lr) if fp is not None else None
        lin = self.net.first_order
        self.lin_opt = torch.optim.Adagrad(list(lin.parameters()), lr=cfg.emb_lr) if lin is not None else None

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense_opt, self.fp_opt, self.lin_opt) if o is not None]

    def _emb_states(self) -> list[list[torch.Tensor]]:
        """Fused optimizer state tensors per table (views into the fbgemm module)."""
        out: list[list[torch.Tensor]] = []
        for m in self.net.ebc._emb_modules:
            out.extend([list(s) for s in m._emb_module.split_optimizer_states()])
        return out

    def _emb_weights(self, net: CTRNet | None = None) -> list[torch.Tensor]:
        net = net or self.net
        return [net.ebc.embedding_bags[f"t_{f}"].weight for f in self.fields]

    def _reset_rows(self, fi: int, rows: np.ndarray) -> None:
        """A recycled/newly assigned row starts from scratch everywhere: fresh embedding, no
        optimizer history, no first-order weight, prior offset and counts back to the field mean,
        no evidence; in the frozen chain links it reads like the cold row (an unknown value)."""
        if not len(rows):
            return
        r = torch.as_tensor(rows, dtype=torch.long)
        bound = (1.0 / self.capacities[fi]) ** 0.5
        with torch.no_grad():
            w = self._emb_weights()[fi]
            w[r] = torch.rand(len(r), w.shape[1], generator=self._gen) * (2 * bound) - bound
            for s in self._emb_states()[fi]:
                s[r] = 0
        for mod, opt, attr in ((self.net.feature_prior, self.fp_opt, "delta"), (self.net.first_order, self.lin_opt, "weight")):
            if mod is None:
                continue
            mod.reset_rows(fi, r)
            st = opt.state.get(getattr(mod, attr).weight) if opt is not None else None
            if st and "sum" in st:
                st["sum"][r + mod.offsets[fi]] = 0
        if self.count_prior is not None and self._pending is not None:
            self.count_prior.reset(fi, rows)
            self._pending.reset(fi, rows)
        if self.evidence is not None:
            self.evidence[fi][rows] = 0.0
        for link in self._frozen_nets():
            with torch.no_grad():
                lw = self._emb_weights(link)[fi]
                lw[r] = lw[COLD_ROW].clone()
                if link.first_order is not None:
                    t = link.first_order.weight.weight
                    off = link.first_order.offsets[fi]
                    t[r + off] = t[COLD_ROW + off].clone()
                if link.feature_prior is not None:
                    link.feature_prior.reset_rows(fi, r)

    def _frozen_copy(self) -> CTRNet:
        """A copy of the live network in eval mode. Built fresh and loaded (not ``deepcopy``: a
        deep-copied fused collection's ``embedding_bags`` weights stop being views of the tables
        its forward reads, so a row written there later would not reach its predictions)."""
        with torch.random.fork_rng():
            twin = build_net(self.config)
        twin.load_state_dict(self.net.state_dict())
        return twin.eval()

    def _frozen_nets(self) -> list[CTRNet]:
        """Frozen networks that read the live rows: the logit chain and the previous window's model."""
        return self.chain + ([self.prev_net] if self.prev_net is not None else [])

    # ------------------------------------------------------------------ encoding
    def to_raw(self, batch: RawBatch | Sequence[Mapping[str, Any]]) -> RawBatch:
        """Accepts a RawBatch or a list of example dicts (``Example.to_dict()``)."""
        if isinstance(batch, RawBatch):
            return batch
        return raw_from_examples(batch, self.fields, self.config.numeric)

    def encode(self, raw: RawBatch, train: bool) -> tuple[ModelInput, int]:
        """RawBatch -> ModelInput. ``train=True`` admits/expires ids and updates the standardiser;
        ``train=False`` changes nothing (read-only lookups)."""
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
        prior = torch.from_numpy(self.count_prior.logits(rows, centred=True)) if self.count_prior is not None else None
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

    # ------------------------------------------------------------------ teacher pass
    def _needs_prev(self) -> bool:
        return self.config.mp in ("posterior", "kl") or self.config.distill_weight > 0

    def snapshot(self) -> "CTRLearner":
        """A frozen deep copy of this learner's predictor: network, chain, mappers, standardiser,
        count prior and evidence. Training this learner afterwards changes nothing in it."""
        twin = copy.copy(self)
        twin.net = self._frozen_copy()
        twin.chain = list(self.chain)
        twin.mappers = copy.deepcopy(self.mappers)
        twin.standardizer = copy.deepcopy(self.standardizer)
        twin.count_prior = copy.deepcopy(self.count_prior)
        twin.evidence = copy.deepcopy(self.evidence)
        return twin

    def teacher_view(self, raw: RawBatch) -> tuple[ModelInput, torch.Tensor, np.ndarray]:
        """What this model, as it is now, says about ``raw`` (read-only): its input, its logits [B]
        and the evidence [B, F] behind each value (0 for values it has no row for)."""
        inp, _ = self.encode(raw, train=False)
        rows = inp.rows.numpy()
        ev = self.evidence if self.evidence is not None else [m.counts.astype(np.float64) for m in self.mappers]
        before = np.stack([np.where(rows[:, f] > COLD_ROW, ev[f][rows[:, f]], 0.0) for f in range(rows.shape[1])], 1)
        if self.config.mp == "logit":
            z = self._chain_logits(inp)
            z = torch.zeros(len(raw)) if z is None else z
        else:
            z = self.logits_for_input(inp)
        return inp, z, before

    def _teacher_pass(
        self, raws: list[RawBatch], teacher: "CTRLearner", stats: WindowStats
    ) -> list[tuple[torch.Tensor, torch.Tensor | float]]:
        """Teacher logits and per-example strength λ_i for every batch of the window."""
        cfg = self.config
        views = [teacher.teacher_view(r) for r in raws]
        if cfg.mp not in ("posterior", "kl"):  # distillation / logit chain: logits only
            return [(z, 0.0) for _, z, _ in views]
        rows = [inp.rows.numpy() for inp, _, _ in views]
        win = window_counts(rows, self.capacities)
        lams = []
        for r, (_, _, before) in zip(rows, views):
            m = np.stack([win[f][r[:, f]] for f in range(r.shape[1])], 1)
            lams.append(strengths(cfg.mp_lambda_mode, cfg.mp_lambda, before, m, cfg.mp_count_n0, cfg.mp_count_agg))
        if cfg.mp_adapt == "pv":
            self._adapt_scale(views, raws, lams, stats)
            lams = [lam * self.mp_scale for lam in lams]
        stats.mp_lambda_mean = float(np.mean(np.concatenate([lam.numpy() for lam in lams]))) if lams else float("nan")
        return [(z, lam) for (_, z, _), lam in zip(views, lams)]

    def _adapt_scale(self, views: list, raws: list[RawBatch], lams: list[torch.Tensor], stats: WindowStats) -> None:
        """mp_adapt="pv": score the previous update on this window (neither model has seen it),
        set the λ scale for this window, and keep the current model as the next 'before'."""
        if self.prev_net is not None:
            with torch.no_grad():
                z_before = np.concatenate([self.prev_net(inp)[0].numpy() for inp, _, _ in views])
            z_now = np.concatenate([z.numpy() for _, z, _ in views])
            y = np.concatenate([r.labels for r in raws])
            alpha = best_step(z_now, z_before, y)
            lam_bar = float(np.mean(np.concatenate([lam.numpy() for lam in lams])))
            self.mp_scale = pv_scale(alpha, self.mp_scale, lam_bar)
            stats.mp_step = alpha
        stats.mp_scale = self.mp_scale
        self.mp_scales.append(self.mp_scale)
        self.prev_net = self._frozen_copy()

    # ------------------------------------------------------------------ training
    def _main_loss(self, z: torch.Tensor, inp: ModelInput, z_prev: torch.Tensor | None, lam: Any) -> torch.Tensor:
        cfg, y = self.config, inp.labels
        if z_prev is None:
            return bce(z, y)
        if cfg.mp == "logit":
            return mp_logit_loss(z, y, z_prev)
        if cfg.mp == "posterior":
            return mp_posterior_loss(z, y, z_prev, lam, cfg.mp_weighted)
        if cfg.mp == "kl":
            return mp_kl_loss(z, y, z_prev, lam, cfg.mp_weighted)
        if cfg.distill_weight > 0:
            return distill_loss(z, y, z_prev, cfg.distill_weight, cfg.distill_temperature)
        return bce(z, y)

    def _step(self, inp: ModelInput, z_prev: torch.Tensor | None, lam: Any) -> float:
        cfg = self.config
        z, u, d = self.net(inp)
        loss = self._main_loss(z, inp, z_prev, lam)
        if cfg.fp == "learned" and u is not None and d is not None:
            loss = loss + cfg.fp_weight * LearnedFeaturePrior.loss(u, d, inp.labels, inp.sightings, cfg.fp_shrink)
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        loss.backward()  # the fused kernel updates the embedding tables here
        for opt in self._optimizers():
            opt.step()
        return float(loss.detach())

    def _init_from_data(self, raws: list[RawBatch]) -> None:
        """Output bias and prior field means start at the logit of the first window's CTR."""
        self.data_initialised = True
        if not self.config.init_from_data:
            return
        n = sum(len(r) for r in raws)
        clicks = float(sum(r.labels.sum() for r in raws))
        z0 = _logit((clicks + 0.5) / (n + 1.0))
        with torch.no_grad():
            self.net.bias.fill_(z0)
        if self.net.feature_prior is not None:
            self.net.feature_prior.set_field_means(z0)

    def train_window(
        self,
        batches: Iterable[RawBatch | Sequence[Mapping[str, Any]]],
        prev_model: "CTRLearner | None" = None,
        epochs: int | None = None,
        shuffle_seed: int | None = None,
    ) -> WindowStats:
        """Trains on one window of batches and returns :class:`WindowStats`.

        ``prev_model`` is the Model Prior / distillation teacher; by default the model as it is
        at the start of this window (none for the first window). It must share this learner's id
        space (an earlier :meth:`snapshot` of the same learner). With ``epochs > 1`` the encoded
        batches of the first pass are replayed (in a shuffled order when ``shuffle_seed`` is given).
        """
        t0 = time.perf_counter()
        cfg = self.config
        epochs = epochs or cfg.epochs
        raws = [r for r in (self.to_raw(b) for b in batches) if len(r)]
        if not self.data_initialised and raws:
            self._init_from_data(raws)
        teacher = None
        if self._needs_prev() and self.windows_trained > 0:
            teacher = prev_model if prev_model is not None else self
        elif cfg.mp == "logit" and self.chain:
            teacher = self
        stats = WindowStats(used_prior_model=teacher is not None)
        prior = self._teacher_pass(raws, teacher, stats) if teacher is not None and raws else [(None, 0.0)] * len(raws)
        encoded: list[ModelInput] = []
        losses: list[float] = []
        for raw, (z_prev, lam) in zip(raws, prior):
            inp, n_reset = self.encode(raw, train=True)
            stats.rows_reset += n_reset
            losses.append(self._step(inp, z_prev, lam))
            self._feed(raw, inp)
            stats.examples += len(raw)
            if epochs > 1:
                encoded.append(inp)
        rng = np.random.default_rng(shuffle_seed)
        for e in range(1, epochs):
            order = rng.permutation(len(encoded)) if shuffle_seed is not None else range(len(encoded))
            for i in order:
                z_prev, lam = prior[i]
                losses.append(self._step(self._replayed(encoded[i], e), z_prev, lam))
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

    def _feed(self, raw: RawBatch, inp: ModelInput) -> None:
        """After a batch's step: its labels reach the count prior (at once, or when the window ends
        with ``fp_update="window"``), its sightings the evidence."""
        rows = inp.rows.numpy()
        if self.count_prior is not None and self._pending is not None:
            (self._pending if self.config.fp_update == "window" else self.count_prior).update(rows, raw.labels)
            self.prior_max_index = max(self.prior_max_index, int(raw.index.max()))
        if self.evidence is not None:
            for f, ev in enumerate(self.evidence):
                np.add.at(ev, rows[:, f], 1.0)
                ev[COLD_ROW] = 0.0
        self.seen_max_index = max(self.seen_max_index, int(raw.index.max()))
        self.seen_max_time = max(self.seen_max_time, float(raw.times.max()))

    def _end_window(self) -> None:
        cfg = self.config
        self.windows_trained += 1
        if self.count_prior is not None and self._pending is not None:
            if cfg.fp_decay < 1:
                self.count_prior.decay(cfg.fp_decay)
            self.count_prior.merge(self._pending)  # fp_update="window": the window's labels arrive now
            self._pending.clear()
        if self.evidence is not None and cfg.mp_count_decay < 1:
            for ev in self.evidence:
                ev *= cfg.mp_count_decay
        if cfg.mp == "logit":
            self.chain.append(self._frozen_copy())
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

    def mapper_stats(self) -> dict[str, dict[str, float]]:
        return {f: asdict(m.stats()) for f, m in zip(self.fields, self.mappers)}
