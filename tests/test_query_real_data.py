"""Query classification on real data: WANDS (``../shared/data/wands/query.csv``, 474 queries, 188
product classes), through the code of ``adstream evaluate-query`` with the packaged MiniLM.

One split (75/25, seed 0), one setting per variant (the defaults, no search): the trained SSUF
classifier beats the plain encoder baseline and the counts baseline on held-out macro-F1 by a wide
margin (3-seed bench, docs/query.md: 0.18 / 0.27 vs 0.54 and more), and the untrained encoder's
zero-shot label-name Recall@5 is far above chance. The full comparison is
``bench/bench_query_quality.py``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parent.parent
WANDS = Path(os.environ.get("ADSTREAM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "wands" / "query.csv"


def test_wands_trained_classifier_beats_the_baselines_and_zero_shot_is_far_above_chance():
    from models.query.data import read_table
    from models.query.encoder import EncoderSpec, MiniLMFeatures
    from models.query.evaluate import EvalConfig, evaluate

    assert WANDS.is_file(), f"WANDS not found at {WANDS} (set ADSTREAM_SHARED_DATA)"
    t = read_table(WANDS, "query", "query_class")
    idx = list(range(len(t)))
    random.Random(0).shuffle(idx)
    k = len(idx) // 4
    train, test = t.subset(idx[k:]), t.subset(idx[:k])
    cfg = EvalConfig(variants=("counts", "baseline", "ssuf"), seeds=1, trials=1, max_epochs=30, encoder=EncoderSpec())
    rep = evaluate(train, test, cfg, features=MiniLMFeatures())
    z = rep["zero_shot"]
    assert z["recall@5"] > 10 * z["chance@5"], z
    macro = {v: r["macro_f1"] for v, r in rep["variants"].items()}
    assert macro["ssuf"] > macro["baseline"] + 0.1, macro
    assert macro["ssuf"] > macro["counts"] + 0.1, macro
