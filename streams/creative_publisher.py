"""Publishes the generate -> inspect -> rank loop's creatives to the catalogue (the ``creatives`` topic).

Each passing creative becomes a ``CreativeChange(action="add")`` with its image and product image
(base64 PNG), the gate's verdict (``pass``) and score, the gate and reward versions, its rank among
the product's accepted creatives, the generator and the background style. The online service's
catalogue feed picks it up: the creative joins its ad and may be served. Delivery is checked
(``streams.delivery.ReliableProducer``): the command fails when a record is not acknowledged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.errors import AdstreamError
from core.events import CreativeChange, encode
from core.images import to_png

log = logging.getLogger(__name__)


def creative_events(report: Any, categories: dict[str, str], titles: dict[str, str], gate_version: str,
                    reward_version: str | None, event_time: float, prefix: str = "gen") -> list[CreativeChange]:
    """One ``add`` event per accepted creative of a ``models.creative_image.loop.LoopReport``."""
    out = []
    for ad_id, accepted in sorted(report.accepted.items()):
        for rank, a in enumerate(accepted):
            feats: dict[str, Any] = {"title": titles.get(ad_id, ""), "bg_style": a.meta.get("bg_style"),
                                     "generator": a.meta.get("generator"), "gate_version": gate_version,
                                     "reward_rank": rank, "attempt": a.attempt}
            if reward_version:
                feats["reward_version"] = reward_version
                feats["reward_score"] = round(float(a.reward), 6)
            out.append(CreativeChange(
                event_time=event_time, ad_id=ad_id, creative_id=f"{ad_id}-{prefix}{int(event_time)}-{a.attempt}",
                action="add", category=categories.get(ad_id, ""), image=to_png(a.image),
                product_image=to_png(a.product_image), gate="pass", gate_score=round(float(a.p_available), 6),
                source=str(a.meta.get("generator") or "generator"), features=feats))
    return out


def publish(bootstrap: str, topic: str, events: list[CreativeChange], timeout_s: float = 30.0) -> int:
    from streams.delivery import ReliableProducer

    prod = ReliableProducer(bootstrap, name="creative-publisher")
    t0 = time.perf_counter()
    for ev in events:
        prod.produce(topic, encode(ev), key=ev.key)
    try:
        if not prod.confirm(timeout_s):
            raise AdstreamError(f"{prod.outstanding} of {len(events)} creative records were not acknowledged by "
                                f"{bootstrap} within {timeout_s:.0f}s")
    finally:
        prod.close(5.0)
    log.info("published %d creatives to %s in %.2fs", len(events), topic, time.perf_counter() - t0)
    return len(events)
