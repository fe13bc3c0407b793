"""``adstream train``: the stream trainer; ``adstream models``: list, roll back or promote versions."""

from __future__ import annotations

import argparse
import json

TRAIN_EPILOG = """\
examples:
  adstream train --window-examples 5000 --strategy ddp --compare finetune
  adstream train --window-seconds 60 --registry .adstream/registry --idle-exit 30
  adstream train --bootstrap 127.0.0.1:9092 --max-windows 10 --gate-margin 0.02

Every closed window is first scored with the candidate (the model trained up to the previous
window) and the serving model; the candidate is published when it is not worse than the serving
model by more than the margins, and rejected (kept under rejected/) otherwise. Then the learner
trains on the window and one checkpoint (model + offsets) is written. Per-window statistics go to
<checkpoint-dir>/windows.jsonl. SIGTERM stops at a consistent checkpoint (exit code 0).
See docs/trainer.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from streams.trainer import add_arguments  # light: argparse only at call time below

    p = sub.add_parser(
        "train",
        help="train the CTR model on the examples topic, window by window, with a gated registry",
        description="Consume labelled examples, train one incremental update per window (DDP by "
        "default), and publish versions that pass the progressive-validation gate.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bootstrap", dest="train_bootstrap", metavar="HOST:PORT",
                   help="Kafka bootstrap servers (same as the global --bootstrap)")
    add_arguments(p)
    p.set_defaults(func=_run_train)

    m = sub.add_parser(
        "models",
        help="list the model registry's versions, roll back, or promote a version",
        description="Inspect and move the registry's LATEST pointer (what the online service serves).",
    )
    m.add_argument("--registry", metavar="DIR", help="registry directory (default: trainer.registry_dir)")
    m.add_argument("--model-name", metavar="NAME", help="model name (default: trainer.model_name)")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", help="published and rejected versions with their gate metrics")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    msub.add_parser("rollback", help="point LATEST back at the version served before the current one")
    pr = msub.add_parser("promote", help="point LATEST at a published version")
    pr.add_argument("version", help="a published version, like v000003")
    m.set_defaults(func=_run_models)


def _run_train(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.trainer import run_from_args

    if args.train_bootstrap:
        args.bootstrap = args.train_bootstrap
    return run_from_args(args, settings_from_args(args))


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _run_models(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from core.errors import ConfigError
    from models.registry import ModelRegistry, RegistryError

    s = settings_from_args(args)
    reg = ModelRegistry(args.registry or s.trainer.registry_dir, args.model_name or s.trainer.model_name)
    action = args.models_command or "list"
    try:
        if action == "rollback":
            info = reg.rollback()
            print(f"LATEST -> {info.version} (window {info.meta.get('window')})")
            return 0
        if action == "promote":
            info = reg.promote(args.version)
            print(f"LATEST -> {info.version} (window {info.meta.get('window')})")
            return 0
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    latest = reg.latest()
    rows = []
    for rejected in (False, True):
        d = reg.rejected_dir if rejected else reg.versions_dir
        for v in reg.versions(rejected=rejected):
            try:
                meta = json.loads((d / v / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            rows.append({"version": v, "status": "rejected" if rejected else "published",
                         "latest": v == latest, **{k: meta.get(k) for k in (
                             "window", "auc", "logloss", "serving_auc", "serving_logloss", "examples",
                             "strategy", "gate_reason")}})
    rows.sort(key=lambda r: r["version"])
    if getattr(args, "json", False):
        print(json.dumps({"latest": latest, "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"no versions in {reg.dir}")
        return 0
    print(f"{'version':<9} {'status':<9} {'window':>6} {'auc':>7} {'logloss':>8} {'serv_auc':>8} "
          f"{'serv_ll':>8} {'examples':>9}  strategy")
    for r in rows:
        mark = "*" if r["latest"] else " "
        print(f"{r['version']:<9}{mark}{r['status']:<9} {str(r['window']):>6} {_fmt(r['auc']):>7} "
              f"{_fmt(r['logloss']):>8} {_fmt(r['serving_auc']):>8} {_fmt(r['serving_logloss']):>8} "
              f"{str(r['examples']):>9}  {r['strategy'] or '-'}")
    print(f"* = LATEST ({latest or 'none'})")
    return 0
