"""The closed set of error codes every Lodestar service answers with.

Each code has one fixed HTTP status, so clients can branch on ``error.code`` and never parse text.
The body is always ``{"error": {"code", "message", "field"?}}``; never a stack trace.
DESIGN.md's set is extended by three codes a real service needs: ``unauthorized`` (API keys),
``timeout`` (the per-request deadline) and ``internal`` (a bug: logged with its trace, answered
without it).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


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
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def not_found(what: str, name: str, *, field: str | None = None) -> LodestarError:
    return LodestarError(ErrorCode.not_found, f"{what} {name!r} does not exist", field=field)


def invalid(message: str, *, field: str | None = None) -> LodestarError:
    return LodestarError(ErrorCode.validation, message, field=field)
