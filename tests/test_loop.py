"""The closed loop on the real parts: served impressions come back as examples with their clicks,
and a model trained on that traffic is served.

Broker (fixture), joiner, feature updater, trainer and ``adstream serve`` as processes; simulated
users send requests and click (``streams.traffic``).
"""

from __future__ import annotations

import pytest

from adstream.loop import LoopConfig, plot_loop, run_loop
from core.settings import KafkaSettings, Settings


@pytest.mark.slow
def test_the_loop_learns_from_its_own_traffic(bootstrap, topic_names, tmp_path):
    s = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=3))
    cfg = LoopConfig(history_s=90, history_rps=10, traffic_s=80, rate=10, window_examples=500,
                     click_delay_s=2.0, join_window_s=30, keep_served=True, bucket_s=10)
    out = run_loop(s, bootstrap, tmp_path / "loop", cfg, say=print)
    tr = out["traffic"]
    assert tr["requests"] > 300 and tr["errors"] == 0, tr["error_samples"]
    served = out["served"]
    assert len(served) >= 3 * tr["requests"] // 2
    # every served impression came back as an example, labelled with what the simulated user did
    ex = out["examples"]
    assert ex["served_found"] == ex["served"] == len({(s["request_id"], s["ad_id"]) for s in served}), ex
    labels = out["example_labels"]
    clicked = {f"{s['request_id']}:{s['ad_id']}": s["clicked"] for s in served}
    assert sum(clicked.values()) > 0
    wrong = {k: (labels[k], c) for k, c in clicked.items() if labels[k] != c}
    assert not wrong, f"{len(wrong)} labels differ from the simulated clicks, e.g. {list(wrong.items())[:3]}"
    # the examples carry the model version that ranked them
    versions = out["example_versions"]
    assert all(versions[f"{s['request_id']}:{s['ad_id']}"].get("ctr") == s["version"] for s in served)
    # a version trained on served traffic was published and then served
    started = out["traffic_started_at"]
    meta = out["registry"]["published_meta"]
    trained_on_traffic = {v for v, m in meta.items() if (m.get("event_time_range") or [0, 0])[1] >= started}
    assert trained_on_traffic, f"no published version saw the traffic: {[(v, m.get('event_time_range')) for v, m in meta.items()]}"
    served_versions = {s["version"] for s in served}
    assert served_versions & trained_on_traffic, (served_versions, trained_on_traffic)
    assert plot_loop(out, tmp_path / "loop.png").stat().st_size > 10_000
