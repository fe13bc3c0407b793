"""Streaming per-entity aggregates: counts, event-time decayed counts, recency.

Pure logic (no Feast, no Kafka, no clock): impressions and clicks go in, feature rows come out.

Entities and join keys
    ``user/user_id``, ``ad/ad_id``, ``creative/creative_id``, ``query/query``, ``bidword/bidword``,
    ``category/category``. An empty key means "unknown" and that entity is skipped. Besides the
    per-key rows, every entity type keeps one *field row* under the reserved key ``__all__`` that
    aggregates every event of that type; its decayed CTR is the prior mean of the smoothed CTR.

Decay (event time, order-robust)
    Each row keeps ``t_ref`` = the newest event time folded into it. For half-life ``h`` the decayed
    impressions are ``D_imp(h) = sum_e 2 ** (-(t_ref - t_e) / h)`` over the row's impressions (and
    ``D_clk(h)`` likewise over its clicks), i.e. the values are *valued at the row's newest event
    time*. A newer event rescales the sums by ``2 ** (-(t_new - t_ref) / h)`` and adds 1; an older
    event adds its own ``2 ** (-(t_ref - t_e) / h)``; time never moves backwards. The result depends
    only on the set of events, not on their arrival order (up to float rounding).

Smoothed CTR (computed when reading, see :func:`smoothed_ctr`)
    ``ctr(h) = (D_clk(h) + k * p0(h)) / (D_imp(h) + k)`` with ``k = ctr_prior_strength``
    pseudo-impressions and ``p0(h) = D_clk(h) / D_imp(h)`` of the entity type's field row (0 when it
    has no impressions). Computing it at read time keeps the stored rows a pure function of their
    own events, so replays and restarts reproduce them exactly.

Field rows are folded lazily: an event is queued for its entity types' field rows and the queue
is folded in one vectorised step before any read of the state (rows, dirty rows, snapshots), with
the same formula; the per-key rows are folded per event.

Sharding (several updaters, one set of rows)
    ``AggregateState(half_lives, shard=i, shards=n)`` folds only the per-key rows whose key it owns,
    ``crc32("<entity type>:<key>") % n == i``, and shard 0 alone folds the field rows (``__all__``).
    n updaters that each read every event therefore write disjoint rows whose union is exactly what
    one updater writes (``tests/test_feature_updater.py``).

Recency
    ``last_impression_time`` / ``last_click_time`` (epoch seconds, 0 = never) and their ages at the
    row's newest event time, ``imp_age_s`` / ``click_age_s`` (-1 = never).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterable

from core.events import ENTITY_KEYS, Click, Impression

ENTITY_TYPES: tuple[str, ...] = tuple(ENTITY_KEYS)
JOIN_KEYS: dict[str, str] = ENTITY_KEYS
FIELD_KEY = "__all__"
_LN2 = math.log(2.0)


def half_life_tag(seconds: float) -> str:
    """A short column suffix for a half-life: 3600 -> '1h', 86400 -> '1d', 90 -> '90s'."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s".replace(".", "p")


def feature_schema(half_lives: Iterable[float]) -> list[tuple[str, str]]:
    """The stored feature columns (name, kind) with kind ``int`` or ``float``; same order as rows."""
    cols: list[tuple[str, str]] = [("impressions", "int"), ("clicks", "int")]
    tags = [half_life_tag(h) for h in half_lives]
    cols += [(f"imp_{t}", "float") for t in tags]
    cols += [(f"clk_{t}", "float") for t in tags]
    cols += [
        ("last_impression_time", "float"),
        ("last_click_time", "float"),
        ("imp_age_s", "float"),
        ("click_age_s", "float"),
        ("event_time", "float"),
    ]
    return cols


def ctr_columns(half_lives: Iterable[float]) -> list[str]:
    return [f"ctr_{half_life_tag(h)}" for h in half_lives]


def smoothed_ctr(dec_clicks: float, dec_imps: float, prior_mean: float, strength: float) -> float:
    """``(clicks + strength * prior_mean) / (impressions + strength)``; the prior when both are 0."""
    den = dec_imps + strength
    if den <= 0:
        return prior_mean
    return (dec_clicks + strength * prior_mean) / den


