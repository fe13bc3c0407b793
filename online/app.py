"""The HTTP API of the online ad service (FastAPI / ASGI).

    POST /v1/ads                                   ranked ads with their creatives (see docs/online.md)
    GET  /healthz  /readyz  /metrics               liveness, readiness, Prometheus metrics
    POST /v1/admin/models/{name}/rollback          LATEST back to the previous version (bearer token)
    POST /v1/admin/models/{name}/promote/{version} LATEST to a published version (bearer token)

:func:`create_app` wires an :class:`~online.service.AdService` from parts the caller builds (the
index, the feature store client, the event sink, the model loader); :func:`serve_in_thread` runs an
app with uvicorn in a background thread (tests, demo, benchmarks).
"""


import hmac
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)
from starlette.exceptions import HTTPException as StarletteHTTPException
from typing_extensions import Annotated

from core.metrics import CounterFrom
from core.ports import EventSink
from core.settings import ServeSettings
from models.registry import RegistryError, RegistryReadOnly
from online.index import AdIndex
from online.metrics import ServeMetrics
from online.models import ModelLoader, preload_ctr
from online.hotpath import AdItem, AdResponse, encode_ad_response  # noqa: F401 (AdItem: the schema)
from online.service import AdRequestData, AdService

log = logging.getLogger(__name__)

API_VERSION = "1"
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
ContextValue = StrictStr | StrictInt | FiniteFloat | StrictBool | None
_ID = r"^[A-Za-z0-9_.:@/\-]+$"
# a query needs a word: at least one letter or digit, in any script ("!!!", "___" and "   " are refused)
QUERY_WORD = r"[^\W_]"
_QUERY_WORD = re.compile(QUERY_WORD)


def _whole_number(v: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0 are the same number (2.5, "3" and true are not integers)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v



def request_model(settings: ServeSettings) -> type[BaseModel]:
    """The request body schema, with this service's slot limit and domains in it."""
    domains = tuple(settings.domains)
    DomainT = Literal[domains]  # type: ignore[valid-type]

    class AdRequest(BaseModel):
        """One search result page asking for ads."""

        model_config = ConfigDict(extra="forbid")
        request_id: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=_ID)] | None = Field(
            None, description="Caller's id for the page (a new one is made when absent); clicks refer to it")
        user_id: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=_ID)]
        query: Annotated[StrictStr, Field(min_length=1, max_length=512, json_schema_extra={"pattern": QUERY_WORD})] \
            = Field(description="The search query; it needs at least one letter or digit")
        slots: Annotated[StrictInt, Field(ge=1, le=settings.max_slots), BeforeValidator(_whole_number)] = Field(
            description="How many ads to return (at most this many; fewer when fewer candidates match)")
        domain: DomainT | None = Field(None, description=f"Traffic domain; default {domains[0]!r}")  # type: ignore[valid-type]
        context: dict[Annotated[StrictStr, Field(max_length=64)], ContextValue] | None = Field(
            None, max_length=32,
            description="Free request context; a numeric 'event_time' (epoch s) stamps the impressions")

        @field_validator("query")
        @classmethod
        def _has_a_word(cls, v: str) -> str:
            if not _QUERY_WORD.search(v):
                raise ValueError("query must contain at least one word (a letter or a digit)")
            return v

    return AdRequest


class AdminResult(BaseModel):
    model: str
    version: str | None
    serving: str | None


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 (by Content-Length, or while reading)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_413(send, self.limit)
        # no (or a lying) Content-Length: read the body here, bounded, and replay it to the app
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_413(send, self.limit)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


