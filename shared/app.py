"""``create_app``: the scaffolding every Lodestar service shares.

It gives each service ``/healthz`` (process alive), ``/readyz`` (models and indexes loaded),
``/metrics`` (Prometheus), the closed error model of ``shared.errors``, a body-size limit, a
concurrency limit that answers 429 at once, a per-request deadline (propagated to downstream calls
through ``X-Lodestar-Deadline``), optional API keys with read/admin roles and per-key rate limits
(``shared.auth``), timing headers and structured logs.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Authorizer, KeyRing, Role, current_principal, required_role
from shared.errors import (
    ERROR_DESCRIPTIONS,
    HTTP_STATUS,
    ErrorCode,
    LodestarError,
    error_responses,
    public_message,
)
from shared.settings import Settings

DEADLINE_HEADER = "x-lodestar-deadline"
REQUEST_ID_HEADER = "x-request-id"
SCOPE_REQUEST_ID = "lodestar.request_id"
UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: What any guarded route may answer besides its own errors: the middleware's 413/429/504, auth,
#: validation, readiness and the last-resort 500. Routers add the codes their handlers raise.
COMMON_ERRORS = (
    ErrorCode.validation,
    ErrorCode.unauthorized,
    ErrorCode.too_large,
    ErrorCode.overloaded,
    ErrorCode.unavailable,
    ErrorCode.timeout,
    ErrorCode.internal,
)

#: Absolute time (``time.time()``) by which the current request must be answered.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_deadline", default=None
)
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

logger = logging.getLogger("lodestar")


def remaining_seconds(default: float) -> float:
    """Seconds left before the current request's deadline, or ``default`` outside a request."""
    deadline = request_deadline.get()
    if deadline is None:
        return default
    return min(default, max(0.0, deadline - time.time()))


# --- readiness ---------------------------------------------------------------------------------


@dataclass
class Readiness:
    """What ``/readyz`` reports. Warm-up runs in a thread so ``/healthz`` answers meanwhile.

    ``reason`` is read by callers: a human sentence, never exception text (the log has that).
    """

    ready: bool = False
    reason: str = "starting"
    details: dict[str, Any] = field(default_factory=dict)

    def set_ready(self, **details: Any) -> None:
        self.details.update(details)
        self.ready, self.reason = True, "ready"

    def set_failed(self, reason: str) -> None:
        self.ready, self.reason = False, reason


# --- logging -----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id.get(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


# --- ASGI middleware ---------------------------------------------------------------------------


async def _send_error(
    send: Send, error: LodestarError, headers: Iterable[tuple[str, str]] = ()
) -> None:
    body = json.dumps(error.body()).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if error.retry_after_s is not None:
        raw_headers.append((b"retry-after", str(error.retry_after_s).encode()))
    raw_headers.extend((k.encode(), v.encode()) for k, v in headers)
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Body limit, concurrency limit, deadline, request id, timing headers and request metrics.

    One middleware rather than four so the order is explicit: the cheap rejections (429, 413)
    happen before any body is read or any handler runs.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        settings: Settings,
        metrics: _Metrics,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.settings = settings
        self.metrics = metrics
        self.authorizer = authorizer or Authorizer(settings)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex[:16]
        rid_token = request_id.set(rid)
        # The route's auth dependency sets the caller; no caller leaks into the next request.
        principal_token = current_principal.set(None)
        # The 500 handler runs outside this middleware (Starlette's outermost layer), after the
        # context variable is reset: the scope carries the id to it.
        scope[SCOPE_REQUEST_ID] = rid
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                extra = [
                    (b"x-request-id", rid.encode()),
                    (b"x-lodestar-time-ms", f"{elapsed_ms:.1f}".encode()),
                    (b"server-timing", f"app;dur={elapsed_ms:.1f}".encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            if self.authorizer.guards_path(path):  # /metrics and /docs, when protect_docs is on
                try:
                    self.authorizer.keys.identify(headers)
                except LodestarError as exc:
                    await _send_error(send_with_headers, exc)
                    return
            if path in UNGUARDED_PATHS:
                await self.app(scope, receive, send_with_headers)
                return
            if self.in_flight >= self.settings.max_concurrency:
                await _send_error(
                    send_with_headers,
                    LodestarError(
                        ErrorCode.overloaded,
                        f"{self.service} is at its concurrency limit "
                        f"({self.settings.max_concurrency}); retry shortly",
                        retry_after_s=1,
                    ),
                )
                return
            self.in_flight += 1
            try:
                await self._guarded(scope, receive, send_with_headers, headers)
            finally:
                self.in_flight -= 1
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            self.metrics.observe(
                scope["method"], route_path, status_holder["status"], time.perf_counter() - started
            )
            logger.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": path,
                        "status": status_holder["status"],
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                    }
                },
            )
            current_principal.reset(principal_token)
            request_id.reset(rid_token)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, _too_large(limit))
            return
        # Read the body up front (bounded by the limit) so chunked uploads are capped too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, _too_large(limit))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        now = time.time()
        deadline = now + self.settings.request_timeout_s
        upstream = headers.get(DEADLINE_HEADER)
        if upstream:
            with suppress(ValueError):
                deadline = min(deadline, float(upstream))
        token = request_deadline.set(deadline)
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                await self.app(scope, replay, tracking_send)
        except TimeoutError:
            if not response_started:
                await _send_error(
                    send,
                    LodestarError(ErrorCode.timeout, "the request ran past its deadline"),
                )
        finally:
            request_deadline.reset(token)


