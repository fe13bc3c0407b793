"""Event contracts: the one place that says what flows through the topics.

Every record is a JSON object with a schema version ``v`` and an event ``type``. Decoding validates
size, JSON, version, type, required fields, field types and value ranges; anything wrong raises
:class:`~core.errors.InvalidRecord` with a stable ``reason`` (the dead-letter reason and metric label).

Times are event times in seconds since the Unix epoch (float). Validation is hand-written over a
field table rather than a general schema library because it sits on the hot path of every worker.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import msgspec

from core.errors import InvalidRecord

_JSON = msgspec.json.Encoder(order="sorted")

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_RECORD_BYTES = 64 * 1024
# event times outside [now - MAX_PAST_S, now + MAX_FUTURE_S] are clock-skewed when a clock is given
MAX_FUTURE_S = 300.0
MAX_PAST_S = 20 * 365 * 86400.0

# entity type -> the event field holding its id; the feature store's join keys use the same names
ENTITY_KEYS: dict[str, str] = {
    "user": "user_id",
    "ad": "ad_id",
    "creative": "creative_id",
    "query": "query",
    "bidword": "bidword",
    "category": "category",
}

# ``features`` keys with this prefix describe the creative that was shown (its content: layout, colour,
# text length, ...; see core/creatives.py). Impressions carry them, the joiner copies them into the
# example with the rest of ``features``, and creative rankers read them from there.
CREATIVE_FEATURE_PREFIX = "cr_"

_NUM = (int, float)


def _is_num(x: Any) -> bool:
    return isinstance(x, _NUM) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _is_features(x: Any) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in x.items()
    )


def _is_str_map(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())


_CHECKS = {"num": _is_num, "int": _is_int, "str": _is_str, "features": _is_features, "str_map": _is_str_map}


_FIELD_CACHE: dict[type, tuple[str, ...]] = {}
_GETTERS: dict[type, tuple[Any, tuple[str, ...], tuple[str, ...]]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_CACHE.get(cls)
    if names is None:
        names = _FIELD_CACHE[cls] = tuple(f.name for f in fields(cls))
    return names


def _getter(cls: type) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """(one C getter of every field, field names, names of the dict-valued fields) of an event class."""
    g = _GETTERS.get(cls)
    if g is None:
        names = _field_names(cls)
        dict_fields = tuple(f.name for f in fields(cls) if f.default_factory is dict)  # type: ignore[comparison-overlap]
        g = _GETTERS[cls] = (operator.attrgetter(*names), names, dict_fields)
    return g


@dataclass(slots=True)
class Event:
    """Base of every event. Subclasses set ``TYPE`` and ``SPEC`` = {field: (kind, required)}."""

    TYPE: ClassVar[str] = ""
    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {}

    def to_dict(self) -> dict[str, Any]:
        # same result as dataclasses.asdict (values are scalars or flat dicts of scalars), ~6x faster
        get, names, dict_fields = _getter(type(self))
        d = dict(zip(names, get(self)))
        for name in dict_fields:
            d[name] = dict(d[name])
        d["v"] = SCHEMA_VERSION
        d["type"] = self.TYPE
        return d

    def to_json(self) -> bytes:
        """Compact JSON with sorted keys (the same event always gives the same bytes). msgspec's
        encoder, ~8x json.dumps (UTF-8 as is, not \\u-escaped); json.dumps for what it refuses
        (a lone surrogate in a string)."""
        d = self.to_dict()
        try:
            return _JSON.encode(d)
        except (UnicodeEncodeError, TypeError, OverflowError):
            return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @property
    def key(self) -> str:
        """The Kafka key: events of one request land in the same partition of every topic."""
        return getattr(self, "request_id")


@dataclass(slots=True)
class Impression(Event):
    """One ad shown in one slot of one search result page. ``creative_id`` is the creative shown;
    its content, when known, is in ``features`` under ``cr_*`` keys (CREATIVE_FEATURE_PREFIX)."""

    TYPE: ClassVar[str] = "impression"
    request_id: str
    event_time: float
    user_id: str
    query: str
    ad_id: str
    creative_id: str
    bidword: str
    category: str
    position: int
    bid: float
    slot: str = "top"
    domain: str = "search"
    features: dict[str, Any] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)

    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        "request_id": ("str", True),
        "event_time": ("num", True),
        "user_id": ("str", True),
        "query": ("str", True),
        "ad_id": ("str", True),
        "creative_id": ("str", True),
        "bidword": ("str", True),
        "category": ("str", True),
        "position": ("int", True),
        "bid": ("num", True),
        "slot": ("str", False),
        "domain": ("str", False),
        "features": ("features", False),
        "model_versions": ("str_map", False),
    }


@dataclass(slots=True)
class Click(Event):
    """A click on a served ad. The click URL carries the ids of what was served, so the click
    alone can update per-entity statistics; the joiner still checks it against its impression."""

    TYPE: ClassVar[str] = "click"
    request_id: str
    event_time: float
    ad_id: str
    user_id: str
    creative_id: str = ""
    query: str = ""
    bidword: str = ""
    category: str = ""

    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        "request_id": ("str", True),
        "event_time": ("num", True),
        "ad_id": ("str", True),
        "user_id": ("str", True),
        "creative_id": ("str", False),
        "query": ("str", False),
        "bidword": ("str", False),
        "category": ("str", False),
    }


@dataclass(slots=True)
class Conversion(Event):
    """A purchase (or other goal) attributed to a served ad."""

    TYPE: ClassVar[str] = "conversion"
    request_id: str
    event_time: float
    ad_id: str
    user_id: str
    value: float = 0.0

    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        "request_id": ("str", True),
        "event_time": ("num", True),
        "ad_id": ("str", True),
        "user_id": ("str", True),
        "value": ("num", False),
    }


@dataclass(slots=True)
class BidwordChange(Event):
    """An advertiser adds, updates or removes a bidword on an ad."""

    TYPE: ClassVar[str] = "bidword_change"
    event_time: float
    ad_id: str
    bidword: str
    action: str
    bid: float = 0.0
    category: str = ""

    ACTIONS: ClassVar[frozenset[str]] = frozenset({"add", "update", "remove"})
    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        "event_time": ("num", True),
        "ad_id": ("str", True),
        "bidword": ("str", True),
        "action": ("str", True),
        "bid": ("num", False),
        "category": ("str", False),
    }

    @property
    def key(self) -> str:
        return self.bidword


@dataclass(slots=True)
class CreativeChange(Event):
    """A creative enters, leaves or is judged in the catalogue (the ``creatives`` topic).

    ``image`` and ``product_image`` are base64 PNGs (the creative, and the clean product it should
    show); ``review`` is a human review label (``core.images.LABELS``); ``gate`` the availability
    gate's verdict (``pass`` / ``fail``) with ``gate_score`` = P(available) and the gate's version in
    ``features["gate_version"]``. ``action``: ``add`` (a new creative), ``remove``, ``verdict`` (a
    judgement of a creative already in the catalogue). Keyed by the ad: an ad's creatives stay in order."""

    TYPE: ClassVar[str] = "creative_change"
    event_time: float
    ad_id: str
    creative_id: str
    action: str
    category: str = ""
    image: str = ""
    product_image: str = ""
    review: str = ""
    gate: str = ""
    gate_score: float | None = None
    source: str = ""
    features: dict[str, Any] = field(default_factory=dict)

    ACTIONS: ClassVar[frozenset[str]] = frozenset({"add", "remove", "verdict"})
    REVIEWS: ClassVar[frozenset[str]] = frozenset({"", "available", "missing", "cutoff", "low_contrast",
                                                   "bg_mismatch"})
    GATES: ClassVar[frozenset[str]] = frozenset({"", "pass", "fail"})
    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        "event_time": ("num", True),
        "ad_id": ("str", True),
        "creative_id": ("str", True),
        "action": ("str", True),
        "category": ("str", False),
        "image": ("str", False),
        "product_image": ("str", False),
        "review": ("str", False),
        "gate": ("str", False),
        "gate_score": ("num", False),
        "source": ("str", False),
        "features": ("features", False),
    }

    @property
    def key(self) -> str:
        return self.ad_id


