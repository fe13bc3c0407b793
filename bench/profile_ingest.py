"""Where the joiner's and the feature updater's time goes, without Kafka: cProfile of the join
(batch decode + JoinState + example encoding) and of the updater's decode + fold (per event and
batched) on the same synthetic events.

    PYTHONPATH=. .venv/bin/python bench/profile_ingest.py [--seconds 600] [--top 12]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="seconds of synthetic traffic (20 req/s)")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    from core.codec import decode_batch, decode_events
    from core.events import Click, Conversion, Impression
    from features.aggregates import AggregateState
    from streams.join import CLICK, CONVERSION, IMPRESSION, JoinState
    from streams.sources import synthetic_events

    kind = {Impression: IMPRESSION, Click: CLICK, Conversion: CONVERSION}
    cls_of = {v: k for k, v in kind.items()}
    evs = list(synthetic_events(seed=3, duration_s=a.seconds, rps=20, drift="none",
                                start_time=time.time() - a.seconds - 600))
    raws = [(kind[type(e)], e.to_json()) for e in evs if type(e) in kind]

    def joiner():
        st = JoinState(60.0, 5.0, track_inputs=True)
        off = dict.fromkeys(kind.values(), 0)
        for lo in range(0, len(raws), 5000):
            by: dict[str, list[bytes]] = {}
            for k, raw in raws[lo:lo + 5000]:
                by.setdefault(k, []).append(raw)
            for k, vals in by.items():
                for ev in decode_events(vals, cls_of[k], time.time())[0]:
                    if ev is not None:
                        st.add(k, 0, off[k], ev)
                    off[k] += 1
            st.advance({0})
            for ex in st.out.examples:
                ex.to_json()
            st.out.clear()

    def updater(batched: bool):
        s = AggregateState([3600.0, 86400.0, 604800.0])
        recs = []
        for k, c in ((IMPRESSION, Impression), (CLICK, Click)):
            recs += [d for d in decode_batch([r for kk, r in raws if kk == k], c, time.time())[0] if d]
        if batched:
            for lo in range(0, len(recs), 5000):
                s.apply_records(recs[lo:lo + 5000])
        else:
            for d in recs:
                s.apply_record(d)
        s.dirty_rows()

    for name, fn in (("joiner", joiner), ("updater, per event", lambda: updater(False)),
                     ("updater, batched", lambda: updater(True))):
        t = time.perf_counter()
        fn()
        print(f"== {name}: {len(raws) / (time.perf_counter() - t):,.0f} events/s without Kafka")
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(a.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
