"""The batch decoder (core.codec) against the reference decoder (core.events.decode): the same
records and the same dead letters (reason and detail) on the same input, including malformed,
oversized, skewed and mistyped records."""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from core.codec import decode_batch, decode_events, decode_one
from core.errors import InvalidRecord
from core.events import (
    MAX_RECORD_BYTES,
    BidwordChange,
    Click,
    Conversion,
    Example,
    Impression,
    decode,
)
from streams.sources import synthetic_events

NOW = 1_800_000_000.0


def _norm(x):
    """Values with their types (1 and 1.0 differ), dicts with sorted keys."""
    if isinstance(x, dict):
        return ("dict", sorted((k, _norm(v)) for k, v in x.items()))
    if isinstance(x, float):
        return ("float", repr(x))
    return (type(x).__name__, repr(x))


def reference(raw, cls, now):
    try:
        return "ok", _norm(decode(raw, cls, now=now).to_dict())
    except InvalidRecord as e:
        return "dead", e.reason, e.detail
    except (OverflowError, ValueError) as e:  # the reference crashes here; the batch path dead-letters
        return "crash", type(e).__name__


def fast(raw_list, cls, nows):
    recs, errors = decode_batch(raw_list, cls, nows)
    errs = dict(errors)
    out = []
    for i, d in enumerate(recs):
        if i in errs:
            assert d is None
            out.append(("dead", errs[i].reason, errs[i].detail))
        else:
            assert d is not None
            out.append(("ok", _norm(d)))
    return out


def _valid_events():
    evs = list(synthetic_events(seed=5, duration_s=40, rps=5, start_time=NOW - 100))
    ex = []
    for e in evs:
        if isinstance(e, Impression):
            ex.append(Example.from_impression(e, clicked=random.Random(e.request_id).random() < 0.3,
                                              converted=False, click_time=e.event_time + 3))
    evs += ex
    rng = random.Random(0)
    per_type: dict[type, list] = {}
    for e in evs:
        per_type.setdefault(type(e), []).append(e)
    evs = [e for group in per_type.values() for e in rng.sample(group, min(40, len(group)))]
    evs.append(BidwordChange(event_time=NOW - 5, ad_id="a1", bidword="shoes", action="add", bid=1.5,
                             category="c/d"))
    evs.append(Conversion(request_id="r", event_time=NOW - 5, ad_id="a1", user_id="u", value=3))
    return evs


_BAD_VALUES = [None, True, False, 0, -1, 1.0, 1.5, -0.0, "", "x", [], {}, [1], {"a": 1}, 10**30, 2**63,
               1e308, "1", {"a": {"b": 1}}, {"a": True}, {"a": None}, {"a": [1]}, {"a": 1.5}, {"a": "s"},
               {"1": "2"}]


