"""``adstream replay SOURCE``: produce a source's events into Kafka in event-time order.

Sources: ``synthetic`` (the world generator), ``obd`` (Open Bandit Dataset sample), ``adwords``
(daily keyword stats, expanded), ``file`` (any CSV/Parquet with time, label and feature columns).
Impressions go to the impressions topic, clicks to clicks, conversions to conversions, bidword
changes to bidword-inventory; values are the events' JSON, keys their request id.

Examples::

    adstream replay synthetic --duration 3600 --rps 20 --as-fast-as-possible
    adstream replay obd --campaign men --time-scale 600
    adstream replay adwords --sample-rate 0.01 --start-date 2012-10-01 --end-date 2012-11-30
    adstream replay file clicks.parquet --time-col ts --label-col clicked --categorical site,app \\
        --numeric price --id-cols user=uid,ad=item --rate 5000
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a source (synthetic, obd, adwords, file) into Kafka",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    common = _common_parser()

    s = sub.add_parser("synthetic", parents=[common], help="the synthetic e-commerce world",
                       description="Events of core.world.World: known ground truth, controllable drift.")
    s.add_argument("--seed", type=int, default=7, help="world and traffic seed (default 7)")
    s.add_argument("--duration", type=float, default=3600.0, metavar="SECONDS",
                   help="event-time span of the requests (default 3600); drift times scale with it")
    s.add_argument("--rps", type=float, default=10.0, help="requests per event-time second (default 10)")
    s.add_argument("--slots", type=int, default=4, help="ads per request (default 4)")
    s.add_argument("--drift", default="all",
                   help="all (default), none, or a comma list of abrupt,gradual,new_ads,trending")
    s.add_argument("--start-time", metavar="T",
                   help="event time of the start: epoch seconds, an ISO date, 'now' or 'now-SECONDS' "
                        "(default: the world's fixed epoch, 2023-11-14T22:13:20Z)")
    s.add_argument("--initial-inventory", action="store_true",
                   help="also emit the initial bidword inventory as bidword-change events")
    s.add_argument("--creative-content", action="store_true",
                   help="creatives carry content (layout, colour, ...) that drives clicks (docs/creative.md)")
    s.add_argument("--lexicon", action="store_true",
                   help="tail queries (synonyms, colloquial attributes, typos) and ad titles (docs/rewrite.md)")

    o = sub.add_parser("obd", parents=[common], help="Open Bandit Dataset sample (real, 2019)",
                       description="One impression per OBD row, plus a click when click=1.")
    o.add_argument("--campaign", choices=["men", "women", "all"], default="all")
    o.add_argument("--policies", default="random,bts", help="logging policies to merge (default random,bts)")
    o.add_argument("--data-dir", help="folder holding {random,bts}/{men,women} (default: shared data/obd)")
    o.add_argument("--click-delay", type=float, default=1.0, metavar="SECONDS",
                   help="a click is placed this long after its impression (default 1)")

    a = sub.add_parser("adwords", parents=[common], help="AdWords daily keyword stats (real, 2012-13)",
                       description="Each (day, keyword) row expanded into sampled impressions and clicks. "
                                   "The data are GPL-3 and are read from the shared folder, never copied.")
    a.add_argument("--data-dir", help="folder holding adwords_daily_*.csv (default: shared data/adwords)")
    a.add_argument("--sample-rate", type=float, default=0.02,
                   help="fraction of impressions kept (default 0.02: ~250k impressions for the year)")
    a.add_argument("--max-impressions-per-row", type=int, help="cap per (day, keyword) after sampling")
    a.add_argument("--start-date", help="first day, YYYY-MM-DD (inclusive)")
    a.add_argument("--end-date", help="last day, YYYY-MM-DD (inclusive)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    f = sub.add_parser("file", parents=[common], help="a CSV/Parquet file of labelled impressions",
                       description="One impression per row (features from the named columns), plus a "
                                   "click when the label is 1; rows are sorted by time.")
    f.add_argument("path", help="a .csv, .tsv or .parquet file")
    f.add_argument("--time-col", required=True, help="timestamp column (epoch numbers or dates)")
    f.add_argument("--label-col", required=True, help="0/1 click label column")
    f.add_argument("--categorical", default="", help="comma list of categorical feature columns")
    f.add_argument("--numeric", default="", help="comma list of numeric feature columns")
    f.add_argument("--id-cols", default="",
                   help="ROLE=COLUMN list; roles: request,user,ad,creative,query,bidword,category,position,bid "
                        "(default: columns named request_id,user_id,ad_id,... when present)")
    f.add_argument("--time-unit", default="auto", choices=["auto", "s", "ms", "us", "ns"],
                   help="unit of numeric timestamps (default: guessed from the magnitude)")
    f.add_argument("--click-delay", type=float, default=1.0, metavar="SECONDS")

    for parser in (s, o, a, f):
        parser.set_defaults(func=run)


def _common_parser() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("pacing and output")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--rate", type=float, metavar="N", help="at most N events per second")
    m.add_argument("--as-fast-as-possible", action="store_true", help="no pacing (the default)")
    m.add_argument("--time-scale", type=float, metavar="X",
                   help="follow event time, X times faster than real time (1 = real time)")
    g.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    g.add_argument("--output", metavar="FILE.jsonl", help="write JSON lines to a file instead of Kafka")
    g.add_argument("--bootstrap", metavar="HOST:PORT", default=argparse.SUPPRESS,
                   help="Kafka bootstrap (default: settings, else the running embedded broker)")
    g.add_argument("--partitions", type=int, help="partitions for topics created here (default: settings)")
    g.add_argument("--no-create-topics", action="store_true", help="fail if the topics do not exist")
    g.add_argument("--no-idempotence", action="store_true",
                   help="plain producer (for brokers without idempotent producers, e.g. Tansu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return c


def _start_time(value: str | None) -> float | None:
    from core.errors import ConfigError

    if value is None:
        return None
    if value == "now" or value.startswith("now-"):
        import time

        try:
            back = float(value[4:]) if value != "now" else 0.0
        except ValueError:
            raise ConfigError(f"--start-time {value!r}: use now-SECONDS, e.g. now-900") from None
        return float(int(time.time() - back))
    try:
        return float(value)
    except ValueError:
        pass
    try:
        import pandas as pd

        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts
        return ts.timestamp()
    except (ValueError, TypeError):
        raise ConfigError(f"--start-time {value!r}: use epoch seconds, an ISO date, 'now' or 'now-SECONDS'") from None


def build_source(args: argparse.Namespace) -> Any:
    """The event iterator for the parsed arguments."""
    from streams import sources

    if args.source == "synthetic":
        return sources.synthetic_events(
            seed=args.seed, duration_s=args.duration, rps=args.rps, drift=args.drift, slots=args.slots,
            start_time=_start_time(args.start_time), initial_inventory=args.initial_inventory,
            creative_content=getattr(args, "creative_content", False), lexicon=getattr(args, "lexicon", False))
    if args.source == "obd":
        return sources.obd_events(campaign=args.campaign, policies=sources.split_cols(args.policies),
                                  data_dir=args.data_dir, click_delay_s=args.click_delay)
    if args.source == "adwords":
        return sources.adwords_events(
            data_dir=args.data_dir, sample_rate=args.sample_rate,
            max_impressions_per_row=args.max_impressions_per_row, start_date=args.start_date,
            end_date=args.end_date, seed=args.seed)
    return sources.table_events(
        args.path, time_col=args.time_col, label_col=args.label_col, categorical=args.categorical,
        numeric=args.numeric, id_cols=args.id_cols, time_unit=args.time_unit, click_delay_s=args.click_delay)


def run(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from core.errors import ConfigError
    from streams.replay import replay, replay_topics, summary_line, write_jsonl

    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be >= 0")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError("--rate must be > 0")
    if args.time_scale is not None and args.time_scale <= 0:
        raise ConfigError("--time-scale must be > 0")
    settings = settings_from_args(args)
    events = build_source(args)
    progress = not args.no_progress
    if args.output:
        result = write_jsonl(events, args.output, limit=args.limit, topics=settings.kafka.topics,
                             progress=progress)
        print(summary_line(result).replace("replayed", "wrote", 1) + f" -> {args.output}")
        return 0

    from streams.broker import resolve_bootstrap, running_broker
    from streams.kafka_io import create_topics, list_topics

    bootstrap = resolve_bootstrap(settings)
    names = replay_topics(settings.kafka.topics)
    if args.no_create_topics:
        missing = [t for t in names if t not in list_topics(bootstrap)]
        if missing:
            raise ConfigError(f"topics {missing} do not exist on {bootstrap}; run `adstream topics create`")
    else:
        create_topics(bootstrap, names, args.partitions or settings.kafka.partitions,
                      settings.kafka.replication_factor)
    producer_config: dict[str, Any] = {}
    if args.no_idempotence:
        producer_config["enable_idempotence"] = False
    elif not settings.kafka.bootstrap:
        st = running_broker(settings.broker.data_dir)
        if st and st.get("kind") == "tansu":  # Tansu has no InitProducerId
            producer_config["enable_idempotence"] = False
    result = replay(events, bootstrap, settings.kafka.topics, rate=args.rate, time_scale=args.time_scale,
                    limit=args.limit, progress=progress, producer_config=producer_config)
    print(summary_line(result))
    if result["delivery_errors"]:
        print(f"adstream replay: error: {result['delivery_errors']} events were not delivered to {bootstrap}",
              file=sys.stderr)
        return 1
    return 0
