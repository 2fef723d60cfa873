"""OpenAI-shaped error bodies for the generator, from the platform's own.

The platform answers ``{"error": {"code", "message", "field"?}}`` from handlers and from
``GuardMiddleware`` (429, 413, 504). OpenAI clients read ``{"error": {"message", "type", "param",
"code"}}``. Rewriting the body on the way out (instead of new handlers) covers the middleware's
answers too, and keeps ``code`` the platform's, so Lodestar clients still branch on it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: OpenAI's error ``type`` per HTTP status (its Python client maps statuses the same way).
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(status: int, body: Any) -> dict[str, Any] | None:
    """The OpenAI form of a platform error body, or ``None`` when it is not one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "message" not in error:
        return None
    return {
        "error": {
            "message": error["message"],
            "type": OPENAI_TYPES.get(status, "server_error" if status >= 500 else "api_error"),
            "param": error.get("field"),
            "code": error.get("code"),
        }
    }


class OpenAIErrorShape:
    """ASGI middleware: JSON error responses (status >= 400) leave in OpenAI's shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                start_headers = dict(message.get("headers", []))
                json_body = start_headers.get(b"content-type") == b"application/json"
                if message["status"] >= 400 and json_body:
                    held = message  # an error: hold it until the whole body is here
                    return
                await send(message)
                return
            if held is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                shaped = openai_error(held["status"], json.loads(body))
            except ValueError:
                shaped = None
            if shaped is not None:
                body = json.dumps(shaped).encode()
            headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
