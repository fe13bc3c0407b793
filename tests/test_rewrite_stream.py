"""The rewrite job on a real broker (issue 12 item 3): examples → windows → the MoBGM rewriter and GRAM
bootstrapped, then refreshed from fresh clicks, each gated on the next window against its serving
version and published under its own registry name; the published versions are served by name; a
restart resumes from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.events import Example
from core.settings import KafkaSettings, RewriteTrainSettings, Settings
from streams.kafka_io import create_topics
from tests.rewrite_helpers import small_world
from tests.test_trainer import BAD_RECORDS, produce

pytestmark = [pytest.mark.kafka]


def examples(world, duration_s: float, seed: int) -> list[Example]:
    from models.rewrite.synthetic import world_records

    out = []
    for r in world_records(world, duration_s, 4.0, seed=seed):
        out.append(Example(request_id=r["request_id"], event_time=r["event_time"], user_id=r["user_id"],
                           query=r["query"], ad_id=r["ad_id"], creative_id=r["creative_id"], bidword=r["bidword"],
                           category=r["category"], position=r["position"], bid=r["bid"],
                           slot="top" if r["position"] < 2 else "side", domain="search", clicked=r["clicked"],
                           converted=r["converted"], features=dict(r["features"])))
    return out


@pytest.mark.slow
def test_rewrite_job_bootstraps_refreshes_and_publishes_both(bootstrap, topic_names, tmp_path, one_torch_thread):
    from models.registry import ModelRegistry
    from models.rewrite.stream import GramStreamModel, RewriteRequest, RewriterStreamModel
    from online.models import ModelLoader
    from streams.rewrite_trainer import run_rewrite_trainer

    w = small_world(3)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("ad_id,title,category\n" + "".join(f"{a.id},{a.title},{a.category}\n" for a in w.ads))
    exs = examples(w, 2400.0, seed=3)
    n = len(exs) // 4 * 4
    create_topics(bootstrap, topic_names.all(), partitions=3)
    produce(bootstrap, topic_names.examples, exs[: n * 3 // 4], extra=BAD_RECORDS)
    rs = RewriteTrainSettings(registry_dir=tmp_path / "registry", checkpoint_dir=tmp_path / "ckpt",
                              window_examples=n // 4, min_window=100, min_bootstrap_clicks=50, catalog=str(catalog),
                              epochs_scale=0.3, dpo_every=2, gate_click_hit_margin=1.0,
                              gate_click_recall_margin=1.0, idle_exit_s=2.0)
    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=3), rewrite=rs)
    out = run_rewrite_trainer(settings, metrics_port=0)
    assert out["reason"] == "idle" and out["windows"] == 3 and out["examples_trained"] == n * 3 // 4
    assert out["dead_letters"] == len(BAD_RECORDS)
    rows = [json.loads(x) for x in (Path(rs.checkpoint_dir) / "windows.jsonl").read_text().splitlines()]
    assert [r["window"] for r in rows] == [0, 1, 2]
    assert rows[0]["gate"] == "none"  # window 0 bootstraps both models; nothing to judge yet
    for r in rows[1:]:
        # both parts judged on the same held-out window, each against its own serving version
        assert set(r["parts"]) == {"rewriter", "gram"}
        assert 0 <= r["parts"]["rewriter"]["click_hit"] <= 1 and 0 <= r["parts"]["gram"]["click_recall"] <= 1
        assert r["parts"]["rewriter"]["gate"] == r["parts"]["gram"]["gate"] == "publish"
    assert rows[2]["parts"]["rewriter"]["judged_against"] == rows[1]["parts"]["rewriter"]["version"]
    assert rows[2]["parts"]["rewriter"]["click_hit"] > 0.05  # the trained model finds clicked bidwords
    assert rows[2]["parts"]["gram"]["click_recall"] > 0.05
    for name in ("rewriter", "gram"):
        assert ModelRegistry(rs.registry_dir, name).latest() == "v000002"
    meta = ModelRegistry(rs.registry_dir, "rewriter").info("v000002").meta
    # bootstrap (post-pre-training, SFT, discriminator, DPO), then window 1: SFT on fresh clicks + a DPO round
    assert meta["stages"][:4] == ["ppt", "sft", "disc", "dpo"] and meta["stages"][4:] == ["sft", "dpo"]
    assert meta["windows"] == 2 and meta["serving_version"] == "v000001"

    # served by name by the one loader
    rw = ModelLoader(rs.registry_dir, "rewriter", build=RewriterStreamModel.from_state).refresh()
    gr = ModelLoader(rs.registry_dir, "gram", build=GramStreamModel.from_state).refresh()
    q = next(t.text for t in w.lexicon.tail if t.kind == "attr_synonym")
    model = rw.model
    live = {b for a in w.ads for b, _ in a.bidwords}
    got = rw.predict(RewriteRequest(q, model.new_trie(sorted(live)), live.__contains__))
    assert got and all(b in live for b, _ in got)
    assert gr.predict((q, 10, None))

    # a restart continues from the checkpoint: the next window only
    produce(bootstrap, topic_names.examples, exs[n * 3 // 4: n])
    out2 = run_rewrite_trainer(settings, metrics_port=0)
    assert out2["windows"] == 4 and out2["windows_this_run"] == 1
    assert ModelRegistry(rs.registry_dir, "rewriter").latest() == "v000003"
