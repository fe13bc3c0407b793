"""The trainer's label-rate guard (``streams/label_guard.py``) on real and synthetic click streams:
how often it holds a clean window (a false hold costs that window's training), and how often it
holds every window a click burst dominates (a miss lets the gate alone judge it; the gate is fooled
when the burst spans two windows, docs/trainer.md "Label-rate guard"). Pure: no broker, no model.

Streams, each in arrival order:

- ``obd``: the Open Bandit Dataset sample (``../shared/data/obd``, real ZOZOTOWN impressions, one
  week): the four logs merged by timestamp, 40,000 impressions, click rate ~0.4 %;
- ``adwords``: the AdWords campaign (``../shared/data/adwords``, a year of daily impressions and
  clicks per keyword, real drift: weekdays, seasons): each day's impressions as examples in a random
  order within the day (seeded), 12.7M impressions, click rate ~2.2 %;
- ``world``: the synthetic world (``core.world``, drift on);
- ``*-at-click``: the same stream as the trainer reads it with positives at the click: a clicked
  example arrives seconds after its impression, an unclicked one ``--lateness`` seconds after it
  (attribution window + allowed lateness; obd and world have event times).

Guards: ``pooled`` (what the trainer runs: the pooled rate of the recent windows), ``median`` (the
median of the recent windows' rates, the rule first written and replaced) and ``none``. For the
bursts, ``--trials`` bursts of one window's size, all clicked, are put at random points of the
stream (after the warm-up), one at a time; a window is *dominated* when ≥ 25 % of it is burst, and
a trial is *caught* when every dominated window is held. ``--bursts`` sets the bursts tried (size in
windows : click rate): by default one window all clicked (``adstream drill``'s), half a window all
clicked, and one window 20 % clicked (click spam at 5-10x the normal rate).

    PYTHONPATH=. .venv/bin/python bench/bench_label_guard.py --windows 500,1000,5000 --trials 40
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from streams.label_guard import LabelRateGuard

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


class MedianGuard(LabelRateGuard):
    """The first rule: the median rate of the recent windows with a positive."""

    def baseline(self) -> float | None:
        rates = [p / n for p, n in self.windows if p > 0]
        return statistics.median(rates) if len(rates) >= self.warmup else None


def at_click(times: np.ndarray, labels: np.ndarray, lateness_s: float, rng) -> np.ndarray:
    """Labels in the order the trainer reads them with positives at the click."""
    arrive = times + np.where(labels == 1, rng.uniform(1.0, 30.0, len(labels)), lateness_s)
    return labels[np.argsort(arrive, kind="stable")]


def obd_stream(root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import pandas as pd

    parts = [pd.read_csv(f, usecols=["timestamp", "click"]) for f in sorted(root.glob("*/*/*.csv"))
             if f.name in ("men.csv", "women.csv")]
    if not parts:
        return None
    d = pd.concat(parts, ignore_index=True)
    t = pd.to_datetime(d["timestamp"]).astype("int64").to_numpy() / 1e9
    order = np.argsort(t, kind="stable")
    return t[order], d["click"].to_numpy().astype(np.int8)[order]


def adwords_stream(root: Path, rng) -> np.ndarray | None:
    import pandas as pd

    files = sorted(root.glob("adwords_daily_*.csv"))
    if not files:
        return None
    d = pd.concat([pd.read_csv(f, usecols=["date", "impressions", "clicks"]) for f in files], ignore_index=True)
    d["clicks"] = np.minimum(d["clicks"], d["impressions"])  # 16 rows have more clicks than impressions
    daily = d.groupby("date")[["impressions", "clicks"]].sum().sort_index()
    out = []
    for imps, clicks in daily.itertuples(index=False):
        day = np.zeros(int(imps), dtype=np.int8)
        day[:int(clicks)] = 1
        rng.shuffle(day)
        out.append(day)
    return np.concatenate(out)


def world_stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from core.world import World, WorldConfig

    w = World(WorldConfig(seed=seed))
    df = w.to_examples_frame(duration_s=w.config.drift.horizon_s, requests_per_s=8.0).sort_values("event_time")
    return df["event_time"].to_numpy(), df["clicked"].to_numpy().astype(np.int8)


def run_guard(make, pos: np.ndarray, n: np.ndarray) -> np.ndarray:
    g = make()
    return np.array([g.judge_counts(int(p), int(k)) is not None for p, k in zip(pos, n)], dtype=bool)


def windows_of(labels: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    m = len(labels) // w
    pos = labels[:m * w].reshape(m, w).sum(axis=1, dtype=np.int64)
    return pos, np.full(m, w)


def evaluate(labels: np.ndarray, w: int, trials: int, rng, guards: dict, bursts: list[tuple[float, float]]) -> dict:
    pos, n = windows_of(labels, w)
    out: dict = {"windows": int(len(pos)), "click_rate": round(float(labels.mean()), 5)}
    warm = 4
    if len(pos) < warm + 5:
        return {**out, "skipped": f"fewer than {warm + 5} windows"}
    for name, make in guards.items():
        held = run_guard(make, pos, n)
        out[f"{name}_false_holds"] = int(held[warm:].sum())
        out[f"{name}_false_hold_rate"] = round(float(held[warm:].mean()), 5)
    for size, ctr in bursts:
        b = max(1, int(round(size * w)))
        caught = {name: 0 for name in guards}
        for _ in range(trials):
            at = int(rng.integers((warm + 1) * w, (len(pos) - 3) * w))
            burst = (rng.random(b) < ctr).astype(np.int8)
            stream = np.concatenate([labels[:at], burst, labels[at:]])
            is_burst = np.concatenate([np.zeros(at, bool), np.ones(b, bool), np.zeros(len(labels) - at, bool)])
            bpos, bn = windows_of(stream, w)
            share = is_burst[:len(bpos) * w].reshape(len(bpos), w).mean(axis=1)
            dominated = np.flatnonzero(share >= 0.25)
            for name, make in guards.items():
                held = run_guard(make, bpos, bn)
                caught[name] += bool(held[dominated].all())
        for name in guards:
            out[f"{name}_caught_{size:g}x{ctr:g}"] = f"{caught[name]}/{trials}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="500,1000,5000", help="window sizes (examples), comma-separated")
    ap.add_argument("--trials", type=int, default=40, help="bursts per stream and window size")
    ap.add_argument("--bursts", default="1:1,0.5:1,1:0.2",
                    help="bursts as SIZE:CTR, comma-separated: SIZE in windows, CTR the burst's click rate "
                    "(default: a window all clicked, half a window all clicked, a window 20 %% clicked)")
    ap.add_argument("--datasets", default="obd,adwords,world", help="comma-separated: obd, adwords, world")
    ap.add_argument("--lateness", type=float, default=630.0,
                    help="seconds after its impression an unclicked example arrives at the trainer (attribution "
                    "window + lateness; default 600 + 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "label_guard.json"))
    args = ap.parse_args(argv)
    logging.getLogger("streams.label_guard").setLevel(logging.ERROR)  # "taken as the new rate", per trial
    rng = np.random.default_rng(args.seed)
    sizes = [int(x) for x in args.windows.split(",")]
    bursts = [(float(a), float(b)) for a, b in (x.split(":") for x in args.bursts.split(","))]
    guards = {"pooled": LabelRateGuard, "median": MedianGuard}
    streams: dict[str, np.ndarray] = {}
    want = args.datasets.split(",")
    if "obd" in want:
        got = obd_stream(DATA / "obd")
        if got is None:
            print(f"obd: no data under {DATA / 'obd'}, skipped")
        else:
            streams["obd"] = got[1]
            streams["obd-at-click"] = at_click(got[0], got[1], args.lateness, rng)
    if "adwords" in want:
        got = adwords_stream(DATA / "adwords", rng)
        if got is None:
            print(f"adwords: no data under {DATA / 'adwords'}, skipped")
        else:
            streams["adwords"] = got
    if "world" in want:
        t, y = world_stream(7)
        streams["world"] = y
        streams["world-at-click"] = at_click(t, y, args.lateness, rng)
    rows = []
    t0 = time.perf_counter()
    for name, labels in streams.items():
        for w in sizes:
            r = {"stream": name, "window": w, **evaluate(labels, w, args.trials, rng, guards, bursts)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "seconds": round(time.perf_counter() - t0, 1),
                                          "rows": rows}, indent=1))
    keys = [f"{a:g}x{c:g}" for a, c in bursts]
    print("| stream | window | windows | click rate | false holds: pooled | median | "
          + " | ".join(f"caught {k}: pooled | median" for k in keys) + " |")
    print("|---" * (6 + 2 * len(keys)) + "|")
    for r in rows:
        if "skipped" in r:
            continue
        print(f"| {r['stream']} | {r['window']} | {r['windows']} | {r['click_rate']:.4f} | "
              f"{r['pooled_false_holds']} ({r['pooled_false_hold_rate']:.1%}) | "
              f"{r['median_false_holds']} ({r['median_false_hold_rate']:.1%}) | "
              + " | ".join(f"{r[f'pooled_caught_{k}']} | {r[f'median_caught_{k}']}" for k in keys) + " |")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
