"""Metrics of the online service (Prometheus, one registry per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics import LATENCY_BUCKETS, NS

FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("query", "retrieve", "features", "ad_rank", "creative_rank", "rank", "assemble", "log", "total")


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.stage_latency = Histogram(
            f"{NS}_serve_stage_latency_seconds", "Time spent per pipeline stage of POST /v1/ads "
            "(rank = ad and creative ranking together; total = the whole pipeline)", ["stage"],
            buckets=FAST_BUCKETS, registry=r)
        self.requests = Counter(
            f"{NS}_serve_requests", "Ad requests by outcome (ok, degraded, invalid, error)", ["outcome"],
            registry=r)
        self.candidates = Histogram(
            f"{NS}_serve_candidates", "Candidate ads per request",
            buckets=(0, 1, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.degraded = Counter(
            f"{NS}_serve_degraded", "Responses served with a degraded component", ["component"], registry=r)
        self.feature_read = Histogram(
            f"{NS}_serve_feature_read_seconds", "Online feature read per request (user + all candidates)",
            buckets=FAST_BUCKETS, registry=r)
        self.model_age = Gauge(
            f"{NS}_serve_model_age_seconds", "Age of the served model version (now - created_at)",
            ["model"], registry=r)
        self.model_version = Gauge(
            f"{NS}_serve_model_version", "Number of the served model version (v000012 -> 12; 0 = none)",
            ["model"], registry=r)
        self.model_swaps = Counter(
            f"{NS}_serve_model_swaps", "Model versions swapped in", ["model"], registry=r)
        self.impressions_logged = Counter(
            f"{NS}_serve_impressions_logged", "Impression records handed to the event sink", registry=r)
        self.impression_log_dropped = Counter(
            f"{NS}_serve_impression_log_dropped", "Impression records lost by the event sink "
            "(undelivered and the on-disk spool full or absent)", registry=r)
        self.impression_log_spooled = Counter(
            f"{NS}_serve_impression_log_spooled", "Impression records written to the on-disk spool "
            "(the broker did not take them in time); sent again once it answers", registry=r)
        self.impression_log_spool_bytes = Gauge(
            f"{NS}_serve_impression_log_spool_bytes", "Bytes waiting in the impression spool", registry=r)
        self.impression_log_pending = Gauge(
            f"{NS}_serve_impression_log_pending", "Impression records waiting for delivery", registry=r)
        self.impression_log_lag = Gauge(
            f"{NS}_serve_impression_log_lag_seconds", "Latest delivery time of an impression record "
            "(handed to the sink -> acknowledged by the broker)", registry=r)
        self.inventory_changes = Counter(
            f"{NS}_serve_inventory_changes", "Bidword-inventory changes applied to the index", registry=r)
        self.index_ads = Gauge(f"{NS}_serve_index_ads", "Live ads in the index", registry=r)
        self.ad_ranker = Counter(
            f"{NS}_serve_ad_ranker", "Requests by the ad ranker chosen (ctr, crossdomain) and why (cold, warm, "
            "no_history_store, history_failed, no_model, failed)", ["ranker", "reason"], registry=r)
        self.creatives_gated = Counter(
            f"{NS}_serve_creatives_gated", "Candidate creatives held back by their gate verdict", registry=r)

    @staticmethod
    def buckets() -> tuple[float, ...]:
        return LATENCY_BUCKETS
