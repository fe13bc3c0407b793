"""Metric names and the helpers every worker uses to export them.

Names live here so that the dashboard, the docker-compose Prometheus config and the code agree.
Conventions (Prometheus): a count is a Counter (exported with ``_total``); labels never carry a
process id or anything else that changes on a restart (``worker`` is the role: ``joiner``,
``feature_updater``, ``trainer``; Prometheus adds ``instance``); a gauge is set whenever its value
changes, not only at some later event. ``tests/test_metrics_endpoints.py`` runs ``promtool check
metrics`` on every endpoint and compares label sets across a restart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NS = "adstream"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """The metrics every stream worker exports. One instance per process (or per test, with its own
    registry)."""

    def __init__(self, worker: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.worker = worker
        self.records_in = Counter(
            f"{NS}_records_in", "Records consumed", ["worker", "topic"], registry=r
        )
        self.records_out = Counter(
            f"{NS}_records_out", "Records produced", ["worker", "topic"], registry=r
        )
        self.dead_letters = Counter(
            f"{NS}_dead_letters", "Records sent to the dead-letter topic", ["worker", "reason"], registry=r
        )
        self.join_outcomes = Counter(
            f"{NS}_join_outcomes", "Join results by outcome", ["outcome"], registry=r
        )
        self.late_records = Counter(
            f"{NS}_late_records", "Records behind the watermark by more than the allowance", ["worker", "topic"], registry=r
        )
        self.consumer_lag = Gauge(
            f"{NS}_consumer_lag", "Records behind the end of the log", ["worker", "topic", "partition"], registry=r
        )
        self.processing_latency = Histogram(
            f"{NS}_processing_latency_seconds", "Time from record append to processed", ["worker"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.feature_freshness = Histogram(
            f"{NS}_feature_freshness_seconds",
            "Time from an event entering Kafka to its effect being readable in the online store",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.duplicates = Counter(
            f"{NS}_duplicates", "Records dropped as duplicates of one already processed (same event id)",
            ["worker", "topic"], registry=r
        )
        self.store_refills = Counter(
            f"{NS}_store_refills", "Full re-pushes of the online store after it came back without the rows",
            registry=r
        )
        self.features_written = Counter(
            f"{NS}_features_written", "Feature rows pushed to the store", ["view"], registry=r
        )
        self.watermark = Gauge(
            f"{NS}_watermark_seconds", "Event-time watermark of a partition (epoch seconds)", ["worker", "partition"],
            registry=r
        )

    def export_watermarks(self, watermarks: dict[int, float]) -> None:
        """Set the watermark gauge of every partition that has one (call it whenever the join advances)."""
        for part, wm in watermarks.items():
            if wm > -1e18:  # no event seen yet: no series rather than a 1970 watermark
                self.watermark.labels(self.worker, str(part)).set(wm)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose ``/metrics`` on host:port (always loopback by default). Returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class CounterFrom:
    """A Counter child that follows a running total kept elsewhere (an index's change count, a
    de-duplicator's evictions): ``update(total)`` adds what is new. A total that went down (the
    owner was rebuilt) starts counting from there again."""

    def __init__(self, child) -> None:
        self.child = child
        self.seen = 0.0

    def update(self, total: float) -> None:
        if total > self.seen:
            self.child.inc(total - self.seen)
        self.seen = total
