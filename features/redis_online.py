"""Lean access to the Redis online store, in Feast's own key/value layout.

Feast's Redis store (``feast.infra.online_stores.redis``, entity key serialisation version 3) keeps
one Redis hash per entity key and project:

* key   = ``serialize_entity_key(EntityKey(join_keys=[jk], entity_values=[string_val=k]))`` + project,
  i.e. ``<u32 1><u32 STRING=2><u32 len(jk)><jk><u32 2><u32 len(k)><k><project>`` (little endian);
* field ``mmh3_32("<view>:<feature>")`` (4 bytes, little endian) = the serialised ``Value`` proto
  (``int64_val`` = tag ``0x20`` + varint, ``double_val`` = tag ``0x29`` + 8 bytes);
* field ``_ts:<view>`` = the serialised ``google.protobuf.Timestamp`` of the row's event time.

:class:`RedisFeatureIO` writes and reads exactly these bytes, so Feast (``get_online_features``,
``online_read``) and this module read the same data (tested byte for byte against Feast's writer),
with the field names, hashes and key prefix computed once per view instead of per row and value.

Writes: one ``EVALSHA`` of :data:`WRITE_LUA` per chunk of rows, pipelined; for each row the script
reads the stored ``event_time`` feature and writes the row only if its event time is **newer or
equal** (a late event changes a row without moving its newest event time). The check runs inside
Redis, so it holds across restarts and for several writers of the same key, and a replayed write is
idempotent. Reads: one pipeline of ``HMGET`` (one round trip) for every key of every view of a
request.

Redis Cluster (Feast's ``redis_type: redis_cluster``; ``host:port,host:port,...``): the same
bytes and the same script, sent through redis-py's cluster pipeline one key per script call (a
script's keys must share a slot), and reads as one pipelined ``HMGET`` per key, grouped by node.
``key_ttl_seconds`` (Feast's option, ``FeatureSettings.redis_key_ttl_s``) is honoured on both:
every row written gets that TTL, as Feast's own writer does.
"""

from __future__ import annotations

import math
import socket
import struct
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import redis
import redis.exceptions

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - feast[redis] brings it; the fallback is slower
    _hiredis = None

#: a row is written when the stored event time is absent or not newer than the row's
WRITE_LUA = """
-- ARGV: n2 (arguments per row), p (position of the event_time value in a row's arguments), the
-- event_time field, the key TTL in seconds (0 = none); then per key n2 arguments: field, value,
-- field, value, ... (HSET's own order)
local n2 = tonumber(ARGV[1])
local p_et = tonumber(ARGV[2])
local etf = ARGV[3]
local ttl = tonumber(ARGV[4])
local written = 0
for i = 1, #KEYS do
  local off = 4 + (i - 1) * n2
  local t = struct.unpack('<d', ARGV[off + p_et], 2)
  local old = redis.call('HGET', KEYS[i], etf)
  if not (old and string.len(old) == 9 and string.byte(old, 1) == 41
          and struct.unpack('<d', old, 2) > t) then
    redis.call('HSET', KEYS[i], unpack(ARGV, off + 1, off + n2))
    if ttl > 0 then
      redis.call('EXPIRE', KEYS[i], ttl)
    end
    written = written + 1
  end
end
return written
"""

WRITE_CHUNK = 500  # rows per script call: bounds how long one call blocks Redis (~1-3 ms)
_STRING = 2  # feast ValueType.STRING
_TAG_INT64 = 0x20
_TAG_DOUBLE = 0x29


def mmh3_field(view: str, feature: str) -> bytes:
    """Feast's hash field name for a feature (``feast.infra.online_stores.helpers._mmh3``)."""
    import mmh3

    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def parse_redis_url(url: str) -> dict[str, Any]:
    """``host:port[,db=0,password=...,ssl=true]`` (Feast's connection string) -> redis-py kwargs."""
    import json

    parts = [p for p in url.split(",") if p]
    if not parts or "=" in parts[0] or ":" not in parts[0]:
        raise ValueError(f"redis url must look like host:port[,db=0,...], got {url!r}")
    host, port = parts[0].rsplit(":", 1)
    kw: dict[str, Any] = {"host": host, "port": int(port)}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return kw


def _varint(n: int) -> bytes:
    if 0x10000000 <= n < 0x800000000:  # 5 bytes: every epoch second since 1978, most nanos
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, ((n >> 14) & 0x7F) | 0x80,
                      ((n >> 21) & 0x7F) | 0x80, n >> 28))
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(b: bytes, pos: int) -> int:
    n = shift = 0
    while True:
        c = b[pos]
        n |= (c & 0x7F) << shift
        pos += 1
        if c < 0x80:
            break
        shift += 7
    return n - (1 << 64) if n >= 1 << 63 else n


