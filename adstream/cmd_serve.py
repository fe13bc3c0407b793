"""``adstream serve``: the online ad service (HTTP), wired to Kafka, Feast and the model registry.

Wiring (this module is the only place that joins ``online/`` to ``streams/``):

* impressions -> :class:`streams.event_sink.KafkaEventSink` (the ``EventSink`` port of ``online/``);
* ``bidword-inventory`` -> :class:`streams.inventory_feed.InventoryFeed` -> ``AdIndex.apply``;
* features -> :class:`features.store.FeatureStoreClient` (``read_for_request``);
* the CTR model -> ``ModelRegistry(serve.registry_dir, serve.model_name)``, polled for ``LATEST``.

:func:`build_app` does the same wiring for the demo and tests and returns the app with a ``close``.
"""

from __future__ import annotations

import argparse
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from adstream.cli import settings_from_args
from core.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the online ad service (POST /v1/ads)",
        description="Serve ads over HTTP: query understanding, candidates from the live bidword index "
                    "(bidword-inventory topic), Feast online features, the latest CTR model from the "
                    "registry (hot-swapped) beside a creative ranker, eCPM ranking; every served ad is "
                    "logged to the impressions topic. OpenAPI document at /openapi.json.",
        epilog="The admin token is read from configuration only (ADSTREAM_SERVE__ADMIN_TOKEN or the "
               "YAML file); without it the admin endpoints refuse every call.")
    p.add_argument("--host", help="bind address (default: serve.host = 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port = 8080; 0 = any free port)")
    p.add_argument("--registry-dir", metavar="DIR", help="model registry root (default: serve.registry_dir)")
    p.add_argument("--online-store", choices=["sqlite", "redis"], help="online feature store (default: settings)")
    p.add_argument("--redis-url", metavar="HOST:PORT", help="Redis for --online-store redis")
    p.add_argument("--repo-dir", metavar="DIR", help="Feast repository directory")
    p.add_argument("--no-features", action="store_true", help="serve without the feature store (degraded)")
    p.add_argument("--no-kafka", action="store_true",
                   help="no impression log and no inventory feed (the index comes from --world-seed)")
    p.add_argument("--world-seed", type=int, metavar="N",
                   help="load the ad catalog (creatives, advertisers) of the synthetic world with this seed")
    p.add_argument("--initial-inventory", choices=["topic", "world"], default="topic",
                   help="topic: the index is built from the bidword-inventory topic alone (default); "
                        "world: also load the world's initial inventory in-process (needs --world-seed)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--sequential", action="store_true",
                      help="rank creatives after ads (serve.parallel_ranking false; the default)")
    rank.add_argument("--parallel-ranking", action="store_true",
                      help="rank creatives beside the ads in a thread (Peri-CR; pays only with a GIL-releasing "
                      "creative model and a spare core: docs/speed.md)")
    p.add_argument("--creative-content", action="store_true",
                   help="the --world-seed world's creatives carry content (the catalog gives CR+ its cr_* inputs)")
    p.add_argument("--lexicon", action="store_true",
                   help="the --world-seed world has tail queries and ad titles (docs/rewrite.md)")
    p.add_argument("--rewrite-model", metavar="NAME", help="serve the MoBGM rewriter of this registry name "
                   "(serve.rewrite_model; e.g. rewriter)")
    p.add_argument("--gram-model", metavar="NAME", help="serve GRAM of this registry name (serve.gram_model; e.g. gram)")
    p.set_defaults(func=cmd_serve)


@dataclass
class Wired:
    app: Any
    closers: list[Callable[[], Any]] = field(default_factory=list)
    sink: Any = None
    feed: Any = None
    feature_store: Any = None

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("closing %s", fn)


