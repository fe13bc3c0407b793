"""librdkafka's own log and errors through Python logging, for every Kafka client of the project.

Without a ``logger``, librdkafka prints its lines (``%3|...|FAIL|...``) straight to stderr, one per
reconnect attempt: hundreds during a broker outage. :func:`client_config` adds a ``logger`` that
writes them to the ``librdkafka`` Python logger and an ``error_cb`` for client-level errors, so
``core.logs`` filters and rate-limits them like any library's lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError

RDKAFKA_LOG = logging.getLogger("librdkafka")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")
# reported by error_cb AND logged by librdkafka (FAIL lines): the log line is enough
_ALSO_LOGGED = {KafkaError._TRANSPORT, KafkaError._RESOLVE}


class _LibrdkafkaLog:
    """The ``logger`` of every client: librdkafka's lines into the ``librdkafka`` Python logger (so
    ``core.logs`` filters and rate-limits them) instead of raw lines on stderr."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if not RDKAFKA_LOG.isEnabledFor(level):
            return
        if len(args) == 3:  # confluent-kafka: ("%s [%s] %s", facility, client name, message)
            fac, name, msg = args
            RDKAFKA_LOG.log(level, "%s %s: %s", fac, name, _THREAD.sub("", str(msg)))
        else:
            RDKAFKA_LOG.log(level, fmt, *args)


def _on_client_error(err: KafkaError) -> None:
    if err.code() in _ALSO_LOGGED:
        return
    RDKAFKA_LOG.log(logging.ERROR if err.fatal() else logging.WARNING, "%s: %s", err.name(), err.str())


_CLIENT_LOG = _LibrdkafkaLog()


def client_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` plus librdkafka's log and error callbacks routed through Python logging. Every
    Kafka client of the project is built with it (a broker outage then costs a few lines, not one
    per reconnect: see core/logs.py)."""
    out = dict(cfg)
    out.setdefault("logger", _CLIENT_LOG)
    out.setdefault("error_cb", _on_client_error)
    return out
