"""The one stream model worker against the real broker, with tiny pure models (no torch): a job that
publishes two registry names per window (joint and per-part gate decisions, reset to both serving
versions, each part served by the generic loader), the figures of a decision reused after a crash
between publish and checkpoint, de-dup state across a restart with a re-emitted backlog, and dead
letters that are never lost (failed deliveries and a full queue)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.settings import KafkaSettings
from models.registry import ModelRegistry
from models.stream_model import Criterion, Gate
from online.models import ModelLoader
from streams.kafka_io import create_topics, read_topic
from streams.model_worker import ModelWorker, WorkerConfig
from streams.worker_metrics import ModelWorkerMetrics
from tests.test_trainer import BAD_RECORDS, produce, world_examples

pytestmark = [pytest.mark.kafka]

TARGETS = {"clicked": lambda r: float(r["clicked"]), "top": lambda r: float(r["position"] == 0)}


class Part:
    """Predicts one rate (the mean of a target over the last window learned); gated on the Brier score."""

    gate = Gate.of(Criterion("brier", higher_is_better=False, margin=0.1, required=True))

    def __init__(self, name: str, target: str, p: float = 0.5) -> None:
        self.name, self.target, self.p = name, target, p

    def learn(self, records):
        ys = [TARGETS[self.target](r) for r in records]
        self.p = sum(ys) / len(ys)
        return {"loss": self.p}

    def score(self, records):
        ys = [TARGETS[self.target](r) for r in records]
        return {"brier": sum((y - self.p) ** 2 for y in ys) / len(ys), "rate": sum(ys) / len(ys)}

    def predict(self, inputs):
        return [self.p for _ in inputs]

    def state(self):
        return {"name": self.name, "target": self.target, "p": self.p}

    @classmethod
    def from_state(cls, state):
        return cls(state["name"], state["target"], float(state["p"]))


class Joint:
    """A job with two parts trained together (like JAC's ad ranker and creative ranker)."""

    name = "toy-joint"
    resets: list[dict] = []

    def __init__(self, ad: Part | None = None, creative: Part | None = None, learned: int = 0) -> None:
        self.ad = ad or Part("toy-ad", "clicked")
        self.creative = creative or Part("toy-creative", "top")
        self.learned = learned

    def parts(self):
        return {self.ad.name: self.ad, self.creative.name: self.creative}

    def learn(self, records):
        self.learned += 1
        return {"loss": self.ad.learn(records)["loss"] + self.creative.learn(records)["loss"]}

    def score(self, records):
        return {**self.ad.score(records), "creative_brier": self.creative.score(records)["brier"]}

    def predict(self, inputs):
        return self.ad.predict(inputs), self.creative.predict(inputs)

    def state(self):
        return {"ad": self.ad.state(), "creative": self.creative.state(), "learned": self.learned}

    @classmethod
    def from_state(cls, state):
        return cls(Part.from_state(state["ad"]), Part.from_state(state["creative"]), int(state["learned"]))

    def reset_to(self, states):
        Joint.resets.append({n: s["p"] for n, s in states.items()})
        if self.ad.name in states:
            self.ad = Part.from_state(states[self.ad.name])
        if self.creative.name in states:
            self.creative = Part.from_state(states[self.creative.name])

    def fingerprint(self):
        return {"kind": "toy-joint", "parts": sorted(self.parts())}


class Single(Part):
    """One part on its own: the model is its own single published part."""

    def fingerprint(self):
        return {"kind": "single", "target": self.target}


def config(topic_names, tmp_path: Path, **kw) -> WorkerConfig:
    base = dict(topic=topic_names.examples, dead_letter_topic=topic_names.dead_letter,
                registry_dir=tmp_path / "registry", checkpoint_dir=tmp_path / "ckpt", window_examples=200,
                min_window=50, idle_exit_s=2.0, worker="toy")
    return WorkerConfig(**{**base, **kw})


def rows_of(cfg: WorkerConfig) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.checkpoint_dir) / "windows.jsonl").read_text().splitlines()]


def poisoned(n_windows: int, w: int, bad: int, seed: int):
    exs = world_examples(n_windows * w, seed=seed)
    for ex in exs[bad * w:(bad + 1) * w]:
        ex.clicked = 1  # every example of window `bad` clicked
    return exs