@dataclass(slots=True)
class Example(Event):
    """A labelled training example: an impression with what happened within the attribution
    window. Keyed by ``request_id:ad_id``; the same input always yields the same content.

    ``stage`` (docs/speed.md "Fresher models"): ``full`` — the one record of an impression, emitted
    when its attribution window closes (the default, and every record when the joiner does not emit
    positives at the click); ``click`` — emitted at the impression's first click (``clicked=1``,
    ``converted=0``, ``click_time`` of that click), before the window closes; ``close`` — the record
    at window close of an impression that already had a ``click`` record (its final labels: the
    conversion and the earliest click time). A consumer takes ``full`` plus either ``close`` (final
    labels, as without early positives) or ``click`` (positives as soon as they exist); never both."""

    TYPE: ClassVar[str] = "example"
    STAGES: ClassVar[tuple[str, ...]] = ("full", "click", "close")
    request_id: str
    event_time: float
    user_id: str
    query: str
    ad_id: str
    creative_id: str
    bidword: str
    category: str
    position: int
    bid: float
    slot: str
    domain: str
    clicked: int
    converted: int
    click_time: float | None = None
    features: dict[str, Any] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    stage: str = "full"

    SPEC: ClassVar[dict[str, tuple[str, bool]]] = {
        **Impression.SPEC,
        "slot": ("str", True),
        "domain": ("str", True),
        "clicked": ("int", True),
        "converted": ("int", True),
        "click_time": ("num", False),
        "stage": ("str", False),
    }

    @property
    def key(self) -> str:
        return example_key(self.request_id, self.ad_id)

    @classmethod
    def from_impression(
        cls, imp: Impression, clicked: bool, converted: bool, click_time: float | None, stage: str = "full"
    ) -> "Example":
        return cls(
            request_id=imp.request_id,
            event_time=imp.event_time,
            user_id=imp.user_id,
            query=imp.query,
            ad_id=imp.ad_id,
            creative_id=imp.creative_id,
            bidword=imp.bidword,
            category=imp.category,
            position=imp.position,
            bid=imp.bid,
            slot=imp.slot,
            domain=imp.domain,
            clicked=int(clicked),
            converted=int(converted),
            click_time=click_time,
            features=dict(imp.features),
            model_versions=dict(imp.model_versions),
            stage=stage,
        )


