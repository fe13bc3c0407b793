"""``make bench``: short versions of every speed benchmark, one table, one JSON.

Starts one Kafka broker and one redis-server (127.0.0.1, free ports), runs each benchmark script
in its own process against them with short settings, then prints one table: metric, ours, the
baseline measured in the same run, which baseline that is, the goal, ours/baseline, and whether
the goal is met (with what blocks it where it is not). Writes ``bench/results/bench.json`` (every
row, each benchmark's own JSON, the machine's load before and after, the command).

    PYTHONPATH=. .venv/bin/python bench/run_all.py                 # everything (~10-15 min here)
    PYTHONPATH=. .venv/bin/python bench/run_all.py --only decode idmap serve

The machine is small and shared: absolute figures move with its load (printed with the table);
the ratios, measured side by side in one run, move much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------- the benchmarks


def _g(d: Any, *path: Any, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def row(metric: str, ours: Any, baseline: Any, baseline_name: str, goal: str, met: bool | None,
        unit: str, blocker: str = "", higher_is_better: bool = True) -> dict[str, Any]:
    ratio = None
    if isinstance(ours, (int, float)) and isinstance(baseline, (int, float)) and baseline:
        ratio = round(ours / baseline, 3)
    return {"metric": metric, "ours": ours, "baseline": baseline, "baseline_name": baseline_name,
            "ratio": ratio, "goal": goal, "met": met, "unit": unit,
            "blocker": "" if met else blocker, "higher_is_better": higher_is_better}


def rows_decode(r: dict) -> list[dict]:
    out = []
    for kind in ("example", "impression"):
        rates = _g(r, kind, "records_per_s", default={})
        ours, base = rates.get("msgspec_batch"), rates.get("reference_json_dataclass")
        out.append(row(f"decode {kind}s (records/s, 1% bad)", ours, base,
                       "core.events.decode + to_dict (json + dataclass), same records", "faster than the reference",
                       None if ours is None else ours > (base or 0), "rec/s",
                       f"orjson + reference checks: {rates.get('orjson_reference_checks')} rec/s"))
    return out


def rows_ingest(r: dict) -> list[dict]:
    raw = r.get("raw_consume_events_per_s")
    k = _g(r, "joiner_events_per_s", "kafka")
    f = _g(r, "joiner_events_per_s", "faust")
    out = [row("joiner, kafka runtime, reading a backlog (events/s)", k, raw,
               "raw confluent-kafka consume of the same inputs", ">= 50k ev/s and >= 0.3 x raw",
               None if k is None or raw is None else (k >= 50_000 and k >= 0.3 * raw), "ev/s",
               "Python per record: batch decode (~1/3), the join's dict + heap entry per impression (~1/3), "
               "building and encoding each example (bench/profile_ingest.py; docs/speed.md)")]
    if f is not None:
        out.append(row("joiner, faust runtime, reading a backlog (events/s)", f, k, "kafka runtime, same backlog",
                       ">= 10k ev/s", f >= 10_000, "ev/s",
                       "faust's per-message send and agent machinery (decode is batched; see docs/speed.md)"))
    return out


def rows_freshness(r: dict) -> list[dict]:
    fast = _g(r, "stores", "redis")
    feast = _g(r, "stores", "redis-feast")
    out = []
    if fast:
        p99 = _g(fast, "freshness_worker", "p99_s")
        base = _g(feast, "freshness_worker", "p99_s") if feast else None
        tp = _g(fast, "throughput", "events_per_s")
        push50, push99 = _g(fast, "push_s", "p50_s"), _g(fast, "push_s", "p99_s")
        if tp is not None and r.get("rate_target") and tp < r["rate_target"]:
            why = "one updater process drains below the offered rate on this machine (see the drain row)"
        elif push50 is not None and push99 is not None:
            why = (f"batching, not throughput (the drain row is above the offered rate): an event waits up to the "
                   f"flush interval ({r.get('flush_interval_s')} s) for its push, then the fold and the push "
                   f"({push50:.2f} s p50 / {push99:.2f} s p99 for ~{fast.get('rows_per_push_p50')} rows); a shorter "
                   "interval did not help here (docs/speed.md)")
        else:
            why = "see the drain row and docs/speed.md"
        out.append(row(f"feature freshness p99 at {r.get('rate_target'):g} ev/s (s)", p99, base,
                       "same updater through Feast's Redis provider", "<= 1 s", None if p99 is None else p99 <= 1.0,
                       "s", why, higher_is_better=False))
        tpb = _g(feast, "throughput", "events_per_s") if feast else None
        out.append(row("feature updater drain (events/s, 1 process)", tp, tpb,
                       "same updater through Feast's Redis provider", ">= 20k ev/s", None if tp is None else tp >= 20_000,
                       "ev/s", "after the batch fold: per-key row gather/scatter in Python, then decode "
                       "(bench/profile_ingest.py; docs/speed.md)"))
    return out


def rows_read(r: dict) -> list[dict]:
    fast = _g(r, "latency_ms", "redis-fast", "user+ad", "p99")
    feast = _g(r, "latency_ms", "redis-feast", "user+ad", "p99")
    p50 = _g(r, "latency_ms", "redis-fast", "user+ad", "p50")
    c50, c99 = (_g(r, "client_cpu_ms", "redis-fast", "user+ad", q) for q in ("p50", "p99"))
    why = (f"p50 {p50} ms, of which {c50} ms (p99 {c99} ms) is client CPU: decoding and building a dict per row "
           f"for 201 rows in Python, the rest the Redis round trip; load {_g(r, 'machine', 'load_avg_1m')}"
           if None not in (p50, c50, c99) else "the client builds a dict per row in Python")
    return [row("feature read, 1 user + 200 ads, p99 (ms)", fast, feast, "Feast's online_read on the same Redis",
                "<= 2 ms", None if fast is None else fast <= 2.0, "ms", why, higher_is_better=False)]


def rows_trainer(r: dict) -> list[dict]:
    tp = r.get("throughput") or {}
    ours, raw = tp.get("trainer_examples_per_s"), tp.get("raw_consume_examples_per_s")
    n, wall = tp.get("examples"), tp.get("trainer_wall_s")
    tr_s, gate_s = tp.get("train_seconds"), tp.get("gate_seconds")
    if None not in (n, wall, tr_s, gate_s) and tr_s + gate_s > 0:
        why = (f"of {wall:.2f} s for {n:,} examples, training takes {tr_s:.2f} s and the gate's scoring "
               f"{gate_s:.2f} s: the model alone caps it at {n / (tr_s + gate_s):,.0f} ex/s here; the rest "
               f"({max(wall - tr_s - gate_s, 0):.2f} s) is consume, decode, de-dup, checkpoint, publish")
    else:
        why = "training and gate scoring per window (train_seconds, gate_seconds in the JSON); see the CTR rows"
    out = [row("trainer from the topic, end to end (examples/s)", ours, raw, "raw confluent-kafka consume",
               ">= 100k ex/s", None if ours is None else ours >= 100_000, "ex/s", why),
           row("consume + decode examples (examples/s)", tp.get("consume_decode_examples_per_s"), raw,
               "raw confluent-kafka consume", "(context)", None, "ex/s")]
    fr = r.get("freshness") or {}
    p99 = _g(fr, "freshness_newest_s", "p99")
    oldest = _g(fr, "freshness_oldest_s", "p99")
    if fr:
        out.append(row(f"example -> published model p99 at {fr.get('rate_examples_per_s')} ex/s (s)", p99, oldest,
                       "same, from the oldest example of the window", "<= 30 s (demo); path to <= 5 s",
                       None if p99 is None else p99 <= 30, "s", "a window must fill and be gated on the next",
                       higher_is_better=False))
    return out


def rows_ctr_speed(r: dict) -> list[dict]:
    out = []
    for key, res in (r.get("results") or {}).items():
        ours = _g(res, "ours_torchrec_fused_rowwise_adagrad", "median_ex_s")
        base = _g(res, "plain_embeddingbag_sparse_adagrad", "median_ex_s")
        e2e = _g(res, "ours_end_to_end_with_id_mapping", "median_ex_s")
        out.append(row(f"CTR training step {key} (examples/s)", round(ours) if ours else ours,
                       round(base) if base else base, "plain PyTorch EmbeddingBag(sparse) + Adagrad, same batches",
                       ">= 200k ex/s and ahead of plain", None if ours is None else (ours >= 200_000 and ours > base),
                       "ex/s", "the dense backbone's backward at batch 1024 on 1 thread"))
        out.append(row(f"CTR train_window end to end {key} (examples/s)", round(e2e) if e2e else e2e,
                       round(ours) if ours else ours, "the step alone (pre-encoded)", "(context)", None, "ex/s"))
    return out


def rows_idmap(r: dict) -> list[dict]:
    out = []
    for name in ("observe", "lookup_batch", "lookup_request"):
        res = r.get(name) or {}
        ours, base = res.get("vectorised_values_per_s"), res.get("reference_values_per_s")
        if ours is None:
            continue
        out.append(row(f"id mapping {name.replace('_', ' ')} (values/s)", ours, base,
                       "the per-value reference mapper (models/ctr/hashing.py ReferenceIdMapper)",
                       "faster than the reference", ours > base, "val/s"))
    return out


def serve_blocker(r: dict, rate: str, res: dict) -> str:
    """What the measurement says blocks a paced rate: the cost of one request from the least loaded
    run (the lowest rate: stage p50s from the service's stage log, and the HTTP p50), the share of a
    core that cost makes at this rate, how long the stages took at this rate (above that cost: waiting
    for the GIL or a core), the rate achieved and the machine's load."""
    paced = r.get("paced") or {}
    low = min(paced, key=float) if paced else rate
    lo = _g(paced, low, "ours") or {}
    cost = {k: _g(lo, "stages", k, "p50_ms") for k in ("features", "assemble", "ad_rank", "creative_rank", "total")}
    parts = ", ".join(f"{k} {v:.1f}" for k, v in cost.items() if k != "total" and v is not None)
    http, here = lo.get("p50_ms"), _g(res, "ours", "stages", "total", "p50_ms")
    got, load = _g(res, "ours", "achieved_rps"), (r.get("load_avg_start") or [None])[0]
    out = []
    if cost["total"] is not None:
        out.append(f"pipeline p50 {cost['total']:.1f} ms a request at {low} req/s ({parts})")
    if http is not None:
        out.append(f"HTTP p50 {http:.1f} ms there, so {rate} req/s asks ~{http * float(rate) / 1000:.2f} s of "
                   "service time a second of one process (under the GIL)")
    if here is not None and cost["total"] and here > 1.5 * cost["total"]:
        out.append(f"at {rate} req/s the pipeline took {here:.1f} ms at p50 (waiting for the GIL or a core)")
    if got is not None:
        out.append(f"achieved {got:g} of {rate} req/s")
    if load is not None:
        out.append(f"load {load:.1f} on 2 cores, the load generator on the same cores")
    return "; ".join(out) + " (bench/profile_serve.py; docs/speed.md)"


def rows_serve(r: dict) -> list[dict]:
    out = []
    for rate, res in sorted((r.get("paced") or {}).items(), key=lambda kv: float(kv[0])):
        ours = _g(res, "ours", "p99_ms")
        base = _g(res, "baseline", "p99_ms")
        goal_ok = None if ours is None else (ours <= 20 if float(rate) <= 100 else None)
        out.append(row(f"POST /v1/ads p99 at a paced {rate} req/s (ms)", ours, base, r.get("baseline_name", ""),
                       "<= 20 ms at 100 req/s" if float(rate) == 100 else "(reported)", goal_ok, "ms",
                       serve_blocker(r, rate, res), higher_is_better=False))
    return out


def rows_first_model(r: dict) -> list[dict]:
    def mean(name: str, key: str):
        xs = [x[key] for x in r.get("runs") or [] if x.get("name") == name and x.get(key) is not None]
        return round(sum(xs) / len(xs), 2) if xs else None

    ours, base = mean("ours", "p99_ms"), mean("baseline", "p99_ms")
    rate = r.get("rate", 20)
    return [row(f"POST /v1/ads p99 while the first CTR model arrives, paced {rate:g} req/s (ms)", ours, base,
                r.get("baseline_name", ""), "<= 20 ms", None if ours is None else ours <= 20, "ms",
                "the swap or the import held requests (see the run's 'slowest')", higher_is_better=False),
            row("service start to ready, registry empty (s)", mean("ours", "ready_s"), mean("baseline", "ready_s"),
                "same, torch imported at the first swap", "(the cost: torch imported before ready)", None, "s",
                higher_is_better=False)]


def rows_shards(r: dict) -> list[dict]:
    runs = r.get("runs") or {}
    one = runs.get("1") or {}
    n, many = next(((k, v) for k, v in runs.items() if k != "1"), (None, {}))
    if not many:
        return []
    f1, fn = _g(one, "freshness_probe_s", "p99"), _g(many, "freshness_probe_s", "p99")
    return [row(f"feature updaters x{n}: drain (events/s, all processes)", many.get("drain_events_per_s"),
                one.get("drain_events_per_s"), "1 updater process, same backlog", ">= 20k ev/s per process",
                None if many.get("drain_events_per_s") is None else many["drain_events_per_s"] / int(n) >= 20_000,
                "ev/s", "the machine's 2 cores are shared; each process folds in Python (see updater row)"),
            row(f"feature updaters x{n}: probe freshness p99 at {many.get('paced_rate'):g} ev/s (s)", fn, f1,
                "1 updater process, same traffic", "<= 1 s at 10k ev/s", None if fn is None else fn <= 1.0, "s",
                "offered rate above what the processes fold on this machine", higher_is_better=False)]


def rows_model_freshness(r: dict) -> list[dict]:
    runs = _g(r, "runs") or {}
    close, click, fast = (runs.get(n) or {} for n in ("demo", "demo-click", "fast-click"))

    def q(run: dict, p: str):
        return _g(run, "click_to_served_s", p)

    def unserved(run: dict) -> str:
        return f"{run.get('unserved')} of {run.get('clicks')} clicks unserved at the end"

    c99, k99, f50 = q(close, "p99"), q(click, "p99"), q(fast, "p50")
    return [row(f"click -> served model p99, demo settings, positives at the click (s; {unserved(click)})", k99,
                c99, "same loop and traffic, positives at window close", "<= 30 s", None if k99 is None else k99 <= 30,
                "s", "a window of 1,500 examples fills + the next window for the gate + train + loader poll",
                higher_is_better=False),
            row(f"click -> served model p50, positives at the click, 300-example windows (s; {unserved(fast)})", f50,
                q(close, "p50"), "demo settings, positives at window close", "path to <= 5 s",
                None if f50 is None else f50 <= 5, "s",
                "window fill + gate on the next window + train + loader poll; see docs/speed.md",
                higher_is_better=False)]


def rows_clients(r: dict) -> list[dict]:
    out = []
    for job in ("produce", "consume"):
        res = r.get(job) or {}
        ck = res.get("confluent-kafka")
        for other in ("aiokafka", "kafka-python"):
            if res.get(other) is not None:
                out.append(row(f"{job} msg/s: confluent-kafka vs {other}", ck, res[other], other,
                               "(choice of client)", None, "msg/s"))
    return out


BENCHES: dict[str, tuple[list[str], Callable[[dict], list[dict]]]] = {
    # name: (arguments after the script, rows); {B} = bootstrap, {R} = redis url, {O} = output file
    "decode": (["bench/bench_decode.py", "--records", "10000", "--reps", "3"], rows_decode),
    "idmap": (["bench/bench_idmap.py"], rows_idmap),
    "ingest": (["bench/bench_ingest.py", "--events", "30000", "--bootstrap", "{B}", "--skip-updater"], rows_ingest),
    "freshness": (["bench/bench_feature_freshness.py", "--stores", "redis", "redis-feast", "--seconds", "8",
                   "--rate", "10000", "--backlog", "20000", "--bootstrap", "{B}", "--redis-url", "{R}"],
                  rows_freshness),
    "read": (["bench/bench_feature_read.py", "--events", "10000", "--requests", "60", "--redis-url", "{R}"],
             rows_read),
    "trainer": (["bench/bench_trainer.py", "--examples", "20000", "--window", "5000", "--compare", "",
                 "--seconds", "15", "--rate", "1000", "--fresh-window", "2000", "--warmup", "8",
                 "--bootstrap", "{B}"], rows_trainer),
    "ctr_speed": (["bench/bench_ctr_speed.py", "--reps", "3", "--steps", "30", "--threads", "1",
                   "--backbones", "deepfm"], rows_ctr_speed),
    "serve": (["bench/bench_serve_paced.py", "--rates", "50", "100", "200", "--seconds", "8", "--redis-url", "{R}"],
              rows_serve),
    "first_model": (["bench/bench_first_model.py", "--rate", "20", "--seconds", "12", "--runs", "1",
                     "--redis-url", "{R}"], rows_first_model),
    "shards": (["bench/bench_feature_shards.py", "--shards", "2", "--backlog", "20000", "--rate", "10000",
                "--seconds", "8", "--bootstrap", "{B}", "--redis-url", "{R}"], rows_shards),
    "model_freshness": (["bench/bench_model_freshness.py", "--seconds", "30", "--bootstrap", "{B}"],
                        rows_model_freshness),
    "clients": (["bench/bench_clients.py", "--messages", "50000", "--bootstrap", "{B}"], rows_clients),
}


# --------------------------------------------------------------------------- running


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(rows: list[dict]) -> str:
    head = ["metric", "ours", "baseline", "ours/base", "goal", "met", "baseline is"]
    lines = [[r["metric"], _fmt(r["ours"]), _fmt(r["baseline"]), _fmt(r["ratio"]), r["goal"],
              "-" if r["met"] is None else _fmt(r["met"]), r["baseline_name"]] for r in rows]
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [fmt(head), "-+-".join("-" * w for w in widths)]
    out += [fmt(ln) for ln in lines]
    blockers = [f"- {r['metric']}: {r['blocker']}" for r in rows if r["met"] is False and r["blocker"]]
    if blockers:
        out += ["", "not met, and what blocks it:", *blockers]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    ap.add_argument("--skip", nargs="+", choices=list(BENCHES), default=[], help="leave these out")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per benchmark")
    ap.add_argument("--out", default=str(RESULTS / "bench.json"))
    a = ap.parse_args()
    names = [n for n in (a.only or list(BENCHES)) if n not in a.skip]
    sys.path.insert(0, str(ROOT))
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker, free_port

    work = Path(tempfile.mkdtemp(prefix="adstream-bench-all-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_start = time.time()
    broker = redis_proc = None
    results: dict[str, Any] = {}
    rows: list[dict] = []
    try:
        needs_broker = any("{B}" in " ".join(BENCHES[n][0]) for n in names)
        needs_redis = any("{R}" in " ".join(BENCHES[n][0]) for n in names)
        bootstrap = redis_url = ""
        if needs_broker:
            print("starting a Kafka broker ...", flush=True)
            broker = EmbeddedBroker(BrokerSettings(), data_dir=work / "broker", port=0).start()
            bootstrap = broker.bootstrap
        if needs_redis:
            port = free_port()
            redis_proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"127.0.0.1:{port}"
            time.sleep(0.5)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for name in names:
            argv, to_rows = BENCHES[name]
            out_file = RESULTS / f"{name}.json"
            args = [x.replace("{B}", bootstrap).replace("{R}", redis_url) for x in argv]
            cmd = [sys.executable, *args, "--out", str(out_file)]
            if redis_url and "{R}" in " ".join(argv):  # each benchmark starts from an empty Redis:
                import redis  # rows another one wrote (same project, newer event times) would win

                host, port = redis_url.rsplit(":", 1)
                redis.Redis(host=host, port=int(port)).flushall()
            print(f"== {name}: {' '.join(args)}  (load {os.getloadavg()[0]:.1f})", flush=True)
            t0 = time.time()
            if out_file.exists():
                out_file.unlink()
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
                rc, tail = p.returncode, (p.stdout[-1500:] + p.stderr[-1500:])
            except subprocess.TimeoutExpired:
                rc, tail = "timeout", ""
            secs = round(time.time() - t0, 1)
            if out_file.exists() and rc == 0:
                res = json.loads(out_file.read_text())
                results[name] = {"seconds": secs, "result": res}
                new = to_rows(res)
                for r in new:
                    r["bench"] = name
                rows += new
                print(f"   {secs}s, {len(new)} rows", flush=True)
            else:
                results[name] = {"seconds": secs, "error": f"rc={rc}", "tail": tail}
                rows.append({**row(f"{name}: failed ({rc})", None, None, "", "", False, ""), "bench": name,
                             "blocker": tail.strip().splitlines()[-1][:200] if tail.strip() else str(rc)})
                print(f"   FAILED rc={rc} after {secs}s\n{tail[-1200:]}", flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    txt = table(rows)
    print()
    print(txt)
    print(f"\nload average (1, 5, 15 min) at start {tuple(round(x, 1) for x in load_start)}, at end "
          f"{tuple(round(x, 1) for x in load_end)} on {os.cpu_count()} CPUs; {time.time() - t_start:.0f} s in all")
    doc = {"command": " ".join(["bench/run_all.py", *sys.argv[1:]]), "started_at": t_start,
           "seconds": round(time.time() - t_start, 1),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_avg_start": load_start, "load_avg_end": load_end},
           "rows": rows, "table": txt, "benchmarks": results}
    Path(a.out).write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {a.out}")
    return 0 if not any(r["metric"].endswith(")") and "failed" in r["metric"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