def prior_mean(field_dec_clicks: float, field_dec_imps: float) -> float:
    """The field mean CTR used as the prior (0 before the first impression)."""
    return field_dec_clicks / field_dec_imps if field_dec_imps > 0 else 0.0


def owner(etype: str, key: str, shards: int) -> int:
    """The shard that owns an entity's row (stable across processes and runs)."""
    return zlib.crc32(f"{etype}:{key}".encode()) % shards


class _Row:
    __slots__ = ("impressions", "clicks", "t_ref", "dimp", "dclk", "last_imp", "last_clk")

    def __init__(self, n: int) -> None:
        self.impressions = 0
        self.clicks = 0
        self.t_ref = -math.inf
        self.dimp = [0.0] * n
        self.dclk = [0.0] * n
        self.last_imp = 0.0
        self.last_clk = 0.0

    def to_list(self) -> tuple[Any, ...]:
        """Plain data for snapshots. The decay lists are shared, not copied: every update assigns
        new lists instead of changing them in place, so a snapshot never changes afterwards."""
        return (self.impressions, self.clicks, self.t_ref, self.dimp, self.dclk,
                self.last_imp, self.last_clk)

    @classmethod
    def from_list(cls, data: list[Any]) -> "_Row":
        r = cls(len(data[3]))
        (r.impressions, r.clicks, r.t_ref, dimp, dclk, r.last_imp, r.last_clk) = data
        r.dimp, r.dclk = list(dimp), list(dclk)
        return r


