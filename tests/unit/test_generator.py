"""The generator's batching engine on real SmolLM2: batched greedy output equals each request's
unbatched output (``shared.models.Generator``, the in-process path), rows stop on their own
(max_tokens, stop strings, cancellation), the token budget splits batches, seeded sampling
repeats; and the pure helpers (stop hold-back, OpenAI error shape)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from services.generator.engine import (
    BatchingEngine,
    Delta,
    Done,
    Event,
    Job,
    SamplingParams,
    stop_hold_back,
)
from services.generator.errors import openai_error
from shared.models import Generator, get_generator
from tests.conftest import make_settings

QUESTIONS = (
    "What is the capital of France?",
    "Who painted the Mona Lisa? Answer in one sentence.",
    "Write a haiku about snow.",
    "hi",
)


def test_stop_hold_back_keeps_possible_stop_prefixes_and_half_characters() -> None:
    assert stop_hold_back("hello wor", ["world"]) == 3
    assert stop_hold_back("hello", ["world"]) == 0
    assert stop_hold_back("a\n", ["\n\n", "xyz"]) == 1
    assert stop_hold_back("caf\ufffd", []) == 1


def test_platform_errors_get_openai_type_and_param_and_keep_their_code() -> None:
    shaped = openai_error(422, {"error": {"code": "validation", "message": "bad", "field": "n"}})
    assert shaped == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "n",
            "code": "validation",
        }
    }
    assert openai_error(429, {"error": {"code": "overloaded", "message": "busy"}}) == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert openai_error(500, {"detail": "x"}) is None


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return get_generator(make_settings(tmp_path_factory.mktemp("gen")))


@pytest.fixture
def engine(generator: Generator) -> Iterator[BatchingEngine]:
    # A wide window so jobs submitted together always share a batch, even on a loaded machine.
    engine = BatchingEngine(generator, batch_window_ms=300, max_batch=8)
    engine.start()
    yield engine
    engine.stop()


def submit_together(
    engine: BatchingEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[Job], list[list[Event]]]:
    events: list[queue.SimpleQueue[Event]] = [queue.SimpleQueue() for _ in prompts]
    jobs = [Job(p, sp, q.put) for p, sp, q in zip(prompts, params, events, strict=True)]
    for job in jobs:
        engine.submit(job)
    collected: list[list[Event]] = []
    for q in events:
        got: list[Event] = []
        while not got or not isinstance(got[-1], Done):
            got.append(q.get(timeout=300))
        collected.append(got)
    return jobs, collected


def done_of(events: list[Event]) -> Done:
    last = events[-1]
    assert isinstance(last, Done)
    return last


@pytest.mark.slow
def test_batched_greedy_output_equals_each_requests_unbatched_output(
    generator: Generator, engine: BatchingEngine
) -> None:
    prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    # Different budgets in one batch: each row stops at its own max_tokens.
    budgets = [20, 12, 20, 16]
    _, events = submit_together(engine, prompts, [SamplingParams(b) for b in budgets])
    for question, budget, got in zip(QUESTIONS, budgets, events, strict=True):
        done = done_of(got)
        assert done.batch_size == len(QUESTIONS)
        alone = generator.generate([{"role": "user", "content": question}], max_new_tokens=budget)
        assert done.text.strip() == alone.text
        assert done.completion_tokens == alone.new_tokens
        assert done.prompt_tokens == alone.prompt_tokens
        assert done.finish_reason == ("length" if alone.new_tokens == budget else "stop")
        # The streamed pieces add up to the final text.
        assert "".join(e.text for e in got if isinstance(e, Delta)) == done.text


@pytest.mark.slow
def test_a_stop_string_ends_only_its_row_and_is_never_streamed(engine: BatchingEngine) -> None:
    prompt = engine.prompt_ids([{"role": "user", "content": "Count from one to ten in words."}])
    free, stopped = SamplingParams(24), SamplingParams(24, stop=("3.",))
    _, (plain, cut) = submit_together(engine, [prompt, prompt], [free, stopped])
    full, short = done_of(plain), done_of(cut)
    assert "3." in full.text  # the model writes "1. 1\n2. 2\n3. 3 ..."
    index = full.text.find("3.")
    assert short.finish_reason == "stop"
    assert short.text == full.text[:index]
    assert "3." not in "".join(e.text for e in cut if isinstance(e, Delta))
    assert short.completion_tokens < full.completion_tokens


@pytest.mark.slow
def test_a_cancelled_row_stops_while_the_rest_of_its_batch_finishes(
    engine: BatchingEngine,
) -> None:
    prompt = engine.prompt_ids([{"role": "user", "content": "Write a long story about a fox."}])
    events: list[queue.SimpleQueue[Event]] = [queue.SimpleQueue(), queue.SimpleQueue()]
    first_piece = threading.Event()

    def watch(event: Event) -> None:
        events[0].put(event)
        first_piece.set()

    victim = Job(prompt, SamplingParams(48), watch)
    other = Job(prompt, SamplingParams(48), events[1].put)
    engine.submit(victim)
    engine.submit(other)
    assert first_piece.wait(300)
    victim.cancel()
    drained: list[list[Event]] = [[], []]
    for i in (0, 1):
        while not drained[i] or not isinstance(drained[i][-1], Done):
            drained[i].append(events[i].get(timeout=300))
    cancelled, finished = done_of(drained[0]), done_of(drained[1])
    assert cancelled.finish_reason == "cancelled"
    assert finished.finish_reason != "cancelled"
    assert cancelled.completion_tokens < finished.completion_tokens


@pytest.mark.slow
def test_the_token_budget_splits_a_batch(generator: Generator) -> None:
    engine = BatchingEngine(generator, batch_window_ms=300, max_batch=8)
    prompt = engine.prompt_ids([{"role": "user", "content": "hi"}])
    engine.batch_tokens = len(prompt) + 4  # one such job fits, two do not
    engine.start()
    try:
        _, events = submit_together(engine, [prompt, prompt], [SamplingParams(4)] * 2)
        assert [done_of(e).batch_size for e in events] == [1, 1]
    finally:
        engine.stop()


@pytest.mark.slow
def test_sampling_runs_alone_and_repeats_for_a_seed(engine: BatchingEngine) -> None:
    prompt = engine.prompt_ids([{"role": "user", "content": "Name a colour."}])
    params = SamplingParams(12, temperature=1.0, seed=7)
    first = engine.generate_blocking(prompt, params)
    second = engine.generate_blocking(prompt, params)
    assert first.batch_size == second.batch_size == 1
    assert first.text == second.text


def test_lodestar_up_starts_the_generator_and_points_the_orchestrator_at_it() -> None:
    from lodestar.stack import STACK
    from shared.settings import Settings

    names = [spec.name for spec in STACK]
    assert names.index("generator") < names.index("orchestrator")
    orchestrator = next(spec for spec in STACK if spec.name == "orchestrator")
    url = dict(orchestrator.env)["LODESTAR_GENERATOR_URL"]
    settings = Settings()
    assert url == f"http://127.0.0.1:{settings.port_of('generator')}"
    # Outside the stack the default stays in-process, so nothing else needs the extra process.
    assert settings.generator_url == ""
