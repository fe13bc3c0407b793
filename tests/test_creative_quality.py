"""Creative ranking on the synthetic world with creative content, several world seeds: the learned
rankers beat the Beta baseline on NSCTR, and on creatives never shown before CR+ beats the Beta
prior's flat guess. Figures over five worlds and the CR+ vs CR comparison: docs/creative.md."""

from __future__ import annotations

import numpy as np
import pytest

from core.creatives import CreativeContentConfig
from core.world import World, WorldConfig
from models.creative.evaluate import CreativeColumns, EvalSettings, prepare, run_evaluation

WORLDS = (7, 11, 23)
COLS = dict(ad="ad_id", creative="creative_id", label="clicked", time="event_time", position="position",
            categorical=["user_id", "segment", "query", "bidword", "category", "advertiser", "top_category", "match"],
            numeric=["bid"], creative_features=["cr_layout", "cr_colour", "cr_price_badge"],
            creative_numeric=["cr_text_len"], gauc="user_id")


@pytest.fixture(scope="module")
def reports(one_torch_thread_module):
    out = {}
    for seed in WORLDS:
        w = World(WorldConfig(seed=seed, creative_content=CreativeContentConfig(enabled=True)))
        df = w.to_examples_frame(duration_s=2000, requests_per_s=10, seed=seed + 1000)
        cols = CreativeColumns(**COLS)
        out[seed] = run_evaluation(prepare(df, cols), cols, EvalSettings(seeds=1, holdout_creatives=0.3))
    return out


@pytest.fixture(scope="module")
def one_torch_thread_module():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n(rep, block, name):
    return rep[block][name]["nsctr"]


@pytest.mark.slow
def test_learned_rankers_beat_the_beta_baseline_on_nsctr(reports):
    for seed, rep in reports.items():
        assert _n(rep, "rankers", "cr+") > _n(rep, "rankers", "beta"), seed
        assert _n(rep, "rankers", "beta") > _n(rep, "rankers", "logged"), seed  # the baseline is a real one
    cr = np.mean([_n(r, "rankers", "cr") for r in reports.values()])
    crp = np.mean([_n(r, "rankers", "cr+") for r in reports.values()])
    beta = np.mean([_n(r, "rankers", "beta") for r in reports.values()])
    assert cr > beta and crp > beta
    # CR+ is not worse than CR (whether it is better is not established on this world: docs/creative.md)
    assert crp >= cr - 0.002


@pytest.mark.slow
def test_never_shown_creatives_cr_plus_beats_the_flat_prior(reports):
    for seed, rep in reports.items():
        cold = rep["cold"]
        assert cold["cr+"]["impressions"] > 1000, seed
        # the Beta prior gives every never-shown creative of an ad the same score: a random pick
        assert cold["beta"]["nsctr"] == pytest.approx(cold["logged"]["nsctr"], rel=1e-9), seed
        assert cold["cr+"]["nsctr"] > cold["beta"]["nsctr"] * 1.1, seed
        assert cold["cr"]["nsctr"] > cold["beta"]["nsctr"], seed
