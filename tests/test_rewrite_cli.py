"""``adstream evaluate-rewrite`` / ``evaluate-retrieval`` on any file of that shape (issue 12 item 4):
report.json with every method / source, a PNG, a table; clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LEAVES = {"running shoes": ["trainers", "jogging shoes", "runners"], "sofas": ["couch", "settee"],
          "tents": ["camping shelter", "bivouac"], "headphones": ["headset", "earphones"]}
ATTRS = ["red", "black", "cheap", "kids", "large"]


def write_pairs(path):
    rows = ["query,target,clicks,title"]
    for leaf, syns in LEAVES.items():
        for a in ATTRS:
            for s in syns + [leaf]:
                rows.append(f"{a} {s},{leaf},2,acme {a} {leaf} deluxe")
    path.write_text("\n".join(rows) + "\n")
    return path


def run(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "adstream", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_evaluate_rewrite_on_a_file(tmp_path):
    data = write_pairs(tmp_path / "pairs.csv")
    r = run("evaluate-rewrite", "--data", str(data), "--query-col", "query", "--target-col", "target",
            "--title-col", "title", "--weight-col", "clicks", "--epochs-scale", "0.2", "--no-progress",
            "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["summary"]) == {"index", "sft", "sft+ppt", "aligned"}
    m = rep["summary"]["aligned"]["trie"]["all"]
    for key in ("relevance_rate", "authenticity_rate", "expected_revenue", "coverage", "distinct_2", "combined"):
        assert key in m
    assert m["authenticity_rate"]["mean"] == 1.0  # through the live inventory
    assert (tmp_path / "out" / "report.png").stat().st_size > 5000
    assert "relevance" not in r.stdout or "rel@1" in r.stdout


@pytest.mark.slow
def test_evaluate_retrieval_on_a_file(tmp_path):
    data = write_pairs(tmp_path / "pairs.csv")
    r = run("evaluate-retrieval", "--data", str(data), "--query-col", "query", "--item-col", "target",
            "--text-col", "title", "--epochs-scale", "0.3", "--ks", "1,3", "--no-progress", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(rep["summary"]) == {"index", "gram", "union"}
    assert "recall@3" in rep["summary"]["gram"]["all"]
    assert "R@3" in r.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    data = write_pairs(tmp_path / "pairs.csv")
    r = run("evaluate-rewrite", "--data", str(data), "--query-col", "query", "--target-col", "nope",
            "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "column(s) ['nope'] not in the file" in r.stderr
    r = run("evaluate-rewrite", "--data", str(tmp_path / "missing.csv"), "--query-col", "q", "--target-col", "t",
            "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = run("evaluate-retrieval", "--data", str(data), "--query-col", "query", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "--item-col" in r.stderr
    r = run("evaluate-rewrite", "--synthetic", "--seeds", "x", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "--seeds" in r.stderr
    (tmp_path / "empty.csv").write_text("query,target\n")
    r = run("evaluate-rewrite", "--data", str(tmp_path / "empty.csv"), "--query-col", "query", "--target-col",
            "target", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no usable rows" in r.stderr
