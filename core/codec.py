"""Batch decoding of event records: the hot consumers' fast path, as strict as :func:`core.events.decode`.

``decode_batch(values, expected, nows)`` decodes a batch of raw record values (one consume call's
worth) into plain dicts shaped like ``Event.to_dict()`` (every field, defaults filled in, ``v`` and
``type``) and a list of ``(index, InvalidRecord)`` for the bad ones. ``decode_events`` gives the
event objects instead (for code that needs them, like the join).

How it stays as strict as the reference path
    Each value is parsed by a ``msgspec.json.Decoder`` bound to a ``msgspec.Struct`` generated from
    the event class's ``SPEC`` (C code: JSON parsing and the per-field type checks in one pass, no
    intermediate dict, no dataclass). The checks ``msgspec`` cannot express (schema version,
    event type, required fields, finite times, non-empty ids, ranges, clock skew) run on the
    struct's attributes. **Any** record that fails anything here is handed to the reference
    :func:`core.events.decode`, which raises the exact ``InvalidRecord`` (same reason, same detail)
    it always did; should the reference accept it (a case this path is stricter about, e.g. a
    schema version written ``1.0``, a UTF-16 payload, a ``NaN`` literal), its result is used. So
    the dead letters are the reference's, and an accepted record is the reference's by
    construction or by the equivalence test (``tests/test_codec.py``: same records and same dead
    letters on random, malformed, oversized and skewed inputs).

Why msgspec (measured, ``bench/bench_decode.py``; figures in ``docs/speed.md``)
    It parses and type-checks in one C pass against a declared schema; ``orjson`` parses faster
    than ``json`` but still builds a dict that the Python checks then walk (measured in the same
    run). ``msgspec`` 0.22 is a pure-C wheel with no dependencies.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import msgspec

from core.errors import InvalidRecord
from core.events import (
    EVENT_TYPES,
    MAX_FUTURE_S,
    MAX_PAST_S,
    MAX_RECORD_BYTES,
    SUPPORTED_VERSIONS,
    BidwordChange,
    Event,
    Example,
    decode,
)

_SCALAR = Union[str, int, float, bool, None]
_TYPES: dict[str, Any] = {
    "num": Union[int, float, None],
    "int": Union[int, None],
    "str": Union[str, None],
    "features": Union[dict[str, _SCALAR], None],
    "str_map": Union[dict[str, str], None],
}
_NONEMPTY = ("request_id", "ad_id", "user_id", "bidword")


class _Layout:
    """The generated struct and the per-field facts of one event class."""

    def __init__(self, cls: type[Event]) -> None:
        self.cls = cls
        annotations = {"v": Any, "type": Any}
        annotations.update({name: _TYPES[kind] for name, (kind, _req) in cls.SPEC.items()})
        ns = {"__annotations__": annotations, **{k: None for k in annotations}}
        # every field optional here: missing and null both become None, and the checks below send
        # a missing required field to the reference path (which names it)
        self.struct = type(f"_{cls.__name__}Wire", (msgspec.Struct,), ns)
        self.decoder = msgspec.json.Decoder(self.struct)
        self.names = list(cls.SPEC)
        self.required = [n for n, (_k, req) in cls.SPEC.items() if req]
        self.nonempty = [n for n in _NONEMPTY if n in cls.SPEC and cls.SPEC[n][1]]
        # field defaults of the dataclass (what to_dict() shows for an absent optional field)
        probe = {n: None for n in self.names}
        self.defaults: dict[str, Any] = {}
        self.factories: dict[str, Any] = {}
        import dataclasses

        for f in dataclasses.fields(cls):
            if f.name not in probe:
                continue
            if f.default is not dataclasses.MISSING:
                self.defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                self.factories[f.name] = f.default_factory  # type: ignore[misc]
        self.has_position = "position" in cls.SPEC
        self.has_bid = "bid" in cls.SPEC
        self.is_bidword = cls is BidwordChange
        self.is_example = cls is Example


_LAYOUTS: dict[type[Event], _Layout] = {}


def _layout(cls: type[Event]) -> _Layout:
    lay = _LAYOUTS.get(cls)
    if lay is None:
        lay = _LAYOUTS[cls] = _Layout(cls)
    return lay


def _fast_one(lay: _Layout, raw: Any, now: float | None, max_future_s: float) -> dict[str, Any] | None:
    """The record as a dict, or None when anything is off (the caller asks the reference why)."""
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        s = lay.decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
        return None
    v = s.v
    if type(v) is not int or v not in SUPPORTED_VERSIONS:
        return None
    t = s.type
    if t is not None and t != lay.cls.TYPE:
        return None
    d = msgspec.structs.asdict(s)
    for name in lay.required:
        if d[name] is None:
            return None
    et = d["event_time"]
    if type(et) is int and not -(1 << 53) <= et <= 1 << 53:
        return None  # the reference decides (a float conversion that may overflow)
    if not math.isfinite(et):
        return None
    if now is not None and not (now - MAX_PAST_S <= et <= now + max_future_s):
        return None
    for name in lay.nonempty:
        if not d[name]:
            return None
    if lay.has_position:
        p = d["position"]
        if p is not None and p < 0:
            return None
    if lay.has_bid:
        b = d["bid"]
        if b is not None:
            if type(b) is int and not 0 <= b <= 1 << 53:
                return None
            if not math.isfinite(b) or b < 0:
                return None
            d["bid"] = float(b)
    if lay.is_bidword and d["action"] not in BidwordChange.ACTIONS:
        return None
    if lay.is_example and d["stage"] is not None and d["stage"] not in Example.STAGES:
        return None
    d["event_time"] = float(et)
    for name, default in lay.defaults.items():
        if d[name] is None:
            d[name] = default
    for name, factory in lay.factories.items():
        if d[name] is None:
            d[name] = factory()
    d["v"] = v
    d["type"] = lay.cls.TYPE
    return d


def _now_at(nows: float | Sequence[float] | None, i: int) -> float | None:
    if nows is None or isinstance(nows, (int, float)):
        return nows  # type: ignore[return-value]
    return nows[i]


def decode_batch(
    values: Sequence[bytes | None],
    expected: type[Event],
    nows: float | Sequence[float] | None = None,
    max_future_s: float = MAX_FUTURE_S,
) -> tuple[list[dict[str, Any] | None], list[tuple[int, InvalidRecord]]]:
    """Decode a batch of record values of one event type.

    ``nows``: the clock of the skew check, one for the batch or one per record (None: no check).
    Returns ``(records, errors)``: ``records[i]`` is the dict of value ``i`` (``Event.to_dict()``
    shape) or None when it is bad, and ``errors`` lists ``(i, InvalidRecord)`` for the bad ones,
    with the reference path's reason and detail."""
    lay = _layout(expected)
    per_record = not (nows is None or isinstance(nows, (int, float)))
    out: list[dict[str, Any] | None] = []
    errors: list[tuple[int, InvalidRecord]] = []
    fast = _fast_one
    for i, raw in enumerate(values):
        now = nows[i] if per_record else nows  # type: ignore[index]
        d = fast(lay, raw, now, max_future_s)  # type: ignore[arg-type]
        if d is None:
            try:
                d = _reference_dict(raw, expected, now, max_future_s)  # type: ignore[arg-type]
            except InvalidRecord as e:
                errors.append((i, e))
            except (OverflowError, ValueError) as e:  # a number too large for a float: never a crash
                d = None
                errors.append((i, InvalidRecord("invalid_value", f"{type(e).__name__}: {e}"[:200])))
        out.append(d)
    return out, errors


