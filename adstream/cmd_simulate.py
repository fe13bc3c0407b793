"""``adstream simulate-traffic``: synthetic users send ad requests and click what they like."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate-traffic",
        help="send ad requests from the synthetic world's users and produce their clicks",
        description="POST /v1/ads requests drawn from the synthetic world's users and queries to a "
        "running `adstream serve`, sample clicks (and conversions) for the served ads from the "
        "world's ground truth with position bias, and produce them to the clicks/conversions topics "
        "at their event time. The service logs the impressions itself, so the joiner, the feature "
        "updater and the trainer learn from this traffic.",
    )
    p.add_argument("--url", help="the service (default: http://serve.host:serve.port from the settings, "
                               "http://127.0.0.1:8080)")
    p.add_argument("--world-seed", type=int, default=7,
                   help="seed of the synthetic world; use the one `adstream serve --world-seed` loaded (default 7)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of traffic (default 60)")
    p.add_argument("--requests", type=int, metavar="N", help="stop after N requests instead")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--slots", type=int, default=4, help="ads per request (default 4)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel connections (default 4)")
    p.add_argument("--click-delay", type=float, metavar="S",
                   help="mean click delay after the impression, seconds (default: the world's, 15)")
    p.add_argument("--no-conversions", action="store_true", help="produce clicks only")
    p.add_argument("--creative-content", action="store_true",
                   help="the world's creatives carry content (as `serve`/`replay synthetic --creative-content`)")
    p.add_argument("--lexicon", action="store_true",
                   help="the world has tail queries and ad titles (as `replay synthetic --lexicon`; docs/rewrite.md)")
    p.add_argument("--seed", type=int, default=0, help="traffic random seed (default 0)")
    p.add_argument("--max-wait", type=float, default=120.0, metavar="S",
                   help="after the requests, wait at most S seconds for clicks dated in the future, then send "
                        "the rest at once (default 120; the joiner dead-letters clicks more than "
                        "join.max_future_s ahead of their Kafka timestamp as clock_skew)")
    p.add_argument("--delivery-timeout", type=float, default=30.0, metavar="S",
                   help="a click not acknowledged by Kafka within S seconds counts as a delivery failure (default 30)")
    p.add_argument("--out", metavar="FILE.json", help="write the report (per-bucket CTR, latency, versions) here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from core.world import World, WorldConfig
    from streams.broker import resolve_bootstrap
    from streams.traffic import simulate_traffic

    if args.rate <= 0 or args.slots < 1 or args.concurrency < 1 or args.duration <= 0 or args.max_wait < 0 \
            or args.delivery_timeout <= 0:
        print("error: --rate, --slots, --concurrency, --duration and --delivery-timeout must be positive, "
              "--max-wait not negative", file=sys.stderr)
        return 2
    s = settings_from_args(args)
    args.url = args.url or f"http://{s.serve.host}:{s.serve.port}"
    bootstrap = resolve_bootstrap(s)
    from core.creatives import CreativeContentConfig

    from core.lexicon import LexiconConfig

    world = World(WorldConfig(seed=args.world_seed,
                              creative_content=CreativeContentConfig(enabled=args.creative_content),
                              lexicon=LexiconConfig(enabled=args.lexicon)))

    total = f"{args.requests} requests" if args.requests else f"{args.duration:g}s"
    delay = args.click_delay if args.click_delay is not None else world.config.click_delay_mean_s
    print(f"simulate-traffic: {args.rate:g} requests/s for {total} to {args.url}; clicks and conversions to "
          f"Kafka at {bootstrap} at their event time (users click 1s + Exp({delay:g}s) after an ad is shown)",
          flush=True)

    def show(b) -> None:
        d = b.summary()
        ctr = f"{d['ctr']:.2%}" if d["ctr"] is not None else "-"
        exp = f"{d['expected_ctr']:.2%}" if d["expected_ctr"] is not None else "-"
        p99 = f"{d['latency_p99_ms']:.1f}" if d["latency_p99_ms"] is not None else "-"
        end = "" if args.requests else f"/{args.duration:g}s"
        print(f"t={d['start_s']:4.0f}s{end}  requests={d['requests']:5d}  errors={d['errors']:3d}  "
              f"ctr={ctr:>7}  expected={exp:>7}  p99={p99:>7} ms  versions={d['model_versions']}", flush=True)

    said = []

    def waiting(left: int, last_in_s: float) -> None:
        if not said:
            print(f"requests done; waiting for {left} clicks and conversions dated in the future (the last is due "
                  f"in {last_in_s:.0f}s; waiting at most {args.max_wait:g}s, --max-wait)", flush=True)
        else:
            print(f"  {left} left, the last due in {last_in_s:.0f}s", flush=True)
        said.append(left)

    report = simulate_traffic(
        args.url, world, bootstrap, s.kafka.topics, duration_s=None if args.requests else args.duration,
        requests=args.requests, rate=args.rate, slots=args.slots, concurrency=args.concurrency,
        click_delay_mean_s=args.click_delay, conversions=not args.no_conversions, seed=args.seed,
        on_bucket=show, on_wait=waiting, max_wait_s=args.max_wait, delivery_timeout_s=args.delivery_timeout,
    )
    summary = report.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "buckets"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    rc = 0
    if report.ok == 0:
        print(f"error: no request succeeded ({report.error_samples[:1]})", file=sys.stderr)
        rc = 1
    if report.delivery_failures:
        print(f"error: {report.delivery_failures} of {report.produced} clicks and conversions did not reach Kafka "
              f"at {bootstrap} ({report.delivery_error})", file=sys.stderr)
        rc = 1
    return rc
