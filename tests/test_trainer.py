"""The stream trainer against the real broker: windows trained and published to a registry,
metrics, dead letters, de-duplication, exact resume after a crash between checkpoints (in process
and with kill -9), the gate rejecting a poisoned window, and restore validation."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from core.events import Example, encode
from core.settings import KafkaSettings, Settings, TrainerSettings
from streams.kafka_io import create_topics, make_producer, read_topic

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[1]
CTR = {"name": "ctr"}  # the trainer's metrics are labelled by model name

BAD_RECORDS = [
    (b"{not json", "malformed_json"),
    (b'{"v":1,"type":"example","request_id":"x"}', "missing_field"),
    (json.dumps({"v": 1, "type": "impression", "request_id": "x"}).encode(), "unknown_event_type"),
]


def world_examples(n: int, seed: int = 3) -> list[Example]:
    """``n`` realistic examples (the synthetic world, in event-time order) as Example events."""
    from core.world import generate_examples

    df = generate_examples(duration_s=n / 30.0 + 60, requests_per_s=10.0, seed=seed).head(n)
    assert len(df) == n
    out = []
    for r in df.itertuples(index=False):
        out.append(Example(
            request_id=r.request_id, event_time=float(r.event_time), user_id=r.user_id, query=r.query,
            ad_id=r.ad_id, creative_id=r.creative_id, bidword=r.bidword, category=r.category,
            position=int(r.position), bid=float(r.bid), slot=r.slot, domain=r.domain, clicked=int(r.clicked),
            converted=int(r.converted),
            features={"segment": r.segment, "match": r.match, "top_category": r.top_category,
                      "advertiser": r.advertiser, "query_len": int(r.query_len)}))
    return out


def produce(bootstrap: str, topic: str, examples: list[Example], extra: list[tuple[bytes, str]] = ()) -> None:
    p = make_producer(bootstrap)
    for i, ex in enumerate(examples):
        p.produce(topic, encode(ex), key=ex.key)
        p.poll(0)
        if extra and i == len(examples) // 2:
            for raw, _ in extra:
                p.produce(topic, raw, key="bad")
    assert p.flush(30) == 0 and p.errors == 0


def make_settings(bootstrap, topic_names, tmp_path, partitions=3, **trainer) -> Settings:
    base = dict(registry_dir=tmp_path / "registry", checkpoint_dir=tmp_path / "ckpt", window_examples=400,
                min_window=100, batch_size=256, capacity=4096, embedding_dim=4, backbone="dcn")
    return Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=partitions),
                    trainer=TrainerSettings(**{**base, **trainer}))


def windows_of(settings: Settings) -> list[dict]:
    path = Path(settings.trainer.checkpoint_dir) / "windows.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_trains_publishes_dedups_and_dead_letters(bootstrap, topic_names, tmp_path, one_torch_thread):
    from models.registry import ModelRegistry
    from streams.trainer import TrainerMetrics, run_trainer

    create_topics(bootstrap, topic_names.all(), partitions=3)
    exs = world_examples(2000)
    dups = exs[100:160]  # the joiner may re-emit an example: same key, same content
    produce(bootstrap, topic_names.examples, exs + dups, extra=BAD_RECORDS)
    settings = make_settings(bootstrap, topic_names, tmp_path, compare="finetune", idle_exit_s=2.0)
    metrics = TrainerMetrics()
    out = run_trainer(settings, metrics=metrics, metrics_port=0)

    assert out["reason"] == "idle"
    assert out["examples_trained"] == 2000 and out["windows"] == 5
    assert out["duplicates"] == len(dups) and out["dead_letters"] == len(BAD_RECORDS)
    assert out["published"] + out["rejected"] == 4  # window 0 has no candidate to gate

    reg = ModelRegistry(settings.trainer.registry_dir)
    assert reg.latest() == out["serving_version"]
    state, info = reg.load()
    for k in ("window", "auc", "logloss", "calibration", "examples", "event_time_range", "strategy",
              "created_at", "config"):
        assert k in info.meta, k
    assert info.meta["strategy"] == "ddp" and info.meta["config"]["mp"] == "posterior"
    from streams.trainer import learner_from_state

    assert learner_from_state(state).validate_state() == []

    rows = windows_of(settings)
    assert [r["window"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["examples"] for r in rows) == 2000
    assert rows[0]["gate"] == "none" and all(r["gate"] in ("publish", "reject") for r in rows[1:])
    assert out["published"] == sum(r["gate"] == "publish" for r in rows)  # the count the windows file shows
    for r in rows[1:]:
        assert 0.0 < r["auc"] < 1.0 and r["logloss"] > 0 and r["shadow_auc"] is not None
        assert r["shadow_strategy"] == "finetune"

    r = metrics.registry
    assert r.get_sample_value("adstream_trainer_examples_trained_total", CTR) == 2000
    assert r.get_sample_value("adstream_trainer_windows_trained_total", CTR) == 5
    assert r.get_sample_value("adstream_trainer_duplicates_total", CTR) == len(dups)
    gates = sum(r.get_sample_value("adstream_trainer_gate_decisions_total", {**CTR, "outcome": o}) or 0
                for o in ("publish", "reject"))
    assert gates == 4
    assert r.get_sample_value("adstream_trainer_window_auc", {**CTR, "model": "candidate"}) == pytest.approx(rows[-1]["auc"])
    assert r.get_sample_value("adstream_trainer_model_age_seconds", CTR) > 0
    assert r.get_sample_value("adstream_dead_letters_total", {"worker": "trainer", "reason": "malformed_json"}) == 1

    dl = read_topic(bootstrap, topic_names.dead_letter)
    assert Counter(json.loads(v)["reason"] for _k, v, *_ in dl) == Counter(x for _, x in BAD_RECORDS)

    # a restart with nothing new resumes from the checkpoint: nothing is trained again
    out2 = run_trainer(settings, metrics_port=0)
    assert out2["windows_this_run"] == 0 and out2["examples_trained"] == 2000 and out2["records"] == 0


class Crash(Exception):
    pass


@pytest.mark.slow
def test_crash_between_checkpoints_resumes_exactly(bootstrap, topic_names, tmp_path, one_torch_thread):
    from models.registry import ModelRegistry
    from streams.trainer import run_trainer

    create_topics(bootstrap, topic_names.all(), partitions=3)
    exs = world_examples(2400, seed=4)
    produce(bootstrap, topic_names.examples, exs)
    # wide margins: every candidate is published, so window 3's decision moves LATEST before the crash
    settings = make_settings(bootstrap, topic_names, tmp_path, window_examples=300, min_window=50,
                             gate_auc_margin=1.0, gate_logloss_margin=10.0, gate_calibration_margin=10.0)

    def crash_at(k):
        def hook(rec):
            if rec["window"] == k:  # trained (and gated) in memory, not checkpointed yet
                raise Crash(k)
        return hook

    with pytest.raises(Crash):
        run_trainer(settings, metrics_port=0, record_keys=True, on_window=crash_at(3))
    ck = pickle.loads((Path(settings.trainer.checkpoint_dir) / "checkpoint.pkl").read_bytes())
    assert ck["window"] == 3
    s2 = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"max_windows": 2})})
    out = run_trainer(s2, metrics_port=0, record_keys=True)
    assert out["reason"] == "max_windows" and out["windows"] == 5
    s3 = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"idle_exit_s": 2.0})})
    out = run_trainer(s3, metrics_port=0, record_keys=True)
    assert out["windows"] == 8 and out["examples_trained"] == 2400

    rows = windows_of(settings)
    assert [r["window"] for r in rows] == list(range(8))  # none twice, none skipped
    keys = [k for r in rows for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 2400
    assert set(keys) == {e.key for e in exs}
    # the gate decision of window 3 taken before the crash was reused, not stored twice
    reg = ModelRegistry(settings.trainer.registry_dir)
    decided = []
    for rejected in (False, True):
        d = reg.rejected_dir if rejected else reg.versions_dir
        decided += [json.loads((d / v / "meta.json").read_text())["window"] for v in reg.versions(rejected)]
    assert sorted(decided) == list(range(1, 8))
    # the resumed line of window 3 carries the figures of the decision taken before the crash (judged
    # against the version served then), not the candidate compared with itself
    r3 = rows[3]
    assert r3["gate"] == "publish"
    meta3 = json.loads((reg.versions_dir / r3["version"] / "meta.json").read_text())
    assert meta3["window"] == 3 and meta3["serving_version"] not in (None, r3["version"])
    assert r3["judged_against"] == meta3["serving_version"]
    assert (r3["auc"], r3["logloss"]) == (meta3["auc"], meta3["logloss"])
    assert (r3["serving_auc"], r3["serving_logloss"]) == (meta3["serving_auc"], meta3["serving_logloss"])


@pytest.mark.slow
def test_kill_9_and_sigterm_resume(bootstrap, topic_names, tmp_path, one_torch_thread):
    create_topics(bootstrap, topic_names.all(), partitions=2)
    exs = world_examples(3000, seed=6)
    produce(bootstrap, topic_names.examples, exs)
    settings = make_settings(bootstrap, topic_names, tmp_path, partitions=2, window_examples=250, min_window=50)
    cfg = tmp_path / "adstream.yaml"
    cfg.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "streams.trainer", "--config", str(cfg), "--metrics-port", "0", "--idle-exit", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wpath = Path(settings.trainer.checkpoint_dir) / "windows.jsonl"

    def n_windows():
        return len(wpath.read_text().splitlines()) if wpath.exists() else 0

    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    ckpt = Path(settings.trainer.checkpoint_dir) / "checkpoint.pkl"
    while time.monotonic() < deadline and proc.poll() is None and (n_windows() < 2 or not ckpt.exists()):
        time.sleep(0.05)
    assert proc.poll() is None, "the trainer finished before it could be killed; use more examples"
    assert ckpt.exists(), "kill -9 only after a checkpoint (offsets and model) was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    log.close()

    # SIGTERM, in process (one process start-up less): the handler of `python -m streams.trainer`
    # stops at a consistent checkpoint and the exit code is 0
    from streams.trainer import main, run_trainer

    start = n_windows()

    def term_after_two_windows():
        end = time.monotonic() + 60
        while time.monotonic() < end and n_windows() < start + 2:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    old = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=term_after_two_windows, daemon=True)
    killer.start()
    try:
        assert main(["--config", str(cfg), "--metrics-port", "0"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    killer.join(5)
    assert start + 2 <= n_windows() < 12

    s2 = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"idle_exit_s": 2.0})})
    run_trainer(s2, metrics_port=0)
    rows = windows_of(settings)
    assert [r["window"] for r in rows] == list(range(12))
    assert sum(r["examples"] for r in rows) == 3000


@pytest.mark.slow
def test_poisoned_window_is_rejected_and_serving_kept(bootstrap, topic_names, tmp_path, one_torch_thread):
    from models.registry import ModelRegistry
    from streams.trainer import TrainerMetrics, run_trainer

    create_topics(bootstrap, topic_names.all(), partitions=1)  # one partition: windows = produce order
    w = 500
    exs = world_examples(6 * w, seed=5)
    for ex in exs[3 * w:4 * w]:  # window 3: labels flipped
        ex.clicked = 1 - ex.clicked
    produce(bootstrap, topic_names.examples, exs)
    # the default gate (docs/trainer.md, "Gate") on its own: the label-rate guard (which would hold window 3,
    # 95 % clicked) is off here; test_poison_across_two_windows_is_held_by_the_label_guard has it on
    settings = make_settings(bootstrap, topic_names, tmp_path, partitions=1, window_examples=w, idle_exit_s=2.0,
                             label_guard={"ratio": None})
    metrics = TrainerMetrics()
    out = run_trainer(settings, metrics=metrics, metrics_port=0)
    assert out["windows"] == 6
    rows = {r["window"]: r for r in windows_of(settings)}
    # the candidate that learned the poisoned window is scored on window 4 and rejected
    r4 = rows[4]
    assert r4["gate"] == "reject", r4
    # a window of 500 learned with flipped labels barely moves the ranking or the LogLoss (+0.0115
    # here, a hair over the 0.01 margin), but the level of its predictions: the calibration
    # criterion is what rejects it with room to spare (over-prediction 0.59 on a log scale vs 0.4)
    assert "over-prediction" in r4["gate_reason"], r4["gate_reason"]
    assert r4["overprediction"] > r4["serving_overprediction"] + 0.4
    assert r4["serving_version"] == rows[3]["serving_version"]  # serving unchanged by the rejection
    assert r4["reset_to"] == rows[3]["serving_version"]
    reg = ModelRegistry(settings.trainer.registry_dir)
    assert r4["version"] in reg.versions(rejected=True)
    meta = json.loads((reg.rejected_dir / r4["version"] / "meta.json").read_text())
    assert meta["window"] == 4 and meta["trained_through_window"] == 3
    # no published version ever learned from window 3 without the reset
    for v in reg.versions():
        m = reg.info(v).meta
        assert m["trained_through_window"] != 3
    assert out["rejected"] >= 1 and out["resets"] >= 1
    assert metrics.registry.get_sample_value("adstream_trainer_gate_decisions_total",
                                             {**CTR, "outcome": "reject"}) == out["rejected"]
    # after the reset, window 5's candidate (serving + window 4) is healthy again
    assert rows[5]["logloss"] < r4["logloss"]


def poison_across_two_windows(w: int, seed: int) -> tuple[list[Example], set[str]]:
    """Five clean windows of ``w``, then a burst of ``w`` all-clicked examples that lands in the
    middle of window 5 (half of window 5, half of window 6), then clean windows 6-8."""
    exs = world_examples(9 * w, seed=seed)
    burst = world_examples(w, seed=seed + 100)
    for i, ex in enumerate(burst):
        ex.request_id, ex.clicked = f"burst-{i}", 1
    at = 5 * w + w // 2
    return exs[:at] + burst + exs[at:8 * w], {ex.key for ex in burst}


@pytest.mark.slow
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
def test_poison_across_two_windows_is_held_by_the_label_guard(bootstrap, topic_names, tmp_path, one_torch_thread,
                                                              guard):
    """A click burst split across two windows fools the next-window gate (the candidate that learned
    the first half is judged on the second half, and wins there); the label-rate guard holds both
    windows, so no version that learned them is published."""
    from models.registry import ModelRegistry
    from streams.trainer import TrainerMetrics, run_trainer

    create_topics(bootstrap, topic_names.all(), partitions=1)  # one partition: windows = produce order
    w = 300
    exs, burst = poison_across_two_windows(w, seed=21)
    produce(bootstrap, topic_names.examples, exs)
    settings = make_settings(bootstrap, topic_names, tmp_path, partitions=1, window_examples=w, idle_exit_s=2.0,
                             label_guard={"ratio": 4.0 if guard else None})
    metrics = TrainerMetrics()
    out = run_trainer(settings, metrics=metrics, metrics_port=0)
    assert out["windows"] == 9
    rows = {r["window"]: r for r in windows_of(settings)}
    assert rows[5]["ctr"] > 0.4 and rows[6]["ctr"] > 0.4  # both halves of the burst
    reg = ModelRegistry(settings.trainer.registry_dir)
    learned_poison = [v for v in reg.versions() if reg.info(v).meta["trained_through_window"] in (5, 6)]
    if not guard:
        # the weakness the guard is for: the gate publishes a candidate that learned the burst
        assert learned_poison, [(r["window"], r["gate"], r.get("gate_reason")) for r in rows.values()]
        return
    assert [k for k, r in rows.items() if r.get("suspect")] == [5, 6]
    for k in (6, 7):  # the candidates that learned windows 5 and 6: rejected, learner reset to serving
        assert rows[k]["gate"] == "reject" and "held as suspect" in rows[k]["gate_reason"], rows[k]
        assert rows[k]["reset_to"] == rows[k]["serving_version"]
    assert not learned_poison
    assert rows[8]["gate"] == "publish"  # the clean window after it learns and publishes again
    assert metrics.registry.get_sample_value("adstream_trainer_suspect_windows_total", CTR) == 2


@pytest.mark.slow
def test_event_time_windows(bootstrap, topic_names, tmp_path, one_torch_thread):
    from streams.trainer import run_trainer

    create_topics(bootstrap, topic_names.all(), partitions=1)
    exs = world_examples(1500, seed=8)  # about 30 examples per second of event time
    produce(bootstrap, topic_names.examples, exs)
    settings = make_settings(bootstrap, topic_names, tmp_path, partitions=1, window_seconds=10.0, min_window=1,
                             idle_exit_s=2.0)
    out = run_trainer(settings, metrics_port=0)
    rows = windows_of(settings)
    buckets = [math.floor(r["event_time_min"] / 10.0) for r in rows]
    assert len(rows) == out["windows"] >= 4
    assert all(math.floor(r["event_time_max"] / 10.0) == b for r, b in zip(rows, buckets))
    assert buckets == sorted(set(buckets))  # one bucket per window, in order
    assert sum(r["examples"] for r in rows) == 1500 and rows[-1]["partial"]


def test_corrupt_or_invalid_checkpoint_is_a_clear_error(tmp_path, topic_names):
    import torch

    from streams.trainer import StreamTrainer

    settings = make_settings("127.0.0.1:1", topic_names, tmp_path)
    ckpt = Path(settings.trainer.checkpoint_dir) / "checkpoint.pkl"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x05garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        StreamTrainer(settings)._restore()
    ckpt.write_bytes(pickle.dumps({"version": 1, "topic": topic_names.examples, "learner": "not a state"}))
    with pytest.raises(ConfigError, match="inconsistent"):
        StreamTrainer(settings)._restore()

    t = StreamTrainer(settings)
    with torch.no_grad():
        next(p for n, p in t.learner.net.named_parameters() if "ebc" not in n).fill_(math.nan)
    t.checkpoint()
    with pytest.raises(ConfigError, match="invalid model"):
        StreamTrainer(settings)._restore()

    other = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"strategy": "finetune"})})
    with pytest.raises(ConfigError, match="different model configuration"):
        StreamTrainer(other)._restore()

    wrong_topic = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"topics": settings.kafka.topics.model_copy(update={"examples": "other"})})})
    with pytest.raises(ConfigError, match="belongs to topic"):
        StreamTrainer(wrong_topic)._restore()


def test_cli_options_and_models_command(tmp_path, capsys):
    from adstream.cli import main
    from models.registry import ModelRegistry

    assert main(["train", "--window-examples", "0", "--checkpoint-dir", str(tmp_path)]) == 1
    assert "invalid trainer options" in capsys.readouterr().err
    assert main(["train", "--label-guard", "0.5", "--checkpoint-dir", str(tmp_path)]) == 1
    assert "label_guard.ratio" in capsys.readouterr().err
    import argparse

    from streams.label_guard import label_guard
    from streams.trainer import add_arguments, settings_for
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = Settings()
    assert label_guard(base.trainer.label_guard).ratio == 4.0  # on by default
    assert label_guard(settings_for(p.parse_args(["--label-guard", "0"]), base).trainer.label_guard) is None
    guard = label_guard(settings_for(p.parse_args(["--label-guard", "6"]), base).trainer.label_guard)
    assert guard.ratio == 6.0 and guard.history == 8
    reg = ModelRegistry(tmp_path / "reg")
    reg.publish({"w": 1}, {"window": 1, "auc": 0.7, "logloss": 0.2, "strategy": "ddp"})
    reg.reject({"w": 2}, {"window": 2, "auc": 0.5, "logloss": 0.9, "strategy": "ddp"})
    reg.publish({"w": 3}, {"window": 3, "auc": 0.71, "logloss": 0.19, "strategy": "ddp"})
    assert main(["models", "--registry", str(tmp_path / "reg"), "list"]) == 0
    text = capsys.readouterr().out
    assert "v000002" in text and "rejected" in text and "LATEST (v000003)" in text
    assert main(["models", "--registry", str(tmp_path / "reg"), "rollback"]) == 0
    assert reg.latest() == "v000001"
    assert main(["models", "--registry", str(tmp_path / "reg"), "promote", "v000003"]) == 0
    assert reg.latest() == "v000003"
    assert main(["models", "--registry", str(tmp_path / "reg"), "promote", "v000002"]) == 1