_SMALL_INT64 = [bytes([_TAG_INT64]) + _varint(i) for i in range(1 << 14)]


_SMALL_INT64_DEC = {b: i for i, b in enumerate(_SMALL_INT64)}
_U32 = struct.Struct("<I")


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


_SMALL_INT64_BULK = [_bulk(b) for b in _SMALL_INT64]


def _int64_bulk(n: int) -> bytes:
    return _SMALL_INT64_BULK[n] if 0 <= n < 16384 else _bulk(b" " + _varint(n))


def int64_value(n: int) -> bytes:
    """A serialised ``Value(int64_val=n)``."""
    return _SMALL_INT64[n] if 0 <= n < 16384 else b" " + _varint(n)


def timestamp_bytes(t: float) -> bytes:
    """The serialised ``Timestamp`` Feast stores for an event time ``t`` (epoch seconds), with the
    Feast path's rounding: ``datetime.fromtimestamp(round(t, 6))`` (microseconds, half to even),
    then ``Timestamp.FromDatetime``. Equality with that path is tested."""
    frac, whole = math.modf(round(t, 6))
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    out = b"\x08" + _varint(sec) if sec else b""
    return out + b"\x10" + _varint(us * 1000) if us else out


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _seconds(dt: datetime) -> int:
    d = dt - _EPOCH
    return d.days * 86400 + d.seconds


