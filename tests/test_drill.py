"""The fault drill (adstream/drill.py): the short version end to end on the real parts, and the
audit's checks shown to fail on a loop that lost or double-counted something."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from adstream.drill import POISON_PREFIX, DrillConfig, DrillReport, malformed_records
from adstream.drill_audit import AuditContext, audit, print_table
from core.events import Example, Impression
from core.settings import Settings


def _imp(rid: str, ad: str, t: float, version: str = "v000001") -> Impression:
    return Impression(request_id=rid, event_time=t, user_id="u1", query="q", ad_id=ad, creative_id=f"{ad}-c0",
                      bidword="b", category="c", position=0, bid=1.0, model_versions={"ctr": version})


class FakeContext(AuditContext):
    """The audit's view of a finished loop, built by hand (a unit test of the checks)."""

    def __init__(self, tmp_path, imps, examples, clicks=(), mismatches=(), dead=()):
        self.topics = Settings().kafka.topics
        self.settings = Settings()
        self.cfg = DrillConfig()
        self.registry_dir = tmp_path / "registry"
        self._imps, self._examples, self._clicks = imps, examples, list(clicks)
        self._mismatches, self._dead = list(mismatches), list(dead)

    def impressions(self):
        recs = [(k.encode(), v.to_json(), 0, i, 0) for i, (k, v) in enumerate(self._imps.items())]
        bad = [(f"drill-bad-{i}".encode(), raw, 0, 1000 + i, 0) for i, (kind, raw, _r) in
               enumerate(malformed_records(0.0)) if kind == "impression"]
        return dict(self._imps), recs + bad

    def examples(self, stages=("full", "close")):
        def stage(raw):
            try:
                return json.loads(raw).get("stage", "full")
            except ValueError:
                return "full"
        out = {k: {v for v in vals if stage(v) in stages} for k, vals in self._examples.items()}
        return {k: v for k, v in out.items() if v}

    def read(self, topic):
        if topic == self.topics.clicks:
            bad = [(f"drill-bad-{i}".encode(), raw, 1, 1000 + i, 0) for i, (kind, raw, _r) in
                   enumerate(malformed_records(0.0)) if kind == "click"]
            return [(None, c.to_json(), 1, i, int(c.event_time * 1000)) for i, c in enumerate(self._clicks)] + bad
        if topic == self.topics.dead_letter:
            return [(None, json.dumps(d).encode(), 0, i, 0) for i, d in enumerate(self._dead)]
        return []

    def windows(self):
        return getattr(self, "_windows", [{"window": 3, "ctr": 0.05, "gate": "publish"},
                                          {"window": 4, "ctr": 0.81, "gate": "publish"},
                                          {"window": 5, "ctr": 0.04, "gate": "reject"}])

    def recount(self):
        return {"user": {"u1": [len(self._imps), 0]}}

    def store_mismatches(self, counts=None):
        return self._mismatches


def all_dead_letters():
    out = []
    for i, (kind, _raw, reason) in enumerate(malformed_records(0.0)):
        topic = "impressions" if kind == "impression" else "clicks"
        out.append({"topic": topic, "partition": 0 if kind == "impression" else 1, "offset": 1000 + i, "reason": reason})
    return out


def facts(served_keys, errors=0):
    return {"served": [{"request_id": k.split(":")[0], "ad_id": k.split(":")[1]} for k in served_keys],
            "traffic": {"requests": len(served_keys), "ok": len(served_keys) - errors, "errors": errors},
            "serve_metrics": {"adstream_serve_impression_log_dropped_total": 0.0}, "error_samples": []}


def run_audit(ctx, served, errors=0) -> dict[str, bool]:
    rep = DrillReport(facts=facts(served, errors))
    audit(ctx, rep)
    print_table(rep)
    return {c.name: c.ok for c in rep.checks}


def good_loop(tmp_path, **kw):
    """Five impressions; r0 clicked 1 s after it, so its positive went out at the click too."""
    from core.events import Click

    imps = {f"r{i}:a{i}": _imp(f"r{i}", f"a{i}", 1000.0 + i) for i in range(5)}
    examples = {k: {Example.from_impression(v, False, False, None).to_json()} for k, v in imps.items()}
    examples["r0:a0"] = {Example.from_impression(imps["r0:a0"], True, False, 1001.0, stage="click").to_json(),
                         Example.from_impression(imps["r0:a0"], True, True, 1001.0, stage="close").to_json()}
    examples[f"{POISON_PREFIX}0:a1"] = {b"poison is not an impression's example"}
    args = dict(imps=imps, examples=examples, dead=all_dead_letters(),
                clicks=[Click(request_id="r0", event_time=1001.0, ad_id="a0", user_id="u1")])
    args.update(kw)
    return FakeContext(tmp_path, **args), list(imps)


