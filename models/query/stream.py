"""The query classifier as a :class:`models.stream_model.StreamModel` (pure).

It learns from *query snapshots*: one record per query whose click statistics changed, written by
the faust refresh agent (``streams.query_refresh``) from the ``examples`` stream::

    {"query": "red running shoes", "labels": {"shoes/running-shoes": 0.8}, "clicks": 12.4,
     "impressions": 310.0, "knowledge": ["running shoes", "buy running shoes"], "event_time": 1.7e9}

``learn(window)``
    1. the replay buffer takes the window's snapshots (latest per query; bounded, the least
       recently updated queries leave first);
    2. categories never seen before become label nodes at once: their embedding is the encoded
       name and the semantic graph links them to similar labels, so they are predictable before
       any fine-tuning;
    3. label side information, the co-occurrence / similarity / hierarchy graphs are recomputed
       from the buffer (cheap: no training);
    4. every ``finetune_every`` windows, ``finetune_steps`` optimiser steps on batches mixing the
       window's fresh queries (``fresh_share``) with queries drawn from the whole buffer.

``score(window)``
    Held-out quality on snapshots the model has not learned: click-weighted micro-F1 of the
    predicted category set against the snapshot's labels (``f1``, the gate: higher is better,
    margin 0.02) and the share of click mass whose top category is a label (``top1``). The query's
    knowledge is what the model knew *before* the window (no leak from the labels being scored).

``predict(queries)``
    ``[[(category, probability), ...], ...]``: the predicted set of each query, best first, with
    the knowledge the version carries for known queries.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from models.query.classifier import QueryClassifier, dense_labels
from models.query.encoder import EncoderSpec, build_encoder, make_features, restore_encoder
from models.query.labels import LabelSpace, side_terms
from models.query.metrics import predict_sets
from models.query.ssuf import SSUFConfig, SSUFNet, variant_config
from models.stream_model import Criterion, Gate

QUERY_GATE = Gate.of(Criterion("f1", higher_is_better=True, margin=0.02, label="click F1"))
MAX_QUERY_CHARS = 256


@dataclass
class QueryStreamConfig:
    name: str = "query-classifier"
    variant: str = "ssuf"
    encoder: dict[str, Any] = field(default_factory=lambda: EncoderSpec().to_dict())
    hierarchy_sep: str = "/"
    threshold: float = 0.5
    max_labels: int = 3
    finetune_every: int = 1  # windows between fine-tunes (0: never)
    finetune_steps: int = 20
    batch_size: int = 32
    fresh_share: float = 0.5
    replay_size: int = 50_000  # queries kept in the buffer
    weight_cap: float = 50.0  # a query's sample weight is log1p(min(clicks, cap)): head queries do not drown the tail
    lr: float = 1e-3
    soft_labels: bool = True  # targets = click share / the query's largest share (False: every label 1)
    seed: int = 0
    ssuf: dict[str, Any] = field(default_factory=dict)  # SSUFConfig overrides

    def ssuf_config(self) -> SSUFConfig:
        over = dict(self.ssuf)
        over.setdefault("lr", self.lr)
        over.setdefault("seed", self.seed)
        return variant_config(self.variant, **over)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QueryStreamConfig":
        return cls(**{k: v for k, v in dict(d).items() if k in cls.__dataclass_fields__})


def clean_query(q: Any) -> str:
    """Whitespace-normalised, length-capped text ("" for anything that is not a usable string)."""
    if not isinstance(q, str):
        return ""
    return " ".join(q.split())[:MAX_QUERY_CHARS]


class QueryStreamModel:
    """See the module docstring."""

    gate = QUERY_GATE
    thread_safe = True

    def __init__(self, config: QueryStreamConfig | None = None, features=None) -> None:
        self.config = cfg = config or QueryStreamConfig()
        self.name = cfg.name
        self.scfg = cfg.ssuf_config()
        self.features = features
        self.buffer: dict[str, dict[str, Any]] = {}  # query -> {labels, knowledge, clicks, t}
        self.windows = 0
        self.records = 0
        self.finetunes = 0
        self.clf: QueryClassifier | None = None
        self._opt_state: dict | None = None
        self._rng = random.Random(cfg.seed)

    # ---- building -------------------------------------------------------------------------
    def _encoder(self):
        spec = EncoderSpec.from_dict(self.config.encoder)
        feats = self.features if self.features is not None else make_features(spec.features, spec.features_dim)
        enc = build_encoder(spec, features=feats)
        enc.cache_new = False  # serving: an unseen query's features are not kept
        return enc

    def _labels_in_buffer(self) -> list[str]:
        seen: dict[str, None] = {}
        for b in self.buffer.values():
            for c in b["labels"]:
                seen[c] = None
        return sorted(seen)

    def _rebuild(self, leaves: list[str]) -> bool:
        """Make the label space ``leaves`` (existing labels keep their order and weights; new ones
        are appended). Returns True when it changed."""
        old = self.clf.space.leaves if self.clf is not None else []
        new = old + [x for x in leaves if x not in set(old)]
        if self.clf is not None and new == old:
            return False
        space = LabelSpace.build(new, self.config.hierarchy_sep)
        torch.manual_seed(self.config.seed)  # the same stream gives the same model
        enc = self.clf.encoder if self.clf is not None else self._encoder()
        clf = QueryClassifier(self.scfg, space, enc)
        clf.threshold, clf.max_labels = self.config.threshold, self.config.max_labels
        if self.clf is not None:
            clf.side = {}
        torch.manual_seed(self.config.seed + len(new))
        clf.net = SSUFNet(self.scfg, enc, space.n_leaves, enc.ids(clf.node_texts()))
        if self.clf is not None:
            _copy_weights(self.clf, clf)
        self.clf = clf
        self._opt_state = None  # parameter shapes changed
        return True

    def _refresh(self) -> None:
        """Side information, node texts and graphs from the buffer (no training)."""
        clf = self.clf
        qs = list(self.buffer)
        labels = [clf.space.ids(self.buffer[q]["labels"]) for q in qs]
        weights = [self._weight(self.buffer[q]) for q in qs]
        if self.scfg.side_info:
            clf.side = side_terms(qs, labels, clf.space, self.scfg.side_terms, weights)
            clf.net.node_ids = clf.encoder.ids(clf.node_texts())
        clf.train_counts = np.zeros(clf.space.n_leaves)
        for ls, w in zip(labels, weights):
            for j in ls:
                clf.train_counts[j] += w
        clf.refresh_graphs(labels, weights)

    def _weight(self, b: Mapping[str, Any]) -> float:
        return math.log1p(min(float(b.get("clicks") or 0.0), self.config.weight_cap)) or 0.1

    # ---- StreamModel ----------------------------------------------------------------------
    def learn(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        fresh = []
        for r in records:
            q = clean_query(r.get("query"))
            labels = r.get("labels") or {}
            if not q or not isinstance(labels, dict):
                continue
            self.buffer.pop(q, None)  # re-insert: dict order = recency
            self.buffer[q] = {"labels": {str(k): float(v) for k, v in labels.items()},
                              "knowledge": [clean_query(x) for x in (r.get("knowledge") or []) if clean_query(x)],
                              "clicks": float(r.get("clicks") or 0.0), "t": float(r.get("event_time") or 0.0)}
            fresh.append(q)
        while len(self.buffer) > self.config.replay_size:
            self.buffer.pop(next(iter(self.buffer)))
        self.records += len(records)
        self.windows += 1
        stats: dict[str, Any] = {"records": len(records), "queries": len(self.buffer), "finetuned": False}
        leaves = self._labels_in_buffer()
        if not leaves:
            return stats
        before = self.clf.space.n_leaves if self.clf is not None else 0
        self._rebuild(leaves)
        stats["new_labels"] = self.clf.space.n_leaves - before
        stats["labels"] = self.clf.space.n_leaves
        self._refresh()
        every = self.config.finetune_every
        if every and self.windows % every == 0 and fresh:
            stats["loss"] = self._finetune(fresh)
            stats["finetuned"] = True
            self.finetunes += 1
            if "sim" in self.scfg.graphs:
                self._refresh()
        self.clf._h_cache = None
        return stats

    def _finetune(self, fresh: list[str]) -> float:
        cfg, clf = self.config, self.clf
        net = clf.net
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=self.scfg.weight_decay)
        if self._opt_state is not None:
            try:
                opt.load_state_dict(self._opt_state)
            except (ValueError, KeyError):
                pass
        allq = [q for q in self.buffer if self.buffer[q]["labels"]]
        fresh = [q for q in fresh if self.buffer.get(q, {}).get("labels")]
        if not allq:
            return float("nan")
        torch.manual_seed(cfg.seed + self.windows)
        net.train()
        loss_v = float("nan")
        n_fresh = max(1, int(round(cfg.fresh_share * cfg.batch_size))) if fresh else 0
        for _ in range(cfg.finetune_steps):
            batch = [self._rng.choice(fresh) for _ in range(n_fresh)]
            batch += [self._rng.choice(allq) for _ in range(cfg.batch_size - n_fresh)]
            q_ids = clf.encoder.ids(batch)
            k_ids = clf._knowledge_ids([self.buffer[q]["knowledge"] for q in batch], len(batch), register=True)
            y = self._targets(batch)
            w = torch.tensor([self._weight(self.buffer[q]) for q in batch])
            out = net(q_ids, k_ids)
            loss, _ = net.loss(out, y, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
        net.eval()
        self._opt_state = opt.state_dict()
        return loss_v

    def _targets(self, batch: list[str]) -> torch.Tensor:
        """Click labels as targets: 1 for hard labels, or (``soft_labels``) each label's click share
        relative to the query's largest share, so the dominant category ranks first."""
        clf = self.clf
        if not self.config.soft_labels:
            return dense_labels([clf.space.ids(self.buffer[q]["labels"]) for q in batch], clf.space.n_leaves)
        y = torch.zeros(len(batch), clf.space.n_leaves)
        for i, q in enumerate(batch):
            ls = self.buffer[q]["labels"]
            top = max(ls.values()) if ls else 0.0
            for c, share in ls.items():
                j = clf.space.index.get(c)
                if j is not None and j < clf.space.n_leaves and top > 0:
                    y[i, j] = min(1.0, share / top)
        return y

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [(clean_query(r.get("query")), r.get("labels") or {}, float(r.get("clicks") or 0.0)) for r in records]
        rows = [(q, ls, c) for q, ls, c in rows if q and isinstance(ls, dict) and ls]
        if not rows or self.clf is None:
            return {"f1": float("nan"), "top1": float("nan"), "n": len(rows)}
        probs = self._proba([q for q, _, _ in rows])
        sets = predict_sets(probs, self.config.threshold, 1, self.config.max_labels)
        tp = fp = fn = 0.0
        hit = mass = 0.0
        leaves = self.clf.space.leaves
        for (q, ls, c), s, p in zip(rows, sets, probs):
            w = self._weight({"clicks": c})
            pred = {leaves[j] for j in s}
            gold = set(ls)
            tp += w * len(pred & gold)
            fp += w * len(pred - gold)
            fn += w * len(gold - pred)
            hit += w * (leaves[int(np.argmax(p))] in gold)
            mass += w
        d = 2 * tp + fp + fn
        return {"f1": 2 * tp / d if d else float("nan"), "top1": hit / mass if mass else float("nan"), "n": len(rows)}

    def _proba(self, queries: Sequence[str]) -> np.ndarray:
        kn = [self.buffer[q]["knowledge"] if q in self.buffer else [] for q in queries]
        return self.clf.predict_proba(list(queries), kn if self.scfg.knowledge else None)

    def predict(self, inputs: Sequence[Any]) -> list[list[tuple[str, float]]]:
        """Categories of each query (a string, or a dict with ``query``), best first."""
        queries = [clean_query(x.get("query") if isinstance(x, Mapping) else x) for x in inputs]
        out: list[list[tuple[str, float]]] = [[] for _ in queries]
        idx = [i for i, q in enumerate(queries) if q]
        if self.clf is None or not idx:
            return out
        probs = self._proba([queries[i] for i in idx])
        sets = predict_sets(probs, self.config.threshold, 1, self.config.max_labels)
        leaves = self.clf.space.leaves
        for i, p, s in zip(idx, probs, sets):
            out[i] = sorted(((leaves[j], float(p[j])) for j in s), key=lambda x: -x[1])
        return out

    def head_queries(self, n: int) -> list[str]:
        """The ``n`` queries with the most (decayed) clicks in the buffer: the serving cache's warm set."""
        return sorted(self.buffer, key=lambda q: (-self.buffer[q]["clicks"], q))[:n]

    @property
    def labels(self) -> list[str]:
        return list(self.clf.space.leaves) if self.clf is not None else []

    # ---- state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": "query-classifier", "config": self.config.to_dict(), "windows": self.windows,
                             "records": self.records, "finetunes": self.finetunes,
                             "buffer": [[q, b["labels"], b["knowledge"], b["clicks"], b["t"]] for q, b in self.buffer.items()]}
        if self.clf is not None:
            s["leaves"] = list(self.clf.space.leaves)
            s["side"] = {str(k): v for k, v in self.clf.side.items()}
            s["encoder"] = self.clf.encoder.export()
            s["net"] = {k: v.detach().clone() for k, v in self.clf.net.state_dict().items()
                        if not k.startswith("encoder.")}
        return s

    @classmethod
    def from_state(cls, state: dict[str, Any], features=None) -> "QueryStreamModel":
        if not isinstance(state, dict) or state.get("kind") != "query-classifier":
            raise ValueError("not a query-classifier state")
        m = cls(QueryStreamConfig.from_dict(state["config"]), features=features)
        m.windows, m.records, m.finetunes = int(state["windows"]), int(state["records"]), int(state.get("finetunes", 0))
        for q, ls, kn, c, t in state["buffer"]:
            m.buffer[q] = {"labels": dict(ls), "knowledge": list(kn), "clicks": float(c), "t": float(t)}
        if "leaves" in state:
            enc = restore_encoder(state["encoder"], features=features)
            enc.cache_new = False
            space = LabelSpace.build(state["leaves"], m.config.hierarchy_sep)
            clf = QueryClassifier(m.scfg, space, enc)
            clf.threshold, clf.max_labels = m.config.threshold, m.config.max_labels
            clf.side = {int(k): list(v) for k, v in state.get("side", {}).items()}
            clf.net = SSUFNet(m.scfg, enc, space.n_leaves, enc.ids(clf.node_texts()))
            clf.net.load_state_dict({**{f"encoder.{k}": v for k, v in enc.state_dict().items()}, **state["net"]},
                                    strict=False)
            m.clf = clf
            m._refresh_graphs_only()
            clf.net.eval()
        return m

    def _refresh_graphs_only(self) -> None:
        clf = self.clf
        qs = list(self.buffer)
        labels = [clf.space.ids(self.buffer[q]["labels"]) for q in qs]
        weights = [self._weight(self.buffer[q]) for q in qs]
        clf.train_counts = np.zeros(clf.space.n_leaves)
        for ls, w in zip(labels, weights):
            for j in ls:
                clf.train_counts[j] += w
        clf.refresh_graphs(labels, weights)

    # ---- optional hooks -------------------------------------------------------------------
    def reset_to(self, states: dict[str, dict[str, Any]]) -> None:
        other = type(self).from_state(states[self.name], features=self.features)
        self.__dict__.update({k: v for k, v in other.__dict__.items() if k != "features"})

    def fingerprint(self) -> dict[str, Any]:
        c = self.config.to_dict()
        return {"variant": c["variant"], "encoder": c["encoder"], "ssuf": c["ssuf"]}

    def validate(self) -> list[str]:
        if self.clf is None:
            return []
        bad = [k for k, v in self.clf.net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        return [f"non-finite weights in {k}" for k in bad]

    def meta(self) -> dict[str, Any]:
        return {"variant": self.config.variant, "labels": len(self.labels), "queries": len(self.buffer),
                "windows": self.windows, "finetunes": self.finetunes}

    def warm(self) -> None:
        out = self.predict(["warm up query"])
        if self.clf is not None and not out[0]:
            raise ValueError("the model predicts nothing for a query")
        for _, p in out[0]:
            if not math.isfinite(p):
                raise ValueError("the model predicts non-finite probabilities")


def _copy_weights(old: QueryClassifier, new: QueryClassifier) -> None:
    """Carry weights over a label-space change: shared tensors as they are, per-label rows by name."""
    o, n = old.net.state_dict(), new.net.state_dict()
    pos = {name: i for i, name in enumerate(old.space.leaves)}
    for k, v in n.items():
        if k.startswith("encoder.") or k not in o:
            continue
        ov = o[k]
        if ov.shape == v.shape:
            n[k] = ov.clone()
        elif v.dim() >= 1 and v.shape[0] == new.space.n_leaves and ov.shape[0] == old.space.n_leaves:
            nv = v.clone()
            for j, name in enumerate(new.space.leaves):
                if name in pos:
                    nv[j] = ov[pos[name]]
            n[k] = nv
    new.net.load_state_dict(n)
