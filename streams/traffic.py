"""Simulated users: send ad requests to the online service and click what they like.

``simulate_traffic`` draws requests from the synthetic world's users and queries
(:meth:`core.world.World.sample_request`), POSTs them to ``/v1/ads``, and for every served ad
samples a click from the world's ground truth, ``World.true_ctr`` (attractiveness × position bias),
and a conversion from ``World.conversion_prob``. Clicks are produced to the ``clicks`` topic
(conversions to ``conversions``) keyed by request id, at their own event time (impression time +
1 s + Exp(click delay)): a heap holds them until the wall clock reaches them, as a real click log
would deliver them. The service logs the impressions itself, so the joiner sees exactly what was
served, and the whole system learns from its own traffic.

Event time is the wall clock (the service stamps impressions with the request's
``context.event_time``), so the workers' clock-skew checks hold.

Everything measured comes back in a :class:`TrafficReport` (requests, errors, latency
percentiles, served and clicked impressions, the true expected CTR of what was served, the model
versions seen, per time bucket, and how many clicks and conversions reached Kafka or failed to),
which the demo prints and plots.

After the requests, the clicks still dated in the future are produced at their time
(``wait_for_clicks``, at most ``max_wait_s``; what is left then is produced at once): users click
1 s + Exp(click delay) after an ad is shown, conversions later still, so a 60 s run can wait a
minute or two more. ``on_wait`` hears what is left while it waits.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.events import Click, Conversion, encode
from core.settings import TopicNames
from core.world import World
from streams.kafka_io import make_producer, produce_json

log = logging.getLogger(__name__)


@dataclass
class Bucket:
    """What happened in one time bucket of the simulation."""

    start_s: float
    requests: int = 0
    errors: int = 0
    impressions: int = 0
    clicks: int = 0
    expected_clicks: float = 0.0  # Σ true click probability of what was served (low-variance CTR)
    latencies_ms: list[float] = field(default_factory=list)
    versions: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([math.nan])
        return {
            "start_s": round(self.start_s, 1),
            "requests": self.requests,
            "errors": self.errors,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": self.clicks / self.impressions if self.impressions else None,
            "expected_ctr": self.expected_clicks / self.impressions if self.impressions else None,
            "latency_p50_ms": float(np.nanpercentile(lat, 50)) if self.latencies_ms else None,
            "latency_p99_ms": float(np.nanpercentile(lat, 99)) if self.latencies_ms else None,
            "model_versions": dict(self.versions),
        }


@dataclass
class TrafficReport:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    expected_clicks: float = 0.0
    degraded: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)  # (request_id, ad_id, clicked) per served ad
    seconds: float = 0.0
    wait_seconds: float = 0.0  # after the requests: waiting for clicks dated in the future
    produced: int = 0  # click and conversion records handed to the producer
    delivered: int = 0  # ... acknowledged by the broker
    delivery_failures: int = 0  # ... reported failed by the producer, or still undelivered at the end
    delivery_error: str | None = None

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([math.nan])
        pct = {f"latency_p{p}_ms": (float(np.percentile(lat, p)) if self.latencies_ms else None) for p in (50, 90, 99)}
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
            "impressions": self.impressions,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "ctr": self.clicks / self.impressions if self.impressions else None,
            "expected_ctr": self.expected_clicks / self.impressions if self.impressions else None,
            "requests_per_s": self.requests / self.seconds if self.seconds else None,
            **pct,
            "degraded": dict(self.degraded),
            "model_versions": dict(self.versions),
            "seconds": round(self.seconds, 1),
            "wait_seconds": round(self.wait_seconds, 1),
            "clicks_produced": self.produced,
            "clicks_delivered": self.delivered,
            "delivery_failures": self.delivery_failures,
            "delivery_error": self.delivery_error,
            "buckets": [b.summary() for b in self.buckets],
        }


class _ClickScheduler:
    """Produces clicks and conversions when the wall clock reaches their event time."""

    def __init__(self, bootstrap: str, topics: TopicNames, delivery_timeout_s: float = 30.0) -> None:
        self.delivery_timeout_s = delivery_timeout_s
        self.producer = make_producer(bootstrap, message_timeout_ms=int(delivery_timeout_s * 1000))
        self.produced = 0
        self.topics = topics
        self._heap: list[tuple[float, int, str, str, bytes]] = []
        self._seq = 0
        self._lock = threading.Lock()

    def schedule(self, at: float, topic: str, key: str, value: bytes) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, topic, key, value))

    def due(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        n = 0
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, _, topic, key, value = heapq.heappop(self._heap)
                produce_json(self.producer, topic, key, value, max_wait_s=self.delivery_timeout_s)
                n += 1
        self.produced += n
        return n

    def pending(self) -> tuple[int, float | None]:
        """(records not produced yet, event time of the last one)."""
        with self._lock:
            return len(self._heap), (max(h[0] for h in self._heap) if self._heap else None)

    def close(self, wait: bool, timeout_s: float = 120.0,
              on_wait: Callable[[int, float], None] | None = None, every_s: float = 10.0) -> float:
        """Produce what is left: at its time (``wait``, at most ``timeout_s``) or now; then flush.
        ``on_wait(left, seconds until the last is due)`` is called when the wait starts and every
        ``every_s``. Returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        said = -math.inf
        while wait and self._heap and time.monotonic() < deadline:
            self.due()
            left, last = self.pending()
            if on_wait is not None and left and time.monotonic() - said >= every_s:
                said = time.monotonic()
                on_wait(left, max(0.0, (last or 0.0) - time.time()))
            time.sleep(0.05)
        waited = time.monotonic() - t0
        self.due(now=math.inf)
        self.producer.flush(self.delivery_timeout_s)
        return waited

    def delivery(self) -> tuple[int, int, str | None]:
        """(delivered, failed or still undelivered, last error)."""
        p = self.producer
        err = p.last_error.str() if getattr(p, "last_error", None) is not None else None
        undelivered = len(p)
        if undelivered and err is None:
            err = f"{undelivered} records not acknowledged within {self.delivery_timeout_s:g}s (is the broker up?)"
        return p.delivered, p.errors + undelivered, err