def test_the_audit_passes_a_clean_loop_and_fails_every_kind_of_loss(tmp_path, monkeypatch):
    import models.registry as registry

    # the registry says v000009 was rejected by the gate
    monkeypatch.setattr(registry.ModelRegistry, "versions", lambda self, rejected=False: ["v000009"] if rejected else [])
    ctx, served = good_loop(tmp_path)
    ok = run_audit(ctx, served)
    assert all(ok.values()), ok
    # a served ad that never reached the topic
    assert not run_audit(ctx, served + ["r9:a9"])["served ads on the impressions topic"]
    # an impression without its example, and one with two different examples
    ctx2, _ = good_loop(tmp_path)
    del ctx2._examples["r1:a1"]
    ctx2._examples["r2:a2"].add(b"other content")
    assert not run_audit(ctx2, served)["every impression became one example"]
    # a label that disagrees with the clicks topic
    from core.events import Click

    ctx3, _ = good_loop(tmp_path)
    ctx3._clicks.append(Click(request_id="r1", event_time=1002.0, ad_id="a1", user_id="u1"))
    assert not run_audit(ctx3, served)["example labels = recount of the clicks"]
    # positives at the click: one missing, one spurious, one with two contents, a final record not
    # marked close; and with the option off, any click-stage record at all
    imp0, imp3 = ctx._imps["r0:a0"], ctx._imps["r3:a3"]
    early = Example.from_impression(imp0, True, False, 1001.0, stage="click").to_json()
    for broken in (
        lambda e: e["r0:a0"].discard(early),
        lambda e: e["r3:a3"].add(Example.from_impression(imp3, True, False, 1004.0, stage="click").to_json()),
        lambda e: e["r0:a0"].add(Example.from_impression(imp0, True, False, 1001.5, stage="click").to_json()),
        lambda e: e.__setitem__("r0:a0", {early, Example.from_impression(imp0, True, True, 1001.0).to_json()}),
    ):
        ctxe, _ = good_loop(tmp_path)
        broken(ctxe._examples)
        assert not run_audit(ctxe, served)["every positive emitted at its click"]
    ctxo, _ = good_loop(tmp_path)
    ctxo.cfg.emit_at_click = False
    assert not run_audit(ctxo, served)["no positive emitted at a click (off)"]
    ctxo._examples["r0:a0"].discard(early)
    assert run_audit(ctxo, served)["no positive emitted at a click (off)"]
    # feature counts off, a rejected version served, a request that failed, a lost dead letter,
    # a spurious orphan
    ctx4, _ = good_loop(tmp_path, mismatches=[("user", "u1", [5, 0], [6, 0])])
    assert not run_audit(ctx4, served)["feature counts = recount of the topics"]
    ctx5, _ = good_loop(tmp_path)
    ctx5._imps["r0:a0"] = _imp("r0", "a0", 1000.0, version="v000009")
    assert not run_audit(ctx5, served)["no gated-out model served"]
    assert not run_audit(ctx, served, errors=1)["service answered every request"]
    ctx8, _ = good_loop(tmp_path)
    ctx8._windows = [{"window": 4, "ctr": 0.81, "gate": "publish"}, {"window": 5, "ctr": 0.04, "gate": "publish"}]
    assert not run_audit(ctx8, served)["poisoned window gated out"]
    # a burst split across windows 4 and 5: the candidate that learned 4, judged on 5, was published
    ctx8._windows = [{"window": 4, "ctr": 0.55, "gate": "publish"}, {"window": 5, "ctr": 0.52, "gate": "publish"},
                     {"window": 6, "ctr": 0.04, "gate": "reject"}]
    assert not run_audit(ctx8, served)["poisoned window gated out"]
    ctx8._windows[1]["gate"] = "reject"
    assert run_audit(ctx8, served)["poisoned window gated out"]
    ctx6, _ = good_loop(tmp_path, dead=all_dead_letters()[1:])
    assert not run_audit(ctx6, served)["malformed records dead-lettered"]
    ctx7, _ = good_loop(tmp_path, dead=all_dead_letters() + [{"topic": "clicks", "partition": 2, "offset": 5,
                                                                "reason": "orphan_click"}])
    assert not run_audit(ctx7, served)["no spurious orphan_click"]


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.redis
def test_the_short_drill_loses_nothing(tmp_path):
    """kill -9 of the joiner, the feature updater and the trainer, a broker restart, Redis stopped
    and back empty, malformed events and a poisoned window: every check of the audit passes."""
    from adstream.drill import run_drill

    cfg = DrillConfig.short()
    report = run_drill(tmp_path / "drill", cfg, say=print)
    print_table(report)
    assert {f for _t, f, _w in report.faults} == set(cfg.schedule)  # every fault happened
    failed = [(c.name, c.expected, c.got) for c in report.checks if not c.ok]
    assert not failed, failed
    assert len(report.checks) == 10  # the audit ran every check
