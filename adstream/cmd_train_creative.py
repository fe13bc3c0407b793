"""``adstream train-creative``: the JAC job (AR+ and CR+ trained jointly from the examples topic)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  adstream train-creative --window-examples 5000
  adstream train-creative --window-seconds 60 --pctr-source cached --ste copy --idle-exit 30
  adstream serve ... with serve.model_name=jac-ar (AR+) and serve.creative_model=jac-cr (CR+)

Every closed window is first the held-out window of the candidate: AR+ (jac-ar: AUC, LogLoss) and
CR+ (jac-cr: NSCTR, LogLoss) are each scored on it against their serving versions and published
together (--joint all) or each on its own (--joint each). Then the job trains on the window (one
joint pass) and one checkpoint (both halves, both optimizers, offsets) is written. Per-window
figures go to <checkpoint-dir>/windows.jsonl. See docs/creative.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from streams.creative_trainer import add_arguments

    p = sub.add_parser(
        "train-creative",
        help="train JAC (ad ranker AR+ and creative ranker CR+) on the examples topic, two gated registry names",
        description="Consume labelled examples (with the shown creative and its content), train AR+ and CR+ "
        "jointly window by window, and publish both halves through the gate.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.creative_trainer import run_from_args

    return run_from_args(args, settings_from_args(args))
