"""``adstream topics``: create the project's topics explicitly, or list the broker's topics.

The broker is the one given by ``--bootstrap`` (or ADSTREAM_KAFKA__BOOTSTRAP), else the embedded broker
started with ``adstream broker start``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("topics", help="create or list Kafka topics", description=__doc__)
    sub = p.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create every project topic (dead-letter included); existing ones are kept")
    c.add_argument("--partitions", type=int, help="partitions per topic (default from settings: 6)")
    c.set_defaults(func=_create)
    ls = sub.add_parser("list", help="list topics with their partition counts")
    ls.add_argument("--all", action="store_true", help="include internal topics (__consumer_offsets, ...)")
    ls.set_defaults(func=_list)


def _create(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from core.errors import ConfigError
    from streams.broker import resolve_bootstrap
    from streams.kafka_io import ensure_project_topics, list_topics

    s = settings_from_args(args)
    if args.partitions is not None and args.partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    boot = resolve_bootstrap(s)
    created = ensure_project_topics(boot, s.kafka, partitions=args.partitions)
    have = list_topics(boot)
    for name in s.kafka.topics.all():
        print(f"{name}\t{have.get(name, '?')} partitions\t{'created' if name in created else 'exists'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from adstream.cli import settings_from_args
    from streams.broker import resolve_bootstrap
    from streams.kafka_io import list_topics

    topics = list_topics(resolve_bootstrap(settings_from_args(args)), internal=args.all)
    for name in sorted(topics):
        print(f"{name}\t{topics[name]}")
    return 0
