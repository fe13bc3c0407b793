"""Small ports between layers: interfaces that an edge implements and another edge uses.

``online/`` never imports Kafka clients; it logs what it served through an :class:`EventSink`
that the command line wires to a Kafka producer from ``streams/`` (or to a list in unit tests).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class EventSink(Protocol):
    """Fire-and-forget delivery of encoded events to a topic.

    ``send`` must not block the caller on the network and must not raise when the broker is down:
    it buffers (bounded) or drops, and counts what it dropped (``dropped``).
    """

    def send(self, topic: str, key: bytes | str | None, value: bytes) -> None: ...

    def flush(self, timeout_s: float = 5.0) -> int: ...

    @property
    def dropped(self) -> int: ...


class ListSink:
    """An in-memory :class:`EventSink` for unit tests."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | str | None, bytes]] = []
        self._dropped = 0

    def send(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        self.records.append((topic, key, value))

    def flush(self, timeout_s: float = 5.0) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return self._dropped
