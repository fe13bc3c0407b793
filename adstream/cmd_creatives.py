"""``adstream train-creatives`` (the availability gate / the reward model from the stream) and
``adstream creatives generate`` (generate -> inspect -> rank, publish the passing creatives)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from core.errors import ConfigError

TRAIN_EPILOG = """\
examples:
  adstream train-creatives --job gate --idle-exit 10      # review labels on the creatives topic
  adstream train-creatives --job reward --window 20000     # clicks on the examples topic + the catalogue
See docs/images.md.
"""

GEN_EPILOG = """\
examples:
  adstream creatives generate --world-seed 7 --ads 50 --attempts 4 --want 2
  adstream creatives generate --world-seed 7 --ads 50 --dry-run --out loop.json
The gate and the reward model are the versions the registry serves (creatives.gate_model /
creatives.reward_model). Passing creatives go to the creatives topic; the service's catalogue adds them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-creatives", help="train the creative availability gate or reward model from the stream",
                       description="The gate learns from review labels on the creatives topic; the reward "
                       "model from clicks on the examples topic with the creatives topic's images.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--job", choices=["gate", "reward"], required=True)
    t.add_argument("--window", type=int, metavar="N", help="records per window")
    t.add_argument("--encoder", choices=["classical", "cnn"], help="image encoder (gate; the reward model: classical)")
    t.add_argument("--registry-dir", metavar="DIR")
    t.add_argument("--checkpoint-dir", metavar="DIR")
    t.add_argument("--max-windows", type=int, metavar="N")
    t.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without records")
    t.add_argument("--metrics-port", type=int, default=0, help="/metrics port (0: none)")
    t.set_defaults(func=run_train)

    c = sub.add_parser("creatives", help="generate -> inspect -> rank new creatives and publish the passing ones",
                       description="Creative production with the availability gate and the reward model.")
    csub = c.add_subparsers(dest="creatives_command", metavar="ACTION")
    g = csub.add_parser("generate", help="run the loop over products and publish passing creatives",
                        epilog=GEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--world-seed", type=int, default=7, help="products: the synthetic world's ads")
    g.add_argument("--ads", type=int, default=50, help="how many products (the first N ads)")
    g.add_argument("--segment", default="", help="target segment (its preferred background style)")
    g.add_argument("--styles-from", metavar="FILE",
                   help="examples file (creative_id, segment, clicked) to learn each segment's background style")
    g.add_argument("--attempts", type=int, default=4, help="generation attempts per product")
    g.add_argument("--want", type=int, default=2, help="passing creatives wanted per product")
    g.add_argument("--failure-rate", type=float, default=0.3, help="synthetic generator's failure rate")
    g.add_argument("--registry-dir", metavar="DIR")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dry-run", action="store_true", help="do not publish; print the report")
    g.add_argument("--out", metavar="FILE", help="write the loop report as JSON")
    g.set_defaults(func=run_generate)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.creative_jobs import run_creative_job

    s = settings_from_args(args)
    upd: dict[str, Any] = {}
    for key, val in (("registry_dir", args.registry_dir), ("checkpoint_dir", args.checkpoint_dir),
                     ("max_windows", args.max_windows), ("idle_exit_s", args.idle_exit), ("encoder", args.encoder),
                     ("gate_window" if args.job == "gate" else "reward_window", args.window)):
        if val is not None:
            upd[key] = Path(val) if key.endswith("_dir") else val
    s = s.model_copy(update={"creatives": s.creatives.model_copy(update=upd)})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = run_creative_job(args.job, s, stop, metrics_port=args.metrics_port or None)
    print(f"train-creatives {args.job}: {out['windows_this_run']} windows this run ({out['windows']} in total), "
          f"{out['examples_trained']} records, {out['published']} published, {out['rejected']} rejected, "
          f"serving {out['serving_version']} [{out['reason']}]", flush=True)
    return 0


def _load(root: Path, name: str, build):
    from models.registry import ModelRegistry

    reg = ModelRegistry(root, name)
    v = reg.latest()
    if v is None:
        return None, None
    state, _info = reg.load(v)
    return build(state), v


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from adstream.cli import settings_from_args
    from core.images import ImageConfig
    from core.world import World, WorldConfig
    from models.creative_image.gate import AvailabilityGate
    from models.creative_image.loop import ProductBrief, SyntheticGenerator, produce, style_table
    from models.creative_image.reward import CreativeRewardModel

    torch.set_num_threads(1)
    if args.attempts < 1 or args.want < 1 or args.ads < 1 or not 0 <= args.failure_rate <= 1:
        raise ConfigError("--attempts, --want and --ads must be >= 1 and --failure-rate in [0, 1]")
    s = settings_from_args(args)
    root = Path(args.registry_dir) if args.registry_dir else s.creatives.registry_dir
    gate, gv = _load(root, s.creatives.gate_model, AvailabilityGate.from_state)
    if gate is None:
        raise ConfigError(f"no published {s.creatives.gate_model!r} in {root}: train it first "
                          "(adstream train-creatives --job gate)")
    reward, rv = _load(root, s.creatives.reward_model, CreativeRewardModel.from_state)
    w = World(WorldConfig(seed=args.world_seed, images=ImageConfig(enabled=True, size=s.creatives.size)))
    styles: dict[str, str] = {}
    if args.styles_from:
        from streams.sources import read_table

        ex = read_table(args.styles_from).to_dict("records")
        style_of = {c.id: c.image.style for a in w.ads for c in a.creatives}
        styles = style_table(ex, style_of)
    ads = w.ads[: args.ads]
    briefs = [ProductBrief(a.id, a.category, w.product(a), w.tops.index(w.top_of(a.category)), args.segment,
                           w.category_by_id[a.category].name) for a in ads]
    gen = SyntheticGenerator(ImageConfig(enabled=True, size=s.creatives.size), args.failure_rate, styles, w.tops)
    rep = produce(briefs, gen, gate, reward, attempts=args.attempts, want=args.want, seed=args.seed,
                  size=s.creatives.size)
    summary = {**rep.summary(), "gate_version": gv, "reward_version": rv, "styles": styles,
               "expected_success_within_attempts": 1 - (1 - rep.pass_rate) ** args.attempts
               if np.isfinite(rep.pass_rate) else None}
    published = 0
    if not args.dry_run:
        from streams.broker import resolve_bootstrap
        from streams.creative_publisher import creative_events, publish
        from streams.kafka_io import create_topics

        bootstrap = resolve_bootstrap(s)
        create_topics(bootstrap, [s.kafka.topics.creatives], s.kafka.partitions, s.kafka.replication_factor)
        evs = creative_events(rep, {a.id: a.category for a in ads},
                              {a.id: w.category_by_id[a.category].name for a in ads}, f"{s.creatives.gate_model}:{gv}",
                              f"{s.creatives.reward_model}:{rv}" if rv else None, w.config.epoch)
        published = publish(bootstrap, s.kafka.topics.creatives, evs)
    summary["published"] = published
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0
