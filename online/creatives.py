"""The creative catalogue in the ad service: gate verdicts (a failed creative is never served) and
the reward model beside the creative ranker (docs/images.md).

:class:`CreativeCatalogue` applies ``CreativeChange`` records of the ``creatives`` topic (fed by a
``streams.inventory_feed.InventoryFeed`` in ``adstream serve``):

- ``add``: the creative joins its ad in the index; its image is kept (the reward model scores it);
  a verdict it carries is recorded, and without one the served availability gate (if any) judges
  it right there, on the feed thread, never on a request;
- ``verdict``: a new judgement of a known creative; ``remove``: it leaves the ad.

:meth:`CreativeCatalogue.filter` is the one enforcement point: it runs on every request's
candidates before anything is ranked, so whatever a ranker says, a creative whose verdict forbids it
(``serve.creative_gate``: ``block-failed`` = verdict ``fail``; ``require-pass`` = anything but
``pass``) is not among the choices, and an ad left without creatives is not served.

:class:`RewardBlender` turns the reward model's scores into the creative choice: ``replace`` (the
highest reward score wins) or ``blend`` (``logit(ranker score) + weight · (s − mean s over the ad's
creatives)``).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import replace
from typing import Any, Sequence

from core.events import CreativeChange
from online.index import AdIndex, Candidate

log = logging.getLogger(__name__)

GATE_POLICIES = ("off", "block-failed", "require-pass")


class CreativeCatalogue:
    """See the module docstring. ``gate_loader``: an ``online.models.ModelLoader`` of the gate (or
    None); ``index``: the ad index the catalogue adds creatives to (or None)."""

    def __init__(self, policy: str = "block-failed", index: AdIndex | None = None, gate_loader: Any = None) -> None:
        if policy not in GATE_POLICIES:
            raise ValueError(f"unknown creative gate policy {policy!r}; choose from {GATE_POLICIES}")
        self.policy = policy
        self.index = index
        self.gate_loader = gate_loader
        self._lock = threading.Lock()
        self._verdict: dict[str, tuple[str, float | None, str]] = {}  # creative -> (verdict, P(available), by)
        self._image: dict[str, dict[str, Any]] = {}  # creative -> reward-model input
        self.applied = 0
        self.judged = 0
        self.blocked_total = 0

    # ---- the feed -----------------------------------------------------------------------------
    def apply(self, ch: CreativeChange) -> None:
        self.applied += 1
        cid = ch.creative_id
        if ch.action == "remove":
            with self._lock:
                self._image.pop(cid, None)
                self._verdict.pop(cid, None)
            if self.index is not None:
                self.index.remove_creative(ch.ad_id, cid)
            return
        verdict = (ch.gate, ch.gate_score, str(ch.features.get("gate_version") or ch.source or "event")) \
            if ch.gate else None
        if ch.action == "add":
            if ch.image and not _decodes(ch.image):  # a picture nobody can show is not served
                verdict = ("fail", None, "undecodable image")
                log.warning("creative %s of ad %s: its image does not decode; it is never served", cid, ch.ad_id)
            elif ch.image:
                with self._lock:
                    self._image[cid] = {"creative_id": cid, "image": ch.image, "features": dict(ch.features),
                                        "category": ch.category}
            if verdict is None and ch.image and ch.product_image and _decodes(ch.product_image):
                verdict = self._judge(ch)
            if self.index is not None:
                self.index.add_creative(ch.ad_id, cid, ch.category,
                                        {k: v for k, v in ch.features.items() if k.startswith("cr_")})
        if verdict is not None:
            with self._lock:
                self._verdict[cid] = verdict

    def _judge(self, ch: CreativeChange) -> tuple[str, float | None, str] | None:
        loaded = self.gate_loader.current if self.gate_loader is not None else None
        if loaded is None:
            return None
        try:
            (v, p), = loaded.model.verdicts([{"image": ch.image, "product_image": ch.product_image,
                                               "category": ch.category}])
        except Exception as e:  # noqa: BLE001 - a gate failure leaves the creative without a verdict
            log.warning("gate %s failed on creative %s: %s", loaded.version, ch.creative_id, e)
            return None
        self.judged += 1
        return v, p, f"{loaded.name}:{loaded.version}"

    # ---- requests -----------------------------------------------------------------------------
    def verdict(self, creative_id: str) -> str:
        v = self._verdict.get(creative_id)
        return v[0] if v else ""

    def allowed(self, creative_id: str) -> bool:
        if self.policy == "off":
            return True
        v = self.verdict(creative_id)
        return v != "fail" if self.policy == "block-failed" else v == "pass"

    def filter(self, cands: Sequence[Candidate]) -> tuple[list[Candidate], int]:
        """Candidates with only servable creatives (ads left with none are dropped); and how many
        creatives were held back."""
        if self.policy == "off":
            return list(cands), 0
        out, blocked = [], 0
        for c in cands:
            ok = tuple(cr for cr in c.creatives if self.allowed(cr))
            blocked += len(c.creatives) - len(ok)
            if ok:
                out.append(c if len(ok) == len(c.creatives) else replace(c, creatives=ok))
        self.blocked_total += blocked
        return out, blocked

    def reward_input(self, creative_id: str) -> dict[str, Any]:
        return self._image.get(creative_id) or {"creative_id": creative_id}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            vs = [v[0] for v in self._verdict.values()]
        return {"creatives": len(self._image), "verdicts": len(vs), "failed": vs.count("fail"),
                "passed": vs.count("pass"), "judged_here": self.judged, "blocked_total": self.blocked_total,
                "policy": self.policy}


def _decodes(png: str) -> bool:
    from core.images import from_png

    try:
        from_png(png)
        return True
    except ValueError:
        return False


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class RewardBlender:
    """The reward model beside the creative ranker (``serve.creative_reward``: replace | blend)."""

    def __init__(self, mode: str, loader: Any, catalogue: CreativeCatalogue | None, weight: float = 1.0) -> None:
        if mode not in ("replace", "blend"):
            raise ValueError(f"unknown creative reward mode {mode!r}")
        self.mode = mode
        self.loader = loader
        self.catalogue = catalogue
        self.weight = float(weight)

    @property
    def version(self) -> str | None:
        cur = self.loader.current if self.loader is not None else None
        return f"{cur.name}:{cur.version}" if cur is not None else None

    def choose(self, creatives: Sequence[str], ranker_scores: Sequence[float]) -> int | None:
        """Index of the creative to serve, or None (no reward model served: the ranker decides)."""
        return self.choose_many([creatives], [ranker_scores])[0]

    def choose_many(self, creatives: Sequence[Sequence[str]], ranker_scores: Sequence[Sequence[float]]
                    ) -> list[int | None]:
        """:meth:`choose` for every candidate ad of a request, with one call of the reward model."""
        cur = self.loader.current if self.loader is not None else None
        out: list[int | None] = [None] * len(creatives)
        todo = [j for j, crs in enumerate(creatives) if len(crs) > 1]
        if cur is None or not todo:
            return out
        flat = [c for j in todo for c in creatives[j]]
        inputs = [self.catalogue.reward_input(c) if self.catalogue is not None else {"creative_id": c} for c in flat]
        scores = [float(x) for x in cur.predict(inputs)]
        k = 0
        for j in todo:
            n = len(creatives[j])
            s = scores[k:k + n]
            k += n
            if self.mode == "replace":
                total = s
            else:
                mean = sum(s) / n
                total = [_logit(float(r)) + self.weight * (x - mean) for r, x in zip(ranker_scores[j], s)]
            out[j] = max(range(n), key=lambda i: (total[i], -i))
        return out
