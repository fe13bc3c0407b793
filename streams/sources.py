"""Event sources: real logs and the synthetic world as :mod:`core.events`, in event-time order.

Every source is a generator of events (:class:`~core.events.Impression`, ``Click``, ``Conversion``,
``BidwordChange``) sorted by ``event_time``; :func:`open_source` builds one by name:

``synthetic``  the :class:`core.world.World` (seed, duration, requests/s, drift switches)
``obd``        Open Bandit Dataset sample (``<shared data>/obd/{random,bts}/{men,women}``)
``adwords``    daily impressions/clicks per keyword (``<shared data>/adwords``), expanded into events
``file``       any CSV/Parquet with a time column, a 0/1 label column and feature columns

A click of a real log has no time of its own, so it is placed ``click_delay_s`` after its impression
(AdWords: spread at random). The mappings are documented in ``docs/world.md``. Errors the user can
fix (missing files or columns, unparseable timestamps, bad labels) raise
:class:`~core.errors.ConfigError` with the offending path, column or value.

The AdWords data are GPL-3: they are read from the shared data folder at run time, never copied.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from core.errors import ConfigError
from core.events import ENTITY_KEYS, Click, Event, Impression

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SHARED_DATA_ENV = "ADSTREAM_SHARED_DATA"
SOURCE_NAMES = ("synthetic", "obd", "adwords", "file")
OBD_CAMPAIGNS = ("men", "women")
OBD_POLICIES = ("random", "bts")
# id roles of the generic table source and the column names used when no mapping is given
ID_ROLES = {
    "request": "request_id",
    **ENTITY_KEYS,
    "position": "position",
    "bid": "bid",
}


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def shared_data_dir(required: bool = True) -> Path | None:
    """The shared data folder: ``$ADSTREAM_SHARED_DATA`` or ``../shared/data`` next to the repo."""
    env = os.environ.get(SHARED_DATA_ENV)
    p = Path(env).expanduser() if env else repo_root().parent / "shared" / "data"
    if p.is_dir():
        return p
    if required:
        raise ConfigError(
            f"shared data folder {p} not found; set {SHARED_DATA_ENV} or pass --data-dir"
        )
    return None


def _data_path(data_dir: str | Path | None, sub: str) -> Path:
    base = Path(data_dir).expanduser() if data_dir else shared_data_dir() / sub  # type: ignore[operator]
    if not base.is_dir():
        raise ConfigError(f"data folder {base} not found (pass --data-dir or set {SHARED_DATA_ENV})")
    return base


def _short_hash(*parts: Any, n: int = 12) -> str:
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:n]


def _read_csv(path: Path, **kw: Any) -> "pd.DataFrame":
    import pandas as pd

    if not path.is_file():
        raise ConfigError(f"file {path} not found")
    try:
        return pd.read_csv(path, **kw)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _require_columns(df: "pd.DataFrame", cols: Iterable[str], where: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        shown = ", ".join(map(str, list(df.columns)[:20]))
        raise ConfigError(f"{where}: missing column(s) {missing}; columns are: {shown}")


# --------------------------------------------------------------------------- merging


class DelayedMerge:
    """Emit primary events in order while scheduling follow-ups (clicks) at later times.

    ``emit(ev)`` returns the scheduled events due at or before ``ev.event_time`` followed by ``ev``;
    ``drain()`` returns what is left, in time order. Ties keep scheduling order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0

    def schedule(self, ev: Event) -> None:
        heapq.heappush(self._heap, (ev.event_time, self._seq, ev))
        self._seq += 1

    def due(self, t: float) -> Iterator[Event]:
        while self._heap and self._heap[0][0] <= t:
            yield heapq.heappop(self._heap)[2]

    def drain(self) -> Iterator[Event]:
        while self._heap:
            yield heapq.heappop(self._heap)[2]


def _click_for(imp: Impression, t: float) -> Click:
    return Click(
        request_id=imp.request_id, event_time=t, ad_id=imp.ad_id, user_id=imp.user_id,
        creative_id=imp.creative_id, query=imp.query, bidword=imp.bidword, category=imp.category,
    )


# --------------------------------------------------------------------------- time parsing


