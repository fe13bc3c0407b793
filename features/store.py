"""``FeatureStoreClient``: the one door to Feast for workers, the online service and training.

* :meth:`FeatureStoreClient.push` writes aggregate rows (:meth:`AggregateState.dirty_rows` output) to
  the online store through ``FeatureStore.push`` and/or appends them to the offline history.
  **Newest event time wins**: a row whose ``event_time`` is older than the stored row's is dropped
  before the write (equal times are written: a late event changes a row without moving its newest
  event time). Feast's sqlite store writes blindly and its Redis store drops equal timestamps, so
  the rule is enforced here, identically for both, from a cache of what this client has stored
  (filled from the online store on first sight of a key).
* :meth:`read` / :meth:`read_for_request` return plain dicts, with the smoothed CTR per half-life
  computed from the row and its entity type's field row (:func:`features.aggregates.smoothed_ctr`).
* :meth:`historical` builds point-in-time training sets from the offline history.
* With the Redis online store (and ``features.fast_path``, the default) online reads and writes go
  through :class:`features.redis_online.RedisFeatureIO`, which reads and writes Feast's own Redis
  layout directly (Feast reads the same rows); newest-event-time-wins is then checked inside Redis.
* An unreachable online store raises :class:`FeatureStoreUnavailable` from reads and pushes.

The offline history is an append-only directory of parquet files per feature view. Feast's file
store would rewrite the whole file on every push (``DaskOfflineStore.offline_write_batch``), which
grows without bound on a stream, so history files are written here, one per call, with a name the
caller may choose (a checkpoint sequence number makes a rewrite after a crash idempotent).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from core.atomic import atomic_write
from core.errors import AdstreamError, ConfigError
from core.settings import FeatureSettings
from features import feast_ready
from features import repo as feast_repo
from features.aggregates import (
    ENTITY_TYPES,
    FIELD_KEY,
    JOIN_KEYS,
    feature_schema,
    half_life_tag,
    prior_mean,
)

log = logging.getLogger(__name__)
os.environ.setdefault("FEAST_USAGE", "False")


def keep_prometheus_in_process() -> None:
    """Undo a process-wide side effect of ``feast.metrics`` (imported lazily by Feast's read paths):
    at import it sets ``PROMETHEUS_MULTIPROC_DIR`` to a temporary directory of its own, which puts
    every prometheus_client metric created afterwards -- adstream's worker metrics included -- into
    multiprocess mode, where metrics with equal names and labels share one value across registries
    (two workers' counters in one process double-count). Importing it here first and removing what
    it set keeps metrics in-process; a multiprocess directory configured by the user is kept."""
    try:
        import feast.metrics as feast_metrics
    except Exception:  # pragma: no cover - older/newer Feast without the module
        return
    if not getattr(feast_metrics, "_owns_mp_dir", False):
        return  # the user configured multiprocess mode (or Feast did not): leave it alone
    mp_dir = getattr(feast_metrics, "_prometheus_mp_dir", None)
    for var in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
        if os.environ.get(var) == mp_dir:
            del os.environ[var]
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


PUSH_TARGETS = ("online", "offline", "online_and_offline")
Rows = Mapping[str, Mapping[str, Sequence[Any]]]


def _quiet_feast() -> None:
    """Route Feast's per-call warnings away from stderr (they repeat on every push/read)."""
    warnings.filterwarnings("ignore", message="Stream feature views are experimental")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="feast")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="feast")
    warnings.filterwarnings("ignore", category=FutureWarning, module="dask")
    for name in ("feast", "feast.infra", "feast.feature_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


class FeatureStoreUnavailable(AdstreamError):
    """The online store cannot be reached (connection refused, timeout). Callers may retry later or
    serve without features; the message names the store and the cause."""


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import redis.exceptions as rex

        errs += [rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError]
    except ImportError:  # pragma: no cover - redis is a base requirement
        pass
    return tuple(errs)


_UNAVAILABLE = _unavailable_errors()


class repo_lock:
    """An exclusive lock on a Feast repository directory (``.adstream-repo.lock`` in it), held while
    a client materialises, opens and applies it; waits up to ``timeout_s`` for another process."""

    def __init__(self, repo_dir: Path, timeout_s: float = 300.0) -> None:
        self.path = Path(repo_dir) / ".adstream-repo.lock"
        self.timeout_s = timeout_s
        self._fd: int | None = None

    def __enter__(self) -> "repo_lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"the Feast repository {self.path.parent} stayed locked by another process "
                                      f"for {self.timeout_s:.0f}s ({self.path})") from None
                time.sleep(0.05)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class FeatureStoreClient:
    """Feast repository management, pushes and reads for adstream's entity aggregates."""

    def __init__(self, settings: FeatureSettings, apply: bool = True) -> None:
        feast_ready()
        _quiet_feast()
        self.settings = settings
        self.repo_dir = Path(settings.repo_dir).resolve()
        self.half_lives = list(settings.half_lives_s)
        self.schema = feature_schema(self.half_lives)
        self.feature_names = [n for n, _ in self.schema]
        self.tags = [half_life_tag(h) for h in self.half_lives]
        self._stored_time: dict[tuple[str, str], float] = {}
        # several processes open one repository at once (the demo's updater and service): Feast
        # writes its registry file in place, so one process's apply can wipe the views another just
        # applied, or a reader can see a half-written file. One process at a time, here.
        with repo_lock(self.repo_dir):
            self.materialise()
            from feast import FeatureStore

            try:
                self.store = FeatureStore(repo_path=str(self.repo_dir))
            except Exception as e:  # bad yaml, unreachable registry ...
                raise ConfigError(f"cannot open the Feast repository {self.repo_dir}: {e}") from e
            if apply:
                self.apply()
            if settings.online_store == "sqlite":
                _sqlite_wal(self.repo_dir / feast_repo.DATA_DIR / "online.db")
            self._provider = self.store._get_provider()
            try:
                self._views = {e: self.store.get_feature_view(feast_repo.view_name(e)) for e in ENTITY_TYPES}
            except Exception as e:
                raise ConfigError(f"the Feast repository {self.repo_dir} has no adstream feature views "
                                  f"(run `adstream features apply`): {e}") from e
        self._fast = None
        if settings.online_store == "redis" and settings.fast_path:
            from features.redis_online import RedisFeatureIO

            self._fast = RedisFeatureIO(
                settings.redis_url, self.store.config.project,
                {e: (feast_repo.view_name(e), JOIN_KEYS[e]) for e in ENTITY_TYPES}, self.schema,
                timeout_s=settings.redis_timeout_s, cluster=settings.redis_type == "redis_cluster",
                key_ttl_s=settings.redis_key_ttl_s)

    @property
    def fast_path(self) -> bool:
        """True when online reads and writes bypass Feast's provider (Redis + ``fast_path``)."""
        return self._fast is not None

    def _unavailable(self, e: BaseException) -> FeatureStoreUnavailable:
        where = (f"redis at {self.settings.redis_url}" if self.settings.online_store == "redis"
                 else f"sqlite in {self.repo_dir}")
        return FeatureStoreUnavailable(f"online feature store ({where}) unavailable: "
                                       f"{type(e).__name__}: {e}")

    # ---- repository ----------------------------------------------------------------------------
    def materialise(self) -> None:
        """Write feature_store.yaml, .feastignore and the empty history files if absent/changed."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        yaml_path = self.repo_dir / "feature_store.yaml"
        text = feast_repo.feature_store_yaml(self.settings)
        if not yaml_path.exists() or yaml_path.read_text() != text:
            atomic_write(yaml_path, text.encode())
        ignore = self.repo_dir / ".feastignore"
        if not ignore.exists():
            ignore.write_bytes(feast_repo.FEASTIGNORE.read_bytes())
        import pyarrow as pa
        import pyarrow.parquet as pq

        for etype in ENTITY_TYPES:
            d = feast_repo.history_dir(self.repo_dir, etype)
            d.mkdir(parents=True, exist_ok=True)
            init = d / "part-000000000000-init.parquet"
            schema = feast_repo.arrow_schema(etype, self.half_lives)
            if init.exists():
                have = pq.read_schema(init)
                if not have.equals(schema):
                    raise ConfigError(
                        f"the feature history in {d} was written with other half-lives "
                        f"({have.names}); use a new features.repo_dir for {self.tags}"
                    )
            else:
                pq.write_table(pa.Table.from_pylist([], schema=schema), init)

    def apply(self) -> None:
        """Register (or update) entities, push sources and feature views."""
        objects = feast_repo.build_definitions(self.repo_dir, self.half_lives)
        t0 = time.perf_counter()
        self.store.apply(objects)
        log.info("feast apply: %d objects in %.1fs (%s)", len(objects), time.perf_counter() - t0,
                 self.repo_dir)

    # ---- writes --------------------------------------------------------------------------------
    def push(self, rows_by_entity_type: Rows, to: str = "online_and_offline",
             part: str | None = None) -> dict[str, int]:
        """Write rows; returns the number of rows written to the online store per entity type."""
        if to not in PUSH_TARGETS:
            raise ValueError(f"to must be one of {PUSH_TARGETS}, got {to!r}")
        written: dict[str, int] = {}
        if to in ("online", "online_and_offline"):
            try:
                if self._fast is not None:  # newest-event-time-wins is checked inside Redis
                    written = self._fast.write(rows_by_entity_type)
                else:
                    for etype, cols in rows_by_entity_type.items():
                        written[etype] = self._write_online(etype, self._newest_only(etype, cols))
            except _UNAVAILABLE as e:
                raise self._unavailable(e) from e
        if to in ("offline", "online_and_offline"):
            self.write_history(rows_by_entity_type, part)
        return written

    # ---- the updater's marker: does the online store still hold what was pushed? ---------------
    def _marker_redis(self):
        if self._fast is not None:
            return self._fast.redis
        if getattr(self, "_marker_client", None) is None and self.settings.redis_type == "redis_cluster":
            from features.redis_online import _cluster_client

            self._marker_client = _cluster_client(self.settings.redis_url, self.settings.redis_timeout_s)
        if getattr(self, "_marker_client", None) is None:
            import redis

            from features.redis_online import parse_redis_url

            kw = parse_redis_url(self.settings.redis_url)
            kw.setdefault("socket_timeout", self.settings.redis_timeout_s)
            kw.setdefault("socket_connect_timeout", self.settings.redis_timeout_s)
            self._marker_client = redis.Redis(**kw)
        return self._marker_client

    @property
    def marker_key(self) -> str:
        """One marker per updater shard: each shard's rows can be lost and refilled on their own."""
        s = self.settings
        shard = f":shard-{s.shard}-of-{s.shards}" if s.shards > 1 else ""
        return f"adstream:{self.store.config.project}:online-marker{shard}"

    def store_marker(self) -> str | None:
        """The marker last written with :meth:`set_store_marker`, or None when the online store does
        not have it (a Redis that restarted empty, was flushed, or is new). Always "sqlite" for the
        sqlite store, whose file does not silently empty."""
        if self.settings.online_store != "redis":
            return "sqlite"
        try:
            v = self._marker_redis().get(self.marker_key)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        return v.decode() if v is not None else None

    def set_store_marker(self, value: str) -> None:
        if self.settings.online_store != "redis":
            return
        try:
            self._marker_redis().set(self.marker_key, value.encode())
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    def _write_online(self, etype: str, cols: Mapping[str, Sequence[Any]]) -> int:
        """One ``online_write_batch`` for the rows of one feature view.

        This is the provider call ``FeatureStore.push(..., to=ONLINE)`` ends in; the value protos are
        built here straight from the typed columns because Feast's generic per-value conversion of a
        DataFrame costs ~0.8 ms per row, more than the write itself."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = list(cols.get(JOIN_KEYS[etype], ()))
        if not keys:
            return 0
        jk = [JOIN_KEYS[etype]]
        ints = [(n, list(map(int, cols[n]))) for n, kind in self.schema if kind == "int"]
        floats = [(n, list(map(float, cols[n]))) for n, kind in self.schema if kind == "float"]
        times = cols["event_time"]
        data: list[tuple[EntityKey, dict[str, Value], datetime, datetime | None]] = []
        for i, k in enumerate(keys):
            values = {n: Value(int64_val=v[i]) for n, v in ints}
            values.update({n: Value(double_val=v[i]) for n, v in floats})
            ts = datetime.fromtimestamp(round(times[i], 6), tz=timezone.utc)
            n_events = values["impressions"].int64_val + values["clicks"].int64_val
            data.append((EntityKey(join_keys=jk, entity_values=[Value(string_val=k)]), values, ts,
                         ts + timedelta(microseconds=n_events)))
        self._provider.online_write_batch(self.store.config, self._views[etype], data, progress=None)
        self._stored_time.update(((etype, k), t) for k, t in zip(keys, times))
        return len(keys)

    def _newest_only(self, etype: str, cols: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        keys = list(cols[JOIN_KEYS[etype]])
        unknown = [k for k in keys if (etype, k) not in self._stored_time]
        if unknown:
            for k, row in self._read_raw(etype, unknown, ["event_time"]).items():
                t = row.get("event_time")
                self._stored_time[(etype, k)] = float(t) if t is not None else float("-inf")
        times = cols["event_time"]
        keep = [i for i, (k, t) in enumerate(zip(keys, times)) if t >= self._stored_time[(etype, k)]]
        if len(keep) < len(keys):
            log.debug("%s: %d rows older than the stored rows dropped", etype, len(keys) - len(keep))
        return {c: [v[i] for i in keep] for c, v in cols.items()}

    def _frame(self, etype: str, cols: Mapping[str, Sequence[Any]]):
        import pandas as pd

        if not cols or not cols[JOIN_KEYS[etype]]:
            return None
        import numpy as np

        # typed arrays up front: pandas' inference over Python lists cost more than the write
        data: dict[str, Any] = {JOIN_KEYS[etype]: cols[JOIN_KEYS[etype]]}
        for name, kind in self.schema:
            data[name] = np.asarray(cols[name], dtype=np.int64 if kind == "int" else np.float64)
        df = pd.DataFrame(data)
        df[feast_repo.TIMESTAMP_FIELD] = pd.to_datetime(df["event_time"], unit="s", utc=True).dt.floor("us")
        # created = newest event time + (events in the row) µs: among versions of a row with the same
        # newest event time the one holding more (late) events sorts last, independent of the
        # wall clock, so point-in-time joins over replayed history behave like live ones
        n = (df["impressions"] + df["clicks"]).to_numpy()
        df[feast_repo.CREATED_FIELD] = df[feast_repo.TIMESTAMP_FIELD] + pd.to_timedelta(n, unit="us")
        return df

    def write_history(self, rows_by_entity_type: Rows, part: str | None = None) -> list[Path]:
        """Append rows to the offline history: one parquet file per entity type, written atomically.
        The same ``part`` name replaces the earlier file (idempotent re-writes)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = part or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        paths = []
        for etype, cols in rows_by_entity_type.items():
            df = self._frame(etype, cols)
            if df is None:
                continue
            d = feast_repo.history_dir(self.repo_dir, etype)
            path = d / f"part-{name}.parquet"
            tmp = d / f".tmp-{name}.parquet"
            table = pa.Table.from_pandas(df, schema=feast_repo.arrow_schema(etype, self.half_lives),
                                         preserve_index=False)
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            paths.append(path)
        return paths

    # ---- reads ---------------------------------------------------------------------------------
    def _read_raw(self, etype: str, keys: Sequence[str], features: Sequence[str] | None = None
                  ) -> dict[str, dict[str, Any]]:
        """One batched online read of one feature view: ``{key: {feature: value | None}}``.

        This is the ``OnlineStore.online_read`` call ``FeatureStore.get_online_features`` makes per
        view (one pipelined HMGET batch on Redis, one SELECT on sqlite); the protos are converted
        here, which for 200 entities is ~10x faster than building Feast's generic response."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        feats = list(features or self.feature_names)
        uniq = list(dict.fromkeys(keys))
        if self._fast is not None:
            return {k: ({f: row.get(f) for f in feats} if row else dict.fromkeys(feats))
                    for k, row in self._read_fast([(etype, uniq)])[0].items()}
        jk = [JOIN_KEYS[etype]]
        eks = [EntityKey(join_keys=jk, entity_values=[Value(string_val=k)]) for k in uniq]
        try:
            # a copy: Feast's Redis store appends its `_ts:<view>` field to the list it is given
            res = self._provider.online_read(self.store.config, self._views[etype], eks, list(feats))
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        out: dict[str, dict[str, Any]] = {}
        for k, (_ts, values) in zip(uniq, res):
            row: dict[str, Any] = dict.fromkeys(feats)
            if values:
                for f in feats:
                    v = values.get(f)
                    if v is not None:
                        which = v.WhichOneof("val")
                        row[f] = getattr(v, which) if which else None
            out[k] = row
        return out

    def _read_fast(self, requests):
        try:
            return self._fast.read(requests)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    def _ctr_terms(self, field: dict[str, Any]) -> list[tuple[str, str, str, float]]:
        """Per half-life ``(ctr column, clk column, imp column, prior mean)`` from a field row."""
        return [(f"ctr_{t}", f"clk_{t}", f"imp_{t}",
                 prior_mean(field.get(f"clk_{t}") or 0.0, field.get(f"imp_{t}") or 0.0))
                for t in self.tags]

    def _with_ctr(self, row: dict[str, Any], field: dict[str, Any],
                  terms: list[tuple[str, str, str, float]] | None = None) -> dict[str, Any]:
        """Add ``ctr_<tag>`` (:func:`features.aggregates.smoothed_ctr`) to ``row``, in place."""
        k = self.settings.ctr_prior_strength
        for name, clk, imp, p0 in terms if terms is not None else self._ctr_terms(field):
            den = (row.get(imp) or 0.0) + k  # smoothed_ctr, inlined (runs for every row read)
            row[name] = ((row.get(clk) or 0.0) + k * p0) / den if den > 0 else p0
        return row

    def read(self, entity_type: str, keys: Iterable[str], features: Sequence[str] | None = None
             ) -> dict[str, dict[str, Any]]:
        """Online features per key (``None`` values for unknown keys) plus ``ctr_<half-life>``.
        ``features`` restricts the returned columns (ctr columns may be named too)."""
        if entity_type not in JOIN_KEYS:
            raise ValueError(f"unknown entity type {entity_type!r}; one of {list(JOIN_KEYS)}")
        keys = list(keys)
        raw = self._read_raw(entity_type, [*keys, FIELD_KEY])
        field = raw.get(FIELD_KEY, {})
        out = {}
        for k in keys:
            row = self._with_ctr(dict(raw[k]), field)
            out[k] = {f: row[f] for f in features} if features else row
        return out

    def read_for_request(
        self,
        user_id: str,
        ad_ids: Sequence[str],
        *,
        creative_ids: Sequence[str] | None = None,
        query: str | None = None,
        bidwords: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Everything one ad request needs, one batched read per feature view involved (user, ad and
        optionally query/creative/bidword/category; field rows for the CTR priors ride along).
        Returns
        ``{"user": {...}, "query": {...} | None, "ads": [{"ad": {...}, "creative": ..., ...}]}``."""
        n = len(ad_ids)
        per_ad: dict[str, Sequence[str]] = {"ad": list(ad_ids)}
        for etype, vals in (("creative", creative_ids), ("bidword", bidwords), ("category", categories)):
            if vals is not None:
                if len(vals) != n:
                    raise ValueError(f"{etype} list has {len(vals)} items for {n} ads")
                per_ad[etype] = list(vals)
        singles = {"user": user_id, **({"query": query} if query else {})}
        wanted = [*((e, [k, FIELD_KEY]) for e, k in singles.items()),
                  *((e, [*vals, FIELD_KEY]) for e, vals in per_ad.items())]
        if self._fast is not None:  # every view in one round trip
            empty = dict.fromkeys(self.feature_names)
            raw = {e: {k: r or empty for k, r in got.items()}
                   for (e, _), got in zip(wanted, self._read_fast(wanted))}
        else:
            raw = {e: self._read_raw(e, keys) for e, keys in wanted}
        out: dict[str, Any] = {e: self._with_ctr(dict(raw[e][k]), raw[e][FIELD_KEY])
                               for e, k in singles.items()}
        out.setdefault("query", None)
        terms = {e: self._ctr_terms(raw[e][FIELD_KEY]) for e in per_ad}
        out["ads"] = [
            {e: self._with_ctr(dict(raw[e][vals[i]]), raw[e][FIELD_KEY], terms[e])
             for e, vals in per_ad.items()}
            for i in range(n)
        ]
        return out

    def historical(self, entity_df, features: Sequence[str] | None = None, entity_type: str | None = None):
        """Point-in-time features for ``entity_df`` (join-key columns + ``event_timestamp``).

        ``features`` are ``"<view>:<feature>"`` references (e.g. ``"ad_stats:clicks"``); with
        ``entity_type`` and no ``features`` every feature of that entity type is returned. For every
        entity type involved, ``<view>__ctr_<tag>`` columns are added using the field row as of the
        same timestamp. Column names are ``<view>__<feature>``."""
        import pandas as pd

        if features is None:
            if entity_type is None:
                raise ValueError("give features or entity_type")
            features = [f"{feast_repo.view_name(entity_type)}:{f}" for f in self.feature_names]
        features = list(features)
        views = sorted({f.split(":", 1)[0] for f in features})
        etypes = [e for e in ENTITY_TYPES if feast_repo.view_name(e) in views]
        ctr_needs = [f"{feast_repo.view_name(e)}:{p}_{t}" for e in etypes for t in self.tags
                     for p in ("imp", "clk")]
        all_feats = list(dict.fromkeys([*features, *ctr_needs]))
        df = entity_df.reset_index(drop=True).copy()
        df["_row"] = range(len(df))
        got = self._pit(df, all_feats)
        field_df = df[["_row", feast_repo.TIMESTAMP_FIELD]].copy()
        for e in etypes:
            field_df[JOIN_KEYS[e]] = FIELD_KEY
        prior = self._pit(field_df, ctr_needs)
        k = self.settings.ctr_prior_strength
        for e in etypes:
            v = feast_repo.view_name(e)
            for t in self.tags:
                fc = prior[f"{v}__clk_{t}"].astype("float64").fillna(0.0).to_numpy()
                fi = prior[f"{v}__imp_{t}"].astype("float64").fillna(0.0).to_numpy()
                p0 = pd.Series(fc).div(pd.Series(fi).where(fi > 0)).fillna(0.0).to_numpy()
                c = got[f"{v}__clk_{t}"].astype("float64").fillna(0.0).to_numpy()
                i = got[f"{v}__imp_{t}"].astype("float64").fillna(0.0).to_numpy()
                got[f"{v}__ctr_{t}"] = (c + k * p0) / (i + k)
        wanted = [c for c in got.columns if c not in ctr_needs_cols(ctr_needs, features)]
        return got[wanted].drop(columns=["_row"])

    def _pit(self, df, features: list[str]):
        """get_historical_features, with every entity row kept (in the input order): the file
        store drops an entity row whose only candidate versions are newer than it."""
        got = self.store.get_historical_features(
            entity_df=df, features=features, full_feature_names=True).to_df()
        cols = [c for c in got.columns if "__" in c and c not in df.columns]
        return df.merge(got[["_row", *cols]], on="_row", how="left").sort_values("_row").reset_index(drop=True)


def ctr_needs_cols(ctr_needs: list[str], features: list[str]) -> set[str]:
    """Columns fetched only to compute the CTR (not asked for by the caller)."""
    asked = {f.replace(":", "__") for f in features}
    return {c.replace(":", "__") for c in ctr_needs} - asked


def _sqlite_wal(path: Path) -> None:
    """Readers (the online service) must not wait for the updater's write transactions: WAL mode
    (persistent in the database file) lets reads run beside one writer."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()
