"""Fault injection for tests: producers whose deliveries fail, on top of the real client.

``FlakyProducer`` wraps a real ``confluent_kafka.Producer``. The records chosen by ``fail`` (a
predicate on (topic, key, value), or the first ``fail_first`` records) are never handed to the
broker; their delivery callback reports ``_MSG_TIMED_OUT`` at the next ``poll``/``flush``, exactly
what librdkafka reports when a broker stays away longer than ``message.timeout.ms``.
``buffer_errors`` makes that many ``produce`` calls raise ``BufferError`` first (a full queue).
"""

from __future__ import annotations

from typing import Any, Callable

from confluent_kafka import KafkaError
from confluent_kafka import Producer as RealProducer


class FlakyProducer:
    def __init__(self, config: dict[str, Any], fail_first: int = 0,
                 fail: Callable[[str, Any, Any], bool] | None = None, buffer_errors: int = 0) -> None:
        self._p = RealProducer(config)
        self.fail_left = fail_first
        self.fail = fail
        self.buffer_errors = buffer_errors
        self.failed: list[tuple[str, Any, Any]] = []
        self._reports: list[Callable[[], None]] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, on_delivery=None, **kw: Any) -> None:
        if self.buffer_errors > 0:
            self.buffer_errors -= 1
            raise BufferError("Local: Queue full (injected)")
        drop = False
        if self.fail_left > 0:
            self.fail_left -= 1
            drop = True
        elif self.fail is not None and self.fail(topic, key, value):
            drop = True
        if drop:
            self.failed.append((topic, key, value))
            cb = on_delivery or kw.get("callback")
            if cb is not None:
                err = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out (injected)")
                self._reports.append(lambda: cb(err, None))
            return
        self._p.produce(topic, value=value, key=key, on_delivery=on_delivery, **kw)

    def _report(self) -> int:
        reports, self._reports = self._reports, []
        for r in reports:
            r()
        return len(reports)

    def poll(self, timeout: float = 0.0) -> int:
        return self._report() + self._p.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        self._report()
        return self._p.flush(timeout)

    def __len__(self) -> int:
        return len(self._p) + len(self._reports)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)


def flaky_factory(**kw: Any):
    """A ``Producer`` replacement (``monkeypatch.setattr(module, "Producer", flaky_factory(...))``)
    whose instances share one fault budget; ``.instances`` lists what it built."""
    state = {"fail_first": kw.pop("fail_first", 0), "buffer_errors": kw.pop("buffer_errors", 0)}
    instances: list[FlakyProducer] = []

    def make(config: dict[str, Any], *a: Any, **k: Any) -> FlakyProducer:
        p = FlakyProducer(config, fail_first=state["fail_first"], buffer_errors=state["buffer_errors"], **kw)
        state["fail_first"] = state["buffer_errors"] = 0
        instances.append(p)
        return p

    make.instances = instances  # type: ignore[attr-defined]
    return make