def to_epoch_seconds(values: "pd.Series", column: str, unit: str = "auto") -> "Any":
    """Parse a column of timestamps into float seconds since the epoch (numpy array).

    Numbers are epoch times in ``unit`` (``s``, ``ms``, ``us``, ``ns``; ``auto`` guesses from the
    magnitude); strings are parsed as dates (naive ones as UTC)."""
    import numpy as np
    import pandas as pd

    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ConfigError(f"column {column!r}: missing timestamp at row {row}")
    if pd.api.types.is_bool_dtype(values):
        raise ConfigError(f"column {column!r} holds booleans, not timestamps")
    if pd.api.types.is_numeric_dtype(values):
        x = values.to_numpy(dtype=float)
        if not np.isfinite(x).all():
            raise ConfigError(f"column {column!r}: non-finite timestamp")
        if unit == "auto":
            m = float(np.median(np.abs(x))) if len(x) else 0.0
            unit = "ns" if m > 1e17 else "us" if m > 1e14 else "ms" if m > 1e11 else "s"
        scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}.get(unit)
        if scale is None:
            raise ConfigError(f"unknown time unit {unit!r} (auto, s, ms, us, ns)")
        return x * scale
    if pd.api.types.is_datetime64_any_dtype(values):
        ts = values if getattr(values.dt, "tz", None) is not None else values.dt.tz_localize("UTC")
    else:
        ts = pd.to_datetime(values.astype(str), utc=True, errors="coerce", format="mixed")
        bad = ts.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"column {column!r}: cannot parse timestamp {values.iloc[row]!r} at row {row}"
            )
    epoch = pd.Timestamp(0, tz="UTC")
    return ((ts - epoch) / pd.Timedelta(seconds=1)).to_numpy(dtype=float)


# --------------------------------------------------------------------------- synthetic


def synthetic_events(
    seed: int = 7,
    duration_s: float = 3600.0,
    rps: float = 10.0,
    drift: str | None = "all",
    slots: int = 4,
    start_time: float | None = None,
    initial_inventory: bool = False,
    creative_content: bool = False,
    lexicon: bool = False,
) -> Iterator[Event]:
    """The synthetic world's stream. ``drift``: ``all``, ``none`` or a comma list of
    ``abrupt,gradual,new_ads,trending``; drift times scale with ``duration_s``. ``start_time``
    (epoch seconds) moves the world's epoch, so drift stays relative to the start.
    ``creative_content``: creatives carry content that drives clicks (``core.creatives``);
    ``lexicon``: tail queries (synonyms, colloquial attributes, typos) and ad titles (``core.lexicon``)."""
    from core.creatives import CreativeContentConfig
    from core.world import DriftConfig, World, WorldConfig

    cfg_kw: dict[str, Any] = {"seed": seed, "drift": DriftConfig.parse(drift, horizon_s=duration_s)}
    if creative_content:
        cfg_kw["creative_content"] = CreativeContentConfig(enabled=True)
    if lexicon:
        from core.lexicon import LexiconConfig

        cfg_kw["lexicon"] = LexiconConfig(enabled=True)
    if start_time is not None:
        cfg_kw["epoch"] = float(start_time)
    world = World(WorldConfig(**cfg_kw))
    log.info("synthetic world: %s", world.summary())
    return world.generate(None, duration_s, rps, slots=slots, seed=seed,
                          initial_inventory=initial_inventory)


# --------------------------------------------------------------------------- OBD


def _obd_frame(base: Path, policy: str, campaign: str) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    d = base / policy / campaign
    log_file, items_file = d / f"{campaign}.csv", d / "item_context.csv"
    df = _read_csv(log_file, index_col=0)
    items = _read_csv(items_file, index_col=0)
    _require_columns(df, ["timestamp", "item_id", "position", "click", "propensity_score"]
                     + [f"user_feature_{i}" for i in range(4)], str(log_file))
    _require_columns(items, ["item_id"] + [f"item_feature_{i}" for i in range(4)], str(items_file))
    df["_t"] = to_epoch_seconds(df["timestamp"], "timestamp")
    item_id = df["item_id"].to_numpy()
    aff_cols = [f"user-item_affinity_{i}" for i in range(len(items))]
    if all(c in df.columns for c in aff_cols) and len(df):
        if item_id.min() < 0 or item_id.max() >= len(items):
            raise ConfigError(f"{log_file}: item_id outside 0..{len(items) - 1}")
        df["_aff"] = df[aff_cols].to_numpy(dtype=float)[np.arange(len(df)), item_id]
    else:
        df["_aff"] = np.nan
    df = df.drop(columns=[c for c in df.columns if c.startswith("user-item_affinity_")])
    df = df.merge(items, on="item_id", how="left", validate="many_to_one")
    df["_policy"] = policy
    df["_campaign"] = campaign
    df["_row"] = np.arange(len(df))
    return pd.DataFrame(df)


