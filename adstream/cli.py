"""``adstream``: one command line for every part of the system.

Each sub-command lives in its own module ``adstream/cmd_<name>.py`` exposing
``register(subparsers)``; heavy imports happen inside the command functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from core.errors import AdstreamError

# order = order in --help
COMMAND_MODULES = [
    "adstream.cmd_broker",
    "adstream.cmd_topics",
    "adstream.cmd_replay",
    "adstream.cmd_workers",
    "adstream.cmd_features",
    "adstream.cmd_train",
    "adstream.cmd_evaluate",
    "adstream.cmd_train_dist",
    "adstream.cmd_serve",
    "adstream.cmd_simulate",
    "adstream.cmd_demo",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adstream",
        description="Real-time learning for search ads: Kafka streams, Feast features, TorchRec models.",
        epilog="Configuration: --config FILE (YAML), or ADSTREAM_<SECTION>__<FIELD> environment variables.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="use an existing Kafka cluster instead of the embedded broker (also ADSTREAM_KAFKA__BOOTSTRAP)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except AdstreamError as e:
        print(f"adstream {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"adstream {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def settings_from_args(args: argparse.Namespace):
    """Settings for a command: file, environment, then the global --bootstrap flag."""
    from core.settings import load_settings

    over = {}
    if getattr(args, "bootstrap", None):
        over["kafka"] = {"bootstrap": args.bootstrap}
    return load_settings(getattr(args, "config", None), **over)
