"""Id mapping: the vectorised ``IdMapper`` vs the per-value reference, on the same stream, in one run.

* ``observe``: training batches of 1024 values (skewed ids, admission 2, TTL), 9 fields' worth;
* ``lookup_batch``: a window of 5,000 values looked up on the trained mapper;
* ``lookup_request``: 200 values (one request's candidates), the serving shape.

    PYTHONPATH=. .venv/bin/python bench/bench_idmap.py --out bench/results/idmap.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stream(n_batches: int, batch: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for _ in range(n_batches):
        ids = (rng.random(batch) ** 3 * vocab).astype(np.int64)
        vals = np.array([f"id{i}" for i in ids], dtype=object)
        t += 2.0
        out.append((vals, t + rng.random(batch)))
    return out


def rate(fn, n_values: int, reps: int) -> float:
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        xs.append(n_values / (time.perf_counter() - t))
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "idmap.json"))
    a = ap.parse_args()
    from models.ctr.hashing import IdMapper
    from models.ctr.idmap_reference import ReferenceIdMapper

    data = stream(a.batches, 1024, a.vocab)
    n = sum(len(v) for v, _ in data)
    res: dict = {"load_avg_1m": os.getloadavg()[0], "values": n, "vocab": a.vocab}
    obs = {"vectorised": [], "reference": []}
    mappers = {}
    for _ in range(a.reps):
        for name, cls in (("vectorised", IdMapper), ("reference", ReferenceIdMapper)):
            m = cls(1 << 17, admission=2, ttl=60.0)
            t = time.perf_counter()
            for vals, times in data:
                m.observe(vals, times)
            obs[name].append(n / (time.perf_counter() - t))
            mappers[name] = m
    res["observe"] = {"vectorised_values_per_s": round(statistics.median(obs["vectorised"])),
                      "reference_values_per_s": round(statistics.median(obs["reference"]))}
    window = np.concatenate([v for v, _ in data[-5:]])
    req = window[:200]
    for key, vals, reps in (("lookup_batch", window, a.reps * 3), ("lookup_request", req, a.reps * 200)):
        r = {name: rate(lambda m=m: [m.lookup(vals) for _ in range(reps // a.reps)], len(vals) * (reps // a.reps), a.reps)
             for name, m in mappers.items()}
        np.testing.assert_array_equal(mappers["vectorised"].lookup(vals), mappers["reference"].lookup(vals))
        res[key] = {"values": len(vals), "vectorised_values_per_s": round(r["vectorised"]),
                    "reference_values_per_s": round(r["reference"])}
    for k in ("observe", "lookup_batch", "lookup_request"):
        res[k]["speedup"] = round(res[k]["vectorised_values_per_s"] / res[k]["reference_values_per_s"], 2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
