"""``/answer`` generation over the OpenAI protocol, with the generator as its own process:
the orchestrator's ``AnswerPipeline`` on ``shared.llm.RemoteGenerator`` answers exactly as on the
in-process generator (plain and streamed rounds, follow-up query writing included); a real
orchestrator process with ``LODESTAR_GENERATOR_URL`` sends its generation there; the CAR
rewriter rewrites the same over the protocol as in-process; and with the
generator down ``/answer`` is a clear 424 naming ``generator``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.index.engine import IndexEngine, InProcessIndex
from services.orchestrator.rounds import AnswerPipeline, RoundsFinished
from services.orchestrator.search import SearchPipeline
from services.rewriter.engine import PairDocument, RewriterConfig, RewriterEngine
from shared.clients import DependencyError
from shared.llm import RemoteGenerator, chat_generator
from shared.models import ChatModel, Generation, get_generator
from shared.schemas import Document
from shared.store import Trace
from tests.conftest import Stack, free_port, loopback, make_settings, read_sse, start_stack

pytestmark = pytest.mark.slow

QUESTION = "Who painted the Mona Lisa?"


@pytest.fixture(scope="module")
def stack(built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """generator + index + orchestrator, the orchestrator generating on the generator."""
    with start_stack(
        built_data_dir,
        tmp_path_factory.mktemp("answer-logs"),
        services=["generator"],
        LODESTAR_CRITIC_URL=loopback(free_port()),  # no critic: one round
        LODESTAR_ANSWER_MAX_NEW_TOKENS="16",
        LODESTAR_REQUEST_TIMEOUT_S="300",
        OMP_NUM_THREADS="1",
    ) as stack:
        yield stack


def pipeline(data_dir: Path, generator: ChatModel) -> AnswerPipeline:
    settings = make_settings(data_dir)
    search = SearchPipeline(InProcessIndex(IndexEngine.from_settings(settings)))
    return AnswerPipeline(search, lambda: generator, max_new_tokens=16, critic=None)


def batches(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("generator_batch_size_count "):
            return float(line.split()[1])
    return 0.0


async def test_the_answer_pipeline_answers_the_same_over_the_protocol(
    stack: Stack, built_data_dir: Path
) -> None:
    settings = make_settings(built_data_dir, generator_url=stack.urls["generator"])
    remote = chat_generator(settings)
    assert isinstance(remote, RemoteGenerator)
    local = get_generator(make_settings(built_data_dir))
    outcomes = []
    for generator in (local, remote):
        trace = Trace(kind="answer", request={"max_rounds": 2})
        # Two rounds without a critic: answer, write a follow-up query, answer again.
        outcomes.append(
            await pipeline(built_data_dir, generator).run_rounds(
                trace, question=QUESTION, collection="wiki", k=3, max_rounds=2
            )
        )
    in_process, over_http = outcomes
    assert [r.raw for r in over_http.rounds] == [r.raw for r in in_process.rounds]
    assert [r.query for r in over_http.rounds] == [r.query for r in in_process.rounds]
    assert over_http.answer == in_process.answer
    for mine, theirs in zip(over_http.rounds, in_process.rounds, strict=True):
        assert mine.generation.new_tokens == theirs.generation.new_tokens
        assert mine.generation.prompt_tokens == theirs.generation.prompt_tokens
    # Streamed over SSE: pieces add up to the same first-round answer.
    events = [
        event
        async for event in pipeline(built_data_dir, remote).rounds(
            Trace(kind="answer", request={}),
            question=QUESTION,
            collection="wiki",
            k=3,
            max_rounds=1,
            stream=True,
        )
    ]
    finished = events[-1]
    assert isinstance(finished, RoundsFinished)
    assert finished.outcome.rounds[0].raw == in_process.rounds[0].raw
    streamed = finished.outcome.rounds[0].generation
    assert isinstance(streamed, Generation)
    assert streamed.new_tokens == in_process.rounds[0].generation.new_tokens


def test_the_orchestrator_process_generates_through_the_generator_service(
    stack: Stack,
) -> None:
    ready = httpx.get(f"{stack.orchestrator_url}/readyz", timeout=10).json()
    assert ready["generator_url"] == stack.urls["generator"]
    before = batches(stack.urls["generator"])
    response = httpx.post(
        f"{stack.orchestrator_url}/answer",
        json={"question": QUESTION, "collection": "wiki", "k": 3, "max_rounds": 1},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] and "Mona Lisa" in body["rounds"][0]["hit_ids"]
    assert "generator" not in body["degraded"]
    assert batches(stack.urls["generator"]) == before + 1


def test_the_car_rewriter_rewrites_the_same_over_the_protocol(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = RewriterConfig(max_new_tokens=16, context_tokens=96)
    document = PairDocument("jaguar", "Jaguar", "The jaguar is a large cat of the Americas.")
    rewrites = []
    for url in (stack.urls["generator"], ""):
        # Separate data directories: separate caches, so both really generate.
        settings = make_settings(tmp_path_factory.mktemp("car"), generator_url=url)
        engine = RewriterEngine.from_settings(settings, config)
        result = engine.rewrite("jaguar speed", document, "context", qid="q1")
        assert not result.cached and engine.llm_calls == 1
        rewrites.append(result.record)
    over_http, in_process = rewrites
    assert isinstance(
        RewriterEngine.from_settings(
            make_settings(tmp_path_factory.mktemp("car"), generator_url=stack.urls["generator"])
        ).generator,
        RemoteGenerator,
    )
    assert not in_process.fell_back and not over_http.fell_back  # a real rewrite, not the query
    assert over_http.rewritten_query == in_process.rewritten_query
    assert over_http.model == in_process.model


def test_dsi_pseudo_queries_are_the_same_over_the_protocol(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # DSI++'s generative memory only needs text from the LM: its engine asks chat_generator.
    from services.dsi.continual import generate_pseudo_queries_lm
    from services.dsi.engine import DsiEngine

    docs = [
        Document(id="jaguar", title="Jaguar", text="The jaguar is a large cat of the Americas."),
        Document(id="nile", title="Nile", text="The Nile is a river that flows through Egypt."),
    ]
    demonstrations = [("The Eiffel Tower is in Paris.", "where is the eiffel tower")]
    remote = make_settings(tmp_path_factory.mktemp("dsi"), generator_url=stack.urls["generator"])
    assert isinstance(DsiEngine.from_settings(remote)._llm(), RemoteGenerator)  # type: ignore[misc]
    before = batches(stack.urls["generator"])
    # Greedy (one query a document), so both ends must write the same text.
    over_http, in_process = (
        generate_pseudo_queries_lm(llm, docs, 1, demonstrations)
        for llm in (chat_generator(remote), get_generator(remote))
    )
    assert over_http == in_process and all(over_http.values())
    assert batches(stack.urls["generator"]) >= before + len(docs)


async def test_with_the_generator_down_answer_is_a_clear_424(
    stack: Stack, built_data_dir: Path
) -> None:
    stack.processes["generator"].kill()
    response = httpx.post(
        f"{stack.orchestrator_url}/answer",
        json={"question": QUESTION, "collection": "wiki", "k": 3, "max_rounds": 1},
        timeout=300,
    )
    assert response.status_code == 424
    error = response.json()["error"]
    assert error["code"] == "dependency_failed"
    assert error["message"].startswith("generator: unreachable")
    # Streamed, the round's retrieval arrives, then an error event with the same body.
    with httpx.stream(
        "POST",
        f"{stack.orchestrator_url}/answer",
        json={"question": QUESTION, "collection": "wiki", "k": 3, "max_rounds": 1, "stream": True},
        timeout=300,
    ) as streamed:
        events = read_sse(streamed)
    assert [name for name, _ in events] == ["round", "error"]
    assert events[-1][1]["error"]["code"] == "dependency_failed"
    assert events[-1][1]["error"]["message"].startswith("generator: unreachable")
    # The pipeline itself raises the error that names the service (what `degraded` would use).
    remote = RemoteGenerator(make_settings(built_data_dir, generator_url=stack.urls["generator"]))
    with pytest.raises(DependencyError) as caught:
        await pipeline(built_data_dir, remote).run_rounds(
            Trace(kind="answer", request={}), question=QUESTION, collection="wiki", k=3
        )
    assert caught.value.service == "generator" and caught.value.status == 424
    # Search needs no generator and keeps working.
    search = httpx.post(
        f"{stack.orchestrator_url}/search",
        json={"query": QUESTION, "collection": "wiki", "k": 3},
        timeout=60,
    )
    assert search.status_code == 200
