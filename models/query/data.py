"""Reading labelled short-text files for the query classifier (any CSV/TSV).

A file has a text column and a label column (several labels per cell with ``label_sep``);
optional knowledge columns carry posterior click statistics per row (items separated by ``|``).
Errors a user can fix raise :class:`~core.errors.ConfigError` with what to change.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.errors import ConfigError

log = logging.getLogger(__name__)

KNOWLEDGE_PREFIXES = ("knowledge", "clicked_categories", "clicked_brands", "clicked_titles")


@dataclass
class Table:
    texts: list[str]
    labels: list[list[str]]
    knowledge: list[list[str]] | None = None
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Table":
        return Table([self.texts[i] for i in idx], [list(self.labels[i]) for i in idx],
                     [list(self.knowledge[i]) for i in idx] if self.knowledge is not None else None, self.source)


def _delimiter(path: Path, head: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    first = head.splitlines()[0] if head else ""
    if first.count("\t") > first.count(","):
        return "\t"
    return ","


def read_table(path: str | Path, text_col: str, label_col: str, label_sep: str | None = None,
               knowledge_cols: Sequence[str] | None = None, knowledge_sep: str = "|",
               encoding: str = "utf-8", require_labels: bool = True) -> Table:
    """Rows with a non-empty text (and, with ``require_labels``, at least one label).
    ``knowledge_cols=None`` picks the columns named ``knowledge*`` / ``clicked_categories`` /
    ``clicked_brands`` / ``clicked_titles`` when the file has them; ``[]`` uses none."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not valid {encoding} (byte {raw[e.start]:#04x} at offset {e.start}); "
                          f"re-encode it or pass --encoding (e.g. latin-1)") from None
    text = text.lstrip("\ufeff")
    delim = _delimiter(p, text[:4096])
    reader = csv.DictReader(io.StringIO(text), delimiter=delim)
    cols = reader.fieldnames or []
    for c in (text_col, label_col):
        if c not in cols:
            raise ConfigError(f"{p} has no column {c!r}; its columns are: {', '.join(cols) or '(none)'}")
    if knowledge_cols is None:
        kcols = [c for c in cols if c.lower().startswith(KNOWLEDGE_PREFIXES)]
    else:
        kcols = list(knowledge_cols)
        missing = [c for c in kcols if c not in cols]
        if missing:
            raise ConfigError(f"{p} has no knowledge column(s) {missing}; its columns are: {', '.join(cols)}")
    out = Table([], [], [] if kcols else None, str(p))
    skipped = {"empty_text": 0, "no_label": 0}
    for row in reader:
        t = " ".join((row.get(text_col) or "").split())
        if not t:
            skipped["empty_text"] += 1
            continue
        cell = (row.get(label_col) or "").strip()
        labels = [x.strip() for x in (cell.split(label_sep) if label_sep else [cell]) if x.strip()]
        labels = list(dict.fromkeys(labels))
        if not labels and require_labels:
            skipped["no_label"] += 1
            continue
        out.texts.append(t)
        out.labels.append(labels)
        if kcols:
            items: list[str] = []
            for c in kcols:
                items += [x.strip() for x in (row.get(c) or "").split(knowledge_sep) if x.strip()]
            out.knowledge.append(items)
    out.skipped = {k: v for k, v in skipped.items() if v}
    if not out.texts:
        raise ConfigError(f"{p}: no usable rows (need a non-empty {text_col!r} and a label in {label_col!r}); "
                          f"skipped {out.skipped}")
    if out.knowledge is not None and not any(out.knowledge):
        out.knowledge = None
    return out


def read_label_info(path: str | Path, encoding: str = "utf-8") -> dict[str, str]:
    """``label,text`` rows (any header names; first two columns): side information per label."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    text = p.read_text(encoding=encoding).lstrip("\ufeff")
    rows = list(csv.reader(io.StringIO(text), delimiter=_delimiter(p, text[:4096])))
    if not rows or len(rows[0]) < 2:
        raise ConfigError(f"{p}: expected two columns (label, text)")
    return {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) >= 2 and r[0].strip()}
