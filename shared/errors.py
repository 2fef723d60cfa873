"""The closed set of error codes every Lodestar service answers with.

Each code has one fixed HTTP status, so clients can branch on ``error.code`` and never parse text.
The body is always ``{"error": {"code", "message", "field"?}}``; never a stack trace.
Besides the codes for bad input and for missing, busy or failing resources (``validation``,
``empty``, ``too_large``, ``overloaded``, ``not_found``, ``conflict``, ``unavailable``,
``dependency_failed``), it has ``unauthorized`` (API keys), ``forbidden`` (a read-only key on an
admin operation), ``timeout`` (the per-request deadline), ``method_not_allowed`` (405, with
``Allow``) and ``internal`` (a bug: logged with its trace, answered without it).

Messages are for people and never say where files live: :func:`public_message` replaces
absolute filesystem paths before a message leaves the process (the log keeps the original).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from typing import Any

from pydantic import BaseModel


class ErrorCode(StrEnum):
    validation = "validation"
    empty = "empty"
    too_large = "too_large"
    overloaded = "overloaded"
    not_found = "not_found"
    conflict = "conflict"
    unavailable = "unavailable"
    dependency_failed = "dependency_failed"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    method_not_allowed = "method_not_allowed"
    timeout = "timeout"
    internal = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.validation: 422,
    ErrorCode.empty: 400,
    ErrorCode.too_large: 413,
    ErrorCode.overloaded: 429,
    ErrorCode.not_found: 404,
    ErrorCode.conflict: 409,
    ErrorCode.unavailable: 503,
    ErrorCode.dependency_failed: 424,
    ErrorCode.unauthorized: 401,
    ErrorCode.forbidden: 403,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.timeout: 504,
    ErrorCode.internal: 500,
}


class LodestarError(Exception):
    """An error with a code from the closed set; engines raise it, the API layer renders it."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code.value, "message": public_message(self.message)}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def not_found(what: str, name: str, *, field: str | None = None) -> LodestarError:
    return LodestarError(ErrorCode.not_found, f"{what} {name!r} does not exist", field=field)


def invalid(message: str, *, field: str | None = None) -> LodestarError:
    return LodestarError(ErrorCode.validation, message, field=field)


# --- what a message may say --------------------------------------------------------------------


@cache
def _path_pattern() -> re.Pattern[str]:
    """Absolute paths that start at a directory of this machine's filesystem root.

    Anchoring on the real top-level directories (``/home``, ``/tmp``, ``/work``, ...) tells a
    file path from a route a message names on purpose (``POST /collections/{name}/...``).
    """
    try:
        roots = sorted(e.name for e in os.scandir("/") if e.is_dir(follow_symlinks=False))
    except OSError:
        roots = []
    names = "|".join(re.escape(name) for name in roots) or r"(?!)"
    return re.compile(rf"(?<![\w/.~-])/(?:{names})(?:/[^\s'\"`,;:()\[\]{{}}]*)?")


def public_message(message: str) -> str:
    """``message`` with absolute filesystem paths replaced by ``<path>``."""
    return _path_pattern().sub("<path>", message)


# --- the error schema, for OpenAPI -------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: ErrorCode
    """One of the closed set; each code always comes with the same HTTP status."""
    message: str
    """For people: what went wrong and what to change. No paths, no exception text."""
    field: str | None = None
    """The request field at fault (dotted), when there is one."""


class ErrorBody(BaseModel):
    """Every error a Lodestar service answers with."""

    error: ErrorDetail


ERROR_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.validation: "The request breaks the schema or a rule of this endpoint",
    ErrorCode.empty: "A required text is empty",
    ErrorCode.too_large: "The body or a list in it is over its limit",
    ErrorCode.overloaded: "At the concurrency limit; retry after Retry-After seconds",
    ErrorCode.not_found: "The named resource does not exist",
    ErrorCode.conflict: "The request conflicts with the resource's state",
    ErrorCode.unavailable: "A model, index or broker is not loaded or reachable yet",
    ErrorCode.dependency_failed: "A downstream service failed",
    ErrorCode.unauthorized: "Missing or invalid API key",
    ErrorCode.forbidden: "The API key is valid but read-only; this operation needs an admin key",
    ErrorCode.method_not_allowed: "The path exists; the method does not (see Allow)",
    ErrorCode.timeout: "The request ran past its deadline",
    ErrorCode.internal: "A bug; the service log has it under the request id",
}


def error_responses(
    *codes: ErrorCode, rules: Mapping[str, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A FastAPI ``responses=`` mapping documenting ``codes`` with the error schema.

    ``rules``: the endpoint's rules its schema cannot state (cross-field ones, or ones against
    the state of what the request names), as the ``field`` their 422 ``validation`` names ->
    the rule. They are written into the 422's description and, for tools, as its
    ``x-lodestar-rules`` object (the contract test accepts a schema-valid request refused by one
    of them, and no other 422; docs/api.md)."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in (*codes, *((ErrorCode.validation,) if rules else ())):
        by_status.setdefault(HTTP_STATUS[code], []).append(code)
    responses: dict[int | str, dict[str, Any]] = {
        status: {
            "model": ErrorBody,
            "description": "; ".join(
                f"`{c.value}`: {ERROR_DESCRIPTIONS[c]}" for c in dict.fromkeys(group)
            ),
        }
        for status, group in sorted(by_status.items())
    }
    if rules:
        validation = responses[HTTP_STATUS[ErrorCode.validation]]
        stated = "; ".join(f"`{name}`: {rule}" for name, rule in rules.items())
        validation["description"] += f". Rules the schema cannot state: {stated}"
        validation["x-lodestar-rules"] = dict(rules)
    return responses