async def _send_413(send, limit: int) -> None:
    body = JSONResponse({"detail": f"request body larger than {limit} bytes"}).body
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: ServeSettings | None = None,
    *,
    registry_root: str | Path | None = None,
    feature_store=None,
    sink: EventSink | None = None,
    index: AdIndex | None = None,
    loader: ModelLoader | None = None,
    query_loader: ModelLoader | None = None,
    impressions_topic: str = "impressions",
    metrics: ServeMetrics | None = None,
    ready_checks: Sequence[Callable[[], tuple[str, bool]]] = (),
    start_loader: bool = True,
    keep_stage_log: int = 0,
    service_kwargs: dict[str, Any] | None = None,
) -> FastAPI:
    """Build the ASGI app. ``registry_root`` (default ``settings.registry_dir``) is watched for
    ``settings.model_name`` unless a ``loader`` is given, and for ``settings.query_model_name`` (the
    query classifier, ``online.query``) unless ``settings.query_classifier`` is ``counts``. ``ready_checks`` add ``(name, ok)`` items
    to ``/readyz`` (e.g. the inventory feed caught up). The loader thread starts here
    (``start_loader``) and stops with the app (lifespan) or with ``app.state.close()``."""
    settings = settings or ServeSettings()
    metrics = metrics or ServeMetrics()
    index = index if index is not None else AdIndex()
    if loader is None:
        loader = ModelLoader(registry_root or settings.registry_dir, settings.model_name, settings.model_poll_s,
                             preload=preload_ctr)
    loader._on_swap = lambda old, new: metrics.model_swaps.labels(loader.name).inc()
    kw = dict(service_kwargs or {})
    if settings.creative_model and "creative_loader" not in kw:  # CR+ (docs/creative.md)
        from models.creative.stream import CreativeRankerModel

        kw["creative_loader"] = ModelLoader(registry_root or settings.registry_dir, settings.creative_model,
                                            settings.model_poll_s, build=CreativeRankerModel.from_state)
    creative_loader = kw.get("creative_loader")
    qloader = query_loader
    if "classifier" not in kw and settings.query_classifier != "counts":  # the query classifier (docs/query.md)
        from online.index import CountsClassifier
        from online.query import ModelQueryClassifier
        from online.query import query_loader as make_query_loader

        if qloader is None:
            qloader = make_query_loader(registry_root or settings.registry_dir, settings.query_model_name,
                                        settings.model_poll_s)
        qloader._on_swap = lambda old, new: metrics.model_swaps.labels(qloader.name).inc()
        kw["classifier"] = ModelQueryClassifier(qloader, CountsClassifier(index), settings.query_cache_size,
                                                settings.query_classifier, budget_ms=settings.query_budget_ms)
    if (settings.rewrite_model or settings.gram_model) and "rewrite_stage" not in kw:  # docs/rewrite.md
        from online.rewrite import build_rewrite_stage

        kw["rewrite_stage"] = build_rewrite_stage(settings, index, registry_root or settings.registry_dir)
    rewrite_stage = kw.get("rewrite_stage")
    rewrite_loaders = rewrite_stage.loaders() if rewrite_stage is not None else []
    service = AdService(settings, index=index, feature_store=feature_store, loader=loader, sink=sink,
                        impressions_topic=impressions_topic, metrics=metrics, keep_stage_log=keep_stage_log, **kw)
    loaders = [x for x in (loader, creative_loader, qloader) if x is not None]
    if start_loader:
        for ldr in (*loaders, *rewrite_loaders):
            ldr.refresh()  # a model that exists now is served from the first request
            ldr.start()
        if rewrite_stage is not None:
            rewrite_stage.start()

    closed = threading.Event()

    def close() -> None:
        if not closed.is_set():
            closed.set()
            for ldr in (*loaders, *rewrite_loaders):
                ldr.stop()
            if rewrite_stage is not None:
                rewrite_stage.stop()
            service.close()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        close()

    app = FastAPI(
        title="adstream ad service", version=API_VERSION, lifespan=lifespan,
        description="Search-ads serving: query understanding, candidate ads from the live bidword index, "
                    "Feast online features, ad CTR ranker and creative ranker in parallel (Peri-CR), "
                    "eCPM = pCTR x bid. Every served ad is logged as an impression.",
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.service = service
    app.state.loader = loader
    app.state.query_loader = qloader
    app.state.index = index
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.close = close
    AdRequest = request_model(settings)
    inventory_changes = CounterFrom(metrics.inventory_changes)
    impressions_dropped = CounterFrom(metrics.impression_log_dropped)
    impressions_spooled = CounterFrom(metrics.impression_log_spooled)
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels("invalid").inc()
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 "There was an error parsing the body" when the body is not UTF-8 or
        # json.loads fails with something else than a JSONDecodeError (an integer of 5,000 digits):
        # malformed input, so 422 like every other malformed body (docs/online.md)
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:
            metrics.requests.labels("invalid").inc()
            msg = ("body is not valid UTF-8" if isinstance(cause, UnicodeDecodeError)
                   else f"body is not valid JSON: {str(cause)[:200]}")
            return JSONResponse({"detail": [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]},
                                status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _error(request: Request, exc: Exception):
        metrics.requests.labels("error").inc()
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    recent_ids = RecentIds(settings.request_id_memory, settings.request_id_memory_s)

    @app.post("/v1/ads", response_model=AdResponse, summary="Ads for one search result page",
              responses={409: {"description": "request_id already used"}, 413: {"description": "body too large"},
                         422: {"description": "invalid request (also: context.event_time out of bounds)"}})
    async def post_ads(body: AdRequest) -> Any:  # type: ignore[valid-type]
        # the pipeline runs on serve.request_threads threads of its own: a queue in the event loop, not
        # dozens of threads passing the GIL to each other at every torch call (docs/speed.md "Serving")
        if limiter[0] is None:
            limiter[0] = anyio.CapacityLimiter(settings.request_threads)
        return await anyio.to_thread.run_sync(answer_ads, body, limiter=limiter[0])

    limiter: list[Any] = [None]  # made on the first request, inside the server's event loop

    def answer_ads(body) -> Any:
        context = body.context or {}
        et = context.get("event_time")
        if isinstance(et, (int, float)) and not isinstance(et, bool):
            now = service.clock()
            lo, hi = now - settings.event_time_max_behind_s, now + settings.event_time_max_ahead_s
            if not lo <= et <= hi:
                metrics.requests.labels("invalid").inc()
                return JSONResponse({"detail": [{
                    "loc": ["body", "context", "event_time"], "type": "value_error",
                    "msg": f"event_time {et!r} is {et - now:+.0f}s from the service clock; allowed: "
                           f"{settings.event_time_max_behind_s:g}s behind to {settings.event_time_max_ahead_s:g}s "
                           "ahead (an event time in the future would make other clicks late)"}]},
                    status_code=422)
        if body.request_id is not None and not recent_ids.add(body.request_id, time.monotonic()):
            metrics.requests.labels("invalid").inc()
            return JSONResponse({"detail": f"request_id {body.request_id!r} was already used; every page "
                                           "needs its own (clicks are matched to impressions by it)"},
                                status_code=409)
        req = AdRequestData(user_id=body.user_id, query=body.query, slots=body.slots,
                            domain=body.domain or settings.domains[0], request_id=body.request_id,
                            context=context)
        out = service.handle(req)
        encoded = encode_ad_response(out)  # one pass (online/hotpath.py); None: FastAPI validates as before
        return out if encoded is None else Response(encoded, media_type="application/json")

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: registry checked, feature store configured, ads in the index",
             responses={503: {"description": "not ready; `why` says what is missing"}})
    def readyz() -> JSONResponse:
        m = loader.current
        n_ads = len(index)
        checks = {"model_loader": loader.checked.is_set(), "feature_store": feature_store is not None,
                  "ads": n_ads > 0}
        for fn in ready_checks:
            name, ok = fn()
            checks[name] = bool(ok)
        ready = all(checks.values())
        why = [NOT_READY[k] for k, ok in checks.items() if not ok and k in NOT_READY]
        why += [f"{k}: not ready" for k, ok in checks.items() if not ok and k not in NOT_READY]
        body = {"ready": ready, "checks": checks, "why": why,
                "model": {"name": loader.name, "version": m.version if m else None,
                          "last_error": loader.last_error},
                "feature_store_healthy": service.features.healthy, "index_ads": n_ads}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = loader.current
        age = loader.age_s()
        metrics.model_age.labels(loader.name).set(age if math.isfinite(age) else -1)
        metrics.model_version.labels(loader.name).set(_version_number(m.version) if m else 0)
        if sink is not None:
            impressions_dropped.update(getattr(sink, "dropped", 0))
            impressions_spooled.update(getattr(sink, "spooled", 0))
            metrics.impression_log_spool_bytes.set(getattr(sink, "spool_bytes", 0))
            metrics.impression_log_pending.set(getattr(sink, "pending", 0))
            metrics.impression_log_lag.set(getattr(sink, "last_latency_s", 0.0))
        inventory_changes.update(index.changes_applied)
        metrics.index_ads.set(len(index))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def admin(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = settings.admin_token
        if creds is None:
            raise HTTPException(401, "admin call needs 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not token:
            raise HTTPException(403, "admin calls are disabled (serve.admin_token is not set)")
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong admin token")

    def _model(name: str) -> None:
        if name != loader.name:
            raise HTTPException(404, f"unknown model {name!r}; this service serves {loader.name!r}")

    @app.post("/v1/admin/models/{name}/rollback", response_model=AdminResult, dependencies=[Depends(admin)],
              summary="Point LATEST back at the previous version and serve it now",
              responses={401: {"description": "no token"}, 403: {"description": "refused"},
                         404: {"description": "unknown model"}, 409: {"description": "nothing to roll back to"},
                         503: {"description": "the registry is not writable by the service"}})
    def rollback(name: str) -> dict[str, Any]:
        _model(name)
        try:
            served = loader.rollback()
        except RegistryReadOnly as e:  # e.g. the registry volume mounted read-only into the service
            raise HTTPException(503, str(e)) from None
        except RegistryError as e:
            raise HTTPException(409, str(e)) from None
        log.warning("admin: model %s rolled back to %s", name, loader.registry.latest())
        return {"model": name, "version": loader.registry.latest(), "serving": served.version if served else None}

    @app.post("/v1/admin/models/{name}/promote/{version}", response_model=AdminResult,
              dependencies=[Depends(admin)], summary="Point LATEST at a published version and serve it now",
              responses={401: {"description": "no token"}, 403: {"description": "refused"},
                         404: {"description": "unknown model"}, 409: {"description": "unknown version"},
                         503: {"description": "the registry is not writable by the service"}})
    def promote(name: str, version: str) -> dict[str, Any]:
        _model(name)
        try:
            served = loader.promote(version)
        except RegistryReadOnly as e:  # e.g. the registry volume mounted read-only into the service
            raise HTTPException(503, str(e)) from None
        except RegistryError as e:
            raise HTTPException(409, str(e)) from None
        log.warning("admin: model %s promoted to %s", name, version)
        return {"model": name, "version": version, "serving": served.version if served else None}

    return app


# what a failed readiness check means, for the operator reading /readyz
NOT_READY = {
    "model_loader": "the model loader has not looked at the registry yet",
    "feature_store": "no feature store is configured (serve without --no-features)",
    "ads": "no ads to serve: the index is empty. The bidword-inventory topic holds no ads yet (replay with "
           "--initial-inventory, or start the service with --world-seed N --initial-inventory world)",
    "inventory": "the inventory feed has not read the bidword-inventory topic to its end yet",
}


class RecentIds:
    """Client-chosen request ids seen in the last ``max_age_s`` (at most ``capacity``): a reused one
    would give two pages' impressions the same (request, ad) keys, and the joiner keeps only one."""

    def __init__(self, capacity: int, max_age_s: float) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self.max_age_s = max_age_s
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, rid: str, now: float) -> bool:
        """False when ``rid`` was seen within the memory (nothing changes); otherwise remembers it."""
        with self._lock:
            seen = self._seen
            while seen and (len(seen) >= self.capacity or now - next(iter(seen.values())) > self.max_age_s):
                seen.popitem(last=False)
            if rid in seen:
                return False
            seen[rid] = now
            return True


def _version_number(version: str) -> int:
    try:
        return int(version.lstrip("v"))
    except ValueError:
        return -1


@dataclass
class RunningServer:
    """An app served by uvicorn in a background thread; ``stop()`` shuts it down."""

    url: str
    host: str
    port: int
    server: Any
    thread: threading.Thread
    app: FastAPI

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        close = getattr(self.app.state, "close", None)
        if close is not None:
            close()


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 20.0,
                    log_level: str = "warning") -> RunningServer:
    """Start uvicorn for ``app`` in a daemon thread; returns once it accepts connections
    (``port=0`` picks a free port; the chosen one is in the result)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", loop="asyncio")
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not t.is_alive():
            raise RuntimeError(f"the server on {host}:{port} did not start (port in use?)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start within {timeout_s:.0f}s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://{host}:{bound}", host, bound, server, t, app)
