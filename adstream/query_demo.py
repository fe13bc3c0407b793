"""The query classifier's part of ``adstream demo`` (docs/query.md, "Demo").

- :func:`start_query_workers`: the refresh agent (faust) and the query model worker as processes of
  the loop, on the loop's topics and registry;
- :class:`QueryWatch`: a few live queries and the categories the served version predicts for them
  (the generic loader on the same registry as the service), printed with every traffic bucket;
- :func:`inject_shift`: a quarter into the traffic, one query's clicks start going to a category
  the world never had (a new category starts getting clicks); the watch shows the served version
  following it, and a similar query that never got a click picking up the new category through its
  name and the semantic graph.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

NEW_CATEGORY = "outdoor/camping-stoves"
NEW_CATEGORY_WORDS = "camping stoves"
SIMILAR_QUERY = "portable camping stove"


def query_env(root: Path, registry_dir: Path, base_env: dict[str, str]) -> dict[str, str]:
    env = dict(base_env)
    env.update({
        "ADSTREAM_TRAINER__REGISTRY_DIR": str(registry_dir),
        "ADSTREAM_QUERY__CHECKPOINT_DIR": str(root / "query_trainer"),
        "ADSTREAM_QUERY__REFRESH_CHECKPOINT_DIR": str(root / "query_refresh"),
        "ADSTREAM_QUERY__WINDOW_SNAPSHOTS": "40",
        "ADSTREAM_QUERY__MIN_WINDOW": "5",
        "ADSTREAM_QUERY__EMIT_INTERVAL_S": "30",
        "ADSTREAM_QUERY__HALF_LIFE_S": "300",
        "ADSTREAM_STATE_DIR": str(root / "state"),
    })
    return env


def start_query_workers(loop, spawn, py: str, bootstrap: str, root: Path, registry_dir: Path,
                        ports: dict[str, int]) -> None:
    env = query_env(root, registry_dir, loop.env)
    spawn(loop, "query_refresh", [py, "-m", "streams.query_refresh", "refresh", "--bootstrap", bootstrap,
                                  "--metrics-port", str(ports["query_refresh"])], env)
    spawn(loop, "query_trainer", [py, "-m", "streams.query_refresh", "train", "--bootstrap", bootstrap,
                                  "--metrics-port", str(ports["query_trainer"])], env)


def watch_queries(world, n: int = 3) -> list[str]:
    """The most popular query of ``n`` different top categories, the outdoor one first (it moves)."""
    out: dict[str, str] = {}
    for q in sorted(world.queries, key=lambda q: -q.popularity):
        top = q.category.split("/")[0]
        if top not in out:
            out[top] = q.text
    tops = sorted(out, key=lambda t: (t != "outdoor", t))[:n]
    return [out[t] for t in tops]


class QueryWatch:
    """What the served query classifier says about a few queries, over time."""

    def __init__(self, registry_dir: Path, queries: list[str], name: str = "query-classifier") -> None:
        from online.query import query_loader

        self.loader = query_loader(registry_dir, name, poll_s=1.0).start()  # loads off the traffic's thread
        self.queries = list(queries)
        self.history: list[dict[str, Any]] = []

    def line(self, t: float) -> str | None:
        cur = self.loader.current
        if cur is None:
            return None
        out = cur.predict(self.queries)
        rec = {"t": round(t, 1), "version": cur.version,
               "predictions": {q: [[c, round(p, 3)] for c, p in cats] for q, cats in zip(self.queries, out)}}
        self.history.append(rec)
        parts = [f"{q!r} -> {', '.join(f'{c} {p:.2f}' for c, p in cats) or '-'}" for q, cats in zip(self.queries, out)]
        return f"  query model {cur.version}: " + "; ".join(parts)

    def stop(self) -> None:
        self.loader.stop()


def inject_shift(bootstrap: str, topics, query: str, n: int = 60) -> int:
    """``n`` impressions of an ad of :data:`NEW_CATEGORY` (a category the world never had) for
    ``query``, each clicked, stamped now: they go through the joiner like any served ad."""
    from core.events import Click, Impression
    from streams.kafka_io import make_producer

    p = make_producer(bootstrap)
    now = time.time()
    for i in range(n):
        rid, t = f"shift-{int(now)}-{i}", now - n * 0.1 + i * 0.1
        imp = Impression(request_id=rid, event_time=t, user_id="shift-user", query=query, ad_id="shift-ad",
                         creative_id="shift-ad-c0", bidword=NEW_CATEGORY_WORDS, category=NEW_CATEGORY, position=0,
                         bid=1.0)
        click = Click(request_id=rid, event_time=t + 1.0, ad_id="shift-ad", user_id="shift-user",
                      creative_id="shift-ad-c0", query=query, bidword=NEW_CATEGORY_WORDS, category=NEW_CATEGORY)
        p.produce(topics.impressions, imp.to_json(), key=rid)
        p.produce(topics.clicks, click.to_json(), key=rid)
        p.poll(0)
    p.flush(30)
    return n


def summary_lines(q: dict[str, Any]) -> list[str]:
    """The demo summary's query-classifier lines."""
    reg = q["registry"]
    out = [f"query classifier      : {len(reg['published'])} versions published, {len(reg['rejected'])} rejected, "
           f"{len(q['windows'])} windows of query snapshots"]
    hist = q["watch"]
    if hist:
        first, last = hist[0], hist[-1]
        for query in last["predictions"]:
            a = first["predictions"].get(query) or [["-", 0]]
            b = last["predictions"].get(query) or [["-", 0]]
            out.append(f"  {query!r:<28} {first['version']}: {a[0][0]:<24} -> {last['version']}: {b[0][0]}")
        moved = last["predictions"].get(q["shifted_query"]) or [["-", 0]]
        out.append(f"  after the shift, {q['shifted_query']!r} is served as {moved[0][0]} "
                   f"({'follows' if moved[0][0] == q['new_category'] else 'not yet'} the new category "
                   f"{q['new_category']})")
    lag = q["metrics"]["refresh"].get("adstream_query_refresh_lag_seconds")
    if lag is not None:
        out.append(f"  refresh lag at the end: {lag:.1f}s (wall clock - event time of the newest example)")
    return out