def _too_large(limit: int) -> LodestarError:
    return LodestarError(ErrorCode.too_large, f"request body exceeds {limit} bytes")


class _Metrics:
    """Prometheus metrics named like text-embeddings-inference: ``<svc>_request_{count,...}``."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route")
        self.count = Counter(f"{service}_request_count", "Requests", labels, registry=self.registry)
        self.success = Counter(
            f"{service}_request_success",
            "Requests answered 2xx/3xx",
            labels,
            registry=self.registry,
        )
        self.failure = Counter(
            f"{service}_request_failure",
            "Requests answered with an error",
            (*labels, "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{service}_request_duration_seconds",
            "Request latency",
            labels,
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.count.labels(method, route).inc()
        self.duration.labels(method, route).observe(seconds)
        if status < 400:
            self.success.labels(method, route).inc()
        else:
            self.failure.labels(method, route, str(status)).inc()


# --- auth --------------------------------------------------------------------------------------


def api_key_dependency(settings: Settings) -> Callable[[Request], None]:
    """Authentication alone (any role): a check for routes outside ``create_app``'s routers
    (the debug pages, which accept a read key). The routers get :func:`authorize_dependency`."""
    keys = KeyRing(settings)

    def check_api_key(request: Request) -> None:
        keys.identify(request.headers)

    return check_api_key


def authorize_dependency(authorizer: Authorizer) -> Callable[[Request], Awaitable[None]]:
    """The dependency on every router ``create_app`` includes: the key, its role for this
    route (``shared.auth.required_role``), its rate limit. Async, so the caller it records is
    seen by the handler (a sync dependency would run in a worker thread's context)."""

    async def authorize(request: Request) -> None:
        route = request.scope.get("route")
        route_path = getattr(route, "path", request.url.path)
        principal = authorizer.authorize(request.headers, request.method, route_path)
        if principal is not None:
            request.state.principal = principal
            current_principal.set(principal)

    return authorize


def _document_roles(app: FastAPI) -> None:
    """State each operation's role in the OpenAPI document (``x-lodestar-role``) and document 403
    ``forbidden`` where a read key is refused. Done on the generated document (path templates
    as published), so it holds however the routers were included."""
    generate = app.openapi
    forbidden = {
        "description": f"`forbidden`: {ERROR_DESCRIPTIONS[ErrorCode.forbidden]}",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if method.upper() not in _METHODS or not isinstance(operation, dict):
                    continue
                role = required_role(method, path)
                operation["x-lodestar-role"] = role.value
                responses = operation.setdefault("responses", {})
                if role is Role.admin and "401" in responses:
                    responses.setdefault(str(HTTP_STATUS[ErrorCode.forbidden]), forbidden)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- the factory -------------------------------------------------------------------------------

WarmUp = Callable[[Readiness], None]


def create_app(
    service: str,
    settings: Settings,
    routers: Sequence[APIRouter],
    *,
    warm_up: WarmUp | None = None,
    on_shutdown: Callable[[], Awaitable[None] | None] | None = None,
    title: str | None = None,
) -> FastAPI:
    """Build a service app. ``warm_up`` loads models/indexes in a thread and marks readiness."""
    readiness = Readiness()
    metrics = _Metrics(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if warm_up is None:
            readiness.set_ready()
        else:

            def run_warm_up() -> None:
                try:
                    warm_up(readiness)
                except Exception:  # readiness reports it; the process stays up for /healthz
                    logger.exception("warm-up failed")
                    readiness.set_failed("warm-up failed; the service log has the cause")
                    return
                # What warm-up loaded (models, index snapshots: ~500k objects) lives as long as the
                # process; without this every full collection walks it, and one such pass
                # (0.1-0.4 s) stalled a /search request. Objects created later are still collected.
                gc.freeze()

            threading.Thread(target=run_warm_up, name=f"{service}-warm-up", daemon=True).start()
        yield
        if on_shutdown is not None:
            result = on_shutdown()
            if result is not None:
                await result

    app = FastAPI(title=title or f"lodestar-{service}", lifespan=lifespan)
    app.state.settings = settings
    app.state.readiness = readiness
    app.state.service = service
    app.state.metrics_registry = metrics.registry  # for service-specific collectors

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "alive", "service": service}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        status = 200 if readiness.ready else 503
        code = "ready" if readiness.ready else ErrorCode.unavailable.value
        details = {k: _public(v) for k, v in readiness.details.items()}
        body = {"ready": readiness.ready, "code": code, "reason": public_message(readiness.reason)}
        return JSONResponse({**body, **details}, status_code=status)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    authorizer = Authorizer(settings)
    auth = Depends(authorize_dependency(authorizer))
    for router in routers:
        app.include_router(router, dependencies=[auth], responses=error_responses(*COMMON_ERRORS))
    _document_roles(app)

    _install_error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        service=service,
        settings=settings,
        metrics=metrics,
        authorizer=authorizer,
    )
    return app


def _public(value: Any) -> Any:
    """A readiness detail as callers may see it (paths replaced, see ``public_message``)."""
    if isinstance(value, str):
        return public_message(value)
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    return value


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path. Starlette's own ``Allow`` names only the
    first route that matched the path, and one path is often served by several routes; asking
    each top-level route (included routers delegate) keeps this off the routers' internals."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**scope, "method": method})[0] is Match.FULL
            for route in app.router.routes
        )
    ]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LodestarError)
    async def lodestar_error(_: Request, exc: LodestarError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        body = exc.body()
        if body["error"]["message"] != exc.message:  # the log keeps what the caller may not see
            logger.info("error message redacted", extra={"fields": {"message": exc.message}})
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]  # where the value came from, not which field it is
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, loc = "request body is not valid JSON", []
        error = LodestarError(ErrorCode.validation, message, field=".".join(loc) or None)
        return JSONResponse(error.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = next((c for c, s in HTTP_STATUS.items() if s == exc.status_code), ErrorCode.internal)
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's own 400 is a body it could not parse (not JSON, not UTF-8): a validation
            # error like any other malformed request, not `empty` (our handlers raise that).
            error = LodestarError(ErrorCode.validation, "request body could not be parsed")
            return JSONResponse(error.body(), status_code=422)
        if exc.status_code == 405:
            allowed = _allowed_methods(request.app, request.scope) or headers.get("Allow", "")
            allow = allowed if isinstance(allowed, str) else ", ".join(allowed)
            headers["Allow"] = allow
            message = f"{request.method} is not allowed here; allowed: {allow}"
        error = LodestarError(code, message)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        rid = str(request.scope.get(SCOPE_REQUEST_ID, "-"))
        logger.exception("unhandled error", exc_info=exc, extra={"fields": {"request_id": rid}})
        message = f"internal error; the service log has it under request id {rid}"
        error = LodestarError(ErrorCode.internal, message)
        return JSONResponse(error.body(), status_code=500, headers={"X-Request-ID": rid})


def get_readiness(request: Request) -> Readiness:
    readiness: Readiness = request.app.state.readiness
    return readiness


def require_ready(request: Request) -> None:
    """Dependency for endpoints that need loaded models: 503 instead of a half-answer."""
    readiness = get_readiness(request)
    if not readiness.ready:
        raise LodestarError(
            ErrorCode.unavailable, f"service not ready: {readiness.reason}", retry_after_s=5
        )


def from_state(name: str) -> Callable[[Request], Any]:
    """A FastAPI dependency returning ``app.state.<name>`` (what ``app.py`` wired in)."""

    def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = f"state_{name}"
    return dependency


#: The service's ``Settings`` and its Celery app, as route parameters (``app.state.settings`` and
#: ``app.state.celery``).
SettingsDep = Annotated[Settings, Depends(from_state("settings"))]
CeleryDep = Annotated[Celery, Depends(from_state("celery"))]


# --- input limits shared by every service ------------------------------------------------------


def check_text(value: str, field: str, settings: Settings) -> str:
    """A query or question: stripped, non-empty (400 ``empty``), within the length limit."""
    stripped = value.strip()
    if not stripped:
        raise LodestarError(ErrorCode.empty, f"{field} is empty", field=field)
    if len(stripped) > settings.max_query_chars:
        raise LodestarError(
            ErrorCode.validation,
            f"{field} exceeds {settings.max_query_chars} characters",
            field=field,
        )
    return stripped


def check_k(k: int, settings: Settings) -> None:
    if not 1 <= k <= settings.max_k:
        raise LodestarError(
            ErrorCode.validation, f"k must be between 1 and {settings.max_k}", field="k"
        )
