"""One shape for every model the stream refreshes (pure: no Kafka, clock, env or HTTP).

The CTR model, the query classifier, the rewriter, the creative ranker and the cross-domain model
all plug into ONE machinery: ``streams.model_worker`` trains any :class:`StreamModel` window by
window from a topic (de-dup, checkpoint with offsets, a gate on the next window, publish/reject to
``models.registry``), and ``online.models.ModelLoader`` serves any published one by name. A model
brings only its own code: batch encoding, network, loss, gate metric.

The contract (``docs/architecture.md``, "One shape for every model")::

    class MyModel:                                   # satisfies StreamModel
        name = "query-classifier"                    # registry name
        gate = Gate.of(Criterion("accuracy", higher_is_better=True, margin=0.01))

        def learn(self, records): ...                # one incremental update on a window of decoded
                                                     # records (plain dicts); returns training stats
        def score(self, records): ...                # held-out quality on a window: a dict that
                                                     # holds every key the gate compares
        def predict(self, inputs): ...               # serving; read-only (called from many threads)
        def state(self): ...                         # tensors / numpy arrays + JSON-able plain data
        @classmethod
        def from_state(cls, state): ...

Optional hooks, looked up with ``getattr`` (see :func:`parts_of` and the worker):

- ``parts() -> dict[str, StreamModel]``: a job that publishes several registry names per window
  (JAC: an ad ranker and a creative ranker trained jointly). Each part is scored and gated on the
  same held-out window and published under its own name; its ``state()`` is what that name's
  version holds, and ``type(part).from_state`` rebuilds it (in the loader, and for the serving
  side of the gate). Without it the model is its own single part, under ``name``.
- ``reset_to(states: dict[str, dict]) -> None``: after a rejection (``on_reject=reset``), go back
  to the serving versions' states (name -> state; only names that have a serving version). A
  single-part model without it is replaced by ``from_state(serving state)``.
- ``fingerprint() -> dict``: JSON identity of the configuration; a checkpoint written with another
  fingerprint is refused (clear error) instead of loading into the wrong shape.
- ``validate() -> list[str]``: problems in the state (NaN, shapes); a checkpoint or version with
  problems is refused.
- ``meta() -> dict``: extra JSON metadata stored with every version (strategy, config, ...).
- ``warm() -> None``: one prediction on a made-up input, run by the loader before a swap.
- ``thread_safe: bool`` (default True): set False when ``predict`` mutates anything; the loader
  then serialises predictions on that version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

Record = dict[str, Any]


@runtime_checkable
class StreamModel(Protocol):
    """See the module docstring."""

    name: str

    def learn(self, records: list[Record]) -> dict[str, Any]: ...

    def score(self, records: list[Record]) -> dict[str, Any]: ...

    def predict(self, inputs: Any) -> Any: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StreamModel": ...


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Criterion:
    """One comparison of the gate: candidate ``score[key]`` vs the serving model's on the same window.

    - ``higher_is_better``: publish needs ``cand >= serving - margin`` (else ``cand <= serving + margin``).
    - ``required``: a non-finite candidate value rejects (LogLoss); otherwise a non-finite value on
      either side skips this criterion (AUC of a window with one class).
    - ``label``: how the reason names it (default: ``key``).
    - ``noise_key`` / ``noise_z``: a noise-aware margin. Each side's score holds the standard error
      of its value under ``noise_key``; the margin used is the larger of ``margin`` and
      ``noise_z · √(se_cand² + se_serving²)`` (the standard error of the difference of two
      independent estimates: an upper bound of the noise of two models scored on the same window).
      So a difference smaller than the window can measure never rejects.
    """

    key: str
    higher_is_better: bool
    margin: float = 0.0
    required: bool = False
    label: str = ""
    noise_key: str = ""
    noise_z: float = 0.0

    @property
    def name(self) -> str:
        return self.label or self.key

    def margin_for(self, cand: Mapping[str, Any], serving: Mapping[str, Any]) -> float:
        """The margin on this window: ``margin``, widened to the noise (see the class docstring)."""
        if not self.noise_key or self.noise_z <= 0:
            return self.margin
        sc, ss = _num(cand.get(self.noise_key)), _num(serving.get(self.noise_key))
        if not (math.isfinite(sc) and math.isfinite(ss)):
            return self.margin
        return max(self.margin, self.noise_z * math.hypot(sc, ss))


@dataclass(frozen=True)
class Gate:
    """Every criterion must hold for the candidate to be published (an empty gate always publishes)."""

    criteria: tuple[Criterion, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, *criteria: Criterion) -> "Gate":
        return cls(tuple(criteria))

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.criteria]

    def with_margins(self, margins: Mapping[str, float]) -> "Gate":
        """The same gate with the margins of the keys in ``margins`` replaced (settings, CLI)."""
        unknown = set(margins) - set(self.keys)
        if unknown:
            raise ValueError(f"gate has no criterion {sorted(unknown)} (it compares {self.keys})")
        return Gate(tuple(replace(c, margin=float(margins[c.key])) if c.key in margins else c
                          for c in self.criteria))

    def decide(self, cand: Mapping[str, Any], serving: Mapping[str, Any] | None) -> tuple[bool, str]:
        return gate_decision(cand, serving, self)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def gate_decision(cand: Mapping[str, Any], serving: Mapping[str, Any] | None, gate: Gate) -> tuple[bool, str]:
    """``(publish, reason)`` for a candidate's scores against the serving model's on the same window.

    Nothing served yet: publish. A ``required`` criterion whose candidate value is not finite:
    reject. Otherwise every criterion with finite values on both sides must be within its margin."""
    if serving is None:
        return True, "no serving model"
    for c in gate.criteria:
        if c.required and not math.isfinite(_num(cand.get(c.key))):
            return False, f"candidate {c.name} is not finite"
    reasons = []
    for c in gate.criteria:
        cv, sv = _num(cand.get(c.key)), _num(serving.get(c.key))
        if not (math.isfinite(cv) and math.isfinite(sv)):
            continue
        m = c.margin_for(cand, serving)
        shown = f"{m:.4g}" if m != c.margin else f"{c.margin}"
        if c.higher_is_better and cv < sv - m:
            reasons.append(f"{c.name} {cv:.4f} < serving {sv:.4f} - {shown}")
        elif not c.higher_is_better and cv > sv + m:
            reasons.append(f"{c.name} {cv:.4f} > serving {sv:.4f} + {shown}")
    if reasons:
        return False, "; ".join(reasons)
    return True, "within margins"


JOINT_MODES = ("all", "each")


def joint_decision(decisions: Mapping[str, tuple[bool, str]], mode: str = "all") -> dict[str, tuple[bool, str]]:
    """Per-part decisions of one window combined for a job with several parts.

    ``mode="all"`` (default): the parts were trained jointly and are served together, so they are
    published together or not at all: one failing part rejects every part (its reason is named).
    ``mode="each"``: every part stands on its own decision."""
    if mode not in JOINT_MODES:
        raise ValueError(f"unknown joint gate mode {mode!r}; choose from {JOINT_MODES}")
    if mode == "each" or all(ok for ok, _ in decisions.values()):
        return dict(decisions)
    failed = "; ".join(f"{n}: {r}" for n, (ok, r) in decisions.items() if not ok)
    return {n: (False, r if not ok else f"rejected with its joint parts ({failed})")
            for n, (ok, r) in decisions.items()}


# --------------------------------------------------------------------------- optional hooks


def parts_of(model: Any) -> dict[str, Any]:
    """Registry name -> the part published under it (the model itself when it has no ``parts()``)."""
    parts = getattr(model, "parts", None)
    if callable(parts):
        out = dict(parts())
        if not out:
            raise ValueError(f"model {getattr(model, 'name', model)!r}: parts() is empty")
        return out
    return {model.name: model}


def gate_of(model: Any) -> Gate:
    """The model's ``gate`` (a clear error when it declares none)."""
    g = getattr(model, "gate", None)
    if not isinstance(g, Gate):
        raise TypeError(f"model {getattr(model, 'name', type(model).__name__)!r} declares no `gate` "
                        "(models.stream_model.Gate): which score keys the gate compares")
    return g


def fingerprint_of(model: Any) -> dict[str, Any] | None:
    f = getattr(model, "fingerprint", None)
    return f() if callable(f) else None


def problems_of(model: Any) -> list[str]:
    v = getattr(model, "validate", None)
    return list(v()) if callable(v) else []


def meta_of(model: Any) -> dict[str, Any]:
    m = getattr(model, "meta", None)
    return dict(m()) if callable(m) else {}


def is_thread_safe(model: Any) -> bool:
    return bool(getattr(model, "thread_safe", True))


def finite_or_none(x: Any) -> float | None:
    """A score for JSON (windows.jsonl, registry meta): finite floats, else None."""
    v = _num(x)
    return v if math.isfinite(v) else None


def numeric_scores(scores: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a ``score()`` dict (gauges, logs)."""
    return {k: float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


__all__: Sequence[str] = ("Criterion", "Gate", "JOINT_MODES", "Record", "StreamModel", "finite_or_none",
                          "fingerprint_of", "gate_decision", "gate_of", "is_thread_safe", "joint_decision",
                          "meta_of", "numeric_scores", "parts_of", "problems_of")
