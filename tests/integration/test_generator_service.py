"""The generator service as a real process over loopback, driven by the official ``openai``
client as a third-party client would: a plain completion with usage, a stream of
``chat.completion.chunk`` events ending ``data: [DONE]``, OpenAI-shaped 4xx errors, a client
that disconnects mid-stream (the server stops that generation), 429 at the concurrency limit,
the propagated deadline, and how ``shared.llm.RemoteGenerator`` maps the server's errors.
``test_generator_answer`` holds ``shared.llm.RemoteGenerator`` to the in-process generator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from shared.clients import DependencyError
from shared.errors import ErrorCode, LodestarError
from shared.llm import RemoteGenerator
from shared.models import LLM_ID
from tests.conftest import Process, free_port, make_settings, spawn, stack_env, wait_ready

pytestmark = pytest.mark.slow

MAX_CONCURRENCY = 4


@dataclass
class Service:
    url: str
    process: Process


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    port = free_port()
    env = stack_env(
        tmp_path_factory.mktemp("generator-data"),
        LODESTAR_GENERATOR_PORT=str(port),
        LODESTAR_MAX_CONCURRENCY=str(MAX_CONCURRENCY),
        LODESTAR_REQUEST_TIMEOUT_S="300",  # generation on a shared 2-core machine
        OMP_NUM_THREADS="1",
    )
    process = spawn("generator", ["-m", "services.generator"], env, tmp_path_factory.mktemp("logs"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield Service(url, process)
    finally:
        process.stop()


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    # No retries: a 429 or 5xx must reach the test, not be papered over.
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)


def metric(service: Service, name: str) -> float:
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return float(value)
    return 0.0


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [LLM_ID]


def test_a_plain_completion_has_text_usage_and_a_finish_reason(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=LLM_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    choice = completion.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 5
    assert 1 <= completion.usage.completion_tokens <= 16
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_a_stream_is_chunks_that_add_up_to_the_plain_answer(
    client: openai.OpenAI, service: Service
) -> None:
    messages: Any = [{"role": "user", "content": "Count from one to ten in words."}]
    plain = client.chat.completions.create(
        model=LLM_ID, messages=messages, max_tokens=20, temperature=0, stop=["4."]
    )
    stream = client.chat.completions.create(
        model=LLM_ID,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stop=["4."],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert text.rstrip().endswith("3") and "4." not in text  # the model writes "1. 1\n2. 2..."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    # On the wire the stream ends with OpenAI's sentinel (the client hides it).
    with httpx.stream(
        "POST",
        f"{service.url}/v1/chat/completions",
        json={"model": LLM_ID, "messages": messages, "max_tokens": 4, "stream": True},
        timeout=300,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("change", "status", "param", "error_class"),
    [
        ({"max_tokens": 100_000}, 422, "max_tokens", openai.UnprocessableEntityError),
        ({"temperature": 3}, 422, "temperature", openai.UnprocessableEntityError),
        ({"model": "gpt-4o"}, 404, "model", openai.NotFoundError),
        ({"messages": []}, 422, "messages", openai.UnprocessableEntityError),
        ({"stop": [""]}, 422, "stop", openai.UnprocessableEntityError),
    ],
)
def test_bad_input_is_an_openai_shaped_4xx(
    client: openai.OpenAI,
    change: dict[str, object],
    status: int,
    param: str,
    error_class: type[openai.APIStatusError],
) -> None:
    request: dict[str, object] = {
        "model": LLM_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **change,
    }
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(**request)  # type: ignore[call-overload]
    error = caught.value
    assert error.status_code == status
    assert isinstance(error.body, dict)
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["param"] == param
    assert error.body["type"] in ("invalid_request_error", "not_found_error")


STORY: Any = [{"role": "user", "content": "Write a long story about a fox and a crow."}]
STORY_BUDGET = 96  # greedy decoding of STORY writes all of these when let


def seconds_for_the_whole_story(service: Service, runs: int = 2) -> float:
    """How long the whole STORY takes here, now (the fastest of ``runs``, as the load on a
    shared machine comes and goes): a client that gives up after a quarter of it gives up
    mid-generation however fast the machine is (CI's wrote 96 tokens in under 1.5 s)."""
    fastest = float("inf")
    for _ in range(runs):
        started = time.monotonic()
        response = httpx.post(
            f"{service.url}/v1/chat/completions",
            json={"model": LLM_ID, "messages": STORY, "max_tokens": STORY_BUDGET, "temperature": 0},
            timeout=300,
        )
        fastest = min(fastest, time.monotonic() - started)
        assert response.json()["usage"]["completion_tokens"] == STORY_BUDGET
    return fastest


def wait_for_the_batch_to_end(service: Service, batches: float) -> None:
    deadline = time.monotonic() + 60
    while metric(service, "generator_batch_size_count") == batches:
        assert time.monotonic() < deadline, "the generation never ended"
        time.sleep(0.2)


def test_a_client_that_disconnects_mid_stream_stops_its_generation(
    client: openai.OpenAI, service: Service
) -> None:
    batches = metric(service, "generator_batch_size_count")
    tokens = metric(service, "generator_completion_tokens_total")
    stream = client.chat.completions.create(
        model=LLM_ID, messages=STORY, max_tokens=STORY_BUDGET, temperature=0, stream=True
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 3:
                break
    stream.close()
    wait_for_the_batch_to_end(service, batches)
    generated = metric(service, "generator_completion_tokens_total") - tokens
    # The same request run to the end writes the whole budget: the disconnect cut it short.
    seconds_for_the_whole_story(service, runs=1)
    assert 3 <= generated < STORY_BUDGET / 2


def test_a_client_that_gives_up_on_a_plain_completion_stops_its_generation(
    service: Service,
) -> None:
    patience = seconds_for_the_whole_story(service) / 4
    batches = metric(service, "generator_batch_size_count")
    tokens = metric(service, "generator_completion_tokens_total")
    body = {"model": LLM_ID, "messages": STORY, "max_tokens": STORY_BUDGET, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{service.url}/v1/chat/completions", json=body, timeout=patience)
    wait_for_the_batch_to_end(service, batches)
    assert metric(service, "generator_completion_tokens_total") - tokens < STORY_BUDGET


def test_requests_past_the_concurrency_limit_get_429_at_once(service: Service) -> None:
    body = {
        "model": LLM_ID,
        "messages": [{"role": "user", "content": "Write a long story about a fox."}],
        "max_tokens": 48,
        "temperature": 0,
    }

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=300) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post("/v1/chat/completions", json=body)
                        for _ in range(MAX_CONCURRENCY + 2)
                    )
                )
            )

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == MAX_CONCURRENCY
    assert statuses.count(429) == 2
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    # The admitted ones were batched together rather than queued one by one.
    texts = {
        r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200
    }
    assert len(texts) == 1