def example_key(request_id: str, ad_id: str) -> str:
    return f"{request_id}:{ad_id}"


EVENT_TYPES: dict[str, type[Event]] = {
    c.TYPE: c for c in (Impression, Click, Conversion, BidwordChange, Example, CreativeChange)
}
_FIELD_NAMES = {c: frozenset(f.name for f in fields(c)) for c in EVENT_TYPES.values()}


def validate_dict(obj: Any, expected: type[Event] | None = None, now: float | None = None,
                  max_future_s: float = MAX_FUTURE_S) -> Event:
    """Validate a decoded JSON value and build its event. ``now`` enables the clock-skew check:
    ``event_time`` must lie in ``[now - MAX_PAST_S, now + max_future_s]``. Workers pass the
    record's append timestamp as ``now``, so the check gives the same answer when the topic is read
    again."""
    if not isinstance(obj, dict):
        raise InvalidRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if v is None:
        raise InvalidRecord("missing_field", "schema version 'v' is missing")
    if v not in SUPPORTED_VERSIONS or isinstance(v, bool):
        raise InvalidRecord("unknown_schema_version", f"v={v!r}; supported: {sorted(SUPPORTED_VERSIONS)}")
    t = obj.get("type")
    cls = EVENT_TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        if t is None and expected is not None:
            cls = expected
        else:
            raise InvalidRecord("unknown_event_type", f"type={t!r}")
    if expected is not None and cls is not expected:
        raise InvalidRecord("unknown_event_type", f"type={t!r} on a topic of {expected.TYPE!r} events")
    kwargs: dict[str, Any] = {}
    for name, (kind, required) in cls.SPEC.items():
        if name not in obj or obj[name] is None:
            if required:
                raise InvalidRecord("missing_field", f"{cls.TYPE}.{name} is required")
            continue
        value = obj[name]
        if not _CHECKS[kind](value):
            raise InvalidRecord(
                "wrong_type", f"{cls.TYPE}.{name} must be {kind}, got {type(value).__name__}"
            )
        kwargs[name] = value
    et = kwargs["event_time"]
    if not math.isfinite(et):
        raise InvalidRecord("invalid_value", f"event_time={et!r} is not finite")
    if now is not None and not (now - MAX_PAST_S <= et <= now + max_future_s):
        raise InvalidRecord("clock_skew", f"event_time={et} is {et - now:+.0f}s from now")
    for name in ("request_id", "ad_id", "user_id", "bidword"):
        if name in kwargs and name in cls.SPEC and cls.SPEC[name][1] and not kwargs[name]:
            raise InvalidRecord("invalid_value", f"{cls.TYPE}.{name} must not be empty")
    if "position" in kwargs and kwargs["position"] < 0:
        raise InvalidRecord("invalid_value", f"position={kwargs['position']} must be >= 0")
    if "bid" in kwargs and (not math.isfinite(kwargs["bid"]) or kwargs["bid"] < 0):
        raise InvalidRecord("invalid_value", f"bid={kwargs['bid']!r} must be a finite number >= 0")
    if cls is Example and kwargs.get("stage", "full") not in Example.STAGES:
        raise InvalidRecord("invalid_value", f"stage={kwargs['stage']!r}; allowed: {list(Example.STAGES)}")
    if cls is BidwordChange and kwargs["action"] not in BidwordChange.ACTIONS:
        raise InvalidRecord("invalid_value", f"action={kwargs['action']!r}")
    if cls is CreativeChange:
        for name, allowed in (("action", CreativeChange.ACTIONS), ("review", CreativeChange.REVIEWS),
                              ("gate", CreativeChange.GATES)):
            if kwargs.get(name, "") not in allowed:
                raise InvalidRecord("invalid_value", f"{name}={kwargs[name]!r}; allowed: {sorted(allowed)}")
        if not kwargs["creative_id"]:
            raise InvalidRecord("invalid_value", "creative_change.creative_id must not be empty")
        gs = kwargs.get("gate_score")
        if gs is not None and not (math.isfinite(gs) and 0.0 <= gs <= 1.0):
            raise InvalidRecord("invalid_value", f"gate_score={gs!r} must be in [0, 1]")
    kwargs["event_time"] = float(et)
    if "bid" in kwargs:
        kwargs["bid"] = float(kwargs["bid"])
    return cls(**kwargs)


