"""The fault drill's audit (``adstream.drill``): the checks, read from the topics and the stores
after the drill drained the loop, and the report's table and JSON. Each check is listed in
docs/drill.md, "What it checks".
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from adstream.drill import (ENTITY_FIELDS, POISON_PREFIX, POISONED_CTR, DrillConfig, DrillReport,
                            malformed_records)


class AuditContext:
    """Reads the topics and stores the checks need (again on each call: the drain polls it)."""

    def __init__(self, bootstrap: str, topics, settings, cfg: DrillConfig, registry_dir: Path,
                 windows_path: Path | None = None) -> None:
        self.bootstrap, self.topics, self.settings, self.cfg = bootstrap, topics, settings, cfg
        self.registry_dir = registry_dir
        self.windows_path = windows_path
        self._client = None

    def windows(self) -> list[dict[str, Any]]:
        """The trainer's windows.jsonl lines."""
        if self.windows_path is None or not self.windows_path.is_file():
            return []
        return [json.loads(line) for line in self.windows_path.read_text().splitlines() if line.strip()]

    def read(self, topic: str) -> list[tuple]:
        from streams.kafka_io import read_topic

        return read_topic(self.bootstrap, topic, timeout_s=60, idle_s=0.5)

    def impressions(self) -> tuple[dict[str, Any], list[tuple]]:
        """Valid impressions by key (first seen), and every record."""
        from core.errors import InvalidRecord
        from core.events import Impression, decode, record_time

        recs = self.read(self.topics.impressions)
        out: dict[str, Any] = {}
        for _k, v, _p, _o, ts in recs:
            try:
                e = decode(v, Impression, now=record_time((1, ts), time.time()),
                           max_future_s=self.settings.join.max_future_s)
            except InvalidRecord:
                continue
            out.setdefault(f"{e.request_id}:{e.ad_id}", e)
        return out, recs

    def examples(self, stages: tuple[str, ...] = ("full", "close")) -> dict[str, set[bytes]]:
        """Example records by key: the final ones (``full``, ``close``) unless ``stages`` says
        otherwise (``("click",)``: the positives emitted at the click)."""
        by_key: dict[str, set[bytes]] = defaultdict(set)
        for k, v, *_ in self.read(self.topics.examples):
            key = k.decode() if isinstance(k, bytes) else str(k)
            if key.startswith(POISON_PREFIX):
                continue
            try:
                stage = json.loads(v).get("stage", "full")
            except (ValueError, AttributeError, TypeError):
                stage = "full"  # unreadable: counted with the final records, where the checks see it
            if stage in stages:
                by_key[key].add(v)
        return by_key

    def examples_complete(self) -> bool:
        imps, _ = self.impressions()
        return set(imps) <= set(self.examples())

    def recount(self) -> dict[str, dict[str, list[int]]]:
        """Per entity type and key: [impressions, clicks] from the topics, each event once (as the
        feature updater counts: records its decoder accepts, ids as streams.feature_updater.event_id)."""
        from core.errors import InvalidRecord
        from core.events import Click, Impression, decode, record_time
        from streams.feature_updater import event_id

        counts: dict[str, dict[str, list[int]]] = {e: defaultdict(lambda: [0, 0]) for e in ENTITY_FIELDS}
        seen: set[str] = set()
        for topic, cls, col in ((self.topics.impressions, Impression, 0), (self.topics.clicks, Click, 1)):
            for _k, v, _p, _o, ts in self.read(topic):
                try:
                    e = decode(v, cls, now=record_time((1, ts), time.time()))
                except InvalidRecord:
                    continue
                eid = event_id(e.to_dict())
                if eid in seen:
                    continue
                seen.add(eid)
                for etype, fld in ENTITY_FIELDS.items():
                    key = getattr(e, fld, "")
                    if key:  # an event without this entity's id counts for neither its row nor the field row
                        counts[etype][key][col] += 1
                        counts[etype]["__all__"][col] += 1
        return counts

    def store_mismatches(self, counts=None) -> list[tuple[str, str, list[int], Any]]:
        from features.store import FeatureStoreClient

        counts = counts or self.recount()
        if self._client is None:
            self._client = FeatureStoreClient(self.settings.features, apply=False)
        bad = []
        for etype, rows in counts.items():
            got = self._client.read(etype, list(rows))
            for key, want in rows.items():
                g = got.get(key) or {}
                have = [g.get("impressions"), g.get("clicks")]
                if have != want:
                    bad.append((etype, key, want, have))
        return bad

    def features_match(self) -> bool:
        return not self.store_mismatches()