@pytest.mark.parametrize("joint", ["all", "each"])
def test_a_job_publishes_two_names_per_window_gated_on_the_same_window(bootstrap, topic_names, tmp_path, joint):
    create_topics(bootstrap, topic_names.all(), partitions=1)  # one partition: windows = produce order
    produce(bootstrap, topic_names.examples, poisoned(6, 200, bad=3, seed=12))
    cfg = config(topic_names, tmp_path, joint=joint)
    Joint.resets = []
    metrics = ModelWorkerMetrics(worker="toy")
    worker = ModelWorker(Joint(), cfg, bootstrap, KafkaSettings(bootstrap=bootstrap, topics=topic_names),
                         metrics=metrics)
    out = worker.run()
    assert out["windows"] == 6 and out["examples_trained"] == 1200

    rows = {r["window"]: r for r in rows_of(cfg)}
    regs = {n: ModelRegistry(cfg.registry_dir, n) for n in ("toy-ad", "toy-creative")}
    # one version per name per gated window, each judged on the same window
    for name, reg in regs.items():
        metas = [json.loads((d / v / "meta.json").read_text()) for d, vs in
                 ((reg.versions_dir, reg.versions()), (reg.rejected_dir, reg.versions(rejected=True))) for v in vs]
        assert sorted(m["window"] for m in metas) == [1, 2, 3, 4, 5], name
        assert all(m["job"] == "toy-joint" and m["name"] == name for m in metas)
    for k in range(1, 6):
        a, c = rows[k]["parts"]["toy-ad"], rows[k]["parts"]["toy-creative"]
        ma = json.loads((regs["toy-ad"].info(a["version"]).path if a["gate"] == "publish" else
                         regs["toy-ad"].rejected_dir / a["version"]).joinpath("meta.json").read_text())
        mc = json.loads((regs["toy-creative"].info(c["version"]).path if c["gate"] == "publish" else
                         regs["toy-creative"].rejected_dir / c["version"]).joinpath("meta.json").read_text())
        assert ma["gate_event_time_range"] == mc["gate_event_time_range"] == [rows[k]["event_time_min"],
                                                                              rows[k]["event_time_max"]]
    # window 4: the ad part learned the poisoned window 3 and fails; the creative part is fine
    a4, c4 = rows[4]["parts"]["toy-ad"], rows[4]["parts"]["toy-creative"]
    assert a4["gate"] == "reject" and a4["brier"] > a4["serving_brier"] + 0.3
    assert a4["reset_to"] == rows[3]["serving_version"]["toy-ad"]
    if joint == "all":
        assert rows[4]["gate"] == "reject" and c4["gate"] == "reject"
        assert "rejected with its joint parts" in c4["gate_reason"] and "toy-ad" in c4["gate_reason"]
        assert Joint.resets and set(Joint.resets[0]) == {"toy-ad", "toy-creative"}
    else:
        assert rows[4]["gate"] == "mixed" and c4["gate"] == "publish"
        assert Joint.resets and set(Joint.resets[0]) == {"toy-ad"}
    assert all(rows[k]["gate"] == "publish" for k in (1, 2, 3, 5))
    # after the reset the ad part is healthy again on window 5
    assert rows[5]["parts"]["toy-ad"]["brier"] < a4["brier"] - 0.3
    r = metrics.registry
    assert r.get_sample_value("adstream_trainer_gate_decisions_total", {"name": "toy-ad", "outcome": "reject"}) == 1
    assert r.get_sample_value("adstream_trainer_window_score",
                              {"name": "toy-creative", "model": "candidate", "metric": "brier"}) is not None
    assert r.get_sample_value("adstream_trainer_examples_trained_total", {"name": "toy-joint"}) == 1200
    # each part is served by name by the generic loader
    for name, reg in regs.items():
        loaded = ModelLoader(cfg.registry_dir, name, build=Part.from_state).refresh()
        assert loaded is not None and loaded.version == reg.latest() and loaded.model.name == name
        assert loaded.predict([{}, {}]) == [loaded.model.p] * 2


class Crash(Exception):
    pass


def test_a_decision_before_a_crash_keeps_its_figures(bootstrap, topic_names, tmp_path):
    """kill -9 between publish and checkpoint: the resumed line of that window shows the decision
    against the version served before, not the candidate compared with itself."""
    create_topics(bootstrap, topic_names.all(), partitions=1)
    produce(bootstrap, topic_names.examples, world_examples(1000, seed=13))
    cfg = config(topic_names, tmp_path)
    ks = KafkaSettings(bootstrap=bootstrap, topics=topic_names)

    def crash_at_3(rec):
        if rec["window"] == 3:
            raise Crash()

    with pytest.raises(Crash):
        ModelWorker(Single("toy-single", "top"), cfg, bootstrap, ks, on_window=crash_at_3).run()
    reg = ModelRegistry(cfg.registry_dir, "toy-single")
    v3 = reg.latest()
    meta3 = reg.info(v3).meta
    assert meta3["window"] == 3 and meta3["serving_version"] not in (None, v3)
    out = ModelWorker(Single("toy-single", "top"), cfg, bootstrap, ks).run()
    assert out["windows"] == 5 and reg.versions() + reg.versions(rejected=True) == \
        sorted(reg.versions() + reg.versions(rejected=True)) and len(reg.versions() + reg.versions(rejected=True)) == 4
    r3 = {r["window"]: r for r in rows_of(cfg)}[3]
    assert r3["version"] == v3 and r3["gate"] == "publish" and "decided before the restart" in r3["gate_reason"]
    assert r3["judged_against"] == meta3["serving_version"]
    assert r3["brier"] == meta3["brier"] and r3["serving_brier"] == meta3["serving_brier"]