def obd_events(
    campaign: str = "all",
    policies: Sequence[str] = OBD_POLICIES,
    data_dir: str | Path | None = None,
    click_delay_s: float = 1.0,
) -> Iterator[Event]:
    """Open Bandit Dataset rows as impressions (+ a click ``click_delay_s`` later when click=1).

    ``campaign``: ``men``, ``women`` or ``all`` (both, merged by time); ``policies``: the logging
    policies to merge (``random``, ``bts``). Mapping (see docs/world.md): one row = one request with
    one impression; ad = item; query = bidword = campaign; category = campaign/item_feature_1;
    user = hash of user_feature_0..3; position 0-based; bid 1.0; domain = ``obd-<campaign>``."""
    import pandas as pd

    campaigns = OBD_CAMPAIGNS if campaign == "all" else (campaign,)
    for c in campaigns:
        if c not in OBD_CAMPAIGNS:
            raise ConfigError(f"unknown OBD campaign {c!r}; use men, women or all")
    for p in policies:
        if p not in OBD_POLICIES:
            raise ConfigError(f"unknown OBD policy {p!r}; use {', '.join(OBD_POLICIES)}")
    if click_delay_s <= 0:
        raise ConfigError("click_delay_s must be > 0")
    base = _data_path(data_dir, "obd")
    frames = [_obd_frame(base, p, c) for c in campaigns for p in policies]
    df = pd.concat(frames, ignore_index=True).sort_values("_t", kind="stable")
    return _obd_iter(df, click_delay_s)


def _obd_iter(df: "pd.DataFrame", click_delay_s: float) -> Iterator[Event]:
    merge = DelayedMerge()
    cols = ["_t", "_policy", "_campaign", "_row", "item_id", "position", "click", "propensity_score",
            "user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3", "_aff",
            "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"]
    user_cache: dict[tuple[str, ...], str] = {}
    for (t, pol, camp, row, item, pos, click, prop, u0, u1, u2, u3, aff, i0, i1, i2, i3) in zip(
        *(df[c].tolist() for c in cols)
    ):
        t = round(float(t), 6)
        yield from merge.due(t)
        ukey = (str(u0), str(u1), str(u2), str(u3))
        uid = user_cache.get(ukey)
        if uid is None:
            uid = user_cache[ukey] = "obd-u" + _short_hash(*ukey)
        ad = f"obd-{camp}-{int(item)}"
        imp = Impression(
            request_id=f"obd-{pol}-{camp}-{int(row)}",
            event_time=t,
            user_id=uid,
            query=camp,
            ad_id=ad,
            creative_id=ad,
            bidword=camp,
            category=f"{camp}/{str(i1)[:8]}",
            position=max(int(pos) - 1, 0),
            bid=1.0,
            slot="top",
            domain=f"obd-{camp}",
            features={
                "policy": pol,
                "propensity": float(prop),
                "user_feature_0": str(u0), "user_feature_1": str(u1),
                "user_feature_2": str(u2), "user_feature_3": str(u3),
                "affinity": None if aff != aff else float(aff),
                "item_feature_0": None if i0 != i0 else float(i0),
                "item_feature_1": str(i1), "item_feature_2": str(i2), "item_feature_3": str(i3),
            },
        )
        yield imp
        if int(click) == 1:
            merge.schedule(_click_for(imp, round(t + click_delay_s, 6)))
    yield from merge.drain()


# --------------------------------------------------------------------------- AdWords


def adwords_files(data_dir: str | Path | None = None) -> list[Path]:
    base = _data_path(data_dir, "adwords")
    files = sorted(base.glob("adwords_daily_*.csv"))
    if not files:
        raise ConfigError(f"no adwords_daily_*.csv files in {base}")
    return files