class _View:
    """Precomputed layout of one feature view."""

    def __init__(self, project: str, view: str, join_key: str, schema: Sequence[tuple[str, str]],
                 ttl_s: int | None = None):
        self.view = view
        self.ttl_s = int(ttl_s or 0)
        self.join_key = join_key
        self.names = [n for n, _ in schema]
        self.kinds = [k for _, k in schema]
        jk = join_key.encode()
        self.key_head = struct.pack("<III", 1, _STRING, len(jk)) + jk + struct.pack("<I", _STRING)
        self.key_tail = project.encode()
        self.fields = [mmh3_field(view, n) for n in self.names]
        self.ts_field = f"_ts:{view}".encode()
        self.int_idx = [i for i, k in enumerate(self.kinds) if k == "int"]
        self.dbl_idx = [i for i, k in enumerate(self.kinds) if k != "int"]
        # read order: ints, then doubles (one struct call per row for the doubles)
        self.read_fields = [self.fields[i] for i in self.int_idx + self.dbl_idx]
        self.n_int = len(self.int_idx)
        self.n_dbl = len(self.dbl_idx)
        self.read_names = [self.names[i] for i in self.int_idx + self.dbl_idx]
        self._dbl = struct.Struct("<" + "xd" * self.n_dbl)
        self._dbl_tags = bytes([_TAG_DOUBLE]) * self.n_dbl
        # RESP of ``HMGET <key> <read_fields...>``: a constant head and tail around the key
        self.hmget_head = b"*%d\r\n$5\r\nHMGET\r\n" % (2 + len(self.read_fields))
        self.hmget_tail = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in self.read_fields)

        self._key_fixed = len(self.key_head) + 4 + len(self.key_tail)
        # writes, per row: (field, value) pairs of the ints, the doubles, then _ts
        self._nf = len(self.read_fields) + 1
        q_et = self.n_int + self.dbl_idx.index(self.names.index("event_time"))
        et_field = self.fields[self.names.index("event_time")]
        self._write_argv = [b"%d" % (2 * self._nf), b"%d" % (2 * q_et + 2), et_field, b"%d" % self.ttl_s]
        self._write_head = b"".join(_bulk(a) for a in self._write_argv)
        self._int_field_bulks = [_bulk(self.fields[i]) for i in self.int_idx]
        self._ts_field_bulk = _bulk(self.ts_field)
        # one double pair, RESP-framed: "$4\r\n<field>\r\n$9\r\n)" + 8 bytes + "\r\n"
        self._dbl_heads = [_bulk(self.fields[i]) + b"$9\r\n)" for i in self.dbl_idx]
        self._dbl_rec = np.dtype([("h", f"S{len(self._dbl_heads[0])}"), ("v", "<f8"), ("t", "S2")])
        assert len(set(map(len, self._dbl_heads))) == 1

    def write_commands(self, cols: Mapping[str, Sequence[Any]], sha: bytes) -> list[bytes]:
        """RESP ``EVALSHA`` commands of :data:`WRITE_LUA` for the rows in ``cols``, :data:`WRITE_CHUNK`
        rows each. Doubles are framed for the whole batch at once (numpy), so per row only the key,
        two ints and the timestamp are assembled in Python."""
        keys = cols.get(self.join_key)
        if not keys:
            return []
        n = len(keys)
        dbl = np.empty((n, self.n_dbl), dtype=self._dbl_rec)
        dbl["t"] = b"\r\n"
        for j, i in enumerate(self.dbl_idx):
            dbl["h"][:, j] = self._dbl_heads[j]
            dbl["v"][:, j] = np.asarray(cols[self.names[i]], dtype=np.float64)
        blob = dbl.tobytes()
        width = self._dbl_rec.itemsize * self.n_dbl
        int_cols = list(zip(self._int_field_bulks, (cols[self.names[i]] for i in self.int_idx)))
        ts_field = self._ts_field_bulk
        times = cols["event_time"]
        head, tail, fixed = self.key_head, self.key_tail, self._key_fixed
        cmds: list[bytes] = []
        for lo in range(0, n, WRITE_CHUNK):
            hi = min(lo + WRITE_CHUNK, n)
            m = hi - lo
            parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (3 + m + 4 + m * 2 * self._nf,
                                                                  sha, _bulk(b"%d" % m))]
            for k in keys[lo:hi]:
                kb = k.encode()
                parts.append(b"$%d\r\n%b%b%b%b\r\n" % (fixed + len(kb), head, _U32.pack(len(kb)), kb, tail))
            parts.append(self._write_head)
            for r in range(lo, hi):
                for f, c in int_cols:
                    parts.append(f)
                    parts.append(_int64_bulk(int(c[r])))
                parts.append(blob[r * width:(r + 1) * width])
                parts.append(ts_field)
                parts.append(_bulk(timestamp_bytes(times[r])))
            cmds.append(b"".join(parts))
        return cmds

    def write_args(self, cols: Mapping[str, Sequence[Any]]) -> list[tuple[bytes, list[bytes]]]:
        """Per row (key, script arguments) for one-key calls of :data:`WRITE_LUA` (Redis Cluster)."""
        keys = cols.get(self.join_key)
        if not keys:
            return []
        ints = [(self.fields[i], cols[self.names[i]]) for i in self.int_idx]
        dbls = [(self.fields[i], cols[self.names[i]]) for i in self.dbl_idx]
        out = []
        for r, k in enumerate(keys):
            args = list(self._write_argv)
            for f, c in ints:
                args += [f, int64_value(int(c[r]))]
            for f, c in dbls:
                args += [f, b")" + struct.pack("<d", float(c[r]))]
            args += [self.ts_field, timestamp_bytes(cols["event_time"][r])]
            out.append((self.key(k), args))
        return out

    def hmget(self, k: str) -> bytes:
        kb = k.encode()
        return b"%b$%d\r\n%b%b%b%b\r\n%b" % (self.hmget_head, self._key_fixed + len(kb), self.key_head,
                                           _U32.pack(len(kb)), kb, self.key_tail, self.hmget_tail)

    def key(self, k: str) -> bytes:
        kb = k.encode()
        return b"".join((self.key_head, _U32.pack(len(kb)), kb, self.key_tail))

    def decode(self, vals: list[bytes | None]) -> list[Any] | None:
        """HMGET values (``read_fields`` order) -> values in ``read_names`` order; None if absent."""
        if vals[-1] is None and all(v is None for v in vals):  # event_time is always written
            return None
        ni = self.n_int
        dbls = vals[ni:]
        out: list[Any] = [_SMALL_INT64_DEC.get(v) if v in _SMALL_INT64_DEC else _generic(v)
                          for v in vals[:ni]]
        try:
            blob = b"".join(dbls)  # type: ignore[arg-type]
        except TypeError:  # a missing field
            blob = b""
        if len(blob) == 9 * self.n_dbl and blob[::9] == self._dbl_tags:
            out.extend(self._dbl.unpack(blob))
        else:
            out.extend(_generic(v) for v in dbls)
        return out


