"""The cold-start protocol's input: any file of the shape user, item, domain, 0/1 label, time (plus
optional item-side and context categorical columns), checked and normalised. No torch here: the
command line validates a file before it loads the models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import ConfigError
from models.crossdomain.config import VARIANTS, DACDRConfig


@dataclass
class XDColumns:
    user: str = "user_id"
    item: str = "ad_id"
    domain: str = "domain"
    label: str = "clicked"
    time: str = "event_time"
    item_features: list[str] = field(default_factory=list)  # item-side categoricals (shared by domains)
    context: list[str] = field(default_factory=list)  # request-side categoricals


@dataclass
class XDEvalConfig:
    targets: list[str] | None = None  # None: every domain in turn
    variants: tuple[str, ...] = VARIANTS
    seeds: int = 3
    test_share: float = 0.2
    cold_share: float = 0.2
    windows: int = 10  # training windows (the stream's incremental updates)
    bootstrap: int = 500
    grid: dict[str, list[Any]] = field(default_factory=dict)  # DACDRConfig field -> values
    model: dict[str, Any] = field(default_factory=dict)  # DACDRConfig overrides for every model

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"unknown or empty variants {bad}; choose from {', '.join(VARIANTS)}")
        if not 0 < self.test_share < 1 or not 0 < self.cold_share <= 1:
            raise ConfigError("--test-share must be in (0, 1) and --cold-share in (0, 1]")
        if self.seeds < 1 or self.windows < 1:
            raise ConfigError("--seeds and --windows must be >= 1")
        known = set(DACDRConfig().to_dict())
        unknown = (set(self.grid) | set(self.model)) - known
        if unknown:
            raise ConfigError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")


def load_frame(path: str | Path, cols: XDColumns) -> pd.DataFrame:
    """Read a CSV/Parquet file and check the columns (clear errors for the user)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {p}")
    if p.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif p.suffix.lower() in (".csv", ".gz", ".txt", ".tsv"):
        df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", low_memory=False)
    else:
        raise ConfigError(f"{p}: unknown file type {p.suffix!r} (use .csv or .parquet)")
    return prepare_frame(df, cols)


def prepare_frame(df: pd.DataFrame, cols: XDColumns) -> pd.DataFrame:
    need = [cols.user, cols.item, cols.domain, cols.label, cols.time, *cols.item_features, *cols.context]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ConfigError(f"missing column(s) {missing}; the file has {list(df.columns)}")
    y = pd.to_numeric(df[cols.label], errors="coerce")
    if y.isna().any() or not y.isin([0, 1]).all():
        bad = df[cols.label][y.isna() | ~y.isin([0, 1])].iloc[0]
        raise ConfigError(f"label column {cols.label!r} must be 0/1, found {bad!r}")
    t = df[cols.time]
    if not pd.api.types.is_numeric_dtype(t):
        parsed = pd.to_datetime(t, errors="coerce", utc=True)
        if parsed.isna().any():
            raise ConfigError(f"time column {cols.time!r}: cannot parse {t[parsed.isna()].iloc[0]!r} as a number or date")
        t = parsed.astype("int64") / 1e9
    out = pd.DataFrame({"user_id": df[cols.user].astype(str), "ad_id": df[cols.item].astype(str),
                        "domain": df[cols.domain].astype(str), "clicked": y.astype(int),
                        "event_time": t.astype(float)})
    for c in [*cols.item_features, *cols.context]:
        out[c] = df[c].astype(str)
    out = out.sort_values("event_time", kind="stable").reset_index(drop=True)
    if out["domain"].nunique() < 2:
        raise ConfigError(f"column {cols.domain!r} has {out['domain'].nunique()} domain(s): cross-domain "
                          "evaluation needs at least two")
    return out
