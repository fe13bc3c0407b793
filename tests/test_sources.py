"""Replay sources: real logs (OBD, AdWords), generic CSV/Parquet, the synthetic world.

Tests on the shared data skip when the folder is absent; every mapping is also checked on small
files written here in the same format.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adstream.cli import main
from core.errors import ConfigError
from core.events import Click, Impression, decode, encode
from core.world import World, WorldConfig, example_columns
from streams import sources
from streams.sources import (
    adwords_events, obd_events, open_source, read_table, shared_data_dir, table_events, write_table,
)

SHARED = shared_data_dir(required=False)


def needs_shared(sub: str):
    present = SHARED is not None and (SHARED / sub).is_dir()
    return pytest.mark.skipif(not present, reason=f"shared data folder '{sub}' not found "
                              f"(set {sources.SHARED_DATA_ENV} to the folder holding obd/ and adwords/)")


def check_stream(events: list, decode_every: int = 1) -> Counter:
    """Valid, round-trippable, in event-time order, each click after its impression."""
    times = [e.event_time for e in events]
    assert all(a <= b for a, b in zip(times, times[1:])), "not in event-time order"
    shown: dict[tuple[str, str], float] = {}
    for i, e in enumerate(events):
        if i % decode_every == 0 or isinstance(e, Click):
            assert decode(encode(e)) == e
        if isinstance(e, Impression):
            assert (e.request_id, e.ad_id) not in shown, "duplicate impression"
            shown[(e.request_id, e.ad_id)] = e.event_time
        elif isinstance(e, Click):
            assert shown[(e.request_id, e.ad_id)] < e.event_time
    return Counter(type(e).__name__ for e in events)


# ---------------------------------------------------------------- OBD


def _write_obd(root: Path, campaign: str = "men", policy: str = "random", n: int = 50, n_items: int = 4,
               drop: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    d = root / policy / campaign
    d.mkdir(parents=True, exist_ok=True)
    ts = pd.date_range("2019-11-24", periods=n, freq="37s", tz="UTC") + pd.to_timedelta(
        rng.uniform(0, 1, n), unit="s")
    df = pd.DataFrame({
        "timestamp": ts.astype(str),
        "item_id": rng.integers(n_items, size=n),
        "position": rng.integers(1, 4, size=n),
        "click": (rng.random(n) < 0.2).astype(int),
        "propensity_score": np.full(n, 1 / n_items),
        **{f"user_feature_{i}": [f"h{i}{x}" for x in rng.integers(3, size=n)] for i in range(4)},
        **{f"user-item_affinity_{i}": rng.random(n) for i in range(n_items)},
    })
    if drop:
        df = df.drop(columns=[drop])
    df.to_csv(d / f"{campaign}.csv")
    items = pd.DataFrame({"item_id": range(n_items), "item_feature_0": rng.normal(size=n_items),
                          **{f"item_feature_{i}": [f"cat{i}{j % 2}" for j in range(n_items)] for i in (1, 2, 3)}})
    items.to_csv(d / "item_context.csv")
    return root


def test_obd_mapping_on_a_small_file(tmp_path):
    root = _write_obd(tmp_path / "obd")
    _write_obd(root, policy="bts")
    events = list(obd_events(campaign="men", data_dir=root))
    kinds = check_stream(events)
    raw = pd.concat([pd.read_csv(root / p / "men" / "men.csv", index_col=0) for p in ("random", "bts")])
    assert kinds["Impression"] == len(raw) and kinds["Click"] == int(raw["click"].sum())
    imp = next(e for e in events if isinstance(e, Impression))
    assert imp.query == imp.bidword == "men" and imp.domain == "obd-men"
    assert imp.ad_id.startswith("obd-men-") and imp.user_id.startswith("obd-u")
    assert 0 <= imp.position <= 2
    assert {"propensity", "policy", "affinity", "user_feature_0", "item_feature_1"} <= set(imp.features)
    # the affinity feature is the row's affinity for the item shown
    first = raw.assign(t=pd.to_datetime(raw["timestamp"])).sort_values("t", kind="stable").iloc[0]
    assert imp.features["affinity"] == pytest.approx(first[f"user-item_affinity_{int(first['item_id'])}"])


def test_obd_missing_column_and_folder(tmp_path):
    root = _write_obd(tmp_path / "obd", drop="position")
    with pytest.raises(ConfigError, match="position"):
        list(obd_events(campaign="men", policies=["random"], data_dir=root))
    with pytest.raises(ConfigError, match="not found"):
        obd_events(campaign="women", policies=["random"], data_dir=root)
    with pytest.raises(ConfigError, match="campaign"):
        obd_events(campaign="kids", data_dir=root)


@needs_shared("obd")
def test_obd_shared_sample():
    events = list(obd_events(campaign="men"))
    kinds = check_stream(events, decode_every=17)
    raw = [pd.read_csv(SHARED / "obd" / p / "men" / "men.csv", usecols=["click"]) for p in ("random", "bts")]
    assert kinds["Impression"] == sum(len(r) for r in raw)
    assert kinds["Click"] == sum(int(r["click"].sum()) for r in raw)
    assert {e.domain for e in events if isinstance(e, Impression)} == {"obd-men"}


# ---------------------------------------------------------------- AdWords


def _write_adwords(root: Path, days: int = 3, keywords: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in pd.date_range("2012-04-01", periods=days, freq="D"):
        for k in range(keywords):
            rows.append({"date": d.strftime("%Y-%m-%d"), "keyword_id": 1000 + k,
                         "keyword_string": "salewa" if k == 0 else "", "impressions": 20 + 5 * k,
                         "clicks": 2 + k})
    rows.append({"date": "2012-04-02", "keyword_id": 999, "keyword_string": "", "impressions": 3,
                 "clicks": 5})  # the upstream quirk: clicks > impressions
    pd.DataFrame(rows).to_csv(root / "adwords_daily_2012Q2.csv", index=False)
    return root


def test_adwords_expansion_keeps_counts_at_full_rate(tmp_path):
    root = _write_adwords(tmp_path / "adwords")
    raw = pd.read_csv(root / "adwords_daily_2012Q2.csv")
    events = list(adwords_events(data_dir=root, sample_rate=1.0))
    kinds = check_stream(events)
    assert kinds["Impression"] == raw["impressions"].sum()
    assert kinds["Click"] == np.minimum(raw["clicks"], raw["impressions"]).sum()
    imps = [e for e in events if isinstance(e, Impression)]
    assert {e.bidword for e in imps} >= {"salewa", "kw1001"}
    assert all(e.query == e.bidword and e.ad_id == f"aw-{e.features['keyword_id']}" for e in imps)
    day1 = pd.Timestamp("2012-04-01", tz="UTC").timestamp()
    assert min(e.event_time for e in imps) >= day1
    assert max(e.event_time for e in imps) < day1 + 3 * 86400


def test_adwords_sampling_cap_and_dates(tmp_path):
    root = _write_adwords(tmp_path / "adwords")
    capped = [e for e in adwords_events(data_dir=root, sample_rate=1.0, max_impressions_per_row=4)
              if isinstance(e, Impression)]
    assert max(Counter((e.ad_id, int(e.event_time // 86400)) for e in capped).values()) <= 4
    one_day = list(adwords_events(data_dir=root, sample_rate=1.0, start_date="2012-04-02",
                                  end_date="2012-04-02"))
    assert {pd.Timestamp(e.event_time, unit="s").strftime("%Y-%m-%d") for e in one_day
            if isinstance(e, Impression)} == {"2012-04-02"}
    with pytest.raises(ConfigError, match="sample_rate"):
        adwords_events(data_dir=root, sample_rate=0)
    with pytest.raises(ConfigError, match="no rows"):
        adwords_events(data_dir=root, start_date="2013-01-01")
    with pytest.raises(ConfigError, match="no adwords_daily"):
        adwords_events(data_dir=tmp_path)


@needs_shared("adwords")
def test_adwords_shared_week_keeps_ctr():
    events = list(adwords_events(sample_rate=0.05, start_date="2012-10-01", end_date="2012-10-07", seed=1))
    kinds = check_stream(events, decode_every=7)
    raw = pd.concat(pd.read_csv(f) for f in sorted((SHARED / "adwords").glob("adwords_daily_*.csv")))
    raw = raw[(raw["date"] >= "2012-10-01") & (raw["date"] <= "2012-10-07")]
    n, c = raw["impressions"].sum(), np.minimum(raw["clicks"], raw["impressions"]).sum()
    assert abs(kinds["Impression"] - 0.05 * n) < 5 * np.sqrt(0.05 * n)
    ctr = kinds["Click"] / kinds["Impression"]
    assert abs(ctr - c / n) < 5 * np.sqrt(ctr / kinds["Impression"])


# ---------------------------------------------------------------- generic CSV / Parquet


def _table(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "ts": (pd.Timestamp("2024-05-01", tz="UTC") + pd.to_timedelta(rng.permutation(n) * 7, unit="s"))
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "y": rng.integers(2, size=n),
        "site": rng.choice(["a", "b", None], size=n),
        "price": rng.normal(10, 2, size=n),
        "uid": [f"u{i % 5}" for i in range(n)],
        "item": rng.integers(100, size=n),
    })


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_source_csv_and_parquet(tmp_path, suffix):
    df = _table()
    path = write_table(df, tmp_path / f"log{suffix}")
    events = list(table_events(path, time_col="ts", label_col="y", categorical="site", numeric=["price"],
                               id_cols="user=uid,ad=item"))
    kinds = check_stream(events)
    assert kinds["Impression"] == len(df) and kinds["Click"] == df["y"].sum()
    imps = [e for e in events if isinstance(e, Impression)]
    expected = df.assign(t=pd.to_datetime(df["ts"])).sort_values("t", kind="stable")
    assert [e.user_id for e in imps] == expected["uid"].tolist()
    assert [e.ad_id for e in imps] == expected["item"].astype(str).tolist()
    assert [e.features["price"] for e in imps] == pytest.approx(expected["price"].tolist())
    assert [e.features["site"] for e in imps] == [None if v is None or v != v else v for v in expected["site"]]
    assert all(e.request_id.startswith("log-") and e.bidword == e.ad_id for e in imps)


def test_table_source_epoch_millis_and_default_id_columns(tmp_path):
    df = pd.DataFrame({"t": [1_700_000_002_000, 1_700_000_001_000, 1_700_000_003_000],
                       "label": [True, False, False], "user_id": ["x", "y", None],
                       "ad_id": ["a1", "a2", "a3"], "query": ["red shoes", "tents", "tents"],
                       "position": [2, 0, 1]})
    events = list(table_events(write_table(df, tmp_path / "l.csv"), time_col="t", label_col="label"))
    check_stream(events)
    assert events[-1].user_id == "anonymous"  # a missing id falls back to the default
    first = events[0]
    assert first.event_time == 1_700_000_001.0 and first.user_id == "y" and first.position == 0
    assert first.bidword == "tents"
    click = next(e for e in events if isinstance(e, Click))
    assert (click.ad_id, click.event_time) == ("a1", 1_700_000_003.0)


def test_table_source_errors(tmp_path):
    df = _table(10)
    path = write_table(df, tmp_path / "l.csv")
    with pytest.raises(ConfigError, match="missing column"):
        table_events(path, time_col="when", label_col="y")
    with pytest.raises(ConfigError, match="cannot parse timestamp 'yesterday'"):
        bad = df.assign(ts=["yesterday"] + df["ts"].tolist()[1:])
        table_events(write_table(bad, tmp_path / "b.csv"), time_col="ts", label_col="y")
    with pytest.raises(ConfigError, match="must be 0/1"):
        table_events(write_table(df.assign(y=2), tmp_path / "c.csv"), time_col="ts", label_col="y")
    with pytest.raises(ConfigError, match="numeric column 'site'"):
        table_events(path, time_col="ts", label_col="y", numeric="site")
    with pytest.raises(ConfigError, match="unknown role"):
        table_events(path, time_col="ts", label_col="y", id_cols="shop=site")
    with pytest.raises(ConfigError, match="not unique"):
        table_events(path, time_col="ts", label_col="y", id_cols="request=uid,ad=uid")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown file type"):
        read_table(tmp_path / "x.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read"):
        read_table(tmp_path / "broken.parquet")
    with pytest.raises(ConfigError, match="not found"):
        read_table(tmp_path / "nope.csv")


def test_world_examples_round_trip_through_a_parquet_file(tmp_path):
    """The CTR-evaluation path: world frame -> Parquet -> generic source."""
    world = World(WorldConfig(seed=5))
    df = world.to_examples_frame(duration_s=60, requests_per_s=5)
    path = write_table(df, tmp_path / "examples.parquet")
    cols = example_columns()
    events = list(table_events(path, time_col=cols["time_col"], label_col=cols["label_col"],
                               categorical=cols["categorical"], numeric=cols["numeric"],
                               id_cols="request=request_id,user=user_id,ad=ad_id,creative=creative_id"))
    kinds = check_stream(events)
    assert kinds["Click"] == df["clicked"].sum() and kinds["Impression"] == len(df)
    # the ids of the world's impressions survive the trip
    imps = [e for e in events if isinstance(e, Impression)]
    assert [(e.request_id, e.ad_id, e.creative_id) for e in imps] == list(
        zip(df["request_id"], df["ad_id"], df["creative_id"]))


# ---------------------------------------------------------------- registry, paths, CLI


def test_open_source_and_synthetic():
    events = list(open_source("synthetic", seed=2, duration_s=30, rps=5, drift="none"))
    kinds = check_stream(events)
    assert kinds["Impression"] > 100 and kinds["BidwordChange"] == 0
    with pytest.raises(ConfigError, match="unknown source"):
        open_source("kafka")
    with pytest.raises(ConfigError, match="synthetic"):
        open_source("synthetic", speed=3)


def test_synthetic_start_time_moves_the_epoch():
    events = list(sources.synthetic_events(duration_s=20, rps=5, start_time=1_800_000_000.0))
    assert 1_800_000_000.0 <= events[0].event_time < 1_800_000_020.0


def test_shared_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.SHARED_DATA_ENV, str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv(sources.SHARED_DATA_ENV, str(tmp_path / "missing"))
    assert shared_data_dir(required=False) is None
    with pytest.raises(ConfigError, match=sources.SHARED_DATA_ENV):
        obd_events()


def test_cli_replay_to_jsonl_and_errors(tmp_path, capsys):
    out = tmp_path / "events.jsonl"
    rc = main(["replay", "synthetic", "--duration", "30", "--rps", "5", "--limit", "200",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    lines = out.read_bytes().splitlines()
    assert len(lines) == 200 and all(decode(x) for x in lines)
    assert "wrote 200 events" in capsys.readouterr().out
    rc = main(["replay", "file", str(tmp_path / "nope.csv"), "--time-col", "t", "--label-col", "y",
               "--output", str(out)])
    assert rc == 1
    assert "not found" in capsys.readouterr().err
    rc = main(["replay", "synthetic", "--drift", "sideways", "--output", str(out)])
    assert rc == 1 and "unknown drift" in capsys.readouterr().err
