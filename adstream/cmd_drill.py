"""``adstream drill``: the whole loop under faults, then an audit for loss (adstream/drill.py).

Starts its own Kafka broker and redis-server under ``--dir`` (default ``.adstream/drill``), runs the
joiner, the feature updater, the stream trainer and the online service on the embedded defaults
while simulated users send requests, and meanwhile kill -9s each worker once, restarts the broker
with its data, stops Redis (it comes back empty), and sends malformed events, orphan clicks and a
poisoned training window. Then it checks from the topics and the stores that every served ad was
logged, every impression became exactly one example with the right label, the feature counts equal
a recount of the topics, no gated-out model was served and the service answered every request.
Prints a table; exits 1 when any check fails. The state and logs are kept when it fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drill", help="the fault drill: kill -9 every worker, restart the broker, stop Redis, "
                       "poison the input; audit for loss", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="the few-minute version (what `make test` runs)")
    p.add_argument("--traffic", type=float, metavar="S", help="seconds of simulated traffic (default 150; short 75)")
    p.add_argument("--rate", type=float, help="requests per second (default 6)")
    p.add_argument("--seed", type=int, default=11, help="synthetic world seed (default 11)")
    p.add_argument("--dir", metavar="DIR", help="state, logs and the JSON report (default .adstream/drill)")
    p.add_argument("--keep", action="store_true", help="keep the state and logs when the drill passes")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from adstream.drill import DrillConfig, run_drill
    from adstream.drill_audit import print_table, write_json
    from adstream.loop import WorkerFailed, log_tail

    cfg = DrillConfig.short() if args.short else DrillConfig()
    cfg.seed = args.seed
    if args.traffic is not None:
        if args.traffic < 20:
            print("error: --traffic must be at least 20 seconds", file=sys.stderr)
            return 2
        cfg.traffic_s = args.traffic
    if args.rate is not None:
        if args.rate <= 0:
            print("error: --rate must be positive", file=sys.stderr)
            return 2
        cfg.rate = args.rate
    s = settings_from_args(args)
    root = Path(args.dir).resolve() if args.dir else (Path(s.state_dir) / "drill").resolve()
    report_path = root.parent / f"{root.name}-report.json"
    ok = False
    try:
        report = run_drill(root, cfg, say=lambda m: print(m, flush=True))
        print_table(report)
        write_json(report, report_path)
        print(f"report (JSON): {report_path}")
        ok = report.ok
        return 0 if ok else 1
    except WorkerFailed as e:
        print(f"\ndrill failed: {e}\n--- last 40 lines of {e.log} ---\n{log_tail(e.log)}", file=sys.stderr)
        return 1
    finally:
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif root.exists():
            print(f"drill state and logs kept in {root}", file=sys.stderr)
