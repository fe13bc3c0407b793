"""DACDR as a :class:`models.stream_model.StreamModel` (pure): records in, probabilities out.

``DACDRModel`` keeps, besides the network, the per-user per-domain behaviour history
(:class:`core.history.BehaviourHistory`) folded from every record it learns, in record order:

- ``learn(records)``: the history of each record *before* it is snapshotted, the record folded in;
  items of every record are admitted to the item tables; the loss is BCE on the records of
  ``target_domains`` (every domain when None), ``epochs`` shuffled passes.
- ``score(records)``: the same snapshots on a throw-away overlay (the model and its history are
  unchanged); AUC / LogLoss on the target-domain records, and ``auc_cold`` on those whose user was
  cold in the record's domain (fewer than ``cold_threshold`` own-domain views).
- ``predict(records)``: read-only. A record may carry its user's history as served by the feature
  store (``record["history"]``: domain -> behaviour -> items); else the model's own history is
  used. Candidates of one request are not folded into each other.
- ``add_domain(name, freeze_shared=...)``: a new domain row; the shared tables can be frozen for the
  short fine-tune that follows.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.history import PAD, BehaviourHistory, field_value, history_from_items
from models.crossdomain.config import DACDRConfig
from models.crossdomain.net import DACDRNet
from models.ctr.hashing import IdMapper
from models.ctr.metrics import auc, logloss
from models.stream_model import Criterion, Gate

DACDR_GATE = Gate.of(Criterion("auc_cold", higher_is_better=True, margin=0.02, label="cold-start AUC"),
                     Criterion("logloss", higher_is_better=False, margin=0.01, required=True, label="LogLoss"))

WARM_RECORD = {"user_id": "warm-u", "ad_id": "warm-a", "category": "warm/leaf", "domain": "search",
               "event_time": 0.0, "features": {}}


def _str(v: Any) -> str:
    return "" if v is None else str(v)


class DACDRModel:
    """See the module docstring."""

    gate = DACDR_GATE
    thread_safe = True

    def __init__(self, config: DACDRConfig, name: str = "crossdomain") -> None:
        config.validate()
        self.config = config
        self.name = name
        torch.manual_seed(config.seed)
        self._rng = np.random.default_rng(config.seed)
        self.item_mappers = [IdMapper(config.capacity, config.admission) for _ in config.item_fields]
        self.ctx_mappers = [IdMapper(config.capacity, config.admission) for _ in config.context_fields]
        self.history = BehaviourHistory(config.item_fields, config.max_len, config.max_users, config.behaviours)
        self.net = DACDRNet([config.capacity] * len(config.item_fields), [config.capacity] * len(config.context_fields),
                            len(config.domains), len(config.behaviours), config.dim, config.heads, config.hidden,
                            config.domain_level, config.item_query, config.alpha_reweight, config.cross)
        self.frozen: str | None = None
        self.frozen_domain_rows = 0  # with frozen shared parts: domain rows below this do not train
        self.windows = 0
        self.examples = 0
        self._build_optimizers()

    # ---- parameters --------------------------------------------------------------------------
    def _tables(self) -> list[torch.nn.Embedding]:
        n = self.net
        return [*n.item_tables, *n.ctx_tables, n.domain, n.domain_bias, n.behaviour]

    def _build_optimizers(self) -> None:
        table_ids = {id(t.weight) for t in self._tables()}
        emb = [t.weight for t in self._tables() if t.weight.requires_grad]
        dense = [p for p in self.net.parameters() if id(p) not in table_ids and p.requires_grad]
        self.opt_emb = torch.optim.Adagrad(emb, lr=self.config.emb_lr) if emb else None
        self.opt_dense = torch.optim.Adam(dense, lr=self.config.dense_lr) if dense else None

    def add_domain(self, name: str, freeze_shared: str | None = "tables") -> None:
        """Add domain ``name`` (a new domain row); ``freeze_shared`` = ``tables`` / ``all`` freezes
        :meth:`DACDRNet.shared_parameters` for the fine-tune that follows, None trains everything."""
        if name in self.config.domains:
            raise ValueError(f"domain {name!r} is already known")
        self.config.domains.append(name)
        if self.config.target_domains is not None and name not in self.config.target_domains:
            self.config.target_domains.append(name)
        self.net.add_domain_row()
        self.freeze(freeze_shared, domain_rows=self.net.domain.num_embeddings - 1 if freeze_shared else 0)

    def freeze(self, scope: str | None, domain_rows: int = 0) -> None:
        """Freeze :meth:`DACDRNet.shared_parameters` (``scope``) and the first ``domain_rows`` rows of
        the domain tables (the known domains' rows: a new domain's fine-tune trains its own row)."""
        for p in self.net.parameters():
            p.requires_grad_(True)
        if scope:
            for p in self.net.shared_parameters(scope):
                p.requires_grad_(False)
        self.frozen = scope
        self.frozen_domain_rows = int(domain_rows) if scope else 0
        self._build_optimizers()

    def _mask_frozen_rows(self) -> None:
        k = self.frozen_domain_rows
        if k:
            for t in (self.net.domain, self.net.domain_bias):
                if t.weight.grad is not None:
                    t.weight.grad[:k] = 0.0

    # ---- encoding ----------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return self.config.domains

    def _domain_rows(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        idx = {d: i + 1 for i, d in enumerate(self.domains)}
        return np.array([idx.get(_str(r.get("domain")), 0) for r in records], dtype=np.int64)

    def _groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        nb = len(self.config.behaviours)
        gd = torch.tensor([1 + d for d in range(len(self.domains)) for _ in range(nb)], dtype=torch.long)
        gb = torch.tensor([b for _ in range(len(self.domains)) for b in range(nb)], dtype=torch.long)
        return gd, gb

    def _field_rows(self, mappers: list[IdMapper], values: list[np.ndarray], times: np.ndarray,
                    observe: bool) -> np.ndarray:
        cols = []
        for m, v, table in zip(mappers, values, self._table_for(mappers)):
            if observe:
                rows, fresh = m.observe(v, times)
                if len(fresh):
                    self._reset_rows(table, fresh)
            else:
                rows = m.lookup(v)
            cols.append(rows)
        return np.stack(cols, 1) if cols else np.zeros((len(times), 0), dtype=np.int64)

    def _table_for(self, mappers: list[IdMapper]) -> list[torch.nn.Embedding]:
        return list(self.net.item_tables) if mappers is self.item_mappers else list(self.net.ctx_tables)

    def _reset_rows(self, table: torch.nn.Embedding, rows: np.ndarray) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long)
        with torch.no_grad():
            table.weight[idx] = torch.randn(len(idx), table.embedding_dim) * 0.05
        if self.opt_emb is not None:
            st = self.opt_emb.state.get(table.weight)
            if st and "sum" in st:
                st["sum"][idx] = 0.0

    def _values(self, records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[np.ndarray]:
        out = []
        for f in names:
            col = np.empty(len(records), dtype=object)
            col[:] = [_str(field_value(r, f)) for r in records]
            out.append(col)
        return out

    def _history_rows(self, hist_ids: np.ndarray) -> np.ndarray:
        """Interned history ids ``[n, D, B, L]`` -> item field rows ``[n, D, B, L, F]`` (0 for padding)."""
        uniq, inv = np.unique(hist_ids, return_inverse=True)
        items = [self.history.items[i] for i in uniq]
        table = np.zeros((len(uniq), len(self.config.item_fields)), dtype=np.int64)
        for f, m in enumerate(self.item_mappers):
            vals = np.empty(len(items), dtype=object)
            vals[:] = [it[f] if it else "" for it in items]
            table[:, f] = m.lookup(vals)
        table[uniq == PAD] = 0
        return table[inv.reshape(hist_ids.shape)]

    def _served_history_rows(self, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows and padding of histories carried by the records (``record["history"]``)."""
        cfg = self.config
        nd, nb, L, nf = len(self.domains), len(cfg.behaviours), cfg.max_len, len(cfg.item_fields)
        rows = np.zeros((len(records), nd, nb, L, nf), dtype=np.int64)
        pad = np.ones((len(records), nd, nb, L), dtype=bool)
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i, r in enumerate(records):
            h = r.get("history") or {}
            key = id(h)
            if key not in cache:
                lists = history_from_items(h, self.domains, cfg.behaviours, L)
                hr = np.zeros((nd, nb, L, nf), dtype=np.int64)
                hp = np.ones((nd, nb, L), dtype=bool)
                for d, per in enumerate(lists):
                    for b, items in enumerate(per):
                        if not items:
                            continue
                        k = len(items)
                        for f, m in enumerate(self.item_mappers):
                            vals = np.empty(k, dtype=object)
                            vals[:] = [it[f] if f < len(it) else "" for it in items]
                            hr[d, b, L - k:, f] = m.lookup(vals)
                        hp[d, b, L - k:] = False
                cache[key] = (hr, hp)
            rows[i], pad[i] = cache[key]
        return rows, pad

    def _tensors(self, records: Sequence[Mapping[str, Any]], hist_rows: np.ndarray, hist_pad: np.ndarray,
                 item_rows: np.ndarray, ctx_rows: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(records)
        dom = self._domain_rows(records)
        nd, nb = len(self.domains), len(self.config.behaviours)
        g = nd * nb
        hist = torch.as_tensor(hist_rows.reshape(n, g, self.config.max_len, -1))
        pad = torch.as_tensor(hist_pad.reshape(n, g, self.config.max_len))
        gd, gb = self._groups()
        dom_t = torch.as_tensor(dom)
        if self.config.history_domains == "own":
            pad = pad | (gd[None, :] != dom_t[:, None])[:, :, None]
        return {"item": torch.as_tensor(item_rows), "ctx": torch.as_tensor(ctx_rows), "dom": dom_t,
                "hist": hist, "hist_pad": pad, "group_domain": gd, "group_behaviour": gb}

    def encode(self, records: Sequence[Mapping[str, Any]], hist_ids: np.ndarray | None = None,
               observe_context: bool = False) -> dict[str, torch.Tensor]:
        """Tensors for the network. ``hist_ids`` (interned, from :meth:`BehaviourHistory.replay`) or
        the records' own ``history``; ``observe_context`` admits context values (training; items are
        admitted by :meth:`learn` from every visible record)."""
        times = np.array([float(r.get("event_time") or 0.0) for r in records])
        item_rows = self._field_rows(self.item_mappers, self._values(records, self.config.item_fields), times, False)
        ctx_rows = self._field_rows(self.ctx_mappers, self._values(records, self.config.context_fields), times,
                                    observe_context)
        if hist_ids is not None:
            hist_rows, hist_pad = self._history_rows(hist_ids), hist_ids == PAD
        else:
            hist_rows, hist_pad = self._served_history_rows(records)
        return self._tensors(records, hist_rows, hist_pad, item_rows, ctx_rows)

    # ---- StreamModel -------------------------------------------------------------------------
    def _trains_on(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        targets = self.config.target_domains
        doms = [_str(r.get("domain")) for r in records]
        if targets is None:
            known = set(self.domains)
            return np.array([d in known for d in doms], dtype=bool)
        t = set(targets)
        return np.array([d in t for d in doms], dtype=bool)

    def learn(self, records: list[dict[str, Any]], hide: Sequence[bool] | None = None) -> dict[str, Any]:
        """One incremental update. ``hide[i]``: record ``i`` is neither learnt nor folded into any
        history (the cold-start protocol's hidden target-domain records)."""
        cfg = self.config
        hidden = np.zeros(len(records), dtype=bool) if hide is None else np.asarray(hide, dtype=bool)
        hist_ids = self.history.replay(records, self.domains, mutate=True, skip=hidden)
        visible = [r for r, h in zip(records, hidden) if not h]
        times = np.array([float(r.get("event_time") or 0.0) for r in visible])
        if visible:  # every visible item gets a row, also those only seen in another domain's history
            self._field_rows(self.item_mappers, self._values(visible, cfg.item_fields), times, observe=True)
        sel = np.nonzero(self._trains_on(records) & ~hidden)[0]
        stats = {"examples": int(len(sel)), "loss": float("nan")}
        if len(sel) == 0:
            self.windows += 1
            return stats
        train = [records[i] for i in sel]
        batch = self.encode(train, hist_ids[sel], observe_context=True)
        y = torch.tensor([float(int(r.get("clicked") or 0) > 0) for r in train])
        self.net.train()
        losses = []
        for epoch in range(cfg.epochs):
            order = self._rng.permutation(len(train))
            for lo in range(0, len(order), cfg.batch_size):
                idx = torch.as_tensor(order[lo:lo + cfg.batch_size])
                b = {k: (v[idx] if k not in ("group_domain", "group_behaviour") else v) for k, v in batch.items()}
                loss = F.binary_cross_entropy_with_logits(self.net(**b), y[idx])
                for o in (self.opt_emb, self.opt_dense):
                    if o is not None:
                        o.zero_grad(set_to_none=True)
                loss.backward()
                self._mask_frozen_rows()
                for o in (self.opt_emb, self.opt_dense):
                    if o is not None:
                        o.step()
                losses.append(float(loss.detach()))
        self.net.eval()
        self.windows += 1
        self.examples += len(train)
        stats["loss"] = float(np.mean(losses))
        return stats

    @torch.no_grad()
    def _probs(self, batch: dict[str, torch.Tensor], chunk: int = 4096) -> np.ndarray:
        self.net.eval()
        n = batch["item"].shape[0]
        out = []
        for lo in range(0, n, chunk):
            b = {k: (v[lo:lo + chunk] if k not in ("group_domain", "group_behaviour") else v) for k, v in batch.items()}
            out.append(torch.sigmoid(self.net(**b)).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def predict_window(self, records: Sequence[Mapping[str, Any]], hide: Sequence[bool] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of time-ordered records, each with the history before it (folded on a
        throw-away overlay; ``hide`` as in :meth:`learn`), and whether its user was cold in its domain."""
        hist_ids = self.history.replay(records, self.domains, mutate=False, skip=hide)
        p = self._probs(self.encode(records, hist_ids))
        dom = self._domain_rows(records)
        own = np.zeros(len(records), dtype=np.int64)
        for i, d in enumerate(dom):
            if d > 0:
                own[i] = int((hist_ids[i, d - 1, 0] != PAD).sum())
        return p, own < self.config.cold_threshold

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        sel = np.nonzero(self._trains_on(records))[0]
        p, cold = self.predict_window(records)
        y = np.array([float(int(r.get("clicked") or 0) > 0) for r in records])
        p, cold, y = p[sel], cold[sel], y[sel]
        clicks = float(y.sum())
        return {"auc": auc(y, p), "logloss": logloss(y, p), "auc_cold": auc(y[cold], p[cold]),
                "auc_warm": auc(y[~cold], p[~cold]), "cold_examples": int(cold.sum()), "examples": int(len(y)),
                "calibration": float(p.sum()) / clicks if clicks > 0 else float("nan")}

    def predict(self, inputs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        records = list(inputs)
        if not records:
            return np.zeros(0)
        if all("history" in r for r in records):
            return self._probs(self.encode(records))
        ids = np.stack([self.history.matrix(_str(r.get("user_id")), self.domains) for r in records])
        return self._probs(self.encode(records, ids))

    def is_cold(self, user: str, domain: str) -> bool:
        return self.history.count(user, domain) < self.config.cold_threshold

    # ---- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "name": self.name, "net": dict(self.net.state_dict()),
                "item_mappers": [m.state_dict() for m in self.item_mappers],
                "ctx_mappers": [m.state_dict() for m in self.ctx_mappers],
                "history": self.history.state(), "frozen": self.frozen,
                "frozen_domain_rows": self.frozen_domain_rows,
                "opt_emb": self.opt_emb.state_dict() if self.opt_emb is not None else None,
                "opt_dense": self.opt_dense.state_dict() if self.opt_dense is not None else None,
                "windows": self.windows, "examples": self.examples}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DACDRModel":
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "net" not in state:
            raise ValueError("the state has no 'config'/'net' (not a DACDR model state)")
        m = cls(DACDRConfig.from_dict(state["config"]), name=str(state.get("name", "crossdomain")))
        m.net.load_state_dict(state["net"])
        for mapper, s in zip(m.item_mappers, state["item_mappers"]):
            mapper.load_state_dict(s)
        for mapper, s in zip(m.ctx_mappers, state["ctx_mappers"]):
            mapper.load_state_dict(s)
        m.history = BehaviourHistory.from_state(state["history"])
        m.freeze(state.get("frozen"), int(state.get("frozen_domain_rows", 0)))
        for opt, key in ((m.opt_emb, "opt_emb"), (m.opt_dense, "opt_dense")):
            if opt is not None and state.get(key):
                opt.load_state_dict(state[key])
        m.windows, m.examples = int(state.get("windows", 0)), int(state.get("examples", 0))
        m.net.eval()
        return m

    # ---- optional hooks ----------------------------------------------------------------------
    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        """Back to the serving version's weights, mappers and optimizers. The behaviour history is
        kept: it is data the stream already delivered, not something learnt."""
        other = DACDRModel.from_state(states[self.name])
        history = self.history
        self.__dict__.update(other.__dict__)
        self.history = history

    def fingerprint(self) -> dict[str, Any]:
        """The configuration without the domain lists: a checkpoint of a model that has since gained
        a domain (``add_domain``) still loads."""
        c = self.config.to_dict()
        c.pop("domains", None)
        c.pop("target_domains", None)
        return {"config": c}

    def validate(self) -> list[str]:
        problems = [f"{n} has non-finite values" for n, p in self.net.state_dict().items()
                    if p.is_floating_point() and not torch.isfinite(p).all()]
        for m in (*self.item_mappers, *self.ctx_mappers):
            problems += m.validate()
        return problems

    def meta(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "frozen": self.frozen, "windows": self.windows}

    def warm(self) -> None:
        p = self.predict([dict(WARM_RECORD, domain=self.domains[0], history={})])
        if not np.all(np.isfinite(p)):
            raise ValueError("the model predicts non-finite values")


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
