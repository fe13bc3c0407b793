"""``adstream demo``: the whole loop on one machine, embedded defaults, no Docker, no GPU.

Starts the embedded Kafka broker, replays a few minutes of the synthetic world's history (with its
bidword inventory), and starts the joiner, the feature updater, the stream trainer (DDP, with a
fine-tuning shadow for comparison) and the online service as processes. Simulated users then send
ad requests and click for a few minutes: the service logs what it served, the joiner turns it into
examples, the trainer publishes gated versions and the service hot-swaps them. The summary shows
CTR over time, latency percentiles, the model versions served and the per-window AUC of DDP
against fine-tuning; a PNG plot and a JSON summary are written. Everything started is stopped.

The query classifier runs too (docs/query.md): its refresh agent and model worker publish
versions the service loads; a few live queries are shown with their served categories, and a
quarter into the traffic one query's clicks start going to a new category.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("adstream.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop (broker, workers, trainer, service, simulated users) and print a summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--history", type=float, default=240.0, metavar="S",
                   help="event-time seconds of synthetic history replayed first (default 240)")
    p.add_argument("--traffic", type=float, default=150.0, metavar="S",
                   help="wall seconds of simulated traffic (default 150)")
    p.add_argument("--rate", type=float, default=15.0, help="simulated requests per second (default 15)")
    p.add_argument("--seed", type=int, default=7, help="synthetic world seed (default 7)")
    p.add_argument("--window", type=float, default=30.0, help="attribution window, seconds (default 30)")
    p.add_argument("--window-examples", type=int, default=1500,
                   help="examples per training window (default 1500)")
    p.add_argument("--out", metavar="DIR", help="where the plot and summary go (default .adstream/demo-report)")
    p.add_argument("--keep", action="store_true", help="keep the demo state (broker log, registry, logs)")
    p.add_argument("--no-query", action="store_true",
                   help="leave out the query classifier (refresh agent, model worker, watched queries)")
    p.add_argument("--no-rewrite", action="store_true",
                   help="without the MoBGM rewriter and GRAM (and the world's tail queries); docs/rewrite.md")
    p.add_argument("--positives-at-close", action="store_true",
                   help="emit positives only when their attribution window closes, not at the click "
                   "(docs/speed.md 'Fresher models')")
    p.set_defaults(func=_run)


def _fmt(x, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _print_summary(summary: dict, wall: float, plot: Path | None, out_json: Path) -> None:
    from adstream.loop import quantile_from_buckets

    tr = summary["traffic"]
    buckets = [b for b in tr["buckets"] if b["requests"]]
    print("\n== adstream demo summary ==")
    print(f"history replayed      : {sum(summary['history'].values())} events")
    print(f"traffic               : {tr['requests']} requests in {tr['seconds']:.0f}s "
          f"({_fmt(tr['requests_per_s'], '.1f')}/s), {tr['errors']} errors, "
          f"{tr['impressions']} ads served, {tr['clicks']} clicks, {tr['conversions']} conversions "
          f"({tr.get('clicks_delivered', '?')} delivered to Kafka, {tr.get('delivery_failures', '?')} failed)")
    print(f"latency (client)      : p50 {_fmt(tr['latency_p50_ms'], '.1f')} ms, "
          f"p90 {_fmt(tr['latency_p90_ms'], '.1f')} ms, p99 {_fmt(tr['latency_p99_ms'], '.1f')} ms")
    if buckets:
        half = max(1, len(buckets) // 2)

        def ctr(bs, key):
            imp = sum(b["impressions"] for b in bs)
            return sum((b[key] or 0) * b["impressions"] for b in bs) / imp if imp else None

        print(f"CTR over time         : first half {_fmt(ctr(buckets[:half], 'ctr'), '.2%')} "
              f"(expected {_fmt(ctr(buckets[:half], 'expected_ctr'), '.2%')}), second half "
              f"{_fmt(ctr(buckets[half:], 'ctr'), '.2%')} (expected {_fmt(ctr(buckets[half:], 'expected_ctr'), '.2%')})")
        print("  per bucket          : " + "  ".join(
            f"{b['start_s']:.0f}s:{_fmt(b['expected_ctr'], '.2%')}" for b in buckets) + "  (expected CTR)")
    served = tr["model_versions"]
    print(f"model versions served : {', '.join(f'{v} ({n})' for v, n in served.items())}")
    reg = summary["registry"]
    print(f"registry              : {len(reg['published'])} published, {len(reg['rejected'])} rejected, "
          f"latest {reg['latest']}")
    wins = summary["windows"]
    if wins:
        print("trainer windows       : next-window AUC, DDP vs fine-tuning (gate decision)")
        for w in wins:
            print(f"  window {w['window']:3d}  {w['examples']:5d} ex  DDP {_fmt(w.get('auc'))}  "
                  f"finetune {_fmt(w.get('shadow_auc'))}  {w.get('gate', '-')} {w.get('version') or ''}")
        scored = [w for w in wins if w.get("auc") is not None and w.get("shadow_auc") is not None]
        if scored:
            ddp = sum(w["auc"] for w in scored) / len(scored)
            ft = sum(w["shadow_auc"] for w in scored) / len(scored)
            print(f"  mean over {len(scored)} windows: DDP {ddp:.4f}, finetune {ft:.4f}")
    ex = summary["examples"]
    print(f"examples              : {ex['total']} ({ex['from_traffic']} from the simulated traffic)")
    print(f"dead letters          : {summary.get('dead_letters') or 'none'}")
    fm = summary["metrics"].get("features", {})
    written = sum(v for k, v in fm.items() if k.startswith("adstream_features_written_total"))
    before = summary["metrics"].get("features_at_traffic_start", {})
    live = {k: v - before.get(k, 0.0) for k, v in fm.items()}  # during the traffic, not the history backlog
    p50 = quantile_from_buckets(live, "adstream_feature_freshness_seconds", 0.5)
    p99 = quantile_from_buckets(live, "adstream_feature_freshness_seconds", 0.99)
    print(f"feature rows written  : {int(written)}; freshness during the traffic p50 <= {_fmt(p50, 'g')}s, "
          f"p99 <= {_fmt(p99, 'g')}s (event appended to Kafka -> readable online)")
    sm = summary["metrics"].get("serve", {})
    degraded = {k.split('component="')[1].split('"')[0]: int(v)
                for k, v in sm.items() if k.startswith("adstream_serve_degraded_total{") and 'component="' in k and v}
    if degraded:
        print(f"degraded responses    : {degraded}")
    q = summary.get("query")
    if q:
        from adstream.query_demo import summary_lines

        for line in summary_lines(q):
            print(line)
    rw = summary.get("rewrite")
    if rw:
        print(f"rewriter / GRAM       : versions {rw.get('versions')} (waited {rw.get('waited_s')}s after the traffic)")
        for q in rw.get("queries", []):
            if "error" in q:
                print(f"  {q['query']!r}: {q['error']}")
                continue
            ads = ", ".join(f"{a['ad_id']} via {a['source']}"
                            + (f" '{a['bidword']}'" if a["source"] in ("rewriter", "index") else "")
                            + (f" [{a['code']}]" if a.get("code") else "") for a in q["ads"]) or "no ads"
            print(f"  {q['kind']:>15} {q['query']!r} (gold {q['gold']}): {ads}"
                  + (f"  degraded {q['degraded']}" if q.get("degraded") else ""))
    print(f"wall time             : {wall:.0f}s")
    if plot:
        print(f"plot                  : {plot}")
    print(f"summary (JSON)        : {out_json}")


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from adstream.loop import LoopConfig, WorkerFailed, plot_loop, run_loop
    from core.settings import BrokerSettings
    from streams.broker import EmbeddedBroker

    if args.traffic <= 0 or args.rate <= 0 or args.history <= 0 or args.window_examples < 10:
        print("error: --traffic, --rate and --history must be positive, --window-examples >= 10", file=sys.stderr)
        return 2
    s = settings_from_args(args)
    if args.config:  # the workers read settings from the environment: the same file, from anywhere
        import os

        os.environ["ADSTREAM_CONFIG"] = str(Path(args.config).resolve())
    root = (Path(s.state_dir) / "demo").resolve()
    out_dir = (Path(args.out) if args.out else Path(s.state_dir) / "demo-report").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    t0 = time.monotonic()
    ok = False
    try:
        if s.kafka.bootstrap:
            bootstrap = s.kafka.bootstrap
            print(f"using the Kafka cluster at {bootstrap}")
        else:
            broker = EmbeddedBroker(BrokerSettings(**{**s.broker.model_dump(), "data_dir": root / "broker"}),
                                    port=0, controller_port=0)
            broker.start()
            bootstrap = broker.bootstrap
            print(f"broker: {broker.kind} on {bootstrap} (started in {time.monotonic() - t0:.1f}s)")
        cfg = LoopConfig(world_seed=args.seed, history_s=args.history, traffic_s=args.traffic, rate=args.rate,
                         join_window_s=args.window, window_examples=args.window_examples, query=not args.no_query,
                         rewrite=not args.no_rewrite, positives_at_click=not args.positives_at_close)
        summary = run_loop(s, bootstrap, root, cfg, say=lambda m: print(m, flush=True))
        plot = plot_loop(summary, out_dir / "demo.png")
        out_json = out_dir / "summary.json"
        out_json.write_text(json.dumps(summary, indent=1, default=str))
        _print_summary(summary, time.monotonic() - t0, plot, out_json)
        tr = summary["traffic"]
        ok = bool(tr["ok"] > 0 and summary["examples"]["from_traffic"] > 0 and summary["registry"]["published"])
        if not ok:
            print("incomplete: no traffic answered, no examples from it, or no model published", file=sys.stderr)
            _show_logs(root, None)
        return 0 if ok else 1
    except WorkerFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        _show_logs(root, e.name)
        return 1
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            print(f"\ndemo failed: {type(e).__name__}: {e}", file=sys.stderr)
            _show_logs(root, None)
        raise
    finally:
        if broker is not None:
            broker.stop()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif root.exists():
            print(f"demo state and logs kept in {root}", file=sys.stderr)


def _show_logs(root: Path, failed: str | None, lines: int = 40) -> None:
    """The last lines of the failing process's log (or of every worker log when it is unknown)."""
    from adstream.loop import log_tail

    logs = root / "logs"
    names = [failed] if failed else sorted(p.stem for p in logs.glob("*.log")) if logs.is_dir() else []
    for name in names:
        tail = log_tail(logs / f"{name}.log", lines)
        print(f"--- last {lines} lines of {logs / (name + '.log')} ---", file=sys.stderr)
        print(tail or "(empty)", file=sys.stderr)
    if root.joinpath("broker").is_dir():
        for f in sorted(root.joinpath("broker").glob("*.log"))[:1]:
            if not failed:
                print(f"--- last 15 lines of {f} ---\n{log_tail(f, 15)}", file=sys.stderr)
