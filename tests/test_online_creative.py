"""Serving CR+ beside AR+ (Peri-CR): parallel = sequential, the impression says which creative ranker
and version chose, Beta fallback with ``degraded``, exploration, CR+ reading AR+'s pCTR."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from core.creatives import CreativeContentConfig
from core.ports import ListSink
from core.world import World, WorldConfig
from models.registry import ModelRegistry
from online.index import AdIndex, load_world_catalog, world_inventory
from online.models import BetaCreativeRanker, ModelLoader
from online.service import AdRequestData, AdService
from tests.test_online_common import settings

WORLD = World(WorldConfig(seed=7, creative_content=CreativeContentConfig(enabled=True)))


def index() -> AdIndex:
    idx = AdIndex()
    load_world_catalog(idx, WORLD)
    idx.apply_many(world_inventory(WORLD))
    return idx


@pytest.fixture(scope="module")
def jac_registry(tmp_path_factory):
    """AR+ and CR+ of one JAC job trained on the world (cached and ar pCTR sources), published."""
    import torch

    from models.creative.config import JACConfig
    from models.creative.stream import JACStreamModel
    from models.stream_model import parts_of

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    df = WORLD.to_examples_frame(duration_s=400, requests_per_s=10, seed=1)
    recs = [{**{k: r[k] for k in ("request_id", "event_time", "user_id", "query", "ad_id", "creative_id", "bidword",
                                  "category", "position", "bid", "slot", "domain", "clicked")},
             "features": {k: r[k] for k in ("segment", "match", "top_category", "advertiser", "query_len",
                                            "cr_layout", "cr_colour", "cr_text_len", "cr_price_badge")}}
            for r in df.to_dict("records")]
    for source, suffix in (("cached", ""), ("ar", "-seq")):
        job = JACStreamModel(JACConfig(pctr_source=source, batch_size=256), ar_name=f"jac-ar{suffix}",
                             cr_name=f"jac-cr{suffix}")
        job.learn(recs)
        for name, part in parts_of(job).items():
            ModelRegistry(root, name).publish(part.state(), {"created_at": time.time()})
    torch.set_num_threads(n)
    return root


def service(root, sink=None, ar="jac-ar", cr="jac-cr", **kw) -> AdService:
    from models.creative.stream import CreativeRankerModel

    s = settings(model_name=ar, creative_model=cr, **kw)
    loader = ModelLoader(root, ar)
    loader.refresh()
    cl = ModelLoader(root, cr, build=CreativeRankerModel.from_state) if cr else None
    if cl is not None:
        cl.refresh()
    return AdService(s, index=index(), loader=loader, creative_loader=cl, sink=sink)


def requests(n=12):
    rng = __import__("random").Random(3)
    out = []
    for i in range(n):
        r = WORLD.sample_request(rng, WORLD.config.epoch + 10)
        seg = WORLD.user_by_id[r.user_id].segment
        out.append(AdRequestData(user_id=r.user_id, query=r.query, slots=5, request_id=f"req-{i}",
                                 context={"segment": seg, "event_time": WORLD.config.epoch + 10.0}))
    return out


def _key(out):
    return [(a["ad_id"], a["creative_id"], round(a["pctr"], 9)) for a in out["ads"]]


@pytest.mark.parametrize("exploration", ["off", "thompson", "ucb"])
def test_ar_plus_parallel_to_cr_plus_ranks_as_sequential(jac_registry, exploration, one_torch_thread):
    svc = service(jac_registry, creative_exploration=exploration)
    try:
        before = svc.parallel_calls
        for req in requests():
            par = svc.handle(req, parallel=True)
            seq = svc.handle(req, parallel=False)
            assert _key(par) == _key(seq) and par["ads"]
            assert par["model_versions"] == seq["model_versions"]
            assert par["model_versions"]["creative_ranker"] == "jac-cr"
            assert par["model_versions"]["creative"] == "v000001" and par["model_versions"]["ctr"] == "v000001"
            assert "creative_model" not in par["degraded"]
        assert svc.parallel_calls - before == len(requests())
    finally:
        svc.close()


def test_cr_plus_chooses_and_the_impression_says_so(jac_registry, one_torch_thread):
    sink = ListSink()
    svc = service(jac_registry, sink=sink)
    beta = service(jac_registry, cr="")
    try:
        differ = 0
        for req in requests(20):
            out = svc.handle(req)
            ref = beta.handle(req)
            assert ref["model_versions"]["creative_ranker"] == "beta"
            differ += sum(a["creative_id"] != b["creative_id"] for a, b in zip(out["ads"], ref["ads"]))
        assert differ > 0  # CR+ chose, not the Beta ranker
        imps = [json.loads(v) for _t, _k, v in sink.records]
        assert imps and all(i["model_versions"]["creative_ranker"] == "jac-cr" for i in imps)
        assert all(i["model_versions"]["creative"] == "v000001" for i in imps)
        for i in imps:  # the shown creative's content and the request's context travel into the example
            assert i["features"]["cr_layout"] and i["features"]["segment"].startswith("s")
    finally:
        svc.close()
        beta.close()


def test_beta_fallback_when_cr_plus_is_missing_or_fails(jac_registry, tmp_path, one_torch_thread):
    svc = service(jac_registry, cr="no-such-model")
    try:
        out = svc.handle(requests(1)[0])
        assert "creative_model" in out["degraded"] and out["ads"]
        assert out["model_versions"]["creative_ranker"] == "beta" and out["model_versions"]["creative"] == "beta-v1"
    finally:
        svc.close()
    svc = service(jac_registry)
    try:
        cur = svc.creative.loader.current
        cur.model.predict = lambda rows: (_ for _ in ()).throw(RuntimeError("broken"))
        out = svc.handle(requests(1)[0])
        assert "creative_model" in out["degraded"] and out["model_versions"]["creative_ranker"] == "beta"
        cur.model.predict = lambda rows: np.zeros(3)  # the wrong number of scores
        assert "creative_model" in svc.handle(requests(1)[0])["degraded"]
    finally:
        svc.close()


def test_cr_plus_reading_the_ad_pctr_runs_after_the_ad_ranker(jac_registry, one_torch_thread):
    svc = service(jac_registry, ar="jac-ar-seq", cr="jac-cr-seq")
    try:
        seen = []
        predict = svc.creative.loader.current.model.predict
        svc.creative.loader.current.model.predict = lambda rows: (seen.append(rows), predict(rows))[1]
        before = svc.parallel_calls
        for req in requests(4):
            out = svc.handle(req, parallel=True)
            assert out["model_versions"]["creative_ranker"] == "jac-cr-seq"
            assert _key(out) == _key(svc.handle(req, parallel=False))
        assert svc.parallel_calls == before  # it waited for the ad ranker
        assert seen and all(len(b["ad_pctr"]) == len(b["counts"]) and all(0 < p < 1 for p in b["ad_pctr"])
                            for b in seen)
    finally:
        svc.close()


def _stage(exploration: str):
    from online.creative import CreativeStage

    return CreativeStage(settings(creative_exploration=exploration), index(), BetaCreativeRanker(20.0))


def test_thompson_explores_a_new_creative_and_off_does_not():
    from online.index import Candidate

    cand = Candidate("a1", "w", 1.0, "c/l", "exact", ("old", "new"))
    rows = [[{"impressions": 5000, "clicks": 250}, None]]  # old: 5 % on 5000 impressions; new: never shown
    for mode, lo, hi in (("off", 0, 0), ("thompson", 0.1, 0.9), ("ucb", 1.0, 1.0)):
        st = _stage(mode)
        picks = [st.rank(None, lambda: [], [cand], rows, [0.04], f"r{i}", []).best[0] for i in range(300)]
        share_new = float(np.mean(picks))
        assert lo <= share_new <= hi, (mode, share_new)
        again = [st.rank(None, lambda: [], [cand], rows, [0.04], f"r{i}", []).best[0] for i in range(300)]
        assert picks == again  # the draws are a function of the request id
