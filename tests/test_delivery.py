"""Outputs a worker commits offsets for are never lost: ``streams.delivery`` (the reliable producer
and the dead-letter writer) against a real broker, with deliveries that fail (injected, and a
broker stopped for longer than the message timeout) and a full local queue."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from core.errors import InvalidRecord
from streams.kafka_io import DeadLetterWriter, ReliableProducer, create_topics, read_topic
from tests.faults import flaky_factory
from tests.harness import wait_for

pytestmark = [pytest.mark.kafka]


def keys_on(bootstrap: str, topic: str) -> Counter:
    return Counter(k.decode() for k, *_ in read_topic(bootstrap, topic, timeout_s=20, idle_s=0.3))


def test_failed_deliveries_and_a_full_queue_are_resent(bootstrap, topic_names):
    create_topics(bootstrap, [topic_names.examples], 3)
    flaky = flaky_factory(fail_first=7, buffer_errors=4)
    p = ReliableProducer(bootstrap, name="test", raw_factory=flaky, block_s=0.0)
    for i in range(60):
        p.produce(topic_names.examples, f"v{i}".encode(), key=f"k{i}")
    assert p.outstanding > 0
    assert p.confirm(30)
    assert p.outstanding == 0 and p.failures == 7 and p.resent >= 7 + 4
    (raw,) = flaky.instances
    assert len(raw.failed) == 7  # these never reached the broker the first time
    got = keys_on(bootstrap, topic_names.examples)
    assert got == Counter({f"k{i}": 1 for i in range(60)})


def test_dead_letters_outlive_a_broker_stopped_longer_than_the_message_timeout(fresh_broker, topic_names):
    b = fresh_broker.start()
    create_topics(b.bootstrap, [topic_names.dead_letter], 1)
    w = DeadLetterWriter(b.bootstrap, topic_names.dead_letter, worker="test", message_timeout_ms=1500,
                         socket_timeout_ms=1000)
    err = InvalidRecord("malformed_json", "bad")
    for off in range(5):
        w.write("clicks", 0, off, b"{x", err)
    assert w.confirm(30)
    fresh_broker.stop()
    for off in range(5, 12):
        w.write("clicks", 0, off, b"{x", err)
    # librdkafka gives up on them after the message timeout: the writer keeps them
    wait_for(lambda: (w.producer.poll(0.2), w.producer.failures)[1] >= 7, 30, what="delivery failures")
    assert not w.confirm(0.5) and w.outstanding == 7
    fresh_broker.start()
    assert w.confirm(60), f"{w.outstanding} dead letters still undelivered"
    got = keys_on(b.bootstrap, topic_names.dead_letter)
    assert set(got) == {f"clicks:0:{o}" for o in range(12)}
    assert all(json.loads(v)["reason"] == "malformed_json"
               for _k, v, *_ in read_topic(b.bootstrap, topic_names.dead_letter, timeout_s=10))
