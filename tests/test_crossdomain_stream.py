"""The whole path on a real broker and a real Redis: DACDR, the availability gate and the reward model
trained from the stream by the shared model worker, histories pushed to Redis, the service routing a
cold user to DACDR, judging the catalogue with the served gate, never serving a failed creative, and
picking up a generated creative published through the creatives topic."""

from __future__ import annotations

import random
import time

import pytest

from core.creatives import CreativeContentConfig
from core.domains import CROSS_DOMAINS, CrossDomainConfig
from core.events import CreativeChange, Example, encode
from core.images import ImageConfig
from core.settings import CreativeImageSettings, CrossDomainSettings, FeatureSettings, KafkaSettings, ServeSettings, \
    Settings
from core.world import DriftConfig, World, WorldConfig
from models.registry import ModelRegistry
from streams.kafka_io import create_topics, make_producer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _world() -> World:
    return World(WorldConfig(seed=5, domains=CROSS_DOMAINS, drift=DriftConfig(horizon_s=400),
                             cross_domain=CrossDomainConfig(enabled=True, new_from=0.5),
                             images=ImageConfig(enabled=True, broken_share=0.25, review_share=1.0),
                             creative_content=CreativeContentConfig(enabled=True)))


def _examples(w: World, seconds: float) -> list[Example]:
    df = w.to_examples_frame(duration_s=seconds, requests_per_s=10)
    out = []
    for r in df.to_dict("records"):
        feats = {"segment": r["segment"], "match": r["match"], "top_category": r["top_category"]}
        feats.update({k: r[k] for k in ("cr_layout", "cr_colour", "cr_text_len", "cr_price_badge")})
        out.append(Example(request_id=r["request_id"], event_time=float(r["event_time"]), user_id=r["user_id"],
                           query=r["query"], ad_id=r["ad_id"], creative_id=r["creative_id"], bidword=r["bidword"],
                           category=r["category"], position=int(r["position"]), bid=float(r["bid"]),
                           slot=r["slot"], domain=r["domain"], clicked=int(r["clicked"]), converted=0,
                           features=feats))
    return out


