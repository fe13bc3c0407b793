"""Label graphs of SMGCN/SSUF (docs/query.md, "Graphs"): co-occurrence, semantic similarity and
hierarchy, and the symmetric normalisation ``Â = D^{-1/2} (A + I) D^{-1/2}``.

Everything here is plain numpy on dense ``[N, N]`` matrices over the label nodes (leaves first,
then the ancestors that only the hierarchy graph connects). The stream refresh recomputes them from
decayed counts; nothing here keeps state.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def sym_norm_adj(a: np.ndarray, self_loops: bool = True) -> np.ndarray:
    """``D^{-1/2} (½(A + Aᵀ) + I) D^{-1/2}`` for a non-negative ``A``: symmetric, eigenvalues in
    [−1, 1] (the largest is 1 for every non-empty connected component)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square, got {a.shape}")
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ValueError("adjacency must be finite and non-negative")
    a = 0.5 * (a + a.T)
    if self_loops:
        a = a + np.eye(a.shape[0])
    d = a.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    return (inv[:, None] * a * inv[None, :]).astype(np.float32)


def cooccurrence(label_sets: Sequence[Sequence[int]], n: int, weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts ``N(c_i)`` (diagonal) and ``N(c_i, c_j)`` over the training label sets (weighted:
    the stream passes decayed click mass). Returns ``(pair_counts [n, n], label_counts [n])``."""
    pairs = np.zeros((n, n), dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for k, labels in enumerate(label_sets):
        w = 1.0 if weights is None else float(weights[k])
        ls = sorted(set(int(x) for x in labels))
        for i in ls:
            counts[i] += w
        for x in range(len(ls)):
            for y in range(x + 1, len(ls)):
                pairs[ls[x], ls[y]] += w
                pairs[ls[y], ls[x]] += w
    np.fill_diagonal(pairs, counts)
    return pairs, counts


def cooccurrence_graph(pairs: np.ndarray, counts: np.ndarray, alpha: float) -> np.ndarray:
    """``a_ij = N(c_i, c_j) / N(c_i)`` (``a_ii = 1`` for seen labels), edges below ``alpha``
    dropped. Asymmetric; :func:`sym_norm_adj` symmetrises it."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(counts[:, None] > 0, pairs / np.maximum(counts[:, None], 1e-300), 0.0)
    a = np.clip(a, 0.0, 1.0)
    a[a < alpha] = 0.0
    return a


def similarity_graph(emb: np.ndarray, beta: float) -> np.ndarray:
    """``a_ij = cos(C_i, C_j)`` where it is at least ``beta`` (``i != j``), else 0."""
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    s = e @ e.T
    np.fill_diagonal(s, 0.0)
    s[s < beta] = 0.0
    return np.clip(s, 0.0, 1.0)


def hierarchy_graph(parents: Sequence[int], mass: Sequence[float] | None = None) -> np.ndarray:
    """Parent–child edges with SSUF's weight ``max(1/|Child(k)|, m_i / Σ_{j∈Child(k)} m_j)``;
    ``parents[i]`` is node i's parent (−1 for a root), ``mass[i]`` the child's (decayed) traffic.
    Weights lie in (0, 1]; the matrix holds both directions."""
    n = len(parents)
    m = np.ones(n) if mass is None else np.maximum(np.asarray(mass, dtype=np.float64), 0.0)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if p is not None and p >= 0:
            children.setdefault(int(p), []).append(i)
    a = np.zeros((n, n), dtype=np.float64)
    for k, kids in children.items():
        total = float(sum(m[j] for j in kids))
        for i in kids:
            w = max(1.0 / len(kids), (m[i] / total) if total > 0 else 0.0)
            a[k, i] = a[i, k] = w
    return a


def fuse_ssuf(coo: np.ndarray | None, sim: np.ndarray | None, hier: np.ndarray | None, n: int) -> np.ndarray:
    """SSUF's one graph: the leaf–leaf block ``½(A^coo + A^sim)`` (or the one present) plus the
    parent–child edges of ``A^hier`` (docs/query.md: our reading of the note's ``→ A^hier``)."""
    parts = [x for x in (coo, sim) if x is not None]
    a = np.zeros((n, n)) if not parts else sum(0.5 * (p + p.T) for p in parts) / len(parts)
    if hier is not None:
        a = a + hier
    return a


def pad_to(a: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad a square matrix to ``[n, n]`` (leaf-only graphs over the full node set)."""
    if a.shape[0] == n:
        return a
    out = np.zeros((n, n), dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def label_mass(label_sets: Sequence[Sequence[int]], n: int, weights: Mapping[int, float] | None = None) -> np.ndarray:
    """Training mass per label (a count, or decayed click mass): ``m_i`` of the hierarchy graph."""
    m = np.zeros(n)
    for k, labels in enumerate(label_sets):
        for i in set(labels):
            m[int(i)] += 1.0 if weights is None else float(weights.get(k, 1.0))
    return m
