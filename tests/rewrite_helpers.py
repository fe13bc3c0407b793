"""Small trained rewriters for tests and benchmarks: a small synthetic world (lexicon on), its stream
as example records, and MoBGM / GRAM bootstrapped from them through their StreamModel ``learn``."""

from __future__ import annotations

from dataclasses import replace

SMALL_WORLD = dict(n_top=2, n_leaf_per_top=3, n_ads=60, n_users=500)


def tiny_configs(seed: int = 0, scale: float = 1.0):
    from models.rewrite.discriminator import DiscConfig
    from models.rewrite.gram import GramConfig
    from models.rewrite.lm import LMConfig
    from models.rewrite.mobgm import MoBGMConfig

    lm = LMConfig(n_layer=1, n_head=2, n_embd=48, n_positions=40, dropout=0.0, max_prompt=16, max_target=12)
    ep = lambda n: max(1, round(n * scale))  # noqa: E731
    mc = MoBGMConfig(lm=lm, vocab_size=400, ppt_epochs=ep(3), sft_epochs=ep(8), dpo_epochs=1, batch=64,
                     disc=DiscConfig(epochs=ep(8)), seed=seed)
    gc = GramConfig(lm=replace(lm, max_target=10), vocab_size=400, epochs=ep(4), coalign=False, seed=seed)
    return mc, gc


def quality_configs(seed: int = 0):
    """The models of the several-seed quality tests: the default sizes but 64 dimensions."""
    from models.rewrite.gram import GramConfig
    from models.rewrite.lm import LMConfig
    from models.rewrite.mobgm import MoBGMConfig

    lm = LMConfig(n_layer=2, n_head=4, n_embd=64, n_positions=40, max_prompt=16, max_target=12)
    return (MoBGMConfig(lm=lm, vocab_size=500, seed=seed),
            GramConfig(lm=replace(lm, max_target=10), vocab_size=500, epochs=4, seed=seed))


def small_world(seed: int = 3):
    from models.rewrite.synthetic import rewrite_world

    return rewrite_world(seed, **SMALL_WORLD)


def trained_models(seed: int = 3, duration_s: float = 2400.0):
    """(world, records, RewriterStreamModel, GramStreamModel) bootstrapped on the world's stream."""
    import torch

    from models.rewrite.stream import RefreshConfig
    from models.rewrite.synthetic import bootstrap_models, world_records

    torch.set_num_threads(1)
    w = small_world(seed)
    recs = world_records(w, duration_s, 4.0, seed=seed)
    mc, gc = tiny_configs(seed)
    rw, gr = bootstrap_models(w, recs, mc, gc, RefreshConfig(min_bootstrap_clicks=20, dpo_queries=40))
    assert rw.ready and gr.ready
    return w, recs, rw, gr
