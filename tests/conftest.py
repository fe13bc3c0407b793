"""Shared fixtures: real servers on 127.0.0.1 and per-test unique topic names.

- ``kafka_broker`` (session): an :class:`~streams.broker.EmbeddedBroker` (Apache Kafka, KRaft) on free
  ports in a temporary directory. ``ADSTREAM_TEST_BOOTSTRAP=host:port`` uses that cluster instead
  (an :class:`~tests.harness.ExternalBroker`). ``ADSTREAM_TEST_BROKER_KIND=tansu`` runs the fallback.
- ``fresh_broker`` (function): a broker of its own, for tests that kill or restart it.
- ``redis_server`` (session): Debian's ``redis-server`` (skipped with a clear message if missing).
- ``unique_topic_prefix`` / ``topic_names`` / ``kafka_settings``: names no other test uses, so tests
  on the shared broker do not interfere.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from core.settings import BrokerSettings, KafkaSettings, TopicNames
from streams.broker import EmbeddedBroker
from tests.harness import ExternalBroker, RedisServer, RedisUnavailable


def _broker_settings() -> BrokerSettings:
    kind = os.environ.get("ADSTREAM_TEST_BROKER_KIND", "kafka")
    return BrokerSettings(kind=kind)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker | ExternalBroker]:
    external = os.environ.get("ADSTREAM_TEST_BOOTSTRAP")
    if external:
        yield ExternalBroker(bootstrap=external)
        return
    broker = EmbeddedBroker(_broker_settings(), data_dir=tmp_path_factory.mktemp("kafka"), port=0)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def bootstrap(kafka_broker: EmbeddedBroker | ExternalBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def fresh_broker(tmp_path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own (not started: the test calls ``start()``); always stopped after."""
    broker = EmbeddedBroker(_broker_settings(), data_dir=tmp_path / "broker", port=0)
    try:
        yield broker
    finally:
        broker.stop(timeout_s=15)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as e:
        pytest.skip(str(e))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def unique_topic_prefix(request: pytest.FixtureRequest) -> str:
    """``t-<test name>-<random>-``: valid in topic names, unique per test run."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"t-{name}-{uuid.uuid4().hex[:6]}-"


@pytest.fixture
def topic_names(unique_topic_prefix: str) -> TopicNames:
    """The project's topics, each prefixed with :func:`unique_topic_prefix`."""
    return TopicNames(**{k: unique_topic_prefix + v for k, v in TopicNames().model_dump().items()})


@pytest.fixture
def kafka_settings(bootstrap: str, topic_names: TopicNames) -> KafkaSettings:
    """KafkaSettings pointing at the test broker with this test's unique topic names (not yet created)."""
    return KafkaSettings(bootstrap=bootstrap, topics=topic_names)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread: much faster than two on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