def adwords_events(
    data_dir: str | Path | None = None,
    sample_rate: float = 0.02,
    max_impressions_per_row: int | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
    seed: int = 0,
    n_users: int = 1000,
    click_delay_mean_s: float = 10.0,
) -> Iterator[Event]:
    """Daily (keyword, impressions, clicks) rows expanded into impression and click events.

    Each row keeps Binomial(impressions, ``sample_rate``) impressions (then at most
    ``max_impressions_per_row``); the clicks among them are a hypergeometric draw, so the CTR is kept
    in expectation. Impressions are spread uniformly over their UTC day, clicks follow 1 s +
    Exp(``click_delay_mean_s``) later. ``start_date``/``end_date`` (YYYY-MM-DD, inclusive) cut the
    year. Users are unknown: each impression gets one of ``n_users`` anonymous ids at random."""
    import numpy as np
    import pandas as pd

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if max_impressions_per_row is not None and max_impressions_per_row < 1:
        raise ConfigError("max_impressions_per_row must be >= 1")
    frames = []
    for f in adwords_files(data_dir):
        df = _read_csv(f, dtype={"keyword_string": str})
        _require_columns(df, ["date", "keyword_id", "keyword_string", "impressions", "clicks"], str(f))
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    try:
        day = pd.to_datetime(df["date"], format="%Y-%m-%d", utc=True)
        lo = pd.Timestamp(start_date, tz="UTC") if start_date else None
        hi = pd.Timestamp(end_date, tz="UTC") if end_date else None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"adwords: bad date: {e}") from None
    keep = np.ones(len(df), dtype=bool)
    if lo is not None:
        keep &= (day >= lo).to_numpy()
    if hi is not None:
        keep &= (day <= hi).to_numpy()
    df = df[keep].assign(_day=day[keep])
    if df.empty:
        raise ConfigError(f"adwords: no rows between {start_date} and {end_date}")
    if (df["impressions"] < 0).any() or (df["clicks"] < 0).any():
        raise ConfigError("adwords: negative impressions or clicks")
    df = df.sort_values(["_day", "keyword_id"], kind="stable")
    return _adwords_iter(df, sample_rate, max_impressions_per_row, seed, n_users, click_delay_mean_s)


def _adwords_iter(
    df: "pd.DataFrame", rate: float, cap: int | None, seed: int, n_users: int, delay_mean: float
) -> Iterator[Event]:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    merge = DelayedMerge()
    epoch = pd.Timestamp(0, tz="UTC")
    for day, g in df.groupby("_day", sort=True):
        t0 = float((day - epoch) / pd.Timedelta(seconds=1))
        n = g["impressions"].to_numpy(dtype=np.int64)
        c = np.minimum(g["clicks"].to_numpy(dtype=np.int64), n)  # 16 upstream rows have c > n
        k = rng.binomial(n, rate) if rate < 1 else n.copy()
        if cap is not None:
            k = np.minimum(k, cap)
        kc = np.where(k > 0, rng.hypergeometric(np.maximum(c, 0), n - c, np.maximum(k, 1)), 0)
        kc = np.minimum(kc, k)
        total = int(k.sum())
        if total == 0:
            continue
        row = np.repeat(np.arange(len(g)), k)
        within = np.arange(total) - np.repeat(np.cumsum(k) - k, k)  # 0..k-1 inside each row
        clicked = within < np.repeat(kc, k)
        times = t0 + rng.uniform(0.0, 86400.0, total)
        users = rng.integers(n_users, size=total)
        delays = 1.0 + rng.exponential(delay_mean, total)
        order = np.argsort(times, kind="stable")
        kw_ids = g["keyword_id"].tolist()
        kw_str = g["keyword_string"].tolist()
        date = day.strftime("%Y-%m-%d")
        weekday = int(day.weekday())
        for i in order.tolist():
            r = int(row[i])
            t = round(float(times[i]), 6)
            yield from merge.due(t)
            kid = kw_ids[r]
            s = kw_str[r]
            text = s.strip() if isinstance(s, str) and s.strip() else f"kw{kid}"
            imp = Impression(
                request_id=f"aw-{date}-{kid}-{int(within[i])}",
                event_time=t,
                user_id=f"aw-u{int(users[i])}",
                query=text,
                ad_id=f"aw-{kid}",
                creative_id=f"aw-{kid}-c0",
                bidword=text,
                category="adwords/outdoor",
                position=0,
                bid=1.0,
                slot="top",
                domain="adwords",
                features={"keyword_id": str(kid), "weekday": weekday},
            )
            yield imp
            if clicked[i]:
                merge.schedule(_click_for(imp, round(t + float(delays[i]), 6)))
    yield from merge.drain()


