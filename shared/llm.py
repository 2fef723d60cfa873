"""One client for every caller that only needs text from the LLM.

``chat_generator(settings)`` is what callers ask for: with ``LODESTAR_GENERATOR_URL`` set it is a
``RemoteGenerator`` speaking the OpenAI chat-completions protocol (the ``generator`` service, or
``vllm serve``); empty, it is the in-process ``shared.models.Generator``. Both are
``shared.models.ChatModel`` (``model_id``, ``generate``, ``stream``) with a ``tokenizer``, so a
caller cannot tell which it has, and the congruence test holds them to the same greedy output.

Why a thin httpx client and not the official ``openai`` package: the platform's calls must carry
the request deadline (``X-Lodestar-Deadline``) and a timeout capped by it, and must fail fast into
``DependencyError`` so the caller reports ``generator``; ``openai`` retries by default and has its
own error classes, which would all need undoing. Its protocol is small (one POST, SSE lines), and
httpx is already a dependency. The ``openai`` package is used in the tests, as a third-party
client of the generator service.

Callers that need model internals keep their own in-process model: ICR's attention
(``services.reranker``), SEAL's FM-index-constrained decoding (``services.fmindex``), DSI's
trie-constrained decoding (``services.dsi``) and the shadow LLM agent's yes/no probabilities.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from shared.app import DEADLINE_HEADER, REQUEST_ID_HEADER, remaining_seconds, request_deadline
from shared.app import request_id as current_request_id
from shared.clients import DependencyError
from shared.errors import ErrorCode, LodestarError
from shared.models import ChatModel, Generation, Generator, get_generator, prepare_llm
from shared.settings import Settings

SERVICE = "generator"
#: Downstream statuses that describe the request (a prompt too long, a bad parameter).
_INPUT_ERRORS = {400: ErrorCode.validation, 413: ErrorCode.too_large, 422: ErrorCode.validation}


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteGenerator(ChatModel):
    """A ``shared.models.ChatModel`` over ``POST /v1/chat/completions``.

    Greedy (``temperature`` 0) by default, like the in-process generator; the text is stripped
    the same way. Errors: unreachable, slow or failing servers raise ``DependencyError``
    (``generator``); 429 stays ``overloaded``; 4xx about the request stay input errors.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        base_url: str | None = None,
        model: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.base_url = _base_url(base_url or settings.generator_url)
        self.model_id = model or settings.generator_model
        headers = (
            {"authorization": f"Bearer {settings.service_api_key}"}
            if settings.service_api_key
            else {}
        )
        self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, for callers that cut text to a token budget (no weights)."""
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(prepare_llm(self.settings))
            return self._tokenizer

    def close(self) -> None:
        self._http.close()

    def _request(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> tuple[dict[str, Any], dict[str, str], float]:
        budget = remaining_seconds(self.settings.generator_timeout_s)
        if budget <= 0:
            raise DependencyError(SERVICE, "no time left before the request deadline")
        headers = {REQUEST_ID_HEADER: current_request_id.get()}
        deadline = request_deadline.get()
        if deadline is not None:
            headers[DEADLINE_HEADER] = f"{deadline:.3f}"
        body = {
            "model": self.model_id,
            "messages": list(messages),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
        }
        return body, headers, budget

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = json.loads(response.read())["error"]
            message = str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            message = f"HTTP {response.status_code}"
        if response.status_code == 429:
            raise LodestarError(ErrorCode.overloaded, f"{SERVICE}: {message}", retry_after_s=1)
        code = _INPUT_ERRORS.get(response.status_code)
        if code is not None:
            raise LodestarError(code, f"{SERVICE}: {message}")
        raise DependencyError(SERVICE, f"HTTP {response.status_code}: {message}")

    def _generate(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation:
        body, headers, budget = self._request(messages, max_new_tokens, temperature)
        started = time.perf_counter()
        try:
            response = self._http.post(
                "/v1/chat/completions", json=body, headers=headers, timeout=budget
            )
        except httpx.TimeoutException as exc:
            raise DependencyError(SERVICE, f"timed out after {budget:.1f} s") from exc
        except httpx.HTTPError as exc:
            raise DependencyError(SERVICE, f"unreachable ({type(exc).__name__})") from exc
        self._raise_for(response)
        try:
            payload = response.json()
            text = str(payload["choices"][0]["message"]["content"] or "")
            usage = payload.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DependencyError(SERVICE, "malformed chat completion") from exc
        return Generation(
            text.strip(),
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            time.perf_counter() - started,
        )

    def _stream(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str | Generation]:
        # Pieces as the server sends them; usage from its final chunk. Closing the iterator
        # early closes the connection, which cancels the generation on the server.
        body, headers, budget = self._request(messages, max_new_tokens, temperature)
        body.update(stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        try:
            with self._http.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers, timeout=budget
            ) as response:
                self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if isinstance(chunk.get("error"), dict):  # failed after the 200 was sent
                        raise DependencyError(SERVICE, str(chunk["error"].get("message", "")))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            pieces.append(piece)
                            yield piece
        except httpx.TimeoutException as exc:
            raise DependencyError(SERVICE, f"timed out after {budget:.1f} s") from exc
        except httpx.HTTPError as exc:
            raise DependencyError(SERVICE, f"unreachable ({type(exc).__name__})") from exc
        except ValueError as exc:
            raise DependencyError(SERVICE, "malformed stream chunk") from exc
        yield Generation(
            "".join(pieces).strip(),
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            time.perf_counter() - started,
        )


_remotes: dict[tuple[str, str], RemoteGenerator] = {}
_remotes_lock = threading.Lock()


def chat_generator(settings: Settings) -> Generator | RemoteGenerator:
    """The LLM for text-only callers: the server at ``generator_url``, or the in-process model.

    One ``RemoteGenerator`` per (URL, model) and process, so its connection pool is shared."""
    if not settings.generator_url:
        return get_generator(settings)
    key = (_base_url(settings.generator_url), settings.generator_model)
    with _remotes_lock:
        if key not in _remotes:
            _remotes[key] = RemoteGenerator(settings)
        return _remotes[key]
