"""Input data of the CTR protocol (:mod:`models.evaluation`): the column roles, reading a CSV or
Parquet file, checking and sorting it by time. Pure pandas; the command line and the benches call
these, and ``models.evaluation`` re-exports them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ConfigError

log = logging.getLogger("models.evaluation")


@dataclass
class Columns:
    time: str
    label: str
    categorical: list[str]
    numeric: list[str] = field(default_factory=list)
    segment: str | None = None  # optional column: the audit gets AUC/LogLoss per segment value


def check_sorted(df: pd.DataFrame, time_col: str) -> None:
    """ConfigError unless ``df`` is sorted by ``time_col`` (what ``prepare_frame`` returns)."""
    t = pd.to_numeric(df[time_col], errors="coerce").to_numpy(dtype=np.float64)
    if len(t) > 1 and not (np.diff(t) >= 0).all():
        raise ConfigError(
            f"the frame is not sorted by {time_col!r}: periods would not be time-ordered "
            "(pass it through models.evaluation.prepare_frame, which sorts it)"
        )


def load_frame(path: str | Path, cols: Columns) -> pd.DataFrame:
    """Reads a CSV or Parquet file, checks the columns, sorts by time.

    Raises ConfigError for a missing/unreadable file or missing columns. Rows with a missing time
    or label are dropped (logged); the time column becomes float (datetimes -> epoch seconds).
    """
    return prepare_frame(read_table(path), cols)


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV or Parquet file as a DataFrame; ConfigError for a missing, unreadable or unknown file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".gz", ".txt", ".tsv"):
            return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", low_memory=False)
        raise ConfigError(f"unsupported data file type {suffix!r}: use .csv or .parquet")
    except ConfigError:
        raise
    except Exception as e:  # pandas raises many different types for unreadable files
        raise ConfigError(f"cannot read {p}: {e}") from e


def prepare_frame(df: pd.DataFrame, cols: Columns) -> pd.DataFrame:
    """Column checks, time conversion, row filtering and a stable time sort (logged when the
    input was not in time order)."""
    needed = [cols.time, cols.label, *cols.categorical, *cols.numeric]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise ConfigError(f"missing column(s) {missing}; available: {list(df.columns)}")
    if not cols.categorical:
        raise ConfigError("at least one categorical column is required (--categorical a,b,...)")
    overlap = set(cols.categorical) & set(cols.numeric) | ({cols.label, cols.time} & set(cols.categorical + cols.numeric))
    if overlap:
        raise ConfigError(f"column(s) {sorted(overlap)} given in more than one role")
    df = df.copy()
    df[cols.time] = time_to_float(df[cols.time], cols.time)
    df[cols.label] = pd.to_numeric(df[cols.label], errors="coerce")
    bad = df[cols.time].isna() | df[cols.label].isna()
    if bad.any():
        log.warning("dropping %d rows with a missing/invalid time or label", int(bad.sum()))
        df = df[~bad]
    if len(df) == 0:
        raise ConfigError("no usable rows (every row has a missing time or label)")
    t = df[cols.time].to_numpy()
    if len(t) > 1 and not (np.diff(t) >= 0).all():
        log.warning("the input is not sorted by %r: sorting %d rows by time (stable)", cols.time, len(df))
    return df.sort_values(cols.time, kind="mergesort").reset_index(drop=True)


def time_to_float(s: pd.Series, name: str) -> pd.Series:
    """A time column as float epoch seconds (numbers kept as they are; dates parsed, naive = UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        return (s.astype("int64") / 1e9).astype(np.float64)
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() >= 0.5 * max(1, s.notna().sum()):
        return num.astype(np.float64)
    dt = pd.to_datetime(s, errors="coerce", utc=True)
    if dt.notna().sum() == 0:
        raise ConfigError(f"time column {name!r} is neither numeric nor a date/time")
    return pd.Series(dt.astype("int64") / 1e9, index=s.index).where(dt.notna())