def build_app(settings, *, bootstrap: str | None, world=None, initial_inventory: str = "topic",
              feature_store: Any = "settings", registry_root=None, wait_inventory_s: float = 0.0) -> Wired:
    """Everything ``adstream serve`` runs, as an app (serve it with uvicorn or
    :func:`online.app.serve_in_thread`). ``bootstrap=None`` runs without Kafka. ``feature_store``:
    a client, None (no store) or "settings" (a ``FeatureStoreClient`` from ``settings.features``)."""
    from online.app import create_app
    from online.index import AdIndex, load_world_catalog, world_inventory
    from online.wiring import serving_extras

    index = AdIndex()
    closers: list[Callable[[], Any]] = []
    # gate verdicts, the creative reward model, cold-start routing (docs/images.md, docs/crossdomain.md)
    extras = serving_extras(settings.serve, index, registry_root, settings.features.redis_url)
    closers += extras.closers
    if world is not None:
        n = load_world_catalog(index, world)
        log.info("catalog: %d ads from the synthetic world (seed %d)", n, world.config.seed)
        if initial_inventory == "world":
            log.info("inventory: %d initial bidwords from the world", index.apply_many(world_inventory(world)))
    elif initial_inventory == "world":
        raise ConfigError("--initial-inventory world needs --world-seed")
    if feature_store == "settings":
        from features.store import FeatureStoreClient

        feature_store = FeatureStoreClient(settings.features, apply=True)
    sink = feed = None
    ready_checks = []
    topics = settings.kafka.topics
    if bootstrap:
        from streams.event_sink import KafkaEventSink
        from streams.inventory_feed import InventoryFeed
        from streams.kafka_io import create_topics

        try:
            create_topics(bootstrap, [topics.impressions, topics.bidword_inventory]
                          + ([topics.creatives] if extras.catalogue is not None else []),
                          settings.kafka.partitions, settings.kafka.replication_factor, timeout_s=10.0)
        except Exception as e:  # noqa: BLE001 - the service starts even when the broker does not answer
            log.warning("could not make sure the topics exist on %s: %s", bootstrap, e)
        sink = KafkaEventSink(bootstrap, buffer=settings.serve.impression_buffer,
                              timeout_ms=settings.serve.impression_timeout_ms,
                              spool_dir=settings.serve.impression_spool_dir,
                              spool_max_bytes=settings.serve.impression_spool_max_bytes)
        closers.append(sink.close)
        feed = InventoryFeed(bootstrap, topics.bidword_inventory, index.apply).start()
        closers.append(feed.stop)
        ready_checks.append(lambda: ("inventory", feed.caught_up.is_set()))
        if extras.catalogue is not None:
            from core.events import CreativeChange

            cfeed = InventoryFeed(bootstrap, topics.creatives, extras.catalogue.apply, expected=CreativeChange).start()
            closers.append(cfeed.stop)
            ready_checks.append(lambda: ("creatives", cfeed.caught_up.is_set()))
        if wait_inventory_s > 0 and not feed.wait_caught_up(wait_inventory_s):
            log.warning("inventory feed not caught up after %.0fs; serving what is indexed", wait_inventory_s)
    service_kwargs = dict(extras.service_kwargs or {})
    if world is not None and getattr(world, "lexicon", None) is not None and (
            settings.serve.rewrite_model or settings.serve.gram_model):
        from models.rewrite.catalog import world_catalog
        from online.rewrite import build_rewrite_stage

        # the world's titles: GRAM indexes a new ad by its title the moment it becomes live
        service_kwargs["rewrite_stage"] = build_rewrite_stage(
            settings.serve, index, registry_root or settings.serve.registry_dir, world_catalog(world))
    app = create_app(settings.serve, registry_root=registry_root, feature_store=feature_store, sink=sink,
                     index=index, impressions_topic=topics.impressions, ready_checks=ready_checks,
                     service_kwargs=service_kwargs)
    closers.append(app.state.close)
    return Wired(app, closers, sink, feed, feature_store)




def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from streams.feature_updater import with_overrides

    s = with_overrides(settings_from_args(args), online_store=args.online_store, redis_url=args.redis_url,
                       repo_dir=args.repo_dir)
    upd: dict[str, Any] = {}
    if args.host:
        upd["host"] = args.host
    if args.port is not None:
        upd["port"] = args.port
    if args.registry_dir:
        upd["registry_dir"] = args.registry_dir
    if args.sequential:
        upd["parallel_ranking"] = False
    if args.parallel_ranking:
        upd["parallel_ranking"] = True
    if args.rewrite_model is not None:
        upd["rewrite_model"] = args.rewrite_model
    if args.gram_model is not None:
        upd["gram_model"] = args.gram_model
    if upd:
        s = s.model_copy(update={"serve": s.serve.model_copy(update=upd)})
    if not 0 <= s.serve.port <= 65535:
        raise ConfigError(f"--port {s.serve.port} is not a TCP port")
    world = None
    if args.world_seed is not None:
        from core.creatives import CreativeContentConfig
        from core.world import World, WorldConfig

        from core.lexicon import LexiconConfig

        world = World(WorldConfig(seed=args.world_seed,
                                  creative_content=CreativeContentConfig(enabled=args.creative_content),
                                  lexicon=LexiconConfig(enabled=args.lexicon)))
    bootstrap = None
    if not args.no_kafka:
        from streams.broker import resolve_bootstrap

        bootstrap = resolve_bootstrap(s)
    wired = build_app(s, bootstrap=bootstrap, world=world, initial_inventory=args.initial_inventory,
                      feature_store=None if args.no_features else "settings", wait_inventory_s=10.0)
    log.info("serving on http://%s:%d (registry %s, model %s, kafka %s, features %s)", s.serve.host,
             s.serve.port, s.serve.registry_dir, s.serve.model_name, bootstrap or "off",
             "off" if args.no_features else s.features.online_store)
    if s.serve.gc_freeze:
        from online.hotpath import freeze_startup_heap

        log.info("froze %d startup objects out of the garbage collector's view", freeze_startup_heap())

    def _terminate(_signum, _frame):  # SIGTERM is a normal stop: close everything, exit 0
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        uvicorn.run(wired.app, host=s.serve.host, port=s.serve.port, log_level="warning", access_log=False)
    finally:
        wired.close()
    return 0
