"""``adstream train-rewrite``: the MoBGM rewriter and GRAM refreshed from the examples topic."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  adstream train-rewrite --catalog world:7 --window-examples 20000
  adstream train-rewrite --catalog ads.csv --window-seconds 600 --dpo-every 3 --idle-exit 60
  adstream serve ... --rewrite-model rewriter --gram-model gram

The first windows wait for --min-bootstrap-clicks clicks, then both models are trained from them
(MoBGM: post-pre-training on query <-> title click pairs when a catalog is given, SFT on query ->
clicked bidword pairs, the discriminator, one DPO round; GRAM: shared codes, co-training, index).
Every later window is first the held-out window of the candidates (rewriter: click hit@k, gram:
click recall@k, each against its serving version), then refreshes them with its new click pairs,
with a DPO round every --dpo-every windows. Per-window figures go to <checkpoint-dir>/windows.jsonl.
See docs/rewrite.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from streams.rewrite_trainer import add_arguments

    p = sub.add_parser(
        "train-rewrite",
        help="refresh the MoBGM bidword rewriter and GRAM from the examples topic, two gated registry names",
        description="Consume labelled examples, refresh the bidword rewriter (MoBGM) and the generative "
        "retriever (GRAM) window by window, and publish each through the gate.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.rewrite_trainer import run_from_args

    return run_from_args(args, settings_from_args(args))
