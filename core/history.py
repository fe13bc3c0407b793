"""Per-user, per-domain recent behaviour: the items a user saw and clicked in each domain.

Cross-domain models (``models/crossdomain``) attend over what a user did in the *other* domains;
the online service reads the same histories from the feature store (``features/history_store.py``,
written by ``streams/history_updater.py`` from the ``examples`` topic). Both fold the same records
with :meth:`BehaviourHistory.apply`, so training and serving see the same kind of history.

For every (user, domain, behaviour type) the last ``max_len`` items are kept, newest last:

* ``view``: every example (an impression of the item, clicked or not);
* ``click``: the examples with ``clicked == 1``.

An *item* is the tuple of the record's ``item_fields`` values (``ad_id`` and ``category`` by
default; a value is looked up at the top level of the record, then in its ``features``). Items
are interned to small integers (0 = padding), so a history is a ``[domains, behaviours, max_len]``
int array and a window of records costs one small array copy per record. At most ``max_users``
users are kept (the least recently active are dropped first).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

BEHAVIOURS: tuple[str, ...] = ("view", "click")
PAD = 0


def field_value(record: Mapping[str, Any], name: str) -> Any:
    """``record[name]``, else ``record["features"][name]``, else None."""
    if name in record:
        return record[name]
    feats = record.get("features")
    return feats.get(name) if isinstance(feats, Mapping) else None


def item_of(record: Mapping[str, Any], item_fields: Sequence[str]) -> tuple[str, ...]:
    return tuple("" if (v := field_value(record, f)) is None else str(v) for f in item_fields)


class BehaviourHistory:
    """See the module docstring."""

    def __init__(self, item_fields: Sequence[str] = ("ad_id", "category"), max_len: int = 20,
                 max_users: int = 200_000, behaviours: Sequence[str] = BEHAVIOURS) -> None:
        if max_len < 1 or max_users < 1:
            raise ValueError("max_len and max_users must be >= 1")
        self.item_fields = tuple(item_fields)
        self.max_len = int(max_len)
        self.max_users = int(max_users)
        self.behaviours = tuple(behaviours)
        self.items: list[tuple[str, ...]] = [()]  # interned items; 0 = padding
        self._item_id: dict[tuple[str, ...], int] = {}
        # user -> domain -> int32 [behaviours, max_len] of item ids (newest last, 0 = empty)
        self._users: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.dropped_users = 0

    # ---- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: str) -> bool:
        return user in self._users

    def domains_of(self, user: str) -> list[str]:
        return list(self._users.get(user, {}))

    def count(self, user: str, domain: str, behaviour: str = "view") -> int:
        """How many items the user has in ``domain``'s ``behaviour`` history (at most ``max_len``)."""
        arr = self._users.get(user, {}).get(domain)
        if arr is None:
            return 0
        return int((arr[self.behaviours.index(behaviour)] != PAD).sum())

    def matrix(self, user: str, domains: Sequence[str], overlay: Mapping[str, dict[str, np.ndarray]] | None = None
               ) -> np.ndarray:
        """int32 ``[len(domains), behaviours, max_len]`` of item ids (a copy; zeros when unknown)."""
        per = (overlay or {}).get(user)
        if per is None:
            per = self._users.get(user, {})
        out = np.zeros((len(domains), len(self.behaviours), self.max_len), dtype=np.int32)
        for i, d in enumerate(domains):
            arr = per.get(d)
            if arr is not None:
                out[i] = arr
        return out

    def as_items(self, user: str) -> dict[str, dict[str, list[list[str]]]]:
        """The user's history as plain data: domain -> behaviour -> items (oldest first)."""
        out: dict[str, dict[str, list[list[str]]]] = {}
        for d, arr in self._users.get(user, {}).items():
            out[d] = {b: [list(self.items[i]) for i in arr[j] if i != PAD] for j, b in enumerate(self.behaviours)}
        return out

    # ---- writing ---------------------------------------------------------------------------
    def intern(self, item: tuple[str, ...]) -> int:
        i = self._item_id.get(item)
        if i is None:
            i = self._item_id[item] = len(self.items)
            self.items.append(item)
        return i

    def apply(self, record: Mapping[str, Any]) -> None:
        """Fold one example (``user_id``, ``domain``, the item fields, ``clicked``)."""
        self._apply(record, self._users, touch=True)

    def _apply(self, record: Mapping[str, Any], users: dict, touch: bool, base: Any = None) -> None:
        user = str(record.get("user_id", ""))
        domain = str(record.get("domain") or "")
        if not user or not domain:
            return
        item = self.intern(item_of(record, self.item_fields))
        per = users.get(user)
        if per is None:
            src = (base._users.get(user) if base is not None else None) or {}
            per = users[user] = {d: a.copy() for d, a in src.items()} if base is not None else {}
        elif touch:
            self._users.move_to_end(user)
        arr = per.get(domain)
        if arr is None:
            arr = per[domain] = np.zeros((len(self.behaviours), self.max_len), dtype=np.int32)
        _push(arr[0], item)
        if len(self.behaviours) > 1 and int(record.get("clicked") or 0) > 0:
            _push(arr[1], item)
        if touch and len(self._users) > self.max_users:
            self._users.popitem(last=False)
            self.dropped_users += 1

    def replay(self, records: Sequence[Mapping[str, Any]], domains: Sequence[str], mutate: bool,
               skip: Iterable[bool] | None = None) -> np.ndarray:
        """The history of every record *before* it, in record order: int32 ``[n, len(domains),
        behaviours, max_len]``. Each record is folded in after its snapshot: into this history
        (``mutate=True``, training) or into a throw-away overlay (``mutate=False``, scoring; the
        history is unchanged). ``skip[i]`` true: record ``i`` is snapshotted but not folded in
        (a cold-start protocol hides those records from every history)."""
        out = np.zeros((len(records), len(domains), len(self.behaviours), self.max_len), dtype=np.int32)
        overlay: dict[str, dict[str, np.ndarray]] = {}
        skips = list(skip) if skip is not None else None
        for i, r in enumerate(records):
            user = str(r.get("user_id", ""))
            out[i] = self.matrix(user, domains, None if mutate else overlay)
            if skips is not None and skips[i]:
                continue
            if mutate:
                self.apply(r)
            else:
                self._apply(r, overlay, touch=False, base=self)
        return out

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Plain data + one int32 array: users, their domains, the item table."""
        users, doms, blocks = [], [], []
        for u, per in self._users.items():
            for d, arr in per.items():
                users.append(u)
                doms.append(d)
                blocks.append(arr)
        data = np.stack(blocks) if blocks else np.zeros((0, len(self.behaviours), self.max_len), dtype=np.int32)
        return {"item_fields": list(self.item_fields), "max_len": self.max_len, "max_users": self.max_users,
                "behaviours": list(self.behaviours), "items": [list(x) for x in self.items[1:]],
                "users": users, "domains": doms, "data": data.astype(np.int32), "dropped_users": self.dropped_users}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> "BehaviourHistory":
        h = cls(s["item_fields"], int(s["max_len"]), int(s["max_users"]), s["behaviours"])
        for it in s["items"]:
            h.intern(tuple(str(x) for x in it))
        data = np.asarray(s["data"], dtype=np.int32)
        if data.shape[0] != len(s["users"]) or data.shape[1:] != (len(h.behaviours), h.max_len):
            raise ValueError(f"history data of shape {data.shape} does not fit {len(s['users'])} users × "
                             f"{len(h.behaviours)} behaviours × {h.max_len}")
        if data.size and (data.min() < 0 or data.max() >= len(h.items)):
            raise ValueError("history refers to items that are not in its item table")
        for u, d, arr in zip(s["users"], s["domains"], data):
            h._users.setdefault(str(u), {})[str(d)] = arr.copy()
        h.dropped_users = int(s.get("dropped_users", 0))
        return h


def _push(row: np.ndarray, item: int) -> None:
    row[:-1] = row[1:]
    row[-1] = item


def history_from_items(items_by_domain: Mapping[str, Mapping[str, Sequence[Sequence[Any]]]], domains: Sequence[str],
                       behaviours: Sequence[str], max_len: int) -> list[list[list[tuple[str, ...]]]]:
    """A served history (domain -> behaviour -> items, oldest first) cut to the model's shape:
    ``[domains][behaviours]`` lists of at most ``max_len`` item tuples (newest last)."""
    out = []
    for d in domains:
        per = items_by_domain.get(d) or {}
        out.append([[tuple(str(x) for x in it) for it in list(per.get(b) or [])[-max_len:]] for b in behaviours])
    return out