def _read_replies(conn: Any, n: int) -> list[Any]:
    """``n`` replies from a redis-py connection, parsed by hiredis straight off the socket
    (redis-py's per-reply bookkeeping cost ~2 us a reply, more than the parse). Falls back to
    ``read_response`` without hiredis. Socket errors become redis-py's exception types."""
    sock = getattr(conn, "_sock", None)
    if _hiredis is None or sock is None:
        return [conn.read_response() for _ in range(n)]
    reader = _hiredis.Reader()
    buf = bytearray(1 << 17)
    out: list[Any] = []
    while len(out) < n:
        r = reader.gets()
        if r is False:
            try:
                k = sock.recv_into(buf)
            except socket.timeout as e:
                raise redis.exceptions.TimeoutError("Timeout reading from socket") from e
            except OSError as e:
                raise redis.exceptions.ConnectionError(f"Error while reading from socket: {e}") from e
            if not k:
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            reader.feed(buf, 0, k)  # type: ignore[arg-type]  # any buffer works
            continue
        if isinstance(r, _hiredis.ReplyError):
            msg = str(r)
            if msg.startswith("NOSCRIPT"):
                raise redis.exceptions.NoScriptError(msg)
            raise redis.exceptions.ResponseError(msg)
        out.append(r)
    return out


def _cluster_client(url: str, timeout_s: float) -> Any:
    """A redis-py ``RedisCluster`` from Feast's cluster connection string (``host:port,...``)."""
    from redis.cluster import ClusterNode, RedisCluster

    nodes, params = [], {}
    for part in (p for p in url.split(",") if p):
        if "=" in part:
            k, _, v = part.partition("=")
            params[k] = v
        else:
            host, port = part.rsplit(":", 1)
            nodes.append(ClusterNode(host, int(port)))
    if not nodes:
        raise ValueError(f"redis cluster url must list host:port nodes, got {url!r}")
    kw: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if "password" in params:
        kw["password"] = params["password"]
    if str(params.get("ssl", "")).lower() == "true":
        kw["ssl"] = True
    return RedisCluster(startup_nodes=nodes, **kw)


def _generic(v: bytes | None) -> Any:
    """Any Value proto -> its Python value (None for absent/empty)."""
    if not v:
        return None
    from features import feast_ready

    feast_ready()
    from feast.protos.feast.types.Value_pb2 import Value

    p = Value.FromString(v)
    which = p.WhichOneof("val")
    return getattr(p, which) if which else None