# --------------------------------------------------------------------------- generic table


def read_table(path: str | Path) -> "pd.DataFrame":
    """A CSV (``.csv``, ``.tsv``, ``.txt``, optionally gzipped) or Parquet file as a DataFrame."""
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"file {p} not found")
    suffixes = [s.lower() for s in p.suffixes]
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            return pd.read_parquet(p)
        if ".tsv" in suffixes:
            return pd.read_csv(p, sep="\t")
        if ".csv" in suffixes or ".txt" in suffixes:
            return pd.read_csv(p)
    except Exception as e:  # pyarrow/pandas raise many kinds for a broken file
        raise ConfigError(f"cannot read {p}: {e}") from None
    raise ConfigError(f"{p}: unknown file type; use .csv, .tsv or .parquet")


def write_table(df: "pd.DataFrame", path: str | Path) -> Path:
    """Write a DataFrame (e.g. the world's examples frame) as CSV or Parquet, by suffix."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    suffixes = [s.lower() for s in p.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        df.to_parquet(p, index=False)
    elif ".csv" in suffixes:
        df.to_csv(p, index=False)
    else:
        raise ConfigError(f"{p}: unknown file type; use .csv or .parquet")
    return p


write_examples = write_table


def parse_id_cols(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"user=uid,ad=item"`` → ``{"user": "uid", "ad": "item"}`` (roles: see :data:`ID_ROLES`)."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"--id-cols: expected ROLE=COLUMN, got {part!r}")
            role, col = (x.strip() for x in part.split("=", 1))
            pairs[role] = col
    unknown = set(pairs) - set(ID_ROLES)
    if unknown:
        raise ConfigError(f"--id-cols: unknown role(s) {sorted(unknown)}; roles: {', '.join(ID_ROLES)}")
    return pairs


def split_cols(spec: str | Sequence[str] | None) -> list[str]:
    if not spec:
        return []
    if isinstance(spec, str):
        return [c.strip() for c in spec.split(",") if c.strip()]
    return list(spec)


def _labels(values: "pd.Series", column: str) -> list[int]:
    import numpy as np
    import pandas as pd

    if pd.api.types.is_bool_dtype(values):
        return [int(v) for v in values.tolist()]
    if pd.api.types.is_numeric_dtype(values):
        x = values.to_numpy(dtype=float)
        bad = ~np.isin(x, (0.0, 1.0))
    else:
        m = {"0": 0, "1": 1, "false": 0, "true": 1, "0.0": 0, "1.0": 1}
        s = values.astype(str).str.strip().str.lower()
        bad = ~s.isin(list(m)).to_numpy()
        x = s.map(m).fillna(-1).to_numpy(dtype=float)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"label column {column!r} must be 0/1; row {row} has {values.iloc[row]!r}")
    return [int(v) for v in x]


def table_events(
    path: str | Path,
    time_col: str,
    label_col: str,
    categorical: str | Sequence[str] | None = None,
    numeric: str | Sequence[str] | None = None,
    id_cols: str | Mapping[str, str] | None = None,
    time_unit: str = "auto",
    click_delay_s: float = 1.0,
    frame: "pd.DataFrame | None" = None,
) -> Iterator[Event]:
    """Rows of a CSV/Parquet file as impressions (+ a click ``click_delay_s`` later when label=1),
    sorted by ``time_col``. ``features`` holds the categorical (as strings) and numeric (as floats)
    columns. Ids come from ``id_cols`` (``user=col,ad=col,...``), else from columns named
    ``request_id, user_id, ad_id, creative_id, query, bidword, category, position, bid``, else:
    request ``<file stem>-<row>``, user ``anonymous``, ad ``ad``, creative = ad, query ``""``,
    bidword = query or ad, category ``""``, position 0, bid 1.0. ``frame`` skips reading ``path``."""
    import numpy as np
    import pandas as pd

    df = read_table(path) if frame is None else frame
    where = str(path)
    cats, nums = split_cols(categorical), split_cols(numeric)
    roles = parse_id_cols(id_cols)
    _require_columns(df, [time_col, label_col, *cats, *nums, *roles.values()], where)
    if click_delay_s <= 0:
        raise ConfigError("click_delay_s must be > 0")
    n = len(df)
    times = to_epoch_seconds(df[time_col], time_col, time_unit)
    labels = _labels(df[label_col], label_col)
    num_cols: dict[str, Any] = {}
    for c in nums:
        conv = pd.to_numeric(df[c], errors="coerce")
        bad = (conv.isna() & df[c].notna()).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"numeric column {c!r}: row {row} has {df[c].iloc[row]!r}")
        num_cols[c] = conv.astype(float)
    stem = Path(path).name.split(".")[0] or "row"

    def col(role: str) -> list[Any] | None:
        name = roles.get(role) or (ID_ROLES[role] if ID_ROLES[role] in df.columns else None)
        return df[name].tolist() if name else None

    def ids(role: str, default: Callable[[int], str]) -> list[str]:
        vals = col(role)
        if vals is None:
            return [default(i) for i in range(n)]
        return [default(i) if v is None or v != v or str(v) == "" else str(v) for i, v in enumerate(vals)]

    req = ids("request", lambda i: f"{stem}-{i}")
    user = ids("user", lambda i: "anonymous")
    ad = ids("ad", lambda i: "ad")
    creative_raw = col("creative")
    creative = ad if creative_raw is None else ids("creative", lambda i: ad[i])
    query = ids("query", lambda i: "")
    bidword = ids("bidword", lambda i: query[i] or ad[i])
    category = ids("category", lambda i: "")
    position = _numbers(col("position"), 0, "position", int)
    bid = _numbers(col("bid"), 1.0, "bid", float)
    cat_vals = [[None if v is None or v != v else str(v) for v in df[c].tolist()] for c in cats]
    num_vals = [[None if v != v else float(v) for v in num_cols[c].tolist()] for c in nums]
    if len(set(zip(req, ad))) != n:
        raise ConfigError(f"{where}: (request id, ad id) pairs are not unique; map --id-cols "
                          "request=COLUMN (and ad=COLUMN) to columns that identify a row")
    order = np.argsort(times, kind="stable").tolist()
    return _table_iter(order, times, labels, req, user, ad, creative, query, bidword, category,
                       position, bid, cats, cat_vals, nums, num_vals, click_delay_s)


def _numbers(vals: list[Any] | None, default: float, role: str, kind: type) -> list[Any]:
    if vals is None:
        return []
    out = []
    for i, v in enumerate(vals):
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{role} column: row {i} has {v!r}, not a number") from None
        if isinstance(x, float) and not math.isfinite(x) or x < 0:
            raise ConfigError(f"{role} column: row {i} has {v!r}; must be finite and >= 0")
        out.append(x)
    return out


def _table_iter(order, times, labels, req, user, ad, creative, query, bidword, category, position,
                bid, cats, cat_vals, nums, num_vals, click_delay_s) -> Iterator[Event]:  # noqa: ANN001
    merge = DelayedMerge()
    for i in order:
        t = round(float(times[i]), 6)
        yield from merge.due(t)
        feats: dict[str, Any] = {c: cat_vals[j][i] for j, c in enumerate(cats)}
        feats.update({c: num_vals[j][i] for j, c in enumerate(nums)})
        imp = Impression(
            request_id=req[i], event_time=t, user_id=user[i], query=query[i], ad_id=ad[i],
            creative_id=creative[i], bidword=bidword[i], category=category[i],
            position=position[i] if position else 0, bid=bid[i] if bid else 1.0, features=feats,
        )
        yield imp
        if labels[i]:
            merge.schedule(_click_for(imp, round(t + click_delay_s, 6)))
    yield from merge.drain()


# --------------------------------------------------------------------------- registry


def open_source(name: str, **options: Any) -> Iterator[Event]:
    """Build a source by name (``synthetic``, ``obd``, ``adwords``, ``file``) from keyword options;
    unknown options raise :class:`ConfigError`."""
    factories: dict[str, Callable[..., Iterator[Event]]] = {
        "synthetic": synthetic_events,
        "obd": obd_events,
        "adwords": adwords_events,
        "file": table_events,
    }
    f = factories.get(name)
    if f is None:
        raise ConfigError(f"unknown source {name!r}; use one of {', '.join(SOURCE_NAMES)}")
    import inspect

    try:
        inspect.signature(f).bind(**options)
    except TypeError as e:
        raise ConfigError(f"source {name}: {e}") from None
    return f(**options)
