"""``adstream train-crossdomain``: DACDR on the examples topic, window by window, gated versions,
histories pushed to the history store (docs/crossdomain.md)."""

from __future__ import annotations

import argparse
import signal
import threading

EPILOG = """\
examples:
  adstream train-crossdomain --domains search,feed,video --target feed --history-store redis
  adstream train-crossdomain --add-domain live --freeze tables --max-windows 3

Each window: the candidate (trained through the previous window) and the serving version are scored
on it (cold-start AUC and LogLoss); the candidate is published when not worse by more than the
margins; then the model learns the window (every domain's examples fold into the behaviour history;
the loss is on the variant's domains) and the histories of the window's users go to the history store.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from streams.crossdomain_job import add_arguments

    p = sub.add_parser("train-crossdomain", help="train the cross-domain model (DACDR) on the examples topic",
                       description="DACDR on the stream model worker: windows of examples, a gate on "
                       "cold-start AUC, versions under crossdomain.model_name.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.crossdomain_job import run_crossdomain, settings_for

    s = settings_for(args, settings_from_args(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = run_crossdomain(s, stop, metrics_port=args.metrics_port or None, add_domains=args.add_domain,
                          freeze=None if args.freeze == "none" else args.freeze)
    print(f"train-crossdomain: {out['windows_this_run']} windows this run ({out['windows']} in total), "
          f"{out['examples_trained']} examples, {out['published']} published, {out['rejected']} rejected, "
          f"{out['histories_pushed']} histories pushed, serving {out['serving_version']} [{out['reason']}]",
          flush=True)
    return 0
