"""``adstream evaluate-query`` on files of short texts and labels (CSV and TSV, single- and
multi-label, with and without click statistics) and on bad input. Hashed n-gram features keep it
fast; the protocol is the one the benchmarks run with MiniLM."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from adstream.cli import main
from core.query_world import QueryWorld, QueryWorldConfig, split_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--features", "hash", "--seeds", "2", "--trials", "1", "--max-epochs", "4", "--no-progress"]


def write(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qw")
    w = QueryWorld(QueryWorldConfig(seed=1, n_queries=300, impressions=5000))
    sp = split_rows(w, 1)
    return {k: write(d / f"{k}.csv", rows) for k, rows in sp.items()}


def test_multi_label_file_with_knowledge_and_hierarchy(world_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["evaluate-query", "--train", str(world_files["train"]), "--test", str(world_files["test"]),
               "--val", str(world_files["val"]), "--text-col", "query", "--label-col", "clicked",
               "--test-label-col", "gold", "--label-sep", "|", "--hierarchy-sep", "/",
               "--variants", "baseline,smgcn,ssuf", "--out", str(out), *FAST])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["variants"]) == {"baseline", "smgcn", "ssuf"}
    for v in rep["variants"].values():
        for k in ("micro_f1", "macro_f1", "tail_macro_f1"):
            assert 0.0 <= v[k] <= 1.0
        assert len(v["per_seed"]) == 2
    assert rep["data"]["knowledge"] is True and rep["data"]["hierarchy_nodes"] == 8
    assert (out / "report.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "tail macro-F1" in printed and "ssuf" in printed


def test_single_label_tsv_without_clicks_switches_knowledge_off(tmp_path, capsys):
    rng = random.Random(0)
    names = {"Coffee Tables": ["coffee table", "oak coffee table", "glass cocktail table"],
             "Desk Lamps": ["desk lamp", "reading lamp", "led desk light"],
             "Area Rugs": ["wool rug", "area rug", "shag rug", "runner rug"],
             "Bar Stools": ["bar stool", "counter stool", "swivel barstool"]}
    rows = [{"id": i, "q": f"{rng.choice(['', 'modern ', 'white '])}{t}", "cls": c}
            for i, (c, ts) in enumerate(sorted(names.items())) for t in ts for _ in range(3)]
    rng.shuffle(rows)
    train = write(tmp_path / "train.tsv", rows[: len(rows) * 2 // 3], "\t")
    test = write(tmp_path / "test.tsv", rows[len(rows) * 2 // 3:], "\t")
    rc = main(["evaluate-query", "--train", str(train), "--test", str(test), "--text-col", "q",
               "--label-col", "cls", "--variants", "counts,baseline,ssuf", "--out", str(tmp_path / "o"), *FAST])
    assert rc == 0
    err = capsys.readouterr().err
    assert "knowledge module: off" in err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert any("knowledge module off" in n for n in rep["notes"])
    assert rep["zero_shot"]["recall@1"] > rep["zero_shot"]["chance@1"]
    c = rep["variants"]["counts"]
    assert c["modules"] == {} and len(c["per_seed"]) == 2
    assert c["per_seed"][0]["params"]["weighting"] in ("raw", "share")
    assert c["macro_f1"] > 0.8  # 4 classes whose test texts share words with their training texts (all 4 would give 0.4)


def test_counts_baseline_votes_by_shared_words():
    from models.query.counts import CountsBaseline, fit_counts

    q = ["red running shoes", "running shoes", "trail shoes", "oak table", "glass table", "coffee table", "table"]
    y = [[0], [0], [0], [1], [1], [1], [1]]
    m = CountsBaseline(3, "raw").fit(q, y)
    assert m.predict(["blue running shoes", "round table", "zzz unknown"]) == [{0}, {1}, {1}]  # unknown: most frequent
    assert list(m.scores(["running table"])[0]) == [0.5, 1.0, 0.0]  # running: 2 votes for 0, table: 4 for 1
    # "share": each word's votes sum to one, so a word seen with every label does not drown a specific one
    q2 = ["cheap shoes", "cheap table", "cheap lamp", "cheap lamp", "cheap rug", "desk lamp"]
    y2 = [[0], [1], [2], [2], [2], [2]]
    assert CountsBaseline(3, "raw").fit(q2, y2).predict(["cheap shoes"]) == [{2}]
    assert CountsBaseline(3, "share").fit(q2, y2).predict(["cheap shoes"]) == [{0}]
    best, v = fit_counts(q, y, ["blue shoes", "pine table"], [[0], [1]], 3, "macro_f1")
    assert v == 1.0 and best.predict(["blue shoes", "pine table"]) == [{0}, {1}]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    good = write(tmp_path / "g.csv", [{"text": t, "label": c} for t, c in [
        ("red shoes", "shoes"), ("lamp", "home"), ("trainers", "shoes"), ("floor lamp", "home"), ("boots", "shoes"),
        ("sofa", "home"), ("sneakers", "shoes"), ("rug", "home")]])
    cases = {
        "missing column": (["--train", str(good), "--test", str(good), "--text-col", "query", "--label-col", "label"],
                           "has no column 'query'; its columns are: text, label"),
        "missing file": (["--train", str(tmp_path / "nope.csv"), "--test", str(good), "--text-col", "text",
                          "--label-col", "label"], "no such file"),
        "unknown variant": (["--train", str(good), "--test", str(good), "--text-col", "text", "--label-col", "label",
                             "--variants", "ssuf-xyz"], "unknown module"),
    }
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(("text,label\ncaf\xe9 table,home\n" + "".join(f"shoe {i},shoes\nlamp {i},home\n" for i in range(4))
                     ).encode("latin-1"))
    cases["not utf-8"] = (["--train", str(bad), "--test", str(good), "--text-col", "text", "--label-col", "label"],
                          "is not valid utf-8")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,\n  ,x\n")
    cases["no usable rows"] = (["--train", str(empty), "--test", str(good), "--text-col", "text", "--label-col",
                                "label"], "no usable rows")
    tiny = write(tmp_path / "tiny.csv", [{"text": "red shoes", "label": "shoes"}])
    cases["too few rows"] = (["--train", str(tiny), "--test", str(good), "--text-col", "text", "--label-col",
                              "label"], "too few labelled rows")
    for name, (args, msg) in cases.items():
        rc = main(["evaluate-query", *args, "--out", str(tmp_path / "o"), *FAST])
        err = capsys.readouterr().err
        assert rc == 1, name
        assert msg in err, (name, err)
        assert "Traceback" not in err
    # the same file read as latin-1 works
    assert main(["evaluate-query", "--train", str(bad), "--test", str(good), "--text-col", "text", "--label-col",
                 "label", "--encoding", "latin-1", "--out", str(tmp_path / "o2"), *FAST]) == 0
