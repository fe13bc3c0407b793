"""A trained query classifier: label space + shared encoder + SSUF network + decision threshold.

``QueryClassifier.fit`` trains with early stopping on a validation set (the threshold is chosen
there too); ``predict_proba`` / ``predict`` serve. Pure: data in, arrays out.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from models.query.encoder import SharedEncoder
from models.query.labels import LabelSpace, label_texts, side_terms
from models.query.metrics import f1_scores, predict_sets
from models.query.ssuf import SSUFConfig, SSUFNet, graph_inputs

log = logging.getLogger(__name__)

THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.05, 0.96, 0.05))
CAPS: tuple[int | None, ...] = (1, 2, 3, 5, None)


@dataclass
class QueryData:
    """Queries with leaf-label ids (click labels for training, gold for evaluation), optional
    posterior knowledge texts per query and optional sample weights."""

    queries: list[str]
    labels: list[list[int]]
    knowledge: list[list[str]] | None = None
    weights: list[float] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, idx: Sequence[int]) -> "QueryData":
        return QueryData([self.queries[i] for i in idx], [list(self.labels[i]) for i in idx],
                         [list(self.knowledge[i]) for i in idx] if self.knowledge is not None else None,
                         [self.weights[i] for i in idx] if self.weights is not None else None)


def label_counts(labels: Sequence[Sequence[int]], n: int) -> np.ndarray:
    c = np.zeros(n)
    for ls in labels:
        for j in set(ls):
            c[j] += 1
    return c


def dense_labels(labels: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    y = torch.zeros(len(labels), n)
    for i, ls in enumerate(labels):
        if ls:
            y[i, list(set(ls))] = 1.0
    return y


@dataclass
class FitResult:
    epochs: int = 0
    best_epoch: int = 0
    val_metric: float = float("nan")
    threshold: float = 0.5
    history: list[dict[str, float]] = field(default_factory=list)


class QueryClassifier:
    def __init__(self, cfg: SSUFConfig, space: LabelSpace, encoder: SharedEncoder,
                 label_info: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.space = space
        self.encoder = encoder
        self.label_info = dict(label_info or {})
        self.side: dict[int, list[str]] = {}
        self.threshold = 0.5
        self.max_labels: int | None = None
        self.train_counts = np.zeros(space.n_leaves)
        self.net: SSUFNet | None = None
        self._h_cache: torch.Tensor | None = None

    # ---- building
    def node_texts(self) -> list[str]:
        if self.cfg.side_info:
            return label_texts(self.space, self.side, self.label_info)
        return list(self.space.texts)

    def build(self, train: QueryData | None = None, pair_counts=None, count_vec=None) -> SSUFNet:
        """(Re)build the network and its graphs from the training data (or given counts)."""
        cfg = self.cfg
        if train is not None:
            self.train_counts = label_counts(train.labels, self.space.n_leaves)
            if cfg.side_info:
                self.side = side_terms(train.queries, train.labels, self.space, cfg.side_terms, train.weights)
        node_ids = self.encoder.ids(self.node_texts())
        self.net = SSUFNet(cfg, self.encoder, self.space.n_leaves, node_ids)
        self.refresh_graphs(train.labels if train is not None else [], train.weights if train is not None else None,
                            pair_counts, count_vec)
        return self.net

    def refresh_graphs(self, labels: Sequence[Sequence[int]] = (), weights=None, pair_counts=None, count_vec=None) -> None:
        """Recompute the normalised graphs (co-occurrence from labels or counts; similarity from the
        current label embeddings; hierarchy from the label mass). Cheap: no training."""
        if not self.cfg.graphs:
            self._h_cache = None
            return
        was = self.net.training
        self.net.eval()  # no dropout in the graph's label embeddings
        with torch.no_grad():
            c = self.encoder(self.net.node_ids).numpy()
        self.net.train(was)
        adj = graph_inputs(self.cfg, self.space.n_leaves, self.space.parents, labels, c, weights,
                           pair_counts, count_vec)
        self.net.set_graphs(adj)
        self._h_cache = None

    # ---- tensors
    def _knowledge_ids(self, knowledge: Sequence[Sequence[str]] | None, n: int, register: bool) -> torch.Tensor | None:
        if not self.cfg.knowledge or knowledge is None:
            return None
        m = self.cfg.ke_max_items
        out = torch.full((n, m), -1, dtype=torch.long)
        for i, items in enumerate(knowledge):
            items = [t for t in items if t][:m]
            if items:
                if register:
                    out[i, :len(items)] = self.encoder.ids(items)
                else:
                    idx = [self.encoder.table.index.get(t, -2) for t in items]
                    out[i, :len(items)] = torch.tensor(idx)
        return out

    # ---- training
    def fit(self, train: QueryData, val: QueryData | None = None, select: str = "macro_f1",
            progress: Callable[[int], None] | None = None) -> FitResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        keep = [i for i, ls in enumerate(train.labels) if ls]
        train = train.subset(keep)
        if val is None or len(val) == 0:  # hold out 10% of the training queries for early stopping
            idx = list(range(len(train)))
            rng.shuffle(idx)
            k = max(1, len(idx) // 10)
            val, train = train.subset(idx[:k]), train.subset(idx[k:])
        self.build(train)
        net = self.net
        q_ids = self.encoder.ids(train.queries)
        k_ids = self._knowledge_ids(train.knowledge, len(train), register=True)
        y = dense_labels(train.labels, self.space.n_leaves)
        w = torch.tensor(train.weights, dtype=torch.float32) if train.weights is not None else None
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        res = FitResult()
        # epoch 0 (the untrained network: zero-shot for label-semantic variants) is a candidate too
        best, (self.threshold, self.max_labels) = self._validate(val, select)
        best_state, best_adj, bad = copy.deepcopy(net.state_dict()), dict(net.adj), 0
        res.history.append({"epoch": 0, select: best, "threshold": self.threshold})
        n = len(train)
        epoch = -1
        loss = torch.tensor(float("nan"))
        for epoch in range(cfg.max_epochs if n else 0):
            net.train()
            order = list(range(n))
            rng.shuffle(order)
            for s in range(0, n, cfg.batch_size):
                b = torch.tensor(order[s:s + cfg.batch_size])
                out = net(q_ids[b], k_ids[b] if k_ids is not None else None)
                loss, _ = net.loss(out, y[b], w[b] if w is not None else None)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if "sim" in cfg.graphs or "ssuf" in net.channels:
                self.refresh_graphs(train.labels, train.weights)  # label embeddings moved
            self._h_cache = None
            metric, (thr, cap) = self._validate(val, select)
            res.history.append({"epoch": epoch + 1, "loss": float(loss.detach()), select: metric, "threshold": thr})
            if progress is not None:
                progress(1)
            if metric > best + 1e-6:
                best, bad, res.best_epoch, self.threshold, self.max_labels = metric, 0, epoch + 1, thr, cap
                best_state = copy.deepcopy(net.state_dict())
                best_adj = dict(net.adj)
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        res.epochs = epoch + 1
        net.load_state_dict(best_state)
        net.adj = best_adj
        self._h_cache = None
        res.val_metric, res.threshold = best, self.threshold
        return res

    def _validate(self, val: QueryData, select: str) -> tuple[float, tuple[float, int | None]]:
        probs = self.predict_proba(val.queries, val.knowledge)
        return best_threshold(probs, val.labels, self.train_counts, select)

    # ---- serving
    @torch.no_grad()
    def leaf_embeddings(self) -> torch.Tensor:
        if self._h_cache is None:
            self.net.eval()
            _, h = self.net.label_embeddings()
            self._h_cache = h[: self.space.n_leaves]
        return self._h_cache

    @torch.no_grad()
    def predict_proba(self, queries: Sequence[str], knowledge: Sequence[Sequence[str]] | None = None,
                      batch: int = 256) -> np.ndarray:
        net = self.net
        net.eval()
        h = self.leaf_embeddings() if (self.cfg.label_semantic or self.cfg.semi) else None
        out = []
        for s in range(0, len(queries), batch):
            qs = list(queries[s:s + batch])
            qv = self.encoder.encode(qs)
            if self.cfg.knowledge and knowledge is not None:
                ks = [list(x)[: self.cfg.ke_max_items] for x in knowledge[s:s + batch]]
                qv = self._fuse_texts(qv, ks)
            out.append(torch.sigmoid(net.logits(qv, h)).numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, self.space.n_leaves), dtype=np.float32)

    def _fuse_texts(self, qv: torch.Tensor, ks: list[list[str]]) -> torch.Tensor:
        from models.query.ssuf import knowledge_fuse

        m = max((len(x) for x in ks), default=0)
        if m == 0:
            return qv
        flat = [t for x in ks for t in x]
        kv = self.encoder.encode(flat) if flat else torch.zeros(0, qv.shape[1])
        k = torch.zeros(len(ks), m, qv.shape[1])
        mask = torch.zeros(len(ks), m, dtype=torch.bool)
        p = 0
        for i, x in enumerate(ks):
            if x:
                k[i, :len(x)] = kv[p:p + len(x)]
                mask[i, :len(x)] = True
                p += len(x)
        fused, _ = knowledge_fuse(qv, k, mask)
        return fused

    def predict(self, queries: Sequence[str], knowledge: Sequence[Sequence[str]] | None = None) -> list[set[int]]:
        return predict_sets(self.predict_proba(queries, knowledge), self.threshold, 1, self.max_labels)


def best_threshold(probs: np.ndarray, gold: Sequence[Sequence[int]], train_counts,
                   select: str) -> tuple[float, tuple[float, int | None]]:
    """The decision rule (threshold of :data:`THRESHOLDS` × cap of :data:`CAPS` labels per query,
    always at least one) that maximises ``select`` (``micro_f1``, ``macro_f1`` or ``mean``) on
    ``gold``. Returns (metric, (threshold, cap)). Vectorised: it runs after every epoch."""
    n, L = probs.shape
    g = np.zeros((n, L), dtype=bool)
    for i, ls in enumerate(gold):
        for j in ls:
            g[i, j] = True
    support = g.sum(0) > 0
    rank = np.empty((n, L), dtype=np.int64)
    order = np.argsort(-probs, axis=1, kind="stable")
    rank[np.arange(n)[:, None], order] = np.arange(L)[None, :]
    best: tuple[float, tuple[float, int | None]] = (-1.0, (0.5, None))
    for cap in CAPS:
        within = rank < (cap if cap is not None else L)
        for t in THRESHOLDS:
            pred = (((probs >= t) & within) | (rank == 0))
            tp = (pred & g).sum(0)
            fp = (pred & ~g).sum(0)
            fn = (~pred & g).sum(0)
            d = 2 * tp.sum() + fp.sum() + fn.sum()
            micro = 2 * tp.sum() / d if d else 0.0
            den = (2 * tp + fp + fn)[support]
            macro = float(np.mean(np.where(den > 0, 2 * tp[support] / np.maximum(den, 1), 0.0))) if support.any() else 0.0
            v = 0.5 * (micro + macro) if select == "mean" else (micro if select == "micro_f1" else macro)
            if v > best[0] + 1e-9:
                best = (float(v), (t, cap))
            if cap == 1:
                break  # with one label the threshold does not matter
    return best
