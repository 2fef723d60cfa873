"""The OpenAI chat-completions protocol, as ``vllm serve`` speaks it: ``GET /v1/models`` and
``POST /v1/chat/completions`` (plain, or ``stream: true`` as server-sent ``chat.completion.chunk``
events ending with ``data: [DONE]``).

A thin shell over :mod:`services.generator.engine`: validate, submit a job, relay its events.
Errors keep the platform's codes and statuses (422 validation, 413 too long, 429 overloaded, ...);
``errors.OpenAIErrorShape`` adds OpenAI's ``type`` and ``param`` so OpenAI clients parse them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.generator.engine import BatchingEngine, Delta, Done, Event, Job, SamplingParams
from shared.app import SettingsDep, from_state, request_deadline, require_ready
from shared.errors import ErrorCode, LodestarError, error_responses
from shared.settings import Settings

EngineDep = Annotated[BatchingEngine, Depends(from_state("engine"))]

router = APIRouter(prefix="/v1", dependencies=[Depends(require_ready)])

#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 200


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system"; tool and function messages need tools,
    # which this server does not offer.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields (user, logprobs: false, ...) are accepted and ignored, like vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


def sampling_params(body: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    limit = settings.generator_max_tokens
    max_tokens = body.max_completion_tokens or body.max_tokens or min(limit, 256)
    if max_tokens > limit:
        raise LodestarError(
            ErrorCode.validation, f"max_tokens must be at most {limit}", field="max_tokens"
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise LodestarError(
            ErrorCode.validation,
            f"stop takes at most {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} chars",
            field="stop",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(stops),
        seed=body.seed,
    )


def _check_model(body: ChatCompletionRequest, engine: BatchingEngine) -> None:
    if body.model != engine.model_id:
        raise LodestarError(
            ErrorCode.not_found,
            f"model {body.model!r} does not exist; this server serves {engine.model_id!r}",
            field="model",
        )


def _prompt(body: ChatCompletionRequest, engine: BatchingEngine, settings: Settings) -> list[int]:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    ids = engine.prompt_ids(messages)
    if len(ids) > settings.generator_max_prompt_tokens:
        raise LodestarError(
            ErrorCode.too_large,
            f"the prompt has {len(ids)} tokens; at most {settings.generator_max_prompt_tokens}",
            field="messages",
        )
    return ids


class _Relay:
    """Carries a job's events from the engine thread onto this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        # Called on the engine thread; a loop already closed (server shutting down) must not
        # raise there, where it would abort the whole batch.
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _failed() -> LodestarError:
    return LodestarError(ErrorCode.unavailable, "generation failed; see the generator's log")


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _finish_reason(done: Done) -> str:
    # OpenAI has no "cancelled": a job cut by its deadline ended for want of length.
    return "length" if done.finish_reason == "cancelled" else done.finish_reason


@router.get("/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": engine.model_id, "object": "model", "created": 0, "owned_by": "lodestar"}],
    }


@router.post(
    "/chat/completions",
    response_model=None,
    responses=error_responses(ErrorCode.not_found),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any] | StreamingResponse:
    """One chat completion (``n`` = 1). Greedy when ``temperature`` is 0 (batched with other
    greedy requests); sampled requests run alone, reproducibly for a given ``seed``."""
    _check_model(body, engine)
    params = sampling_params(body, settings)
    prompt = _prompt(body, engine, settings)
    relay = _Relay()
    job = engine.submit(Job(prompt, params, relay.emit, deadline=request_deadline.get()))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _chunks(job, relay, completion_id, created, engine.model_id, include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )
    try:
        done = await _wait_done(job, relay, request)
    finally:
        job.cancel()  # no-op once done; stops the row when the handler is cancelled (deadline)
    if done.finish_reason == "error":
        raise _failed()
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": engine.model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "finish_reason": _finish_reason(done),
                "logprobs": None,
            }
        ],
        "usage": _usage(done),
    }


async def _wait_done(job: Job, relay: _Relay, request: Request) -> Done:
    """The job's ``Done``, asking every ``DISCONNECT_POLL_S`` whether the client is still there,
    by the clock: token events arriving faster than the poll must not hide a hang-up (they
    did, on a machine fast enough to write a token every 0.1 s)."""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while True:
        try:
            wait = max(0.0, next_check - time.monotonic())
            event = await asyncio.wait_for(relay.events.get(), wait)
        except TimeoutError:
            event = None
        if isinstance(event, Done):
            return event
        if time.monotonic() >= next_check:
            if await request.is_disconnected():
                job.cancel()
                raise LodestarError(ErrorCode.timeout, "the client disconnected") from None
            next_check = time.monotonic() + DISCONNECT_POLL_S


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _chunks(
    job: Job, relay: _Relay, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body. When the client goes away Starlette cancels this generator; ``finally``
    then cancels the job, so the batch stops spending steps on that row."""

    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await relay.events.get()
            if isinstance(event, Delta):
                yield _sse(chunk({"content": event.text}, None))
                continue
            if event.finish_reason == "error":
                yield _sse(_failed().body())  # the status line is sent: say it in the stream
                return
            yield _sse(chunk({}, _finish_reason(event)))
            if include_usage:
                final = chunk({}, None)
                final["choices"], final["usage"] = [], _usage(event)
                yield _sse(final)
            yield b"data: [DONE]\n\n"
            return
    finally:
        job.cancel()