def decode_events(
    values: Sequence[bytes | None],
    expected: type[Event],
    nows: float | Sequence[float] | None = None,
    max_future_s: float = MAX_FUTURE_S,
) -> tuple[list[Event | None], list[tuple[int, InvalidRecord]]]:
    """As :func:`decode_batch`, but event objects (what ``core.events.decode`` returns)."""
    recs, errors = decode_batch(values, expected, nows, max_future_s)
    cls = expected
    names = _layout(expected).names
    evs: list[Event | None] = []
    for d in recs:
        evs.append(None if d is None else cls(**{n: d[n] for n in names}))
    return evs, errors


def decode_mixed(
    values: Sequence[bytes | None],
    classes: Sequence[type[Event]],
    nows: Sequence[float],
    max_future_s: float = MAX_FUTURE_S,
    as_events: bool = True,
) -> list[Any]:
    """Records of several event types (``classes[i]`` is record ``i``'s: a batch consumed from
    several topics) decoded at once per type, in input order: each an event (its dict with
    ``as_events=False``) or its :class:`InvalidRecord`."""
    out: list[Any] = [None] * len(values)
    groups: dict[type[Event], list[int]] = {}
    for i, cls in enumerate(classes):
        groups.setdefault(cls, []).append(i)
    decode_group = decode_events if as_events else decode_batch
    for cls, idx in groups.items():
        got, errors = decode_group([values[i] for i in idx], cls, [nows[i] for i in idx], max_future_s)
        for j, x in enumerate(got):
            out[idx[j]] = x
        for j, err in errors:
            out[idx[j]] = err
    return out


def _reference_dict(raw: Any, expected: type[Event], now: float | None, max_future_s: float) -> dict[str, Any]:
    return decode(raw, expected, now=now, max_future_s=max_future_s).to_dict()


def decode_one(raw: bytes | None, expected: type[Event], now: float | None = None) -> dict[str, Any]:
    """One record through the fast path (raises ``InvalidRecord`` like ``core.events.decode``)."""
    recs, errors = decode_batch([raw], expected, now)
    if errors:
        raise errors[0][1]
    return recs[0]  # type: ignore[return-value]


__all__ = ["decode_batch", "decode_events", "decode_one", "EVENT_TYPES"]