def simulate_traffic(
    url: str,
    world: World,
    bootstrap: str,
    topics: TopicNames | None = None,
    *,
    duration_s: float | None = 60.0,
    requests: int | None = None,
    rate: float = 20.0,
    slots: int = 4,
    concurrency: int = 4,
    click_delay_mean_s: float | None = None,
    conversions: bool = True,
    seed: int = 0,
    bucket_s: float = 10.0,
    wait_for_clicks: bool = True,
    keep_served: bool = False,
    stop: threading.Event | None = None,
    on_bucket: Callable[[Bucket], None] | None = None,
    timeout_s: float = 5.0,
    max_wait_s: float = 120.0,
    on_wait: Callable[[int, float], None] | None = None,
    delivery_timeout_s: float = 30.0,
) -> TrafficReport:
    """Send requests at ``rate`` per second for ``duration_s`` seconds (or ``requests`` requests)
    with ``concurrency`` connections; produce the sampled clicks. Never raises on a failed request
    or a failed click delivery: both are counted (and a few messages kept) in the report."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if rate <= 0 or concurrency < 1 or slots < 1:
        raise ValueError("rate, concurrency and slots must be positive")
    if duration_s is None and requests is None:
        raise ValueError("give duration_s or requests")
    topics = topics or TopicNames()
    delay_mean = world.config.click_delay_mean_s if click_delay_mean_s is None else click_delay_mean_s
    rng = random.Random(seed)
    rlock = threading.Lock()
    report = TrafficReport()
    clicks = _ClickScheduler(bootstrap, topics, delivery_timeout_s)
    t_start = time.monotonic()
    stop = stop or threading.Event()
    client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s,
                          limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))

    def bucket_at(elapsed: float) -> Bucket:
        with rlock:
            i = int(elapsed // bucket_s)
            while len(report.buckets) <= i:
                b = Bucket(start_s=len(report.buckets) * bucket_s)
                report.buckets.append(b)
                if on_bucket is not None and len(report.buckets) > 1:
                    on_bucket(report.buckets[-2])
            return report.buckets[i]

    def one(req_no: int) -> None:
        with rlock:
            t = time.time()
            req = world.sample_request(rng, t)
            u_click = [rng.random() for _ in range(slots)]
            u_conv = [rng.random() for _ in range(slots)]
            delays = [1.0 + rng.expovariate(1.0 / delay_mean) if delay_mean > 0 else 1.0 for _ in range(slots)]
        rid = f"sim-{seed}-{req_no}-{uuid.uuid4().hex[:8]}"
        body = {"request_id": rid, "user_id": req.user_id, "query": req.query, "slots": slots,
                "domain": req.domain,
                "context": {"event_time": t, "segment": world.users[req.user_index].segment}}
        t0 = time.perf_counter()
        try:
            resp = client.post("/v1/ads", json=body)
            ms = (time.perf_counter() - t0) * 1000
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            data = resp.json()
        except Exception as e:  # an error is a measurement, not a reason to stop
            with rlock:
                report.requests += 1
                report.errors += 1
                if len(report.error_samples) < 20:
                    report.error_samples.append(str(e)[:300])
            b = bucket_at(time.monotonic() - t_start)
            with rlock:
                b.requests += 1
                b.errors += 1
            return
        b = bucket_at(time.monotonic() - t_start)
        ads = data.get("ads", [])
        version = str(data.get("model_versions", {}).get("ctr", "?"))
        n_click = n_conv = 0
        exp = 0.0
        served = []
        for i, ad in enumerate(ads):
            pos = int(ad.get("position", i))
            try:
                p = world.true_ctr(req.user_id, req.query, ad["ad_id"], ad["creative_id"], pos, t, req.domain)
            except (KeyError, IndexError, ValueError):
                p = 0.0  # an ad or creative the world does not know: never clicked
            exp += p
            clicked = u_click[i % slots] < p
            if clicked:
                n_click += 1
                ct = t + delays[i % slots]
                ev = Click(request_id=rid, event_time=ct, ad_id=ad["ad_id"], user_id=req.user_id,
                           creative_id=ad.get("creative_id", ""), query=req.query,
                           bidword=ad.get("bidword", ""), category=ad.get("category", ""))
                clicks.schedule(ct, topics.clicks, rid, encode(ev))
                if conversions and u_conv[i % slots] < world.conversion_prob(req.user_id, ad["ad_id"]):
                    n_conv += 1
                    cv = Conversion(request_id=rid, event_time=ct + 1.0 + delays[i % slots], ad_id=ad["ad_id"],
                                    user_id=req.user_id, value=round(float(ad.get("bid", 1.0)) * 10, 2))
                    clicks.schedule(cv.event_time, topics.conversions, rid, encode(cv))
            if keep_served:
                served.append({"request_id": rid, "ad_id": ad["ad_id"], "clicked": int(clicked),
                               "position": pos, "version": version})
        with rlock:
            report.requests += 1
            report.ok += 1
            report.impressions += len(ads)
            report.clicks += n_click
            report.conversions += n_conv
            report.expected_clicks += exp
            report.latencies_ms.append(ms)
            report.versions[version] += 1
            for d in data.get("degraded", []):
                report.degraded[str(d)] += 1
            report.served.extend(served)
            b.requests += 1
            b.impressions += len(ads)
            b.clicks += n_click
            b.expected_clicks += exp
            b.latencies_ms.append(ms)
            b.versions[version] += 1

    interval = 1.0 / rate
    sent = 0
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="traffic") as pool:
            futures = []
            while not stop.is_set():
                elapsed = time.monotonic() - t_start
                if duration_s is not None and elapsed >= duration_s:
                    break
                if requests is not None and sent >= requests:
                    break
                target = sent * interval
                if target > elapsed:
                    clicks.due()
                    time.sleep(min(target - elapsed, 0.05))
                    continue
                futures.append(pool.submit(one, sent))
                sent += 1
                if len(futures) > 4 * concurrency:  # bounded: never queue more than we can send
                    futures[0].result()
                    futures = [f for f in futures if not f.done()]
                clicks.due()
            for f in futures:
                f.result()
        if on_bucket is not None and report.buckets:
            on_bucket(report.buckets[-1])  # the last bucket, before the wait for clicks
    finally:
        report.seconds = time.monotonic() - t_start
        client.close()
        try:
            report.wait_seconds = clicks.close(wait=wait_for_clicks and not stop.is_set(), timeout_s=max_wait_s,
                                               on_wait=on_wait)
        finally:
            report.produced = clicks.produced
            report.delivered, report.delivery_failures, report.delivery_error = clicks.delivery()
    return report