def test_stream_trained_models_serve_cold_users_and_never_a_failed_creative(bootstrap, topic_names, tmp_path,
                                                                           redis_server, one_torch_thread):
    from adstream.cmd_serve import build_app
    from features.history_store import RedisHistoryStore
    from online.service import AdRequestData
    from streams.creative_jobs import run_creative_job
    from streams.creative_publisher import creative_events, publish
    from streams.crossdomain_job import run_crossdomain

    w = _world()
    create_topics(bootstrap, topic_names.all(), partitions=2)
    exs = _examples(w, 400)
    catalogue = [w.creative_event(a, c, w.config.epoch) for a in w.ads for c in a.creatives]
    p = make_producer(bootstrap)
    for ev in exs:
        p.produce(topic_names.examples, encode(ev), key=ev.key)
        p.poll(0)
    for ev in catalogue:
        p.produce(topic_names.creatives, encode(ev), key=ev.key)
        p.poll(0)
    p.produce(topic_names.creatives, b'{"v":1,"type":"creative_change"}', key="bad")  # a dead letter, not a crash
    assert p.flush(30) == 0

    redis_url = f"127.0.0.1:{redis_server.port}"
    reg = tmp_path / "registry"
    s = Settings(
        kafka=KafkaSettings(bootstrap=bootstrap, topics=topic_names, partitions=2),
        features=FeatureSettings(redis_url=redis_url),
        crossdomain=CrossDomainSettings(domains=["search", "feed", "video"], target_domains=["feed"],
                                        registry_dir=reg, checkpoint_dir=tmp_path / "xd", window_examples=3000,
                                        min_window=500, idle_exit_s=4.0, history_store="redis",
                                        gate_cold_auc_margin=0.2, gate_logloss_margin=0.2),
        creatives=CreativeImageSettings(registry_dir=reg, checkpoint_dir=tmp_path / "cr", gate_window=300,
                                        reward_window=4000, min_window=100, idle_exit_s=4.0))

    # 1. DACDR from the examples topic; histories go to Redis after every window
    out = run_crossdomain(s)
    assert out["windows"] >= 3 and out["published"] >= 1 and out["histories_pushed"] > 100
    state, info = ModelRegistry(reg, "crossdomain").load()
    assert info.meta["config"]["domains"] == ["search", "feed", "video"] and "auc_cold" in info.meta, info.meta
    from models.crossdomain.model import DACDRModel

    model = DACDRModel.from_state(state)
    store = RedisHistoryStore(redis_url)
    some = sorted({e.user_id for e in exs[-3000:]})[:20]
    stored = {u: store.read(u) for u in some}
    assert all(stored[u] for u in some)
    assert stored[some[0]] == model.history.as_items(some[0]) or out["windows"] > 1  # the latest window's fold

    # 2. the availability gate from the creatives topic (review labels)
    g = run_creative_job("gate", s)
    assert g["published"] + (1 if g["serving_version"] else 0) >= 1 and g["dead_letters"] == 1
    # 3. the reward model from the examples topic, with the catalogue followed beside it
    r = run_creative_job("reward", s)
    assert r["windows"] >= 2 and r["serving_version"]
    _, rinfo = ModelRegistry(reg, "creative-reward").load()
    assert rinfo.meta["creatives"] == len(catalogue)

    # 4. the service: cold users to DACDR, the catalogue judged by the served gate, blend with the reward
    serve = ServeSettings(registry_dir=reg, crossdomain_model="crossdomain", history_store="redis",
                          creative_gate_model="creative-gate", creative_reward="blend", model_poll_s=0.2,
                          domains=["search", "feed", "video"], parallel_ranking=True)
    s2 = s.model_copy(update={"serve": serve})
    wired = build_app(s2, bootstrap=bootstrap, world=w, initial_inventory="world", feature_store=None,
                      registry_root=reg, wait_inventory_s=10.0)
    try:
        svc = wired.app.state.service
        cat = svc.catalogue
        deadline = time.time() + 60
        while cat.applied < len(catalogue) and time.time() < deadline:
            time.sleep(0.2)
        assert cat.applied == len(catalogue) and cat.judged == len(catalogue)
        failed = {c.creative_id for c in catalogue if cat.verdict(c.creative_id) == "fail"}
        truly = {c.creative_id for c in catalogue if c.review != "available"}
        assert len(failed & truly) >= 0.8 * len(truly)  # the gate caught most broken creatives
        # a user with behaviour elsewhere but none in feed yet
        cold_user = next(u for u in some if not stored[u].get("feed"))
        rng = random.Random(1)
        served, routed = [], []
        for i in range(150):
            req = w.sample_request(rng, w.config.epoch + 500 + i)
            user = cold_user if i % 3 == 0 else req.user_id
            resp = svc.handle(AdRequestData(user, req.query, 4, "feed", f"q{i}"))
            served += [a["creative_id"] for a in resp["ads"]]
            routed.append((user, resp["model_versions"]["ad_ranker"], resp["model_versions"]["ad_ranker_reason"]))
        assert served and not set(served) & failed
        assert all(rk == "crossdomain" for u, rk, _ in routed if u == cold_user)
        assert any(rk == "ctr" and why == "warm" for _, rk, why in routed)
        assert "creative_reward" in resp["model_versions"]
        # 5. a generated creative published through the topic joins its ad in the index
        from models.creative_image.gate import AvailabilityGate
        from models.creative_image.loop import ProductBrief, SyntheticGenerator, produce

        gate = AvailabilityGate.from_state(ModelRegistry(reg, "creative-gate").load()[0])
        ad = w.ads[0]
        rep = produce([ProductBrief(ad.id, ad.category, w.product(ad), w.tops.index(w.top_of(ad.category)))],
                      SyntheticGenerator(failure_rate=0.0, tops=w.tops), gate, attempts=3, want=1)
        evs = creative_events(rep, {ad.id: ad.category}, {ad.id: "t"}, "creative-gate:v", None, w.config.epoch + 900)
        assert publish(bootstrap, topic_names.creatives, evs) == 1
        new_id = evs[0].creative_id
        deadline = time.time() + 30
        while time.time() < deadline and not any(new_id in c.creatives for c in
                                                  svc.index.candidates([], ad.category, 500) if c.ad_id == ad.id):
            time.sleep(0.2)
        assert any(new_id in c.creatives for c in svc.index.candidates([], ad.category, 500) if c.ad_id == ad.id)
        assert cat.verdict(new_id) == "pass"
    finally:
        wired.close()
        store.close()