def test_dedup_state_survives_a_restart_with_a_reemitted_backlog(bootstrap, topic_names, tmp_path):
    create_topics(bootstrap, topic_names.all(), partitions=2)
    exs = world_examples(1400, seed=14)
    produce(bootstrap, topic_names.examples, exs[:1000])
    cfg = config(topic_names, tmp_path)
    ks = KafkaSettings(bootstrap=bootstrap, topics=topic_names)
    out = ModelWorker(Single("toy-single", "top"), cfg, bootstrap, ks).run()
    assert out["examples_trained"] == 1000
    # a joiner restart re-emits the last 600 examples (same keys, same event times), then new ones
    produce(bootstrap, topic_names.examples, exs[400:1000] + exs[1000:])
    out = ModelWorker(Single("toy-single", "top"), cfg, bootstrap, ks).run()
    assert out["duplicates"] == 600 and out["examples_trained"] == 1400


def test_dead_letters_are_never_lost(bootstrap, topic_names, tmp_path, monkeypatch, one_torch_thread):
    """The first dead-letter deliveries fail (as after a broker outage longer than the message
    timeout) and the queue is full once: every dead letter still reaches the topic, and the trainer
    (the CTR plug-in) finishes normally."""
    import streams.delivery
    import streams.kafka_io
    from core.settings import Settings, TrainerSettings
    from streams.trainer import run_trainer
    from tests.faults import flaky_factory

    create_topics(bootstrap, topic_names.all(), partitions=1)
    produce(bootstrap, topic_names.examples, world_examples(600, seed=15), extra=BAD_RECORDS)
    flaky = flaky_factory(fail_first=2, buffer_errors=1)
    monkeypatch.setattr(streams.kafka_io, "Producer", flaky)
    monkeypatch.setattr(streams.delivery, "Producer", flaky)
    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=1),
                        trainer=TrainerSettings(registry_dir=tmp_path / "registry", checkpoint_dir=tmp_path / "ckpt",
                                                window_examples=300, min_window=50, batch_size=256, capacity=1024,
                                                embedding_dim=4, idle_exit_s=2.0))
    out = run_trainer(settings, metrics_port=0)
    assert out["dead_letters"] == len(BAD_RECORDS) and out["examples_trained"] == 600
    assert sum(len(p.failed) for p in flaky.instances) == 2  # the faults did happen
    dl = read_topic(bootstrap, topic_names.dead_letter)
    assert Counter(json.loads(v)["reason"] for _k, v, *_ in dl) >= Counter(x for _, x in BAD_RECORDS)


@pytest.mark.parametrize("take", ["click", "close"])
def test_a_worker_takes_full_records_and_one_of_click_or_close(bootstrap, topic_names, tmp_path, take):
    """Positives at the click (core.events.Example.stage): each impression is trained once, from the
    ``full`` record or from one of its ``click`` / ``close`` records, never both."""
    from dataclasses import replace

    create_topics(bootstrap, topic_names.all(), partitions=2)
    exs = world_examples(600, seed=21)
    records = []
    for ex in exs:
        if ex.clicked:
            records.append(replace(ex, stage="click", converted=0))
            records.append(replace(ex, stage="close"))
        else:
            records.append(ex)
    assert sum(ex.clicked for ex in exs) > 10
    produce(bootstrap, topic_names.examples, records)
    skip = ("close",) if take == "click" else ("click",)
    cfg = config(topic_names, tmp_path, skip_stages=skip)
    stages: Counter = Counter()

    class Seen(Single):
        def learn(self, records):
            stages.update(r["stage"] for r in records)
            return super().learn(records)

    worker = ModelWorker(Seen("toy-single", "clicked"), cfg, bootstrap, KafkaSettings(bootstrap=bootstrap,
                                                                                        topics=topic_names),
                         record_keys=True)
    out = worker.run()
    n_clicked = sum(ex.clicked for ex in exs)
    assert out["examples_trained"] == len(exs) and out["duplicates"] == 0
    assert out["other_stage"] == n_clicked
    keys = [k for row in rows_of(cfg) for k in row["keys"]]
    assert sorted(keys) == sorted(ex.key for ex in exs)
    # every window trains (the last, partial one too: min_window 50)
    assert stages == {"full": len(exs) - n_clicked, take: n_clicked}