class RedisFeatureIO:
    """Writer and reader of the adstream feature views in Feast's Redis layout."""

    def __init__(self, url: str, project: str, views: Mapping[str, tuple[str, str]],
                 schema: Sequence[tuple[str, str]], timeout_s: float = 2.0, cluster: bool = False,
                 key_ttl_s: int | None = None) -> None:
        """``views``: entity type -> (feature view name, join key). ``cluster``: ``url`` lists the
        startup nodes of a Redis Cluster. ``key_ttl_s``: TTL of every row written (None = none)."""
        self.cluster = cluster
        if cluster:
            self.redis = _cluster_client(url, timeout_s)
        else:
            kw = parse_redis_url(url)
            kw.setdefault("socket_timeout", timeout_s)
            kw.setdefault("socket_connect_timeout", timeout_s)
            # fail fast: redis-py's default retries with backoff would hold a request for seconds
            # while Redis is down; callers (the online service's breaker, the updater's restart) decide
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            kw.setdefault("retry", Retry(NoBackoff(), 0))
            self.redis = redis.Redis(**kw)
        self.views = {e: _View(project, v, jk, schema, key_ttl_s) for e, (v, jk) in views.items()}
        import hashlib

        self._sha = hashlib.sha1(WRITE_LUA.encode()).hexdigest().encode()

    # ---- writes --------------------------------------------------------------------------------
    def write(self, rows_by_entity_type: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, int]:
        """Write rows (``AggregateState.dirty_rows`` columns) where they are not older than the stored
        row; returns the rows written per entity type. All entity types in one round trip; written
        again as a whole if Redis lost the script (a restart): writes are idempotent."""
        import redis.exceptions as rex

        if self.cluster:
            return self._write_cluster(rows_by_entity_type)
        cmds: list[bytes] = []
        order: list[str] = []
        for etype, cols in rows_by_entity_type.items():
            for cmd in self.views[etype].write_commands(cols, self._sha):
                cmds.append(cmd)
                order.append(etype)
        written: dict[str, int] = {e: 0 for e in rows_by_entity_type}
        if not cmds:
            return written
        try:
            res = self._roundtrip(b"".join(cmds), len(cmds))
        except rex.NoScriptError:
            self.redis.script_load(WRITE_LUA)
            res = self._roundtrip(b"".join(cmds), len(cmds))
        for etype, n in zip(order, res):
            written[etype] += int(n)
        return written

    # ---- reads ---------------------------------------------------------------------------------
    def read(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, dict[str, Any] | None]]:
        """``[(entity type, keys), ...]`` -> per request ``{key: {feature: value} | None}`` (None =
        no row): one HMGET per key, all sent as one buffer and answered in one round trip (the
        commands are assembled from precomputed bytes; redis-py's pipeline bookkeeping cost more
        than Redis itself for 200 keys)."""
        if self.cluster:
            return self._read_cluster(requests)
        plan = []
        cmds: list[bytes] = []
        for etype, keys in requests:
            v = self.views[etype]
            uniq = list(dict.fromkeys(keys))
            cmds.extend(v.hmget(k) for k in uniq)
            plan.append((v, uniq))
        res = self._roundtrip(b"".join(cmds), len(cmds))
        out = []
        pos = 0
        for v, uniq in plan:
            got: dict[str, dict[str, Any] | None] = {}
            names = v.read_names
            for k in uniq:
                vals = v.decode(res[pos])
                pos += 1
                got[k] = dict(zip(names, vals)) if vals is not None else None
            out.append(got)
        return out

    # ---- Redis Cluster ---------------------------------------------------------------------------
    def _write_cluster(self, rows_by_entity_type: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, int]:
        """One-key script calls grouped by the node that serves each key's slot, one pipeline per
        node (redis-py's cluster pipeline refuses scripts). A slot that moved meanwhile (MOVED,
        a resharding) makes the whole write start again once with a fresh slot map: it is
        idempotent."""
        written: dict[str, int] = {e: 0 for e in rows_by_entity_type}
        calls = [(etype, key, args) for etype, cols in rows_by_entity_type.items()
                 for key, args in self.views[etype].write_args(cols)]
        if not calls:
            return written
        for attempt in range(3):
            by_node: dict[str, list[int]] = {}
            nm = self.redis.nodes_manager
            for i, (_e, key, _a) in enumerate(calls):
                node = nm.get_node_from_slot(self.redis.keyslot(key))
                by_node.setdefault(node.name, []).append(i)
            res: list[Any] = [None] * len(calls)
            try:
                for name, idx in by_node.items():
                    pipe = self.redis.get_redis_connection(nm.get_node(node_name=name)).pipeline(transaction=False)
                    for i in idx:
                        _e, key, args = calls[i]
                        pipe.evalsha(self._sha, 1, key, *args)
                    for i, r in zip(idx, pipe.execute()):
                        res[i] = r
                break
            except redis.exceptions.NoScriptError:
                self._load_script_everywhere()
            except redis.exceptions.ResponseError as e:
                if "MOVED" in str(e) or "ASK" in str(e):
                    nm.initialize()
                elif "NOSCRIPT" in str(e):
                    self._load_script_everywhere()
                else:
                    raise
        else:
            raise redis.exceptions.ConnectionError("the cluster's slots kept moving during a write")
        for (etype, _k, _a), n in zip(calls, res):
            written[etype] += int(n)
        return written

    def _load_script_everywhere(self) -> None:
        for node in self.redis.get_primaries():
            self.redis.get_redis_connection(node).script_load(WRITE_LUA)

    def _read_cluster(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, dict[str, Any] | None]]:
        pipe = self.redis.pipeline(transaction=False)
        plan = []
        for etype, keys in requests:
            v = self.views[etype]
            uniq = list(dict.fromkeys(keys))
            for k in uniq:
                pipe.hmget(v.key(k), v.read_fields)
            plan.append((v, uniq))
        res = pipe.execute()
        out, pos = [], 0
        for v, uniq in plan:
            got: dict[str, dict[str, Any] | None] = {}
            for k in uniq:
                vals = v.decode(res[pos])
                pos += 1
                got[k] = dict(zip(v.read_names, vals)) if vals is not None else None
            out.append(got)
        return out

    def _roundtrip(self, packed: bytes, n: int) -> list[Any]:
        """Send ``packed`` (n commands) and read n replies. A pooled connection that turns out to
        be dead (Redis restarted) is replaced once; reads and writes here are idempotent."""
        try:
            return self._roundtrip_once(packed, n)
        except redis.exceptions.ConnectionError:
            return self._roundtrip_once(packed, n)

    def _roundtrip_once(self, packed: bytes, n: int) -> list[Any]:
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed])
            return _read_replies(conn, n)
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            pool.release(conn)

    def close(self) -> None:
        self.redis.close()
