"""The CTR model under TorchRec DistributedModelParallel: 2 processes (gloo) reach the quality of 1.

The slow tests launch real ``torchrun`` jobs through ``adstream train-dist`` and check, from facts
each rank reports about itself, that the tables really were split over the processes and that
each process trained on its own half of the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.evaluation import Columns, EvalConfig, prepare_frame, run_protocol
from tests.test_evaluation import drift_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERIODS, PER_PERIOD = 6, 2500
# Three tables, so a table-wise plan (t_ad, t_user on rank 0; t_hour on rank 1) returns the pooled
# embeddings in another order than the fields; an odd global batch (255) splits 128/127.
ARGS = [
    "--time-col", "time", "--label-col", "clicked", "--categorical", "ad,hour,user", "--numeric", "pos",
    "--periods", str(PERIODS), "--batch-size", "255", "--capacity", "1024", "--embedding-dim", "8",
    "--threads", "1",
]  # fmt: skip
TABLES = {"t_ad", "t_hour", "t_user"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dmp") / "drift.parquet"
    df = drift_frame(0, periods=PERIODS, per_period=PER_PERIOD)
    df["hour"] = (df["time"] // 100) % 24  # a field without signal
    df.to_parquet(path)
    return path


def _train_dist(
    data: Path, out: Path, nproc: int, sharding: str, strategies: str, planner: str = "manual"
) -> dict[str, Any]:
    from adstream.cli import main

    rc = main(["train-dist", "--nproc", str(nproc), "--sharding", sharding, "--planner", planner, "--backend", "gloo",
               "--data", str(data), "--strategies", strategies, "--out", str(out), *ARGS])  # fmt: skip
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def one_proc(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _train_dist(data_file, tmp_path_factory.mktemp("dmp1"), 1, "table_wise", "finetune,ddp-mp")


def _mean_auc(report: dict[str, Any], strategy: str) -> float:
    return float(report["strategies"][strategy]["mean_auc"])


@pytest.mark.slow
def test_two_processes_table_wise_match_one(data_file: Path, one_proc: dict[str, Any], tmp_path: Path, capsys) -> None:
    two = _train_dist(data_file, tmp_path, 2, "table_wise", "finetune,ddp-mp")
    out = capsys.readouterr().out
    assert "period   5: auc" in out and "world size 2" in out

    for s in ("finetune", "ddp-mp"):
        a1, a2 = _mean_auc(one_proc, s), _mean_auc(two, s)
        assert a1 > 0.6 and a2 > 0.6, (s, a1, a2)  # the drift world is learnable: ~0.67
        assert len(two["strategies"][s]["auc"]) == PERIODS - 3  # evaluated periods 3..5
        # Table-wise with plan-independent table init is the same computation as 1 process (the
        # global-batch mean loss, gradients averaged over the ranks) up to float rounding.
        # (measured: AUC equal, LogLoss within 1e-9; a field-order or batch-weighting slip moves
        # both by ~1e-4)
        for key, tol in (("auc", 1e-5), ("logloss", 1e-6)):
            for v1, v2 in zip(one_proc["strategies"][s][key], two["strategies"][s][key]):
                assert abs(v1 - v2) < tol, (s, key, one_proc["strategies"][s][key], two["strategies"][s][key])
    # the Model Prior path really ran: its per-period numbers differ from plain fine-tuning by more
    # than float noise (the 1- vs 2-process agreement above is within 1e-5)
    diffs = [abs(a - b) for a, b in zip(two["strategies"]["ddp-mp"]["auc"], two["strategies"]["finetune"]["auc"])]
    assert max(diffs) > 1e-4, diffs

    # sharding, from what each rank reports it holds: each table on exactly one rank, different ranks
    d2 = two["dist"]
    assert d2["world_size"] == 2 and d2["sharding"] == "table_wise"
    ranks = d2["ranks"]["finetune/seed0"]
    assert [r["rank"] for r in ranks] == [0, 1]
    held = [set(r["shards"]) for r in ranks]
    assert held[0] and held[1] and not held[0] & held[1]
    assert held[0] | held[1] == TABLES
    for r in ranks:
        for shapes in r["shards"].values():
            assert shapes == [[1024, 8]]  # whole tables
    # data parallel: each rank trained on half of every batch (warm start + 2 training periods)
    trained = (PERIODS - 1) * PER_PERIOD
    assert sum(r["local_examples"] for r in ranks) == trained
    assert all(abs(r["local_examples"] - trained / 2) <= 64 for r in ranks)

    d1 = one_proc["dist"]
    assert d1["world_size"] == 1
    assert set(d1["ranks"]["finetune/seed0"][0]["shards"]) == TABLES
    # protocol hygiene: each evaluation was trained strictly before the period it scores
    for rec in two["audit"]:
        assert rec["trained_max_index"] == rec["eval_min_index"] - 1


@pytest.mark.slow
def test_two_processes_column_wise_torchrec_planner(data_file: Path, one_proc: dict[str, Any], tmp_path: Path) -> None:
    two = _train_dist(data_file, tmp_path, 2, "column_wise", "finetune", planner="torchrec")
    assert two["dist"]["planner"] == "torchrec"
    assert two["dist"]["tables"] == {t: [0, 1] for t in TABLES}
    # RowWiseAdagrad keeps one accumulator per row *per column block*, so column-wise is a
    # slightly different optimizer than one whole table: equal quality, not equal numbers
    a1, a2 = _mean_auc(one_proc, "finetune"), _mean_auc(two, "finetune")
    assert a2 > 0.6 and abs(a1 - a2) < 0.02, (a1, a2)
    ranks = two["dist"]["ranks"]["finetune/seed0"]
    for r in ranks:  # every table split in two column blocks of 4, one per rank
        assert r["shards"] == {t: [[1024, 4]] for t in TABLES}


@pytest.mark.slow
def test_one_dmp_process_matches_the_single_process_learner(data_file: Path, one_proc: dict[str, Any]) -> None:
    import pandas as pd

    cols = Columns("time", "clicked", ["ad", "hour", "user"], ["pos"])
    df = prepare_frame(pd.read_parquet(data_file), cols)
    # the settings as given, one seed, and the network DMP runs (no first-order table)
    ec = EvalConfig(periods=PERIODS, strategies=("finetune",), batch_size=255, capacity=1024, embedding_dim=8,
                    search_trials=0, seeds=1, first_order=False)
    ref, _ = run_protocol(df, cols, ec)
    assert abs(_mean_auc(ref, "finetune") - _mean_auc(one_proc, "finetune")) < 0.02


def test_plan_tables() -> None:
    from models.ctr.distributed import DistConfigError, plan_tables
    from models.ctr.model import CTRConfig, FieldConfig

    cfg = CTRConfig([FieldConfig("a", capacity=1000), FieldConfig("b", capacity=600), FieldConfig("c", capacity=500)],
                    embedding_dim=8)  # fmt: skip
    assert plan_tables(cfg, 2, "table_wise") == {"t_a": [0], "t_b": [1], "t_c": [1]}
    assert plan_tables(cfg, 1, "table_wise") == {"t_a": [0], "t_b": [0], "t_c": [0]}
    assert plan_tables(cfg, 2, "column_wise") == {"t_a": [0, 1], "t_b": [0, 1], "t_c": [0, 1]}
    with pytest.raises(DistConfigError, match="divisible"):
        plan_tables(cfg, 3, "column_wise")
    with pytest.raises(DistConfigError, match="sharding"):
        plan_tables(cfg, 2, "row_wise")


def test_unsupported_settings_are_cli_errors(data_file: Path, tmp_path: Path, capsys) -> None:
    from adstream.cli import main

    base = ["train-dist", "--data", str(data_file), "--out", str(tmp_path), *ARGS]
    assert main([*base, "--strategies", "ddp"]) == 1
    assert "not supported under DMP" in capsys.readouterr().err
    assert main([*base, "--nproc", "3", "--sharding", "column_wise"]) == 1
    assert "divisible by the world size 3" in capsys.readouterr().err
    assert main([*base, "--categorical", "colour"]) == 1
    assert "missing column(s) ['colour']" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_single_process_and_dmp_protocols_train_on_the_same_batches(monkeypatch) -> None:
    """Both protocols build every training window with models.evaluation.window_batches: the
    same rows, in the same shuffled order, batch by batch."""
    import numpy as np
    import torch.distributed as dist

    import models.ctr.distributed as mdist
    import models.evaluation as mev
    from adstream.cmd_train_dist import free_port

    real = mev.window_batches

    def recorder(log: list):
        def wrapped(raw, batch_size, seed, period, shuffle=True):
            batches = list(real(raw, batch_size, seed, period, shuffle))
            log.append((period, [b.index.copy() for b in batches]))
            return iter(batches)
        return wrapped

    single: list = []
    multi: list = []
    cols = Columns("time", "clicked", ["ad", "user"], ["pos"])
    df = prepare_frame(drift_frame(4, periods=4, per_period=300), cols)
    ec = EvalConfig(periods=4, warm_start=1, search_trials=0, seeds=1, strategies=("finetune",), batch_size=100,
                    capacity=512, embedding_dim=4, hidden=(8,))
    monkeypatch.setattr(mev, "window_batches", recorder(single))
    run_protocol(df, cols, ec)
    monkeypatch.setattr(mdist, "window_batches", recorder(multi))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mdist.run_dist_protocol(df, cols, ec)
    finally:
        dist.destroy_process_group()
    assert [p for p, _ in single] == [p for p, _ in multi] == [-1, 1, 2]
    for (_, a), (_, b) in zip(single, multi):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(single[1][1][0], np.arange(single[1][1][0][0], single[1][1][0][0] + 100))  # shuffled