def _mutations(ev, rng):
    """Raw variants of one valid event: field removed, null, every bad value, version and type
    variants, skew, broken JSON, other encodings, oversized, duplicate keys, extra fields."""
    d = ev.to_dict()
    yield json.dumps(d).encode()
    names = [k for k in d if k not in ("v", "type")]
    for name in rng.sample(names, min(4, len(names))):
        yield json.dumps({k: v for k, v in d.items() if k != name}).encode()
        yield json.dumps({**d, name: None}).encode()
        for bad in rng.sample(_BAD_VALUES, 6):
            yield json.dumps({**d, name: bad}).encode()
    for v in (None, 1.0, True, 2, "1", 0):
        yield json.dumps({**d, "v": v}).encode()
    yield json.dumps({k: x for k, x in d.items() if k != "v"}).encode()
    for t in (None, "click", "impression", "example", 5, "nope"):
        yield json.dumps({**d, "type": t}).encode()
    yield json.dumps({k: x for k, x in d.items() if k != "type"}).encode()
    for et in (NOW + 301, NOW + 299, NOW - 21 * 365 * 86400, 0, -1e9, NOW, int(NOW)):
        yield json.dumps({**d, "event_time": et}).encode()
    for lit in ("NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400, "1" + "0" * 30):
        yield json.dumps({**d, "event_time": 0}).replace('"event_time": 0', f'"event_time": {lit}').encode()
    if "bid" in d:
        for b in ("NaN", "-1", "1e999", "7", "1" + "0" * 400):
            yield json.dumps({**d, "bid": 0}).replace('"bid": 0', f'"bid": {b}').encode()
    if "position" in d:
        yield json.dumps({**d, "position": -1}).encode()
    if "action" in d:
        yield json.dumps({**d, "action": "delete"}).encode()
    if "stage" in d:
        for st in ("click", "close", "full", "final", "", 1):
            yield json.dumps({**d, "stage": st}).encode()
    if "features" in d:
        yield json.dumps({**d, "features": {"a": float("nan")}}).encode()
    raw = json.dumps(d)
    yield raw.encode()[: rng.randrange(1, len(raw))]  # truncated
    yield raw.encode("utf-16")
    yield b"\xef\xbb\xbf" + raw.encode()
    yield b"  \n" + raw.encode() + b"\t "
    yield raw.encode() + b" x"
    yield b"[" + raw.encode() + b"]"
    yield raw.replace('"request_id"', '"request_id": "dup", "request_id"', 1).encode()
    yield json.dumps({**d, "extra": {"deep": [1, 2]}}).encode()
    yield json.dumps({**d, "user_id": "caf\u00e9 \ud83d\ude00"}).encode()
    yield raw.replace('"user_id": "', '"user_id": "\\ud800', 1).encode()  # a lone surrogate
    yield b"\xff\xfe\x00garbage"
    yield b""
    yield None
    yield b"null"
    yield b"123"
    yield json.dumps({**d, "pad": "x" * MAX_RECORD_BYTES}).encode()  # oversized
    yield json.dumps({**d, "pad": "x" * (MAX_RECORD_BYTES - len(raw) - 20)}).encode()  # just under


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_equals_reference(seed):
    rng = random.Random(seed)
    by_type: dict[type, list] = {}
    for ev in _valid_events():
        for raw in _mutations(ev, rng):
            by_type.setdefault(type(ev), []).append(raw)
    checked = {"ok": 0, "dead": 0}
    for cls, raws in by_type.items():
        rng.shuffle(raws)  # skewed: a batch of good and bad records in any order
        # one clock per record (append times), some far from the event times
        nows = [NOW if rng.random() < 0.8 else NOW - rng.choice([400, -400, 1e9]) for _ in raws]
        got = fast(raws, cls, nows)
        for raw, now, g in zip(raws, nows, got):
            want = reference(raw, cls, now)
            if want[0] == "crash":
                assert g[0] == "dead" and g[1] == "invalid_value", (raw[:200], g)
                continue
            assert g == want, (cls.__name__, raw[:300] if raw else raw)
            checked[g[0]] += 1
        # same answers without a clock, and with one clock for the batch
        for nows2 in (None, NOW):
            for raw, g in zip(raws, fast(raws, cls, nows2)):
                want = reference(raw, cls, nows2)
                if want[0] != "crash":
                    assert g == want
    assert checked["ok"] > 200 and checked["dead"] > 1000, checked  # both sides really exercised


def test_decode_events_builds_the_reference_objects():
    evs = [e for e in _valid_events() if isinstance(e, Impression)][:30]
    raws = [e.to_json() for e in evs] + [b"{", None]
    got, errors = decode_events(raws, Impression, NOW)
    assert [i for i, _ in errors] == [30, 31]
    assert [e.reason for _, e in errors] == ["malformed_json", "malformed_json"]
    for e, g in zip(evs, got):
        assert g == decode(e.to_json(), Impression, now=NOW)
        assert isinstance(g, Impression)


def test_decode_one_raises_like_reference():
    with pytest.raises(InvalidRecord) as ei:
        decode_one(b'{"v": 1, "type": "click"}', Click, time.time())
    assert ei.value.reason == "missing_field"
    ok = Click(request_id="r", event_time=NOW, ad_id="a", user_id="u")
    assert decode_one(ok.to_json(), Click, NOW) == ok.to_dict()
    assert not math.isnan(decode_one(ok.to_json(), Click)["event_time"])
