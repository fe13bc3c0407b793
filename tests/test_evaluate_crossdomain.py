"""``adstream evaluate-crossdomain`` on any file of the shape user, item, domain, label, time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from models.crossdomain.evaluation import XDColumns, draw_cold_users, paired_bootstrap, prepare_frame

ROOT = Path(__file__).resolve().parent.parent


def _toy(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    """Two domains ("shop", "app") whose users share a taste for item group a or b."""
    rng = np.random.default_rng(seed)
    u = rng.integers(60, size=n)
    grp = np.where(rng.random(n) < 0.5, "a", "b")
    likes = np.where(u % 2 == 1, "a", "b")
    p = np.where(grp == likes, 0.4, 0.05)
    return pd.DataFrame({"who": [f"u{x}" for x in u], "what": [f"{g}{int(i)}" for g, i in zip(grp, rng.integers(6, size=n))],
                         "grp": grp, "where": np.where(rng.random(n) < 0.5, "shop", "app"),
                         "y": (rng.random(n) < p).astype(int),
                         "ts": pd.date_range("2024-01-01", periods=n, freq="min").astype(str)})


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "adstream", *args], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=600)


def test_the_command_on_a_csv_of_that_shape(tmp_path):
    f = tmp_path / "log.csv"
    _toy().to_csv(f, index=False)
    out = tmp_path / "rep"
    r = _run(["evaluate-crossdomain", "--data", str(f), "--user-col", "who", "--item-col", "what",
              "--domain-col", "where", "--label-col", "y", "--time-col", "ts", "--item-features", "grp",
              "--target", "app", "--models", "dacdr,single", "--seeds", "2", "--windows", "3", "--dim", "8",
              "--epochs", "2", "--bootstrap", "50", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 1000
    t = rep["targets"]["app"]
    assert set(t["models"]) == {"dacdr", "single"} and len(t["runs"]["dacdr"]) == 2
    assert t["counts"][0]["cold_users"] > 5 and t["counts"][0]["cold_rows"] > 50
    for m in ("dacdr", "single"):  # (which model wins is the bench's and test_dacdr's business)
        assert 0.0 < t["models"][m]["auc_cold"]["mean"] < 1.0 and 0.0 < t["models"][m]["auc_overall"]["mean"] < 1.0
    assert len(t["cold_auc_minus_single_ci95"]["dacdr"]) == 2
    assert "cold AUC" in r.stdout


@pytest.mark.parametrize("change, message", [
    (lambda d: d.drop(columns=["where"]), "missing column"),
    (lambda d: d.assign(y=d["y"] * 2), "must be 0/1"),
    (lambda d: d.assign(where="shop"), "at least two"),
    (lambda d: d.assign(ts="yesterday-ish"), "cannot parse"),
])
def test_bad_files_get_clear_errors(tmp_path, change, message):
    f = tmp_path / "log.csv"
    change(_toy(300)).to_csv(f, index=False)
    r = _run(["evaluate-crossdomain", "--data", str(f), "--user-col", "who", "--item-col", "what",
              "--domain-col", "where", "--label-col", "y", "--time-col", "ts", "--out", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_unknown_target_and_models_are_refused(tmp_path):
    f = tmp_path / "log.csv"
    _toy(300).to_csv(f, index=False)
    base = ["evaluate-crossdomain", "--data", str(f), "--user-col", "who", "--item-col", "what", "--domain-col",
            "where", "--label-col", "y", "--time-col", "ts", "--out", str(tmp_path / "o")]
    r = _run(base + ["--target", "tv"], tmp_path)
    assert r.returncode == 1 and "not in the data" in r.stderr
    r = _run(base + ["--models", "dacdr,magic"], tmp_path)
    assert r.returncode == 1 and "unknown" in r.stderr


def test_cold_users_overlap_and_bootstrap():
    df = prepare_frame(_toy(2000).rename(columns={"who": "user_id", "what": "ad_id", "where": "domain", "y": "clicked",
                                                  "ts": "event_time"}), XDColumns())
    cold = draw_cold_users(df, "app", 1000, 2000, 0.5, np.random.default_rng(0))
    users_app = set(df[df["domain"] == "app"]["user_id"]) & set(df[df["domain"] == "shop"]["user_id"])
    assert cold and cold <= users_app
    y = np.array([0, 1] * 50)
    lo, hi = paired_bootstrap(np.repeat(np.arange(10), 10), y, y + 0.0, np.zeros(100), 200, np.random.default_rng(0))
    assert lo > 0.3 and hi <= 0.5 + 1e-9
    with pytest.raises(ConfigError):
        prepare_frame(df.drop(columns=["domain"]), XDColumns())
