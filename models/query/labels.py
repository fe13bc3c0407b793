"""The label space: leaf labels (what is predicted) and, when a hierarchy is known, their ancestors
(nodes of the hierarchy graph only). Also the label texts the shared encoder reads: the label's
name, plus side information when the label-enhanced module is on.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

STOPWORDS = frozenset(
    "a an and or the of for in on with without to by from at as is are be not no new set sets "
    "best cheap buy sale online discount size men women mens womens kids".split()
)
_SPLIT_CAMEL = re.compile(r"[-_]+")


def display_name(label: str, sep: str | None = None) -> str:
    """The readable text of a label id: its last path component (when ``sep`` is given) with
    ``-``/``_`` turned into spaces: ``shoes/running-shoes`` -> ``running shoes``."""
    part = label.split(sep)[-1] if sep else label
    return " ".join(_SPLIT_CAMEL.sub(" ", part).split()) or label.strip() or "?"


@dataclass
class LabelSpace:
    """``names[:n_leaves]`` are the leaf labels, the rest their ancestors. ``parents[i]`` is node
    i's parent node (−1 for none)."""

    names: list[str]
    texts: list[str]
    parents: list[int]
    n_leaves: int
    sep: str | None = None
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    @property
    def leaves(self) -> list[str]:
        return self.names[: self.n_leaves]

    @property
    def has_hierarchy(self) -> bool:
        return any(p >= 0 for p in self.parents)

    @classmethod
    def build(cls, leaves: Iterable[str], sep: str | None = None) -> "LabelSpace":
        """Leaves in the given order (deduplicated); with ``sep`` every proper prefix path of a
        leaf becomes an ancestor node (``a/b/c`` -> ``a``, ``a/b``)."""
        leaves = list(dict.fromkeys(x for x in leaves if x))
        names = list(leaves)
        anc: dict[str, None] = {}
        if sep:
            for leaf in leaves:
                parts = [p for p in leaf.split(sep)]
                for k in range(1, len(parts)):
                    a = sep.join(parts[:k])
                    if a not in anc and a not in set(leaves):
                        anc[a] = None
        names += list(anc)
        index = {n: i for i, n in enumerate(names)}
        parents = []
        for n in names:
            p = -1
            if sep and sep in n:
                pp = n.rsplit(sep, 1)[0]
                p = index.get(pp, -1)
            parents.append(p)
        texts = [display_name(n, sep) for n in names]
        return cls(names, texts, parents, len(leaves), sep)

    def ids(self, labels: Iterable[str]) -> list[int]:
        """Leaf ids of known labels (unknown ones are dropped)."""
        out = []
        for x in labels:
            i = self.index.get(x)
            if i is not None and i < self.n_leaves:
                out.append(i)
        return out


def side_terms(queries: Sequence[str], labels: Sequence[Sequence[int]], space: LabelSpace, k: int,
               weights: Sequence[float] | None = None) -> dict[int, list[str]]:
    """Frequently searched terms per leaf label (SSUF side information ``m_j``): words of the
    training queries labelled j, ranked by count × specificity (share of the word's occurrences
    that fall in j), without stop words and words already in the label name."""
    per: dict[int, Counter] = defaultdict(Counter)
    total: Counter = Counter()
    for n, (q, ls) in enumerate(zip(queries, labels)):
        w = 1.0 if weights is None else float(weights[n])
        words = {t for t in re.findall(r"\w+", q.lower()) if len(t) > 1 and t not in STOPWORDS and not t.isdigit()}
        for t in words:
            total[t] += w
            for j in set(ls):
                per[j][t] += w
    out: dict[int, list[str]] = {}
    for j, c in per.items():
        name_words = set(re.findall(r"\w+", space.texts[j].lower()))
        scored = [(cnt * (cnt / total[t]), t) for t, cnt in c.items() if t not in name_words]
        scored.sort(key=lambda x: (-x[0], x[1]))
        out[j] = [t for _, t in scored[:k]]
    return out


def label_texts(space: LabelSpace, side: Mapping[int, Sequence[str]] | None = None,
                info: Mapping[str, str] | None = None) -> list[str]:
    """Encoder input per node: the name, with side information appended when given
    (``name: info; term, term``)."""
    out = []
    for i, t in enumerate(space.texts):
        extra = []
        if info and space.names[i] in info and info[space.names[i]].strip():
            extra.append(info[space.names[i]].strip())
        if side and side.get(i):
            extra.append(", ".join(side[i]))
        out.append(f"{t}: {'; '.join(extra)}" if extra else t)
    return out
