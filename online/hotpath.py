"""What keeps the request path of ``POST /v1/ads`` cheap, beside the pipeline itself.

- :func:`freeze_startup_heap`: the objects of a started service (torch, feast, pandas, the index:
  ~500k) leave the garbage collector's view, so a full collection scans only what requests made.
  Measured: a full collection of the unfrozen heap took 239 ms, about once per 1,000 requests,
  one stall of that length every ~10 s at 100 req/s (docs/speed.md "Serving").
- :class:`AdResponse` (the response schema of the API docs) and :func:`encode_ad_response`: the
  response body, encoded in one pass.

FastAPI would validate the service's result against ``AdResponse`` (``response_model``), turn it into
plain data (``jsonable_encoder``) and then ``json.dumps`` it: three passes over the same small dict on
every request. :func:`encode_ad_response` checks the types the model declares and writes the JSON with
msgspec directly: the same document (every ``AdItem`` field in its order, ``code`` null when absent,
``bid``/``pctr``/``ecpm`` as floats, a non-finite float as null as pydantic writes it). Where the
result does not fit the model it returns None and the endpoint hands the dict to FastAPI, whose
response validation decides as before (tests/test_serving_fast_paths.py compares the two).
"""

from __future__ import annotations

import gc
from typing import Any

import msgspec
from pydantic import BaseModel, Field

class AdItem(BaseModel):
    ad_id: str
    creative_id: str
    bidword: str
    category: str
    bid: float
    pctr: float
    ecpm: float = Field(description="pCTR x bid (ranking score)")
    position: int = Field(description="0-based position on the page")
    source: str = Field("index", description="retrieval source: index (literal bidword match), rewriter "
                        "(a generated bidword), gram (generative retrieval), category (the predicted category)")
    code: str | None = Field(None, description="GRAM: the shared code the ad was retrieved by")


class AdResponse(BaseModel):
    request_id: str
    ads: list[AdItem]
    model_versions: dict[str, str]
    degraded: list[str] = Field(description="components served from defaults: features, ctr_model, "
                                            "query_understanding, impression_log, rewriter, gram, ...")


_ENCODER = msgspec.json.Encoder()
_NUM = (float, int)


def _float(v: Any) -> float:
    if type(v) not in _NUM:  # bool, str, None, numpy scalars: the model's validation decides
        raise TypeError(type(v).__name__)
    return float(v)


def _str(v: Any) -> str:
    if type(v) is not str:
        raise TypeError(type(v).__name__)
    return v


def encode_ad_response(out: dict[str, Any]) -> bytes | None:
    """``AdService.handle``'s result as ``AdResponse`` JSON, or None when it does not fit the model."""
    try:
        ads = []
        for a in out["ads"]:
            code = a.get("code")
            if type(a["position"]) is not int:
                return None
            ads.append({"ad_id": _str(a["ad_id"]), "creative_id": _str(a["creative_id"]),
                        "bidword": _str(a["bidword"]), "category": _str(a["category"]),
                        "bid": _float(a["bid"]), "pctr": _float(a["pctr"]), "ecpm": _float(a["ecpm"]),
                        "position": a["position"], "source": _str(a.get("source", "index")),
                        "code": None if code is None else _str(code)})
        versions = out["model_versions"]
        degraded = out["degraded"]
        if type(versions) is not dict or any(type(k) is not str or type(v) is not str for k, v in versions.items()):
            return None
        if type(degraded) is not list or any(type(d) is not str for d in degraded):
            return None
        body = {"request_id": _str(out["request_id"]), "ads": ads, "model_versions": versions, "degraded": degraded}
    except (KeyError, TypeError, AttributeError):
        return None
    return _ENCODER.encode(body)


def freeze_startup_heap() -> int:
    """Collect once, then move every live object to the permanent generation (``gc.freeze``); call it
    when the service is built, before it serves (``serve.gc_freeze``). Returns the frozen count.
    Objects made later (a model swapped in) are collected as usual."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
