"""Ad catalogs (ad id -> (title, category)) for post-pre-training, GRAM's item codes and near-line
indexing. Light: no torch, so the online service can load one without importing the models."""

from __future__ import annotations

from core.errors import ConfigError


def world_catalog(world) -> dict[str, tuple[str, str]]:
    """ad id -> (title, category) of a synthetic world (titles are empty with the lexicon off)."""
    return {a.id: (a.title, a.category) for a in world.ads}


def load_catalog(spec: str) -> dict[str, tuple[str, str]]:
    """A catalog from a spec: ``world:SEED`` (the synthetic world with the lexicon on, as
    ``adstream replay synthetic --lexicon`` plays it), a table with ``ad_id``, ``title`` and an
    optional ``category`` column, or ``""`` (no catalog)."""
    spec = (spec or "").strip()
    if not spec:
        return {}
    if spec.startswith("world:"):
        from core.lexicon import LexiconConfig
        from core.world import World, WorldConfig

        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"catalog {spec!r}: world:SEED needs an integer seed") from None
        # the initial ads' titles do not depend on the drift settings; new ads' follow the default drift
        return world_catalog(World(WorldConfig(seed=seed, lexicon=LexiconConfig(enabled=True))))
    from models.rewrite.filedata import _need, read_table
    from models.rewrite.tokenizer import normalize

    df = read_table(spec)
    _need(df, ["ad_id", "title"])
    has_cat = "category" in df.columns
    out = {}
    for r in df.itertuples(index=False):
        d = dict(zip(df.columns, r))
        a = str(d["ad_id"]).strip()
        if a:
            out[a] = (normalize(d["title"]), str(d["category"]).strip() if has_cat else "")
    return out
