"""``adstream query-refresh`` and ``adstream query-train``: the query classifier kept fresh from the
stream (docs/query.md).

- ``query-refresh``: the faust agent that keeps decayed click statistics per query from the
  ``examples`` topic and produces query snapshots to ``query-labels``;
- ``query-train``: the shared stream model worker running the SSUF classifier on the snapshots,
  publishing gated versions to the registry (``query.model_name``) that ``adstream serve`` loads.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    r = sub.add_parser("query-refresh", help="keep per-query click statistics current and emit query snapshots (faust agent)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--app-id", default="adstream-query-refresh", help="consumer group / faust app id")
    r.add_argument("--metrics-port", type=int, help="Prometheus port (default: metrics.query_refresh_port)")
    r.set_defaults(func=_refresh)
    t = sub.add_parser("query-train", help="train the query classifier on query snapshots, gated, into the registry",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--variant", help="model variant (default: query.variant, e.g. ssuf, smgcn, baseline)")
    t.add_argument("--window-snapshots", type=int, help="snapshots per window (default: query.window_snapshots)")
    t.add_argument("--registry", help="registry directory (default: trainer.registry_dir)")
    t.add_argument("--max-windows", type=int, help="stop after this many windows")
    t.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without snapshots")
    t.add_argument("--metrics-port", type=int, help="Prometheus port (default: metrics.query_trainer_port)")
    t.set_defaults(func=_train)


def _settings(args: argparse.Namespace, **over: Any):
    from adstream.cli import settings_from_args

    s = settings_from_args(args)
    if over:
        s = s.model_copy(update={"query": s.query.model_copy(update=over)})
    return s


def _refresh(args: argparse.Namespace) -> int:
    from streams.broker import resolve_bootstrap
    from streams.query_refresh import run_refresh

    s = _settings(args)
    port = args.metrics_port if args.metrics_port is not None else s.metrics.query_refresh_port
    run_refresh(s, resolve_bootstrap(s), args.app_id, port or None)
    return 0


def _train(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading

    from streams.broker import resolve_bootstrap
    from streams.query_refresh import run_query_trainer

    over = {k: v for k, v in {"variant": args.variant, "window_snapshots": args.window_snapshots,
                              "max_windows": args.max_windows, "idle_exit_s": args.idle_exit}.items() if v is not None}
    s = _settings(args, **over)
    if args.registry:
        s = s.model_copy(update={"trainer": s.trainer.model_copy(update={"registry_dir": args.registry})})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    port = args.metrics_port if args.metrics_port is not None else s.metrics.query_trainer_port
    print(json.dumps(run_query_trainer(s, resolve_bootstrap(s), stop, port or None), default=str))
    return 0