def _field(raw: bytes, name: str) -> Any:
    try:
        return json.loads(raw).get(name, "full" if name == "stage" else None)
    except (ValueError, AttributeError, TypeError):
        return None


def audit(ctx: AuditContext, report: DrillReport) -> None:
    from core.errors import InvalidRecord
    from core.events import Click, decode, record_time
    from models.registry import ModelRegistry

    cfg = ctx.cfg
    served = report.facts.get("served", [])
    tr = report.facts.get("traffic", {})
    imps, imp_recs = ctx.impressions()
    served_keys = {f"{s['request_id']}:{s['ad_id']}" for s in served}
    lost = served_keys - set(imps)
    sm = report.facts.get("serve_metrics", {})
    dropped = sm.get("adstream_serve_impression_log_dropped_total", 0.0)
    report.check("served ads on the impressions topic", f"{len(served_keys)} of {len(served_keys)}, 0 dropped",
                 f"{len(served_keys) - len(lost)} of {len(served_keys)}, {int(dropped)} dropped",
                 not lost and dropped == 0 and served_keys)
    ex = ctx.examples()
    missing = set(imps) - set(ex)
    conflicting = [k for k, vals in ex.items() if len(vals) > 1]
    report.check("every impression became one example", f"{len(imps)} examples, 0 missing, 0 with 2 contents",
                 f"{len(set(imps) & set(ex))} examples, {len(missing)} missing, {len(conflicting)} with 2 contents",
                 not missing and not conflicting and imps)
    at_click = ctx.examples(("click",))
    if cfg.emit_at_click:
        # every final positive went out at its click too, once, with one content; nothing else did
        positives = {k for k, vals in ex.items() if any(_field(v, "clicked") == 1 for v in vals)}
        no_early = positives - set(at_click)
        spurious = set(at_click) - positives
        twice = [k for k, vals in at_click.items() if len(vals) > 1]
        stage_wrong = [k for k in positives if any(_field(v, "stage") != "close" for v in ex[k])]
        report.check("every positive emitted at its click", f"{len(positives)} positives, 0 missing, 0 spurious, "
                     "0 with 2 contents", f"{len(positives) - len(no_early)} positives, {len(no_early)} missing, "
                     f"{len(spurious)} spurious, {len(twice)} with 2 contents, {len(stage_wrong)} final records "
                     "not marked close", positives and not (no_early or spurious or twice or stage_wrong))
    else:
        report.check("no positive emitted at a click (off)", "0 click-stage records", f"{len(at_click)}",
                     not at_click)
    # labels against a recount of the clicks topic
    clicks: dict[str, list[float]] = defaultdict(list)
    for _k, v, _p, _o, ts in ctx.read(ctx.topics.clicks):
        try:
            c = decode(v, Click, now=record_time((1, ts), time.time()))
        except InvalidRecord:
            continue
        clicks[f"{c.request_id}:{c.ad_id}"].append(c.event_time)
    wrong = 0
    for key, imp in imps.items():
        vals = ex.get(key, set()) | at_click.get(key, set())
        if not vals:
            continue
        want = int(any(0 <= t - imp.event_time <= cfg.window_s for t in clicks.get(key, ())))
        try:
            wrong += any(json.loads(v)["clicked"] != want for v in vals)
        except (ValueError, KeyError, TypeError):
            wrong += 1
    report.check("example labels = recount of the clicks", "0 wrong", f"{wrong} wrong of {len(imps)}", wrong == 0)
    counts = ctx.recount()
    bad = ctx.store_mismatches(counts)
    n_rows = sum(len(r) for r in counts.values())
    report.check("feature counts = recount of the topics", f"{n_rows} rows equal",
                 f"{n_rows - len(bad)} equal, {len(bad)} differ" + (f" (e.g. {bad[0]})" if bad else ""), not bad)
    # models
    reg = ModelRegistry(ctx.registry_dir, ctx.settings.trainer.model_name)
    rejected = set(reg.versions(rejected=True))
    served_versions = Counter(e.model_versions.get("ctr", "?") for e in imps.values())
    bad_served = {v: n for v, n in served_versions.items() if v in rejected}
    report.check("no gated-out model served", "0 impressions", f"{sum(bad_served.values())} impressions "
                 f"({len(rejected)} versions rejected, served {dict(served_versions)})", not bad_served)
    # the poisoned window(s): the burst's click rate gives them away (all clicked vs a few percent). A
    # burst of one window's size usually lands in two windows; the candidate trained through each window
    # the burst dominates (>= 40 % clicked) must be rejected at the next gate: the gate's scores catch
    # it when the next window is clean, the trainer's label-rate guard when the next window holds the
    # rest of the burst (then the gate alone would publish it, docs/trainer.md "Label-rate guard")
    wins = ctx.windows()
    by_k = {w["window"]: w for w in wins}
    poisoned = [w["window"] for w in wins if (w.get("ctr") or 0) >= POISONED_CTR]
    gates = {k + 1: (by_k.get(k + 1) or {}).get("gate", "none") for k in poisoned}
    report.check("poisoned window gated out", "the candidate that learned it rejected at the next gate",
                 f"poisoned windows {poisoned}, next gates: {gates}",
                 bool(poisoned) and all(g == "reject" for g in gates.values()))
    report.facts["published"] = reg.versions()
    # the service
    errors = tr.get("errors", 0)
    five = sum(1 for s in report.facts.get("error_samples", []) if "HTTP 5" in s)
    report.check("service answered every request", f"{tr.get('requests', 0)} answered, 0 errors, 0 x 5xx",
                 f"{tr.get('ok', 0)} answered, {errors} errors, {five} x 5xx, degraded {tr.get('degraded', {})}",
                 errors == 0 and tr.get("requests", 0) > 0)
    # dead letters: every malformed record has one with its reason; orphan_click only for the orphans sent
    dls = [json.loads(v) for _k, v, *_ in ctx.read(ctx.topics.dead_letter)]
    reasons_at: dict[tuple, set] = defaultdict(set)
    for d in dls:
        reasons_at[(d.get("topic"), d.get("partition"), d.get("offset"))].add(d.get("reason"))
    sent = {i: reason for i, (_kind, _raw, reason) in enumerate(malformed_records(0.0))}
    where: dict[tuple, str] = {}
    for topic, recs in ((ctx.topics.impressions, imp_recs), (ctx.topics.clicks, ctx.read(ctx.topics.clicks))):
        for k, _v, p, o, _ts in recs:
            if k and k.startswith(b"drill-bad-"):
                where[(topic, p, o)] = sent[int(k[len(b"drill-bad-"):])]
    undead = [(pos, r) for pos, r in where.items() if r not in reasons_at.get(pos, ())]
    report.check("malformed records dead-lettered", f"{len(sent)} records, each with its reason",
                 f"{len(where) - len(undead)} of {len(where)}" + (f", e.g. {undead[0]}" if undead else ""),
                 len(where) == len(sent) and not undead)
    orphan_pos = {pos for pos, r in where.items() if r == "orphan_click"}
    spurious = {pos for pos, rs in reasons_at.items() if "orphan_click" in rs} - orphan_pos
    report.check("no spurious orphan_click", "0 (besides the orphans sent)", f"{len(spurious)}", not spurious)
    report.facts["dead_letters"] = dict(Counter(d.get("reason") for d in dls))


def print_table(report: DrillReport, out=None) -> None:
    out = out or sys.stdout
    w1 = max(len(c.name) for c in report.checks) if report.checks else 10
    w2 = max((len(c.expected) for c in report.checks), default=8)
    print("\n== adstream drill ==", file=out)
    for t, fault, what in report.faults:
        print(f"  t={t:6.1f}s  {fault:22s} {what}", file=out)
    print(f"\n{'check':{w1}}  {'expected':{w2}}  result", file=out)
    for c in report.checks:
        print(f"{c.name:{w1}}  {c.expected:{w2}}  {'ok  ' if c.ok else 'FAIL'} {c.got}", file=out)
    print(f"\n{'PASSED' if report.ok else 'FAILED'}: {sum(c.ok for c in report.checks)} of {len(report.checks)} "
          f"checks ({report.facts.get('wall_s', '?')}s)", file=out)


def write_json(report: DrillReport, path: Path) -> None:
    data = {"ok": report.ok, "checks": [c.__dict__ for c in report.checks], "faults": report.faults,
            "facts": {k: v for k, v in report.facts.items() if k not in ("served",)}}
    path.write_text(json.dumps(data, indent=1, default=str))

