"""API keys, roles and per-key rate limits, the same in every service (``create_app`` wires it).

Two roles. A **read** key may call what answers a question or records a judgement about one:
every ``GET``, and the ``POST`` operations in :data:`READ_POSTS` (``/search``, ``/answer``,
``/feedback``, reruns of a trace, and the compute endpoints services call on each other's
behalf: ``/embed``, ``/rerank``, ``/judge``, ...). Everything else - ``PUT``, ``DELETE``, job
submissions, builds, offline updates that publish a model - needs an **admin** key; a read key
gets 403 ``forbidden``. The rule is by method and route template, in one place, so a new route is
admin-only until it is listed here (fail closed).

Keys are stored as SHA-256 digests (``Settings.api_key_hashes`` for admin,
``Settings.read_api_key_hashes`` for read) and compared in constant time. With neither configured
there is no authentication (the embedded default, and what the test suite runs).

Each key gets a token bucket per process (``rate_limit_per_s``, ``rate_limit_burst``): past it, 429
``overloaded`` with ``Retry-After``. The service key (``service_api_key``, the one every process
presents to the others) is not limited: one user request fans out into several internal calls.

A caller's idempotency keys are scoped to its API key (:func:`scoped_idempotency_key`): two
callers choosing the same key do not see each other's writes.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import ErrorCode, LodestarError
from shared.settings import Settings, hash_api_key


class Role(StrEnum):
    read = "read"
    admin = "admin"


#: Methods that change nothing: a read key may call them on any route.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: ``POST`` routes (templates as declared) that a read key may call: they compute an answer or
#: record feedback, and change no collection, model or job.
READ_POSTS = frozenset(
    {
        # orchestrator
        "/search",
        "/answer",
        "/feedback",
        "/traces/{trace_id}/rerun",
        "/shadow/simulate",
        # index: the orchestrator's and the evaluators' reads
        "/embed",
        "/collections/{name}/lookup",
        "/collections/{name}/passages",
        # model services: one inference each
        "/rerank",
        "/judge",
        "/rewrite",
        "/v1/chat/completions",
    }
)

#: Paths that answer without a key even when keys are configured: liveness and readiness probes.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
#: Paths a key protects only when ``Settings.protect_docs`` is set.
DOC_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def required_role(method: str, route_path: str) -> Role:
    """The role an operation needs: read for safe methods and :data:`READ_POSTS`, else admin."""
    method = method.upper()
    if method in SAFE_METHODS or (method == "POST" and route_path in READ_POSTS):
        return Role.read
    return Role.admin


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``key_id`` (the head of its key's digest, safe to log) and role."""

    key_id: str
    role: Role
    limited: bool = True


#: The caller of the request being served (``None``: no keys configured, or outside a request).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


def presented_key(headers: Mapping[str, str]) -> str:
    """The key in ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (empty when neither)."""
    header = headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return headers.get("x-api-key", "").strip()


class KeyRing:
    """The configured key digests and their roles; ``identify`` authenticates one request."""

    def __init__(self, settings: Settings) -> None:
        admin = [bytes.fromhex(h) for h in settings.api_key_hashes]
        read = [
            bytes.fromhex(h)
            for h in settings.read_api_key_hashes
            if h not in settings.api_key_hashes
        ]
        self._keys: list[tuple[bytes, Role]] = [
            *((d, Role.admin) for d in admin),
            *((d, Role.read) for d in read),
        ]
        self._service = (
            bytes.fromhex(hash_api_key(settings.service_api_key))
            if settings.service_api_key
            else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, headers: Mapping[str, str]) -> Principal | None:
        """The caller, ``None`` when no keys are configured; 401 for a missing or unknown key."""
        if not self._keys:
            return None
        key = presented_key(headers)
        if not key:
            raise LodestarError(
                ErrorCode.unauthorized, "missing API key (Authorization: Bearer KEY, or X-API-Key)"
            )
        digest = bytes.fromhex(hash_api_key(key))
        # Compare against every stored digest without short-circuiting (constant time).
        role: Role | None = None
        for candidate, candidate_role in self._keys:
            if hmac.compare_digest(digest, candidate) and role is None:
                role = candidate_role
        if role is None:
            raise LodestarError(ErrorCode.unauthorized, "invalid API key")
        is_service = self._service is not None and hmac.compare_digest(digest, self._service)
        return Principal(key_id=digest.hex()[:12], role=role, limited=not is_service)


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second up to ``burst``. Memory is bounded by
    the number of configured keys (only authenticated callers get a bucket)."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst or max(1, math.ceil(2 * rate_per_s)))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key_id: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / self.rate


class Authorizer:
    """What ``create_app`` installs: authentication, the role check and the rate limit."""

    def __init__(self, settings: Settings) -> None:
        self.keys = KeyRing(settings)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.protect_docs = settings.protect_docs

    def guards_path(self, path: str) -> bool:
        """Whether the middleware must check a key for this path before the app sees it
        (the routes' own dependency covers every other path)."""
        return self.keys.enabled and self.protect_docs and path in DOC_PATHS

    def authorize(
        self, headers: Mapping[str, str], method: str, route_path: str
    ) -> Principal | None:
        principal = self.keys.identify(headers)
        if principal is None:
            return None
        need = required_role(method, route_path)
        if need is Role.admin and principal.role is not Role.admin:
            raise LodestarError(
                ErrorCode.forbidden,
                f"{method.upper()} {route_path} needs an admin key; this key is read-only",
            )
        if principal.limited:
            wait = self.limiter.acquire(principal.key_id)
            if wait > 0:
                raise LodestarError(
                    ErrorCode.overloaded,
                    f"this API key is over its rate limit ({self.limiter.rate:g} requests/s)",
                    retry_after_s=max(1, math.ceil(wait)),
                )
        return principal


#: Longest stored idempotency key (the store's column).
IDEMPOTENCY_KEY_MAX = 200


def scoped_idempotency_key(key: str | None, principal: Principal | None = None) -> str | None:
    """``key`` as stored: prefixed with the caller's key id, so the same key from two API keys
    names two writes. Unchanged without keys (one caller). Long keys are hashed to fit."""
    principal = principal if principal is not None else current_principal.get()
    if key is None or principal is None:
        return key
    scoped = f"{principal.key_id}:{key}"
    if len(scoped) > IDEMPOTENCY_KEY_MAX:
        scoped = f"{principal.key_id}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    return scoped
