"""``adstream``: one command line for every part of the system.

Each command lives in a module ``adstream/cmd_<name>.py`` exposing ``register(subparsers)``, and is
named in :data:`COMMANDS` (one line: command -> module and one-line help). Only the module of the
command being run is imported, and command modules import nothing heavy at module level (torch,
Feast, faust, FastAPI are imported inside the functions that need them), so ``adstream broker
status`` or ``adstream models list`` start in about a second and ``--help`` never loads torch
(``tests/test_cli.py`` checks the import set of every such command).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import AdstreamError

# command -> (module that registers it, help line of `adstream --help`); the order is the --help order.
# Adding a command: one line here, and a module whose register(subparsers) adds a parser of that name.
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("adstream.cmd_broker", "run the embedded Kafka broker"),
    "topics": ("adstream.cmd_topics", "create or list Kafka topics"),
    "replay": ("adstream.cmd_replay", "replay a source (synthetic, obd, adwords, file) into Kafka"),
    "joiner": ("adstream.cmd_workers", "run the impression ⋈ click/conversion joiner (faust worker)"),
    "features": ("adstream.cmd_features", "Feast feature store: apply, update, get, history"),
    "train": ("adstream.cmd_train", "train the CTR model on the examples topic, window by window, with a gated registry"),
    "models": ("adstream.cmd_train", "list the model registry's versions, roll back, or promote a version"),
    "train-creative": ("adstream.cmd_train_creative", "train JAC (ad ranker AR+ and creative ranker CR+) on the examples topic, two gated registry names"),
    "train-rewrite": ("adstream.cmd_train_rewrite", "refresh the MoBGM bidword rewriter and GRAM from the examples topic, two gated registry names"),
    "evaluate-ctr": ("adstream.cmd_evaluate", "offline incremental CTR evaluation (DDP vs baselines) on a CSV/Parquet file"),
    "evaluate-crossdomain": ("adstream.cmd_evaluate_crossdomain", "cold-start evaluation of cross-domain CTR models (DACDR vs single-domain) on a CSV/Parquet file"),
    "train-crossdomain": ("adstream.cmd_crossdomain", "train the cross-domain model (DACDR) on the examples topic"),
    "train-creatives": ("adstream.cmd_creatives", "train the creative availability gate or reward model from the stream"),
    "creatives": ("adstream.cmd_creatives", "generate -> inspect -> rank new creatives and publish the passing ones"),
    "evaluate-creative": ("adstream.cmd_evaluate_creative", "offline creative ranking (NSCTR): logged, Beta prior, CR and JAC's CR+ on a CSV/Parquet file"),
    "evaluate-query": ("adstream.cmd_evaluate_query", "evaluate query classifiers (plain encoder, SMGCN, SSUF) on a CSV/TSV of texts and labels"),
    "query-refresh": ("adstream.cmd_query", "keep per-query click statistics current and emit query snapshots (faust agent)"),
    "query-train": ("adstream.cmd_query", "train the query classifier on query snapshots, gated, into the registry"),
    "evaluate-rewrite": ("adstream.cmd_rewrite", "MoBGM bidword rewriting vs the index rewriter, offline, on the synthetic world or a file"),
    "evaluate-retrieval": ("adstream.cmd_rewrite", "GRAM generative retrieval vs the bidword index (Recall@K), offline"),
    "train-dist": ("adstream.cmd_train_dist", "incremental CTR training/evaluation under TorchRec DistributedModelParallel (N processes)"),
    "serve": ("adstream.cmd_serve", "run the online ad service (POST /v1/ads)"),
    "simulate-traffic": ("adstream.cmd_simulate", "send ad requests from the synthetic world's users and produce their clicks"),
    "demo": ("adstream.cmd_demo", "run the whole loop (broker, workers, trainer, service, simulated users) and print a summary"),
    "drill": ("adstream.cmd_drill", "the fault drill: kill -9 every worker, restart the broker, stop Redis, poison the input; audit for loss"),
}


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML settings file (also ADSTREAM_CONFIG)")
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="use an existing Kafka cluster instead of the embedded broker (also ADSTREAM_KAFKA__BOOTSTRAP)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: every library's INFO lines and repeated errors too; -vv: debug")


def requested_command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (after the global options), or None."""
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    try:
        _ns, rest = pre.parse_known_args(argv)
    except SystemExit:  # a global option without its value: the real parser will say so
        return None
    return next((tok for tok in rest if not tok.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. With ``argv``, only the module of the command it names is imported (the others
    appear in ``--help`` with their help line); without, every command module is (tests)."""
    p = argparse.ArgumentParser(
        prog="adstream",
        description="Real-time learning for search ads: Kafka streams, Feast features, TorchRec models.",
        epilog="Configuration: --config FILE (YAML), or ADSTREAM_<SECTION>__<FIELD> environment variables. "
               "`adstream COMMAND --help` shows a command's options.",
    )
    _global_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    if argv is None:
        wanted = list(dict.fromkeys(mod for mod, _help in COMMANDS.values()))
    else:
        cmd = requested_command(argv)
        wanted = [COMMANDS[cmd][0]] if cmd in COMMANDS else []
    for mod in wanted:
        importlib.import_module(mod).register(sub)
    # the commands not loaded: a name and a help line, enough for --help and "invalid choice"
    registered = set(sub.choices)
    ordered = {}
    for name, (_mod, help_) in COMMANDS.items():
        ordered[name] = sub.choices[name] if name in registered else sub.add_parser(name, help=help_)
    sub.choices.clear()
    sub.choices.update(ordered)
    sub._choices_actions.sort(key=lambda a: list(COMMANDS).index(a.dest) if a.dest in COMMANDS else len(COMMANDS))
    return p


def main(argv: list[str] | None = None) -> int:
    from core.logs import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.verbose:  # worker processes this one starts (demo, train-dist ranks) log the same way
        import os

        os.environ["ADSTREAM_LOG_VERBOSITY"] = str(min(args.verbose, 2))
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
