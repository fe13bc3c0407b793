"""Shared fixtures: real servers on 127.0.0.1 and per-test unique topic names.

- ``kafka_broker`` (session): an :class:`~streams.broker.EmbeddedBroker` (Apache Kafka, KRaft) on free
  ports in a temporary directory. ``ADSTREAM_TEST_BOOTSTRAP=host:port`` uses that cluster instead
  (an :class:`~tests.harness.ExternalBroker`). ``ADSTREAM_TEST_BROKER_KIND=tansu`` runs the fallback.
- ``fresh_broker`` (function): a broker of its own, for tests that kill or restart it.
- ``redis_server`` (session): Debian's ``redis-server`` (skipped with a clear message if missing; a
  failure under ``make test`` and CI, see below).

Hygiene, for every run:

- The tests run in a temporary working directory (relative paths such as the ``.adstream/`` state
  defaults land there), and at the end the repository is checked for files the run left behind:
  any new untracked or ignored file fails the session ("tests write only under temporary
  directories").
- A test whose service is missing (``tests.harness.fail_service_missing``) fails, saying what is
  missing: never a skip, never a green run without the services.
- ``unique_topic_prefix`` / ``topic_names`` / ``kafka_settings``: names no other test uses, so tests
  on the shared broker do not interfere.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import BrokerSettings, KafkaSettings, TopicNames
from streams.broker import EmbeddedBroker
from tests.harness import ExternalBroker, RedisServer, RedisUnavailable, fail_service_missing

ROOT = Path(__file__).resolve().parents[1]


# ---- tests write only under temporary directories --------------------------------------------

_IGNORE_LEFT = ("__pycache__", ".pytest_cache", ".egg-info", ".venv")


def _repo_leftovers() -> set[str] | None:
    """Untracked and ignored paths in the repository (None when git cannot tell)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored", "--untracked-files=all"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    paths = set()
    for line in out.stdout.splitlines():
        if line[:2] in ("??", "!!"):
            path = line[3:].strip().strip('"')
            if not any(part in path for part in _IGNORE_LEFT):
                paths.add(path)
    return paths


def pytest_sessionstart(session):
    session.config._adstream_left_before = _repo_leftovers()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_adstream_left_before", None)
    after = _repo_leftovers()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (f"the tests left {len(new)} files in the repository (tests write only under temporary "
               f"directories): {new[:10]}")
        if tr is not None:
            tr.write_line("ERROR: " + msg, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _run_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Relative paths (``.adstream/`` defaults, ``.hypothesis/``) resolve under a temporary
    directory, not the repository."""
    work = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(work)
    try:  # hypothesis fixed its default home (cwd/.hypothesis) when the pytest plugin imported it
        from hypothesis.configuration import set_hypothesis_home_dir
        set_hypothesis_home_dir(work / ".hypothesis")
    except ImportError:
        pass
    try:
        yield
    finally:
        os.chdir(old)


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
        fail_service_missing(str(e))
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
