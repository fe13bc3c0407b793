"""The learner's complete state: ``state_dict`` / ``load_state_dict`` / ``validate_state``.

A state is made of tensors, numpy arrays and JSON-able plain data only (the registry stores
weights + JSON). It is a deep snapshot: it shares no tensor with the live learner.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from models.ctr.model import CTRConfig, build_net

if TYPE_CHECKING:
    from models.ctr.train_loop import CTRLearner


class StateMixin:
    """Mixed into :class:`~models.ctr.train_loop.CTRLearner`."""

    def state_dict(self: "CTRLearner") -> dict[str, Any]:
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
            "lin_opt": self.lin_opt.state_dict() if self.lin_opt is not None else None,
            "chain": [m.state_dict() for m in self.chain],
            "prev_net": self.prev_net.state_dict() if self.prev_net is not None else None,
        })
        return {
            "config": self.config.to_dict(),
            **live,
            "mappers": [m.state_dict() for m in self.mappers],
            "standardizer": self.standardizer.state_dict(),
            "count_prior": self.count_prior.state_dict() if self.count_prior is not None else None,
            "evidence": [e.copy() for e in self.evidence] if self.evidence is not None else None,
            "rng": self._gen.get_state().clone(),
            "meta": {
                "windows_trained": self.windows_trained,
                "data_initialised": self.data_initialised,
                "seen_max_index": self.seen_max_index,
                "seen_max_time": self.seen_max_time,
                "prior_max_index": self.prior_max_index,
                "mp_scale": self.mp_scale,
                "mp_scales": list(self.mp_scales),
            },
        }

    def load_state_dict(self: "CTRLearner", state: Mapping[str, Any]) -> None:
        """Restores a ``state_dict()`` taken from a learner with the same configuration."""
        cfg = CTRConfig.from_dict(state["config"])
        if cfg.to_dict() != self.config.to_dict():
            raise ValueError("checkpoint was written with a different CTRConfig")
        self.chain = []
        for i, s in enumerate(state["chain"]):
            link = build_net(CTRConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1000 + i}))
            link.load_state_dict(s)
            self.chain.append(link.eval())
        self.prev_net = None
        if state.get("prev_net") is not None:
            self.prev_net = build_net(cfg).eval()
            self.prev_net.load_state_dict(state["prev_net"])
        self.net.load_state_dict(state["net"])
        for cur, saved in zip(self._emb_states(), state["emb_opt"]):
            for c, s in zip(cur, saved):
                with torch.no_grad():
                    c.copy_(s)
        self._build_optimizers()
        self.dense_opt.load_state_dict(state["dense_opt"])
        for opt, key in ((self.fp_opt, "fp_opt"), (self.lin_opt, "lin_opt")):
            if opt is not None and state.get(key) is not None:
                opt.load_state_dict(state[key])
        for m, s in zip(self.mappers, state["mappers"]):
            m.load_state_dict(s)
        self.standardizer.load_state_dict(state["standardizer"])
        if self.count_prior is not None:
            self.count_prior.load_state_dict(state["count_prior"])
        if self.evidence is not None:
            self.evidence = [np.asarray(e, dtype=np.float64).copy() for e in state["evidence"]]
        self._gen.set_state(state["rng"])
        meta = state["meta"]
        self.windows_trained = int(meta["windows_trained"])
        self.data_initialised = bool(meta.get("data_initialised", self.windows_trained > 0))
        self.seen_max_index = int(meta["seen_max_index"])
        self.seen_max_time = float(meta["seen_max_time"])
        self.prior_max_index = int(meta["prior_max_index"])
        self.mp_scale = float(meta.get("mp_scale", 1.0))
        self.mp_scales = [float(x) for x in meta.get("mp_scales", [])]

    def validate_state(self: "CTRLearner") -> list[str]:
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
        if self.count_prior is not None:
            problems.extend(f"count prior: {p}" for p in self.count_prior.validate())
        if self.evidence is not None and not all(np.isfinite(e).all() and (e >= 0).all() for e in self.evidence):
            problems.append("non-finite or negative Model Prior evidence")
        if not (np.isfinite(self.standardizer.mean).all() and np.isfinite(self.standardizer.m2).all()):
            problems.append("non-finite standardiser statistics")
        return problems