def decode(raw: bytes | str | None, expected: type[Event] | None = None, now: float | None = None,
           max_future_s: float = MAX_FUTURE_S) -> Event:
    """Decode one record's value. Raises :class:`InvalidRecord` with the reason when it is bad."""
    if raw is None:
        raise InvalidRecord("malformed_json", "empty record value")
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord("oversized", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRecord("malformed_json", str(e)[:200]) from None
    return validate_dict(obj, expected, now, max_future_s)


def record_time(ts: tuple[int, int] | None, fallback: float) -> float:
    """The clock a worker checks a record's event time against: its Kafka timestamp (seconds) when
    the record has one (``(type, ms)`` as confluent-kafka gives it; type 0 = none), else
    ``fallback`` (the wall clock). Deterministic when the same topic is read again."""
    if ts is not None and ts[0] != 0 and ts[1] > 0:
        return ts[1] / 1000.0
    return fallback


def encode(event: Event) -> bytes:
    return event.to_json()


def from_mapping(cls: type[Event], data: Mapping[str, Any]) -> Event:
    """Build an event from trusted in-process data (no version field needed)."""
    return validate_dict({"v": SCHEMA_VERSION, "type": cls.TYPE, **data}, cls)


def dead_letter_record(
    topic: str, partition: int | None, offset: int | None, raw: bytes | None, err: InvalidRecord
) -> bytes:
    """The value written to the dead-letter topic: the reason, where it came from, and the payload
    (truncated for oversized records so the dead-letter record itself stays small)."""
    payload = raw if raw is not None else b""
    if isinstance(payload, str):
        payload = payload.encode()
    return json.dumps(
        {
            "reason": err.reason,
            "detail": err.detail,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "size": len(payload),
            "payload": payload[:4096].decode("utf-8", "replace"),
        },
        separators=(",", ":"),
    ).encode()
