"""``adstream joiner``: run the stream joiner worker (faust)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "joiner",
        help="run the impression ⋈ click/conversion joiner (faust worker)",
        description="Join impressions with clicks and conversions within the attribution window and "
        "emit labelled examples. Start several with the same --app-id to split the partitions.",
    )
    p.add_argument("--app-id", default="adstream-joiner", help="consumer group / faust app id")
    p.add_argument("--window", type=float, help="attribution window in seconds (join.attribution_window_s)")
    p.add_argument("--lateness", type=float, help="allowed lateness in seconds (join.allowed_lateness_s)")
    p.add_argument("--emit-at-click", action="store_true",
                   help="emit each positive as an example at its first click, not only when its attribution "
                   "window closes (join.emit_positives_at_click; docs/speed.md 'Fresher models')")
    p.add_argument("--idle-flush", type=float, metavar="S",
                   help="close every open window after S idle seconds (finite replays, demos)")
    p.add_argument("--runtime", choices=("faust", "kafka"), default="faust",
                   help="faust-streaming agent (default) or a confluent-kafka loop (faster per worker)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics on 127.0.0.1:PORT (default from settings)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.broker import resolve_bootstrap
    from streams.joiner import run_worker
    from streams.kafka_io import ensure_project_topics

    s = settings_from_args(args)
    upd = {}
    if args.window is not None:
        upd["attribution_window_s"] = args.window
    if args.lateness is not None:
        upd["allowed_lateness_s"] = args.lateness
    if args.emit_at_click:
        upd["emit_positives_at_click"] = True
    if upd:
        s = s.model_copy(update={"join": s.join.model_copy(update=upd)})
    bootstrap = resolve_bootstrap(s)
    ensure_project_topics(bootstrap, s.kafka)
    port = args.metrics_port if args.metrics_port is not None else s.metrics.joiner_port
    run_worker(s, bootstrap, args.app_id, port, args.idle_flush, runtime=args.runtime)
    return 0
