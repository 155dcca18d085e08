"""create_app(settings): the FastAPI app — lifespan builds the Runtime, routers, middleware, the one error mapping.

Every refusal is counted once, in medzero_errors_total{code}: the response's error code is recorded on the ASGI
scope by whoever writes it (an error handler, or a middleware that replaces the app's answer) and counted when the
request ends, so a body refused mid-parse counts as payload_too_large only, not also as the parser's 400.
"""
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.deps import ACCESS_ERRORS, ClassifyDep
from app.api.limits import DrainUnreadBody, RateLimiter, RequestTimeLimit, content_length, no_receive
from app.api.routes import (
    adapters,
    bundle,
    calibration,
    classify,
    dicomweb,
    health,
    kpl,
    labels,
    results,
    routing,
    support,
)
from app.errors import MedzeroError, Overloaded, PayloadTooLarge
from app.logs import RequestContext
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)
KPL_FIT_PATH = re.compile(r"^/labels/[^/]+/(kpl|support)/?$")      # pool and support-set uploads
STOW_PATH = re.compile(r"^/dicomweb/studies(/[^/]+)?/?$")
SMALL_BODY_BYTES = 1 << 20            # JSON bodies (/labels); uploads have their own limits
MULTIPART_OVERHEAD_BYTES = 64 << 10   # boundaries, part headers and form fields around one file
ERROR_CODE = "medzero.error_code"     # scope key: the error code of the response sent, counted once


def create_app(settings: Settings, *, on_startup_failure: Callable[[MedzeroError], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        runtime.start_loading(on_failure=on_startup_failure)
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="medzero", version="0.1.0", lifespan=lifespan,
                  description="Training-free, zero-shot medical image classification with CLIP-family encoders.")
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.resolved_rate_limit_burst)
    app.include_router(health.router)            # health, readiness and /metrics: no key (probes, scrapers)
    for router in (labels.router, classify.router, kpl.router, calibration.router, adapters.router, support.router,
                   dicomweb.router, results.router, routing.router, bundle.router):
        # admin routes add AdminDep themselves; every one of them may answer 401, 403, 429 or 503
        app.include_router(router, dependencies=[ClassifyDep], responses=ACCESS_ERRORS)
    app.add_exception_handler(MedzeroError, medzero_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(HTTPException, http_error_response)
    app.add_exception_handler(DataError, unstorable_value_response)
    app.add_exception_handler(Exception, unexpected_error_response)
    app.add_middleware(BodySizeLimit, limit_for_path=lambda path: body_limit(settings, path))
    app.add_middleware(BatchBodyAdmission)
    app.add_middleware(DrainUnreadBody)       # outside what answers early, inside the time limit
    app.add_middleware(RequestTimeLimit, limit_for_path=lambda path: time_limit(settings, path),
                       respond=medzero_error_response_for)
    app.add_middleware(RequestMetrics)
    if settings.cors_origins:                 # off unless origins are named: browsers get no CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContext)        # outermost: every answer, refusals included, has its request id
    return app


def time_limit(settings: Settings, path: str) -> float:
    if KPL_FIT_PATH.match(path) or path.rstrip("/") == "/adapters":
        return settings.job_request_timeout_seconds
    return settings.request_timeout_seconds


def body_limit(settings: Settings, path: str) -> int:
    if is_batch_body(path):
        return settings.max_batch_request_bytes
    if path.rstrip("/") == "/classify":
        return settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    if path.rstrip("/") == "/adapters":          # two bundle files, or one archive of them
        return 2 * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    return SMALL_BODY_BYTES


def is_batch_body(path: str) -> bool:
    return path.rstrip("/") == "/classify/batch" or bool(KPL_FIT_PATH.match(path)) or bool(STOW_PATH.match(path))


def error_response(scope: Scope, status_code: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    scope[ERROR_CODE] = code
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


def medzero_error_response_for(scope: Scope, exc: MedzeroError, headers: dict[str, str] | None = None) -> JSONResponse:
    retry = {"Retry-After": str(exc.retry_after_seconds)} if exc.retry_after_seconds else {}
    return error_response(scope, exc.status_code, exc.code, str(exc), {**retry, **(headers or {})} or None)


async def medzero_error_response(request: Request, exc: MedzeroError) -> JSONResponse:
    return medzero_error_response_for(request.scope, exc)


async def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
    return error_response(request.scope, 422, "validation_error", problems or "invalid request")


async def http_error_response(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(request.scope, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def unstorable_value_response(request: Request, exc: DataError) -> JSONResponse:
    # PostgreSQL refuses some values outright where SQLite takes them (a NUL character, text past its column's
    # length): the request named something that cannot exist, so it is the client's 422. The value itself is not
    # echoed (it could be anything, patient data included).
    log.info("the database refused a value of %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
    return error_response(request.scope, 422, "invalid_input", "a value in the request cannot be stored or looked "
                          "up (a NUL character, or text longer than the field allows)")


async def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    # runs outside RequestMetrics (Starlette's ServerErrorMiddleware), so it counts for itself
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    metrics.ERRORS.labels(code="internal").inc()
    return JSONResponse({"error": {"code": "internal", "message": "internal server error; the server log has "
                                                                  "the details"}}, status_code=500)


class BodySizeLimit:
    """Refuses a request body past its route's limit while it streams in, before multipart parsing spools it:
    by Content-Length up front, else by counting received bytes."""

    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for_path(scope["path"])
        declared = content_length(scope)
        if declared is not None and declared > limit:
            return await self._refuse(scope, send, limit)
        received, exceeded, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise PayloadTooLarge(f"request body over {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:   # whatever the app made of the aborted body, the answer is 413
                started = True
                return await self._refuse(scope, send, limit)
            if not exceeded:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, limit: int) -> None:
        response = error_response(scope, 413, PayloadTooLarge.code,
                                  f"request body is larger than the {limit} bytes allowed here "
                                  "(MEDZERO_MAX_UPLOAD_BYTES / MEDZERO_MAX_BATCH_REQUEST_BYTES)",
                                  {"Connection": "close"})
        await response(scope, no_receive, send)


class BatchBodyAdmission:
    """At most MEDZERO_MAX_CONCURRENT_BATCH_BODIES multi-image bodies (/classify/batch, pool uploads) are read at
    once; another is refused with 503 + Retry-After before a byte of it is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not is_batch_body(scope["path"]):
            return await self.app(scope, receive, send)
        admission = scope["app"].state.runtime.admission
        if not admission.try_enter_batch_body():
            refused = Overloaded(f"{admission.max_batch_bodies} multi-image requests are being read already "
                                 f"(MEDZERO_MAX_CONCURRENT_BATCH_BODIES); retry shortly")
            response = medzero_error_response_for(scope, refused, {"Connection": "close"})
            return await response(scope, no_receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            admission.leave_batch_body()


class RequestMetrics:
    """Counts and times every request by route template (never the raw path: names and UIDs stay out), and the
    error code of every refusal, once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.REQUESTS_IN_PROGRESS.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics.REQUESTS_IN_PROGRESS.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(endpoint=endpoint, method=scope["method"], status=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            if code := scope.get(ERROR_CODE):
                metrics.ERRORS.labels(code=code).inc()
