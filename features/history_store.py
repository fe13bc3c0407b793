"""Per-user, per-domain behaviour histories in the online store (Redis), for cross-domain serving.

One Redis hash per user, ``<prefix>:<user_id>``, one field per domain holding a JSON object
``{"view": [[item fields...], ...], "click": [...]}`` (oldest first, at most the history's
``max_len`` items each), plus a field ``"_t"`` with the newest event time folded in. Written by the
cross-domain stream job after every window (``streams.crossdomain_job``; the same fold the model
trains with: :class:`core.history.BehaviourHistory`), read by the online service with one
``HGETALL`` per request. Keys expire after ``ttl_s`` (inactive users leave the store).

:class:`MemoryHistoryStore` has the same interface, for unit tests and a service without Redis.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from core.errors import AdstreamError
from core.history import BehaviourHistory

History = dict[str, dict[str, list[list[str]]]]  # domain -> behaviour -> items


class HistoryStoreUnavailable(AdstreamError):
    """The history store cannot be reached."""


def _decode(raw: Mapping[Any, Any]) -> History:
    out: History = {}
    for k, v in raw.items():
        k = k.decode() if isinstance(k, bytes) else str(k)
        if k.startswith("_"):
            continue
        try:
            obj = json.loads(v)
        except (ValueError, TypeError):
            continue
        if isinstance(obj, dict):
            out[k] = {str(b): [list(map(str, it)) for it in items if isinstance(it, list)]
                      for b, items in obj.items() if isinstance(items, list)}
    return out


class RedisHistoryStore:
    """See the module docstring. ``url``: ``host:port[,db=0,...]`` (as ``features.redis_url``)."""

    def __init__(self, url: str, prefix: str = "adstream:history", ttl_s: float | None = 30 * 86400.0,
                 timeout_s: float = 0.5) -> None:
        import redis

        from features.redis_online import parse_redis_url

        self.prefix = prefix
        self.ttl_s = ttl_s
        self._r = redis.Redis(**parse_redis_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def key(self, user: str) -> str:
        return f"{self.prefix}:{user}"

    def write(self, history: BehaviourHistory, users: Iterable[str], event_time: float | None = None) -> int:
        """Write the current histories of ``users`` (one pipelined round trip). Returns users written."""
        pipe = self._r.pipeline(transaction=False)
        n = 0
        for u in users:
            items = history.as_items(u)
            if not items:
                continue
            mapping = {d: json.dumps(v, separators=(",", ":")) for d, v in items.items()}
            if event_time is not None:
                mapping["_t"] = repr(float(event_time))
            pipe.hset(self.key(u), mapping=mapping)
            if self.ttl_s:
                pipe.expire(self.key(u), int(self.ttl_s))
            n += 1
        if n:
            try:
                pipe.execute()
            except self._errors as e:
                raise HistoryStoreUnavailable(f"history store: {e}") from None
        return n

    def read(self, user: str) -> History:
        try:
            raw = self._r.hgetall(self.key(user))
        except self._errors as e:
            raise HistoryStoreUnavailable(f"history store: {e}") from None
        return _decode(raw)

    def close(self) -> None:
        self._r.close()


class MemoryHistoryStore:
    """In-process stand-in with the same interface (unit tests, a single process)."""

    def __init__(self) -> None:
        self._data: dict[str, History] = {}

    def write(self, history: BehaviourHistory, users: Iterable[str], event_time: float | None = None) -> int:
        n = 0
        for u in users:
            items = history.as_items(u)
            if items:
                self._data[u] = json.loads(json.dumps(items))
                n += 1
        return n

    def read(self, user: str) -> History:
        return json.loads(json.dumps(self._data.get(user, {})))

    def close(self) -> None:
        pass


def views_in(history: History, domain: str) -> int:
    """How many items the user viewed in ``domain`` (what decides whether they are cold there)."""
    return len((history.get(domain) or {}).get("view") or [])
