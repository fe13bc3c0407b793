"""Record decoding: the batch path (``core.codec``, msgspec) vs the reference (``core.events.decode``)
and vs orjson + the reference checks, on the same records, in one run.

Records: examples and impressions of the synthetic world (the trainer's and the joiner's inputs),
with ``--bad`` of them broken (malformed, mistyped, skewed: they go the reference way). Each codec
decodes the same list ``--reps`` times, alternating; the median records/s is reported.

    PYTHONPATH=. .venv/bin/python bench/bench_decode.py --out bench/results/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def records(n: int, bad: float, seed: int = 0) -> dict[str, list[bytes]]:
    from core.events import Example, Impression
    from streams.sources import synthetic_events

    rng = random.Random(seed)
    t0 = time.time() - 3600
    imps = [e for e in synthetic_events(seed=seed, duration_s=n / 20 + 10, rps=6, start_time=t0)
            if isinstance(e, Impression)][:n]
    out = {"impression": [e.to_json() for e in imps],
           "example": [Example.from_impression(e, rng.random() < 0.1, False, None).to_json() for e in imps]}
    for raws in out.values():
        for i in range(len(raws)):
            if rng.random() < bad:
                kind = rng.randrange(3)
                raws[i] = (raws[i][:-5] if kind == 0 else
                           raws[i].replace(b'"position":', b'"position":"x","p":') if kind == 1 else
                           raws[i].replace(b'"event_time":', b'"event_time":1e12,"e":'))
    return out


def run(n: int, bad: float, reps: int) -> dict:
    try:
        import orjson  # requirements/bench.txt
    except ImportError:
        orjson = None
    from core.codec import decode_batch
    from core.errors import InvalidRecord
    from core.events import Example, Impression, decode, validate_dict

    data = records(n, bad)
    now = time.time()

    def reference(raws, cls):
        out = []
        for r in raws:
            try:
                out.append(decode(r, cls, now=now).to_dict())
            except InvalidRecord:
                out.append(None)
        return out

    def with_orjson(raws, cls):
        out = []
        for r in raws:
            try:
                obj = orjson.loads(r)
            except orjson.JSONDecodeError:
                out.append(None)
                continue
            try:
                out.append(validate_dict(obj, cls, now).to_dict())
            except InvalidRecord:
                out.append(None)
        return out

    def batch(raws, cls):
        return decode_batch(raws, cls, now)[0]

    res: dict = {}
    for name, cls in (("example", Example), ("impression", Impression)):
        raws = data[name]
        assert [d is None for d in batch(raws, cls)] == [d is None for d in reference(raws, cls)]
        rates: dict[str, list[float]] = {"reference_json_dataclass": [], "orjson_reference_checks": [],
                                         "msgspec_batch": []}
        fns = {"reference_json_dataclass": reference, "orjson_reference_checks": with_orjson,
               "msgspec_batch": batch}
        if orjson is None:
            del fns["orjson_reference_checks"], rates["orjson_reference_checks"]
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(raws, cls)
                rates[k].append(len(raws) / (time.perf_counter() - t))
        med = {k: round(statistics.median(v)) for k, v in rates.items()}
        res[name] = {"records": len(raws), "bad_share": bad, "records_per_s": med,
                     "msgspec_vs_reference": round(med["msgspec_batch"] / med["reference_json_dataclass"], 2),
                     "orjson_vs_reference": (round(med["orjson_reference_checks"] / med["reference_json_dataclass"], 2)
                                             if orjson is not None else None)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--bad", type=float, default=0.01, help="share of broken records")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    a = ap.parse_args()
    res = {"load_avg_1m": os.getloadavg()[0], **run(a.records, a.bad, a.reps)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
