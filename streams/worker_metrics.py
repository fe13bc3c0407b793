"""Prometheus metrics of the stream model worker (``streams.model_worker``), labelled by model name.

Names keep the ``adstream_trainer_`` prefix the dashboards know; ``name`` is the registry name of
the model (or of the job, for job-wide counters); ``model`` is the role on a window
(``candidate``, ``serving``, ``shadow``). Every numeric key of a model's ``score()`` goes to
``adstream_trainer_window_score{name, model, metric}``; AUC, LogLoss and calibration also have
their own gauges (dashboards).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

from prometheus_client import Counter, Gauge

from core.metrics import NS, CounterFrom, WorkerMetrics

NAMED_SCORES = ("auc", "logloss", "calibration")


class ModelWorkerMetrics:
    """The worker metrics (records in, dead letters, lag) plus the model worker's own, on one registry."""

    def __init__(self, worker_metrics: WorkerMetrics | None = None, worker: str = "trainer") -> None:
        self.worker = worker_metrics or WorkerMetrics(worker)
        r = self.registry = self.worker.registry
        p = f"{NS}_trainer"
        self.examples_trained = Counter(f"{p}_examples_trained", "Examples trained on", ["name"], registry=r)
        self.duplicates = Counter(f"{p}_duplicates", "Examples dropped as duplicates (same key)", ["name"],
                                  registry=r)
        self.windows_trained = Counter(f"{p}_windows_trained", "Windows trained", ["name"], registry=r)
        self.suspect_windows = Counter(f"{p}_suspect_windows", "Windows the label-rate guard held as suspect "
                                       "(their candidate is rejected)", ["name"], registry=r)
        self.gate_decisions = Counter(f"{p}_gate_decisions", "Gate decisions by outcome", ["name", "outcome"],
                                      registry=r)
        self.window_score = Gauge(f"{p}_window_score", "A score() value on the latest window before training on it",
                                  ["name", "model", "metric"], registry=r)
        self.window_auc = Gauge(f"{p}_window_auc", "AUC on the latest window before training on it",
                                ["name", "model"], registry=r)
        self.window_logloss = Gauge(f"{p}_window_logloss", "LogLoss on the latest window", ["name", "model"],
                                    registry=r)
        self.window_calibration = Gauge(f"{p}_window_calibration", "Predicted / observed clicks on the latest window",
                                        ["name", "model"], registry=r)
        self.train_seconds = Gauge(f"{p}_window_train_seconds", "Seconds to train the latest window", ["name"],
                                   registry=r)
        self.model_age = Gauge(f"{p}_model_age_seconds", "Now minus the event time of the newest example trained on",
                               ["name"], registry=r)
        self.since_publish = Gauge(f"{p}_seconds_since_publish", "Seconds since this worker last published a version",
                                   ["name"], registry=r)
        self.publish_freshness = Gauge(f"{p}_publish_freshness_seconds",
                                       "At the latest publish: publish time minus the Kafka append time of the newest "
                                       "example in the published model", ["name"], registry=r)
        self.dedup_keys = Gauge(f"{p}_dedup_keys", "Example keys remembered for de-duplication", ["name"], registry=r)
        self.dedup_evicted_early = Counter(f"{p}_dedup_evicted_early", "Keys forgotten before the event-time horizon "
                                         "because of dedup_max_keys (a re-emitted example may train twice)",
                                         ["name"], registry=r)
        self.checkpoints_postponed = Counter(f"{p}_checkpoints_postponed", "Checkpoints postponed because dead "
                                             "letters were not acknowledged yet", ["name"], registry=r)
        self._evicted: dict[str, CounterFrom] = {}
        self.newest_event_time: dict[str, float] = {}
        self.last_publish: dict[str, float] = {}

    def bind(self, job: str, parts: list[str]) -> None:
        """Create the series of a job (zeros) and the age gauges, computed at scrape time."""
        for n in {job, *parts}:
            self.examples_trained.labels(n)
            self.windows_trained.labels(n)
            self.suspect_windows.labels(n)
            self.duplicates.labels(n)
        self.model_age.labels(job).set_function(lambda: time.time() - self.newest_event_time.get(job, math.nan))
        for n in parts:
            for o in ("publish", "reject"):
                self.gate_decisions.labels(n, o)
            self.since_publish.labels(n).set_function(lambda n=n: time.time() - self.last_publish.get(n, math.nan))

    def evicted_early(self, name: str, total: int) -> None:
        """The de-duplicator's running count of keys forgotten early (kept in the checkpoint), as a
        counter: the series appears at its first update, at the restored total, so a restart reads
        as neither a reset nor new evictions."""
        if name not in self._evicted:
            self._evicted[name] = CounterFrom(self.dedup_evicted_early.labels(name))
        self._evicted[name].update(total)

    def set_scores(self, name: str, model: str, scores: Mapping[str, Any]) -> None:
        for k, v in scores.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self.window_score.labels(name, model, k).set(v)
            if k in NAMED_SCORES:
                getattr(self, f"window_{k}").labels(name, model).set(v)

    def serve(self, port: int, host: str = "127.0.0.1"):
        return self.worker.serve(port, host=host)
