"""``replay`` into a real Kafka broker: routing, keys, per-partition order, counts, pacing, CLI."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from adstream.cli import main
from core.errors import ConfigError
from core.events import BidwordChange, Click, Conversion, Impression, decode, encode
from core.settings import TopicNames
from core.world import DriftConfig, World, WorldConfig
from streams.kafka_io import create_topics, read_topic
from streams.replay import Pacer, replay, replay_topics, summary_line

pytestmark = pytest.mark.kafka


def _events(duration_s: float = 300.0) -> list:
    world = World(WorldConfig(seed=21, drift=DriftConfig(horizon_s=duration_s)))
    return list(world.generate(duration_s=duration_s, requests_per_s=5, seed=21))


def test_replay_routes_keys_and_orders_events(bootstrap: str, topic_names: TopicNames):
    events = _events()
    create_topics(bootstrap, replay_topics(topic_names), partitions=3)
    result = replay(iter(events), bootstrap, topic_names, progress=False)
    assert result["delivery_errors"] == 0
    assert result["events"] == len(events) == result["delivered"]
    want = Counter()
    for e in events:
        want[{Impression: topic_names.impressions, Click: topic_names.clicks,
              Conversion: topic_names.conversions,
              BidwordChange: topic_names.bidword_inventory}[type(e)]] += 1
    assert {t: n for t, n in result["counts"].items() if n} == dict(want)
    assert want[topic_names.bidword_inventory] > 0 and want[topic_names.conversions] > 0

    for topic, cls in [(topic_names.impressions, Impression), (topic_names.clicks, Click),
                       (topic_names.conversions, Conversion),
                       (topic_names.bidword_inventory, BidwordChange)]:
        records = read_topic(bootstrap, topic, timeout_s=30)
        assert len(records) == want[topic]
        sent = Counter(encode(e) for e in events if isinstance(e, cls))
        assert Counter(r[1] for r in records) == sent  # the exact bytes, each once
        last: dict[int, float] = {}
        for key, value, partition, _offset, _ts in records:
            ev = decode(value, cls)
            assert key.decode() == ev.key
            assert ev.event_time >= last.get(partition, 0.0), "event-time order broken in a partition"
            last[partition] = ev.event_time
    # the events of one request share a partition in every topic (co-partitioned by request id)
    imp_part = {decode(r[1]).request_id: r[2] for r in read_topic(bootstrap, topic_names.impressions)}
    for r in read_topic(bootstrap, topic_names.clicks):
        assert imp_part[decode(r[1]).request_id] == r[2]


def test_replay_limit_rate_and_pairs(bootstrap: str, topic_names: TopicNames):
    events = _events(60)
    create_topics(bootstrap, replay_topics(topic_names), partitions=1)
    t0 = time.perf_counter()
    result = replay((("any", e) for e in events), bootstrap, topic_names, rate=1000, limit=400,
                    progress=False)
    elapsed = time.perf_counter() - t0
    assert result["events"] == 400 and result["delivery_errors"] == 0
    assert elapsed >= 0.38  # 400 events at 1000/s
    assert sum(result["counts"].values()) == 400
    assert "replayed 400 events" in summary_line(result)


def test_replay_time_scale_follows_event_time():
    calls = []
    p = Pacer(None, 100.0, lambda timeout: (calls.append(timeout), time.sleep(timeout)))
    t0 = time.perf_counter()
    for t in (1000.0, 1010.0, 1030.0):  # 30 s of event time at 100x = 0.3 s
        p.wait(t)
    assert 0.28 <= time.perf_counter() - t0 < 2.0 and calls
    with pytest.raises(ConfigError):
        Pacer(10, 2.0, lambda _t: None)


def test_cli_replay_into_the_broker(bootstrap: str, topic_names: TopicNames, monkeypatch, capsys):
    for field, name in topic_names.model_dump().items():
        monkeypatch.setenv(f"ADSTREAM_KAFKA__TOPICS__{field.upper()}", name)
    rc = main(["--bootstrap", bootstrap, "replay", "synthetic", "--duration", "60", "--rps", "5",
               "--limit", "500", "--partitions", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "replayed 500 events" in out and "delivery errors=0" in out
    n = sum(len(read_topic(bootstrap, t)) for t in replay_topics(topic_names))
    assert n == 500


def test_cli_replay_requires_existing_topics_when_told(bootstrap: str, topic_names: TopicNames,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("ADSTREAM_KAFKA__TOPICS__IMPRESSIONS", topic_names.impressions)
    rc = main(["--bootstrap", bootstrap, "replay", "synthetic", "--duration", "5", "--no-create-topics",
               "--no-progress"])
    assert rc == 1
    assert "do not exist" in capsys.readouterr().err
