"""The gate of the stream model worker: every part of a job judged on the next window against its
serving version, published or rejected (one version per registry name), reset after a rejection,
and the same decision (with its figures) reused after a crash between the decision and the
checkpoint. Used by ``streams.model_worker.ModelWorker``; see its docstring.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

from models.registry import ModelRegistry, RegistryError
from models.stream_model import finite_or_none, gate_of, joint_decision, meta_of, parts_of

if TYPE_CHECKING:
    from streams.model_worker import ModelWorker

log = logging.getLogger(__name__)

# windows.jsonl / registry meta keys a score key must not overwrite when flattened
RESERVED = {"window", "examples", "partial", "event_time_min", "event_time_max", "gate", "gate_reason", "version",
            "reset_to", "published_at", "publish_freshness_s", "serving_version", "judged_against", "parts", "keys",
            "train_seconds", "gate_seconds", "loss", "examples_trained", "wall_time", "run_id", "created_at",
            "name", "config", "strategy", "suspect"}


def f_or_none(x: Any) -> Any:
    """Numbers as finite floats or None (JSON); anything else unchanged."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    return finite_or_none(x)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


class WindowGate:
    def __init__(self, worker: ModelWorker, registry_dir: Any) -> None:
        self.w = worker
        self.registry_dir = registry_dir
        names = list(parts_of(worker.model))
        self.single = names == [worker.model.name]
        self.registries = {n: ModelRegistry(registry_dir, n) for n in names}
        self.serving_versions: dict[str, str | None] = {n: None for n in names}
        self.counts = {"publish": 0, "reject": 0, "reset": 0}
        self._serving_cache: dict[str, tuple[str, Any]] = {}
        self._cand: tuple[int, dict[str, Any]] | None = None  # (window it is the candidate for, model state)
        self.check_registry_for_window: int | None = None  # after a restore: was window k decided already?

    # ---- checkpoint ----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"serving_versions": dict(self.serving_versions), "counts": dict(self.counts)}

    def restore(self, data: dict[str, Any]) -> None:
        self.serving_versions.update({str(k): v for k, v in dict(data["serving_versions"]).items()})
        self.counts.update({k: int(v) for k, v in dict(data["counts"]).items()})

    def remember_candidate(self, window: int, state: dict[str, Any]) -> None:
        """The model state just checkpointed is what the gate of ``window`` publishes (single part)."""
        self._cand = (window, state) if self.single else None

    # ---- helpers -------------------------------------------------------------------------------
    def score_keys(self) -> list[str]:
        return [c.key for part in parts_of(self.w.model).values() for c in gate_of(part).criteria] \
            if self.single else []

    def _gate_for(self, part: Any):
        g = gate_of(part)
        margins = {k: v for k, v in self.w.cfg.gate_margins.items() if k in g.keys}
        return g.with_margins(margins) if margins else g

    def _serving(self, name: str, part: Any) -> tuple[str, Any] | None:
        """The registry's LATEST of ``name`` as a model (cached by version; reloaded after a rollback)."""
        reg = self.registries[name]
        try:
            version = reg.latest()
        except RegistryError as e:
            log.warning("registry: %s", e)
            return None
        if version is None:
            return None
        cached = self._serving_cache.get(name)
        if cached is not None and cached[0] == version:
            return cached
        try:
            state, _info = reg.load(version)
            model = type(part).from_state(state)
        except Exception as e:
            log.warning("cannot load serving model %s %s (%s): gating without it", name, version, e)
            return None
        self._serving_cache[name] = (version, model)
        return self._serving_cache[name]

    def _earlier_decisions(self, k: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """After a restart: the parts this run already decided for window k (before the crash)."""
        out = {}
        for name, reg in self.registries.items():
            for rejected, outcome in ((False, "publish"), (True, "reject")):
                d = reg.rejected_dir if rejected else reg.versions_dir
                for v in reversed(reg.versions(rejected=rejected)):
                    try:
                        meta = json.loads((d / v / "meta.json").read_text())
                    except (OSError, ValueError):
                        continue
                    if meta.get("run_id") == self.w.run_id and meta.get("window") == k:
                        out[name] = (outcome, v, meta)
                        break
                if name in out:
                    break
        return out

    # ---- one gate ------------------------------------------------------------------------------
    def run(self, k: int, records: list[dict[str, Any]], rec: dict[str, Any], append_max: float,
            suspect: str | None = None) -> None:
        """Judge the candidate (trained through window k-1) on window k. ``suspect``: why the worker's
        guard held window k-1; then every part is rejected (and reset) whatever its scores."""
        w, model = self.w, self.w.model
        parts = parts_of(model)
        judged: dict[str, tuple[dict, tuple[str, Any] | None, dict | None]] = {}
        raw_decisions = {}
        for name, part in parts.items():
            cand = part.score(records)
            serving = self._serving(name, part)
            sv = serving[1].score(records) if serving is not None else None
            if serving is not None:
                self.serving_versions[name] = serving[0]  # LATEST may have moved (rollback, promote)
            w.metrics.set_scores(name, "candidate", cand)
            if sv is not None:
                w.metrics.set_scores(name, "serving", sv)
            judged[name] = (cand, serving, sv)
            raw_decisions[name] = self._gate_for(part).decide(cand, sv)
        decisions = joint_decision(raw_decisions, w.cfg.joint)
        if suspect:
            held = f"learned window {k - 1}, held as suspect: {suspect}"
            decisions = {n: (False, held if ok else f"{why}; {held}") for n, (ok, why) in decisions.items()}
        earlier = {}
        if self.check_registry_for_window == k:
            self.check_registry_for_window = None
            earlier = self._earlier_decisions(k)
        part_recs: dict[str, dict[str, Any]] = {}
        to_reset: dict[str, tuple[str, Any]] = {}
        for name, part in parts.items():
            cand, serving, sv = judged[name]
            publish, reason = decisions[name]
            scores = {key: f_or_none(v) for key, v in cand.items()}
            sv_scores = {key: f_or_none(v) for key, v in (sv or {}).items()}
            against = serving[0] if serving is not None else None
            if name in earlier:  # decided before a crash: keep that decision and its figures
                outcome, version, meta = earlier[name]
                publish = outcome == "publish"
                reason = f"decided before the restart ({meta.get('gate_reason')})"
                scores = dict(meta.get("scores") or scores)
                sv_scores = dict(meta.get("serving_scores") or {})
                against = meta.get("serving_version")
                state = None
            else:
                if self.single and self._cand is not None and self._cand[0] == k:
                    state = self._cand[1]
                else:
                    state = part.state()
                meta = self._meta(k, name, part, scores, sv_scores, against, reason, rec, len(records))
                reg = self.registries[name]
                info = (reg.publish if publish else reg.reject)(state, meta)
                version = info.version
            outcome = "publish" if publish else "reject"
            self.counts[outcome] += 1
            w.metrics.gate_decisions.labels(name, outcome).inc()
            prec: dict[str, Any] = {key: v for key, v in scores.items() if key not in RESERVED}
            prec.update({f"serving_{key}": v for key, v in sv_scores.items() if f"serving_{key}" not in RESERVED})
            prec.update(gate=outcome, gate_reason=reason, version=version, judged_against=against)
            if publish:
                self.serving_versions[name] = version
                if state is not None:
                    self._serving_cache[name] = (version, type(part).from_state(state))
                now = w.clock()
                prec["published_at"] = now
                w.metrics.last_publish[name] = now
                if not math.isnan(w.newest_append_ts):
                    fresh = now - w.newest_append_ts
                    prec["publish_freshness_s"] = round(fresh, 3)
                    w.metrics.publish_freshness.labels(name).set(fresh)
            else:
                log.warning("window %d: %s candidate rejected (%s), kept as %s", k, name, reason, version)
                if serving is not None and (w.cfg.on_reject == "reset" or suspect):
                    to_reset[name] = serving
            part_recs[name] = prec
        if to_reset:
            self._reset(to_reset, part_recs)
        if self.single:
            rec.update(part_recs[w.model.name if w.model.name in part_recs else next(iter(part_recs))])
        else:
            outcomes = {p["gate"] for p in part_recs.values()}
            rec.update(gate=outcomes.pop() if len(outcomes) == 1 else "mixed",
                       version={n: p["version"] for n, p in part_recs.items()}, parts=part_recs)

    def _meta(self, k: int, name: str, part: Any, scores: dict, sv_scores: dict, against: str | None, reason: str,
              rec: dict[str, Any], n: int) -> dict[str, Any]:
        w = self.w
        lw = w.last_window or {}
        meta = {key: v for key, v in scores.items() if key not in RESERVED}
        meta.update({f"serving_{key}": v for key, v in sv_scores.items() if f"serving_{key}" not in RESERVED})
        meta.update({"window": k, "trained_through_window": k - 1, "run_id": w.run_id, "job": w.model.name,
                     "scores": scores, "serving_version": against, "serving_scores": sv_scores,
                     "gate_examples": n, "examples": w.examples_trained,
                     "event_time_range": [lw.get("event_time_min"), lw.get("event_time_max")],
                     "gate_event_time_range": [rec["event_time_min"], rec["event_time_max"]],
                     "created_at": w.clock(), "gate_reason": reason})
        meta.update(meta_of(part))
        return meta

    def _reset(self, serving: dict[str, tuple[str, Any]], part_recs: dict[str, dict[str, Any]]) -> None:
        """``on_reject=reset``: back to the serving versions of the rejected parts."""
        w = self.w
        model = w.model
        try:
            states = {n: m.state() for n, (_v, m) in serving.items()}
            if callable(getattr(model, "reset_to", None)):
                model.reset_to(states)
            elif self.single:
                w.model = type(model).from_state(states[model.name])
            else:
                log.warning("model %s has no reset_to(): it continues from the rejected candidate", model.name)
                return
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            log.warning("cannot reset to the serving versions %s (%s); continuing from the candidate",
                        {n: v for n, (v, _m) in serving.items()}, e)
            return
        self.counts["reset"] += 1
        for n, (v, _m) in serving.items():
            part_recs[n]["reset_to"] = v

    def summary(self, rec: dict[str, Any]) -> str:
        """One log phrase for a window's scores (candidate vs serving)."""
        if not self.single:
            return ", ".join(f"{n}: {p.get('gate')}" for n, p in (rec.get("parts") or {}).items()) or "no gate"
        keys = self.score_keys()
        return ", ".join(f"{k} {_fmt(rec.get(k))} (serving {_fmt(rec.get('serving_' + k))})" for k in keys)
