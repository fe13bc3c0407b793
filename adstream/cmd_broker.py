"""``adstream broker``: run the embedded single-node broker (Apache Kafka in KRaft mode, or Tansu).

    adstream broker fetch              # resolve and cache the Kafka jars (once, e.g. in CI)
    adstream broker start              # start it in the background; prints bootstrap, pid, data dir
    adstream broker status             # exit 0 if running, 3 if not
    adstream broker stop
"""

from __future__ import annotations

import argparse
import time

EXIT_NOT_RUNNING = 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["auto", "kafka", "tansu"],
                   help="auto: Apache Kafka if Java and the jars are available, else Tansu (default from settings)")
    p.add_argument("--port", type=int, help="client port on 127.0.0.1 (0 = any free port; default 19092)")
    p.add_argument("--controller-port", type=int, help="KRaft controller port (default 19093)")
    p.add_argument("--data-dir", help="where the broker keeps its logs and state (default .adstream/broker)")
    p.add_argument("--kafka-version", help="Apache Kafka release from Maven Central (default 4.1.1)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("broker", help="run the embedded Kafka broker",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    for name, func, help_ in (("start", _start, "start the broker in the background"),
                              ("stop", _stop, "stop the broker (SIGTERM, then SIGKILL after --timeout)"),
                              ("status", _status, "show whether it runs (exit 0) or not (exit 3)"),
                              ("fetch", _fetch, "only resolve and cache the Kafka jars from Maven Central")):
        sp = sub.add_parser(name, help=help_, description=help_)
        _common(sp)
        if name in ("start", "stop"):
            sp.add_argument("--timeout", type=float, default=60.0 if name == "start" else 30.0,
                            help="seconds to wait (default %(default)s)")
        sp.set_defaults(func=func)


def _broker_settings(args: argparse.Namespace):
    from adstream.cli import settings_from_args

    bs = settings_from_args(args).broker
    upd = {k: v for k, v in (("kind", args.kind), ("port", args.port), ("controller_port", args.controller_port),
                              ("data_dir", args.data_dir), ("kafka_version", args.kafka_version)) if v is not None}
    return bs.model_copy(update=upd)


def _broker(args: argparse.Namespace):
    from streams.broker import EmbeddedBroker

    bs = _broker_settings(args)
    port = bs.port
    cport = bs.controller_port
    if args.port == 0 and args.controller_port is None:
        cport = 0
    return EmbeddedBroker(bs, data_dir=bs.data_dir, port=port, controller_port=cport)


def _start(args: argparse.Namespace) -> int:
    b = _broker(args)
    st = b.status()
    if st["running"]:
        print(f"already running: kind={st['kind']} bootstrap={st['bootstrap']} pid={st['pid']} "
              f"data_dir={st['data_dir']}")
        return 0
    b.start(timeout_s=args.timeout)
    print(f"bootstrap={b.bootstrap}")
    print(f"kind={b.kind}")
    print(f"pid={b.pid}")
    print(f"data_dir={b.data_dir}")
    print(f"startup_s={b.startup_s:.2f}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    b = _broker(args)
    t0 = time.monotonic()
    if b.stop(timeout_s=args.timeout):
        print(f"stopped broker in {b.data_dir} ({time.monotonic() - t0:.2f}s)")
    else:
        print(f"no broker running from {b.data_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from streams.broker import main_status_line

    st = _broker(args).status()
    print(main_status_line(st))
    return 0 if st["running"] else EXIT_NOT_RUNNING


def _fetch(args: argparse.Namespace) -> int:
    from streams.broker import fetch_kafka_jars, java_bin

    bs = _broker_settings(args)
    t0 = time.monotonic()
    libs = fetch_kafka_jars(bs.kafka_version, bs.cache_dir)
    n = len(list(libs.glob("*.jar")))
    print(f"Kafka {bs.kafka_version}: {n} jars in {libs} ({time.monotonic() - t0:.1f}s)")
    if not java_bin():
        print("warning: no Java found; `broker start --kind auto` will fall back to Tansu")
    return 0
