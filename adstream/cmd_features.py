"""``adstream features``: the Feast repository, the feature updater worker, online/historical reads."""

from __future__ import annotations

import argparse
import json
import sys

from adstream.cli import settings_from_args
from core.errors import ConfigError

ENTITIES = ("user", "ad", "creative", "query", "bidword", "category")


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="Feast feature store: apply, update, get, history",
                              description="Fresh per-entity features in Feast (online: sqlite or Redis; "
                                          "offline: parquet history).")
    sub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND")

    def store_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--online-store", choices=["sqlite", "redis"], help="online store (default: settings)")
        q.add_argument("--redis-url", metavar="HOST:PORT", help="Redis for --online-store redis")
        q.add_argument("--repo-dir", metavar="DIR", help="Feast repository directory")

    a = sub.add_parser("apply", help="create or update the Feast repository (feature_store.yaml + registry)")
    store_opts(a)
    a.set_defaults(func=cmd_apply)

    from streams.feature_updater import add_arguments

    u = sub.add_parser("update", help="run the feature updater (impressions + clicks -> Feast)",
                       description="Consume impressions and clicks, keep per-entity aggregates, push them to "
                                   "Feast every flush interval; checkpoints state + offsets atomically.")
    add_arguments(u)
    u.set_defaults(func=cmd_update)

    g = sub.add_parser("get", help="print online features of some keys as JSON")
    store_opts(g)
    g.add_argument("entity", choices=ENTITIES, help="entity type")
    g.add_argument("keys", nargs="+", metavar="KEY", help="join-key values (e.g. ad ids)")
    g.add_argument("--features", nargs="*", metavar="NAME", help="only these features (default: all)")
    g.set_defaults(func=cmd_get)

    h = sub.add_parser("history", help="point-in-time features (offline store) as CSV",
                       description="For each KEY at time AT (epoch seconds or ISO-8601, UTC), the "
                                   "features as they were then.")
    store_opts(h)
    h.add_argument("entity", choices=ENTITIES)
    h.add_argument("keys", nargs="+", metavar="KEY")
    h.add_argument("--at", required=True, metavar="TIME", help="epoch seconds or ISO-8601 time")
    h.set_defaults(func=cmd_history)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _settings(args: argparse.Namespace):
    from streams.feature_updater import with_overrides

    return with_overrides(settings_from_args(args), online_store=getattr(args, "online_store", None),
                          redis_url=getattr(args, "redis_url", None), repo_dir=getattr(args, "repo_dir", None))


def _client(args: argparse.Namespace, apply: bool):
    from features.store import FeatureStoreClient

    return FeatureStoreClient(_settings(args).features, apply=apply)


def cmd_apply(args: argparse.Namespace) -> int:
    c = _client(args, apply=True)
    print(f"feature repository ready: {c.repo_dir} (online store: {c.settings.online_store})")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from streams.feature_updater import run_from_args

    return run_from_args(args, settings_from_args(args))


def cmd_get(args: argparse.Namespace) -> int:
    c = _client(args, apply=False)
    json.dump(c.read(args.entity, args.keys, features=args.features or None), sys.stdout, indent=2)
    print()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import pandas as pd

    try:
        at = pd.to_datetime(float(args.at), unit="s", utc=True)
    except ValueError:
        try:
            at = pd.to_datetime(args.at, utc=True)
        except (ValueError, TypeError):
            raise ConfigError(f"--at {args.at!r} is neither epoch seconds nor an ISO-8601 time") from None
    from features.aggregates import JOIN_KEYS

    c = _client(args, apply=False)
    edf = pd.DataFrame({JOIN_KEYS[args.entity]: args.keys, "event_timestamp": at})
    c.historical(edf, entity_type=args.entity).to_csv(sys.stdout, index=False)
    return 0