class AggregateState:
    """Per-(entity type, key) aggregates with a dirty set for incremental pushes."""

    def __init__(self, half_lives_s: Iterable[float], shard: int = 0, shards: int = 1) -> None:
        self.half_lives = [float(h) for h in half_lives_s]
        if not self.half_lives or any(h <= 0 for h in self.half_lives):
            raise ValueError("half_lives_s must be a non-empty list of positive seconds")
        if shards < 1 or not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards")
        self.shard, self.shards = int(shard), int(shards)
        self._owned: dict[str, dict[str, bool]] = {e: {} for e in ENTITY_TYPES}  # sharded: key -> mine
        self._rates = [_LN2 / h for h in self.half_lives]
        self._rows: dict[str, dict[str, _Row]] = {e: {} for e in ENTITY_TYPES}
        self.dirty: dict[str, set[str]] = {e: set() for e in ENTITY_TYPES}
        self.events_applied = 0
        # events not yet folded into the field rows: (time, is click) per entity type; folded in one
        # vectorised step before any read (the fold is order-independent, so batching is exact up
        # to float rounding) -- half of the per-event work otherwise
        self._field_pending: dict[str, list[tuple[float, bool]]] = {e: [] for e in ENTITY_TYPES}
        self._field_chunks: dict[str, list[Any]] = {e: [] for e in ENTITY_TYPES}  # from apply_records

    @property
    def rows(self) -> dict[str, dict[str, _Row]]:
        """``{entity type: {key: row}}``, field rows up to date."""
        self._settle_fields()
        return self._rows

    # ---- folding -------------------------------------------------------------------------------
    def apply_impression(self, imp: Impression) -> None:
        self._apply(imp.event_time, False, (imp.user_id, imp.ad_id, imp.creative_id, imp.query,
                                            imp.bidword, imp.category))

    def apply_click(self, click: Click) -> None:
        self._apply(click.event_time, True, (click.user_id, click.ad_id, click.creative_id,
                                             click.query, click.bidword, click.category))

    def apply_record(self, rec: dict[str, Any]) -> None:
        """An impression or click as a decoded dict (``Event.to_dict()`` shape, ``core.codec``)."""
        self._apply(rec["event_time"], rec["type"] == "click", (rec["user_id"], rec["ad_id"], rec["creative_id"],
                                                                 rec["query"], rec["bidword"], rec["category"]))

    def _apply(self, t: float, click: bool, keys: tuple[str, ...]) -> None:
        self.events_applied += 1
        ev = (t, click)
        sharded = self.shards > 1
        for etype, key in zip(ENTITY_TYPES, keys):
            if not key:
                continue
            if sharded:
                if self.shard == 0:
                    self._field_pending[etype].append(ev)
                mine = self._owned[etype].get(key)
                if mine is None:
                    mine = self._owned[etype][key] = owner(etype, key, self.shards) == self.shard
                if not mine:
                    continue
            rows = self._rows[etype]
            row = rows.get(key)
            if row is None:
                row = rows[key] = _Row(len(self._rates))
            self._fold(row, t, click)
            self.dirty[etype].add(key)
            if not sharded:
                self._field_pending[etype].append(ev)

    def apply_records(self, recs: list[dict[str, Any]]) -> None:
        """A batch of decoded impressions and clicks (``Event.to_dict()`` shape): the same rows as
        :meth:`apply_record` one by one, up to float rounding, folded per entity type with numpy
        (each touched row is read and written once per batch, the decay sums for all of them at
        once: the formula of :meth:`_settle_fields`)."""
        import numpy as np
        import pandas as pd

        n = len(recs)
        if not n:
            return
        self.events_applied += n
        t_all = np.array([r["event_time"] for r in recs], dtype=np.float64)
        clk_all = np.array([r["type"] == "click" for r in recs], dtype=bool)
        rates = np.array(self._rates)
        nh = len(rates)
        sharded = self.shards > 1
        for etype, jk in JOIN_KEYS.items():
            keys = np.array([r[jk] for r in recs], dtype=object)
            sel = keys != ""
            if not sel.any():
                continue
            if not sharded or self.shard == 0:
                self._field_chunks[etype].append((t_all[sel], clk_all[sel]))
            if sharded:
                owned = self._owned[etype]
                mine = np.fromiter((owned[k] if k in owned else owned.setdefault(
                    k, owner(etype, k, self.shards) == self.shard) for k in keys[sel]), dtype=bool,
                    count=int(sel.sum()))
                sel[sel] = mine
                if not sel.any():
                    continue
            t, clk = t_all[sel], clk_all[sel]
            codes, uniq = pd.factorize(keys[sel])
            m = len(uniq)
            rows_d = self._rows[etype]
            rows = []
            for k in uniq:
                row = rows_d.get(k)
                if row is None:
                    row = rows_d[k] = _Row(nh)
                rows.append(row)
            t_ref = np.array([r.t_ref for r in rows])
            dimp = np.array([r.dimp for r in rows]).reshape(m, nh)
            dclk = np.array([r.dclk for r in rows]).reshape(m, nh)
            t_max = np.full(m, -math.inf)
            np.maximum.at(t_max, codes, t)
            t_new = np.maximum(t_ref, t_max)
            old = np.isfinite(t_ref)
            f = np.ones((m, nh))
            f[old] = np.exp(-rates[None, :] * (t_new[old] - t_ref[old])[:, None])
            w = np.exp(-rates[None, :] * (t_new[codes] - t)[:, None])
            add_imp = np.zeros((m, nh))
            add_clk = np.zeros((m, nh))
            np.add.at(add_imp, codes[~clk], w[~clk])
            np.add.at(add_clk, codes[clk], w[clk])
            dimp = dimp * f + add_imp
            dclk = dclk * f + add_clk
            n_imp = np.bincount(codes[~clk], minlength=m)
            n_clk = np.bincount(codes[clk], minlength=m)
            li = np.zeros(m)
            lc = np.zeros(m)
            np.maximum.at(li, codes[~clk], t[~clk])
            np.maximum.at(lc, codes[clk], t[clk])
            for i, row in enumerate(rows):  # new lists: snapshots share the old ones
                row.t_ref = float(t_new[i])
                row.dimp = dimp[i].tolist()
                row.dclk = dclk[i].tolist()
                if n_imp[i]:
                    row.impressions += int(n_imp[i])
                    if li[i] > row.last_imp:
                        row.last_imp = float(li[i])
                if n_clk[i]:
                    row.clicks += int(n_clk[i])
                    if lc[i] > row.last_clk:
                        row.last_clk = float(lc[i])
            self.dirty[etype].update(uniq.tolist())

    def _settle_fields(self) -> None:
        """Fold the pending events into the field rows: with ``T`` = the newest time seen, each
        decayed sum becomes ``D * 2**(-(T - t_ref)/h) + sum_e 2**(-(T - t_e)/h)`` -- the same value
        the per-event fold reaches, in any order."""
        import numpy as np

        for etype in ENTITY_TYPES:
            pending, chunks = self._field_pending[etype], self._field_chunks[etype]
            if not pending and not chunks:
                continue
            self._field_pending[etype], self._field_chunks[etype] = [], []
            rows = self._rows[etype]
            row = rows.get(FIELD_KEY)
            if row is None:
                row = rows[FIELD_KEY] = _Row(len(self._rates))
            self.dirty[etype].add(FIELD_KEY)
            ts, cs = [c[0] for c in chunks], [c[1] for c in chunks]  # batches from apply_records
            if pending:
                arr = np.array(pending, dtype=np.float64)
                ts.append(arr[:, 0])
                cs.append(arr[:, 1] > 0.5)
            t, is_click = np.concatenate(ts), np.concatenate(cs)
            pending = t  # its length below
            t_new = max(row.t_ref, float(t.max()))
            n_clk = int(is_click.sum())
            dimp, dclk = list(row.dimp), list(row.dclk)  # new lists: snapshots share the old ones
            for i, r in enumerate(self._rates):
                if row.t_ref != -math.inf and t_new > row.t_ref:
                    f = math.exp(-r * (t_new - row.t_ref))
                    dimp[i] *= f
                    dclk[i] *= f
                w = np.exp(-r * (t_new - t))
                dclk[i] += float(w[is_click].sum())
                dimp[i] += float(w[~is_click].sum())
            row.dimp, row.dclk = dimp, dclk
            row.t_ref = t_new
            row.clicks += n_clk
            row.impressions += len(pending) - n_clk
            if n_clk:
                row.last_clk = max(row.last_clk, float(t[is_click].max()))
            if n_clk < len(pending):
                row.last_imp = max(row.last_imp, float(t[~is_click].max()))

    def _fold(self, row: _Row, t: float, click: bool) -> None:
        """One event into one row (the hot loop of the updater: kept to list comprehensions)."""
        t_ref = row.t_ref
        if t > t_ref:  # newer: decay the sums to t, then add 1
            row.t_ref = t
            if t_ref == -math.inf:
                fs = None
            else:
                dt = t_ref - t
                fs = [math.exp(r * dt) for r in self._rates]
            if click:
                if fs is not None:
                    row.dimp = [d * f for d, f in zip(row.dimp, fs)]
                    row.dclk = [d * f + 1.0 for d, f in zip(row.dclk, fs)]
                else:
                    row.dclk = [d + 1.0 for d in row.dclk]
            else:
                if fs is not None:
                    row.dimp = [d * f + 1.0 for d, f in zip(row.dimp, fs)]
                    row.dclk = [d * f for d, f in zip(row.dclk, fs)]
                else:
                    row.dimp = [d + 1.0 for d in row.dimp]
        else:  # older (or equal) event: decay its contribution back to the row's newest time
            dt = t - t_ref
            ws = [math.exp(r * dt) for r in self._rates]
            if click:
                row.dclk = [d + w for d, w in zip(row.dclk, ws)]
            else:
                row.dimp = [d + w for d, w in zip(row.dimp, ws)]
        if click:
            row.clicks += 1
            if t > row.last_clk:
                row.last_clk = t
        else:
            row.impressions += 1
            if t > row.last_imp:
                row.last_imp = t

    # ---- output ---------------------------------------------------------------------------------
    def row_values(self, etype: str, key: str) -> dict[str, Any] | None:
        self._settle_fields()
        row = self._rows[etype].get(key)
        if row is None:
            return None
        names = [n for n, _ in feature_schema(self.half_lives)]
        return dict(zip(names, self._values(row)))

    def _values(self, row: _Row) -> list[Any]:
        t = row.t_ref
        return [
            row.impressions,
            row.clicks,
            *row.dimp,
            *row.dclk,
            row.last_imp,
            row.last_clk,
            t - row.last_imp if row.impressions else -1.0,
            t - row.last_clk if row.clicks else -1.0,
            t,
        ]

    def has_dirty(self) -> bool:
        return any(self.dirty.values()) or any(self._field_chunks.values())

    def dirty_count(self) -> int:
        self._settle_fields()
        return sum(len(d) for d in self.dirty.values())

    def dirty_rows(self, clear: bool = True) -> dict[str, dict[str, list[Any]]]:
        """Column lists per entity type for the rows changed since the last call (sorted by key):
        ``{etype: {join_key: [...], "impressions": [...], ..., "event_time": [...]}}``."""
        self._settle_fields()
        schema = [n for n, _ in feature_schema(self.half_lives)]
        nh = len(self.half_lives)
        out: dict[str, dict[str, list[Any]]] = {}
        for etype in ENTITY_TYPES:
            keys = sorted(self.dirty[etype])
            if not keys:
                continue
            rows = self._rows[etype]
            sel = [rows[k] for k in keys]
            imps = [r.impressions for r in sel]
            clks = [r.clicks for r in sel]
            t = [r.t_ref for r in sel]
            last_imp = [r.last_imp for r in sel]
            last_clk = [r.last_clk for r in sel]
            values: list[list[Any]] = [imps, clks,
                      *([r.dimp[i] for r in sel] for i in range(nh)),
                      *([r.dclk[i] for r in sel] for i in range(nh)),
                      last_imp, last_clk,
                      [tt - li if n else -1.0 for tt, li, n in zip(t, last_imp, imps)],
                      [tt - lc if n else -1.0 for tt, lc, n in zip(t, last_clk, clks)],
                      t]
            cols: dict[str, list[Any]] = {JOIN_KEYS[etype]: keys}
            cols.update(zip(schema, values))
            out[etype] = cols
            if clear:
                self.dirty[etype].clear()
        return out

    def mark_all_dirty(self) -> int:
        """Mark every row dirty (the online store lost them: push everything again); returns how many."""
        self._settle_fields()
        self.dirty = {e: set(self._rows[e]) for e in ENTITY_TYPES}
        return sum(len(d) for d in self.dirty.values())

    def all_rows(self) -> dict[str, dict[str, list[Any]]]:
        """Every row as in :meth:`dirty_rows` (does not touch the dirty set)."""
        self._settle_fields()
        saved = {e: set(d) for e, d in self.dirty.items()}
        self.dirty = {e: set(self._rows[e]) for e in ENTITY_TYPES}
        try:
            return self.dirty_rows(clear=True)
        finally:
            self.dirty = saved

    # ---- checkpointing --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain data (lists, dicts, floats) that :meth:`restore` turns back into this state.
        The dirty set is included so a restored worker re-pushes what was not yet pushed."""
        self._settle_fields()
        return {
            "half_lives": list(self.half_lives),
            "shard": [self.shard, self.shards],
            "events_applied": self.events_applied,
            "rows": {e: {k: (r.impressions, r.clicks, r.t_ref, r.dimp, r.dclk, r.last_imp, r.last_clk)
                         for k, r in rows.items()} for e, rows in self._rows.items()},
            "dirty": {e: sorted(d) for e, d in self.dirty.items()},
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> "AggregateState":
        shard, shards = snap.get("shard", (0, 1))
        state = cls(snap["half_lives"], shard, shards)
        state.events_applied = int(snap.get("events_applied", 0))
        for etype, rows in snap["rows"].items():
            state._rows[etype] = {k: _Row.from_list(v) for k, v in rows.items()}
        for etype, keys in snap.get("dirty", {}).items():
            state.dirty[etype] = set(keys)
        return state
