"""Generate -> inspect -> rank: new creatives for a product, only the ones the gate passes (pure).

RFNet's recurrent generation with CAIG's reward ranking on top: for each product, up to
``attempts`` candidates come from a pluggable :class:`Generator`; the availability gate inspects
each (P(available) >= ``tau`` passes); generation stops once ``want`` passed; the passing ones are
ranked by the reward model. Every attempt is logged (the data a generator fine-tune would use).
If ``p`` is the single-shot pass rate, P(at least one pass in K attempts) = 1 − (1 − p)^K.

The default generator is the synthetic renderer (``core.images``) with **category-aware**
backgrounds (the scene palette of the product's category) and **segment-aware** styles (the
background style the target segment clicks most, from :func:`style_table`; BG60k's category and
personalised generators, as a compositor). It fails like a diffusion model does, at
``failure_rate`` (kinds of ``core.images.BROKEN_KINDS``), so the gate has something to catch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from core.images import BROKEN_KINDS, STYLES, ImageConfig, Product, draw_spec, render, render_product, scene_of


@dataclass(frozen=True)
class ProductBrief:
    """What a generator is asked for: the ad's product, its category and the audience segment."""

    ad_id: str
    category: str  # leaf id "top/leaf"
    product: Product
    top_index: int = 0
    segment: str = ""
    title: str = ""


@dataclass
class Attempt:
    ad_id: str
    attempt: int
    image: np.ndarray
    product_image: np.ndarray
    meta: dict[str, Any]
    p_available: float = float("nan")
    passed: bool = False
    reward: float = float("nan")


class Generator(Protocol):
    name: str

    def generate(self, brief: ProductBrief, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]: ...


class SyntheticGenerator:
    """See the module docstring. ``styles``: segment -> background style (others: random)."""

    name = "synthetic"

    def __init__(self, config: ImageConfig | None = None, failure_rate: float = 0.3,
                 styles: Mapping[str, str] | None = None, tops: Sequence[str] = ()) -> None:
        self.cfg = config or ImageConfig(enabled=True)
        self.failure_rate = float(failure_rate)
        self.styles = dict(styles or {})
        self.tops = list(tops)

    def generate(self, brief: ProductBrief, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        top = brief.category.split("/", 1)[0]
        tops = self.tops or [top]
        scene = scene_of(top, brief.top_index)
        others = [scene_of(t, i) for i, t in enumerate(tops) if t != top] or [scene_of("", brief.top_index + 1)]
        broken = BROKEN_KINDS[int(rng.integers(len(BROKEN_KINDS)))] if rng.random() < self.failure_rate else ""
        style = self.styles.get(brief.segment)
        spec = draw_spec(rng, brief.product, scene, others, self.cfg, broken, style)
        return render(spec, self.cfg.size), {"generator": self.name, "bg_style": spec.style, "truth": spec.label,
                                             "spec": spec.to_dict()}


def style_table(examples: Sequence[Mapping[str, Any]], style_of: Mapping[str, str], strength: float = 50.0
                ) -> dict[str, str]:
    """The background style each segment clicks most: per (segment, style) CTR of the examples whose
    creative has a known style, shrunk toward the segment's CTR (Beta prior of ``strength``)."""
    counts: dict[tuple[str, str], list[float]] = {}
    seg_tot: dict[str, list[float]] = {}
    for ex in examples:
        st = style_of.get(str(ex.get("creative_id")))
        feats = ex.get("features") if isinstance(ex.get("features"), Mapping) else {}
        seg = str(ex.get("segment") or feats.get("segment") or "")
        if st is None or not seg:
            continue
        c = counts.setdefault((seg, st), [0.0, 0.0])
        t = seg_tot.setdefault(seg, [0.0, 0.0])
        y = float(int(ex.get("clicked") or 0) > 0)
        c[0] += 1
        c[1] += y
        t[0] += 1
        t[1] += y
    out = {}
    for seg, (n, k) in seg_tot.items():
        m = k / n if n else 0.0
        best = max(STYLES, key=lambda s: (counts.get((seg, s), [0.0, 0.0])[1] + strength * m)
                   / (counts.get((seg, s), [0.0, 0.0])[0] + strength))
        out[seg] = best
    return out


@dataclass
class LoopReport:
    attempts: int = 0
    passed: int = 0
    products: int = 0
    products_served: int = 0  # products with at least one passing creative
    accepted: dict[str, list[Attempt]] = field(default_factory=dict)  # ad -> passing attempts, best first
    log: list[Attempt] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.attempts if self.attempts else float("nan")

    def truth_counts(self) -> dict[str, int]:
        """With a generator that knows its failures (``meta["truth"]``): how the gate judged them."""
        out = {"passed_broken": 0, "passed_ok": 0, "failed_broken": 0, "failed_ok": 0}
        for a in self.log:
            truth = a.meta.get("truth")
            if truth is None:
                continue
            broken = truth != "available"
            out[("passed_" if a.passed else "failed_") + ("broken" if broken else "ok")] += 1
        return out

    def summary(self) -> dict[str, Any]:
        return {"products": self.products, "attempts": self.attempts, "passed": self.passed,
                "pass_rate": self.pass_rate, "products_served": self.products_served, **self.truth_counts()}


def produce(briefs: Sequence[ProductBrief], generator: Generator, gate: Any, reward: Any | None = None,
            attempts: int = 4, want: int = 2, seed: int = 0, size: int = 32) -> LoopReport:
    """Run the loop over ``briefs`` (see the module docstring). ``gate``: an object with
    ``predict(records) -> P(available)`` and ``config.tau``; ``reward``: ``predict(records) -> score``."""
    if attempts < 1 or want < 1:
        raise ValueError("attempts and want must be >= 1")
    rng = np.random.default_rng(seed)
    tau = float(getattr(getattr(gate, "config", None), "tau", 0.5))
    rep = LoopReport()
    for brief in briefs:
        rep.products += 1
        product_image = render_product(brief.product, size)
        passed: list[Attempt] = []
        for k in range(attempts):
            img, meta = generator.generate(brief, rng)
            a = Attempt(brief.ad_id, k, img, product_image, meta)
            p = float(gate.predict([{"image": img, "product_image": product_image, "category": brief.category}])[0])
            a.p_available, a.passed = p, p >= tau
            rep.attempts += 1
            rep.log.append(a)
            if a.passed:
                rep.passed += 1
                passed.append(a)
                if len(passed) >= want:
                    break
        if passed and reward is not None:
            recs = [{"image": a.image, "features": {"title": brief.title}, "category": brief.category} for a in passed]
            for a, s in zip(passed, reward.predict(recs)):
                a.reward = float(s)
            passed.sort(key=lambda a: -a.reward)
        if passed:
            rep.products_served += 1
            rep.accepted[brief.ad_id] = passed
    return rep