def test_the_request_deadline_stops_a_generation(service: Service) -> None:
    patience = seconds_for_the_whole_story(service) / 4
    batches = metric(service, "generator_batch_size_count")
    tokens = metric(service, "generator_completion_tokens_total")
    response = httpx.post(
        f"{service.url}/v1/chat/completions",
        json={"model": LLM_ID, "messages": STORY, "max_tokens": STORY_BUDGET, "temperature": 0},
        # What an upstream Lodestar service propagates: answer within `patience` or not at all.
        headers={"x-lodestar-deadline": f"{time.time() + patience:.3f}"},
        timeout=120,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    wait_for_the_batch_to_end(service, batches)
    assert metric(service, "generator_completion_tokens_total") - tokens < STORY_BUDGET


def test_the_platform_client_keeps_input_errors_apart_from_a_failing_generator(
    service: Service, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = make_settings(tmp_path_factory.mktemp("client"), generator_url=service.url)
    remote = RemoteGenerator(settings)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(LodestarError) as caught:
        remote.generate(messages, max_new_tokens=100_000)
    assert not isinstance(caught.value, DependencyError)
    assert caught.value.code is ErrorCode.validation and caught.value.status == 422
    wrong_model = RemoteGenerator(settings, model="gpt-4o")
    with pytest.raises(DependencyError) as failed:
        wrong_model.generate(messages, max_new_tokens=4)
    assert failed.value.service == "generator" and "404" in failed.value.message
    remote.close()
    wrong_model.close()
