"""``/answer`` with real SmolLM2 over the small wiki sample: the default plan is never worse than
one round, follow-up queries are search queries (never an answer echo), and decomposition
records sub-queries that are retrieved apart, fused, and can take feedback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.orchestrator.prompts import _query_key, is_unsure, query_problem
from services.orchestrator.rounds import AnswerPipeline, RoundsOutcome
from shared.store import Trace
from tests.conftest import Stack, free_port, loopback, make_settings, start_stack

pytestmark = pytest.mark.slow

MONA = "Which city is the capital of the country where the Mona Lisa is exhibited?"


def in_process_pipeline(data_dir: Path) -> AnswerPipeline:
    """The orchestrator's answer pipeline over the built wiki sample, with no critic."""
    from services.index.engine import IndexEngine, InProcessIndex
    from services.orchestrator.search import SearchPipeline
    from shared.models import get_generator

    settings = make_settings(data_dir)
    search = SearchPipeline(InProcessIndex(IndexEngine.from_settings(settings)))
    generator = get_generator(settings)
    return AnswerPipeline(search, lambda: generator, max_new_tokens=32, critic=None)


def assert_search_queries(outcome: RoundsOutcome, trace: Trace) -> None:
    """Every round's query is a search query: never an answer of the loop, never a repeat."""
    earlier: list[str] = []
    for record in outcome.rounds:
        # The answers written before this round's queries were (a later answer may echo them).
        answers = [r.answer for r in outcome.rounds if r.round < record.round]
        for sq in record.subqueries:
            key = _query_key(sq.text)
            assert key not in {_query_key(q) for q in earlier}, sq.text
            assert key not in {_query_key(a) for a in answers}, sq.text
            assert not key.startswith("the answer is"), sq.text
            if sq.origin == "follow_up":
                context = outcome.rounds[record.round - 2].context
                problem = query_problem(
                    sq.text, earlier_queries=earlier, answers=answers, context=context
                )
                assert problem is None, (sq.text, problem)
            earlier.append(sq.text)
    for stage in (s for s in trace.stages if s.stage == "query"):
        if stage.outputs["problem"] is not None:
            assert stage.outputs["origin"] in ("fallback", "none"), stage.outputs


async def test_the_default_answer_is_a_confident_round_and_never_an_echo(
    built_data_dir: Path,
) -> None:
    pipeline = in_process_pipeline(built_data_dir)
    # The default plan with no critic trained: the measured-best fixed setting, one round.
    trace = Trace(kind="answer", request={"max_rounds": None})
    default = await pipeline.run_rounds(trace, question=MONA, collection="wiki", k=3)
    assert default.stop_reason == "no_critic" and len(default.rounds) == 1
    assert default.degraded == ["critic"] and trace.request["max_rounds"] == 1
    first = default.rounds[0]
    assert default.answer == first.answer and "Mona Lisa" in [h.doc_id for h in first.hits]
    # Asked for more rounds without a critic, the loop runs them with validated queries and
    # still returns the first confident round's answer, not simply the last one.
    trace = Trace(kind="answer", request={"max_rounds": 3})
    longer = await pipeline.run_rounds(trace, question=MONA, collection="wiki", k=3, max_rounds=3)
    confident = next((r for r in longer.rounds if not is_unsure(r.answer)), longer.rounds[-1])
    assert longer.answer == confident.answer and longer.chosen_round == confident.round
    assert longer.rounds[0].answer == first.answer  # greedy: round 1 is the default's answer
    assert_search_queries(longer, trace)
    if len(longer.rounds) > 1:
        select = next(s for s in trace.stages if s.stage == "select")
        assert select.outputs["round"] == confident.round


@pytest.fixture(scope="module")
def slow_stack(built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """index + orchestrator over loopback with no critic listening and a request deadline that
    a decomposition and an answer on a shared CPU fit in (``live_stack`` keeps 60 s)."""
    with start_stack(
        built_data_dir,
        tmp_path_factory.mktemp("answer-logs"),
        LODESTAR_CRITIC_URL=loopback(free_port()),  # nobody listens there
        LODESTAR_ANSWER_MAX_NEW_TOKENS="24",
        LODESTAR_REQUEST_TIMEOUT_S="600",
    ) as stack:
        yield stack


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{stack.orchestrator_url}{path}", json=body, timeout=700)


def test_answer_with_two_subqueries_decomposes_retrieves_apart_and_takes_feedback(
    slow_stack: Stack,
) -> None:
    # SmolLM2 (greedy) decomposes this one into "the painter of the Mona Lisa", "the physicist
    # Isaac Newton": sq2 is the first of them.
    question = "Who was born first, the painter of the Mona Lisa or the physicist Isaac Newton?"
    response = post(slow_stack, "/answer", {"question": question, "subqueries": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    trace: dict[str, Any] = httpx.get(
        f"{slow_stack.orchestrator_url}/traces/{body['trace_id']}"
    ).json()
    stages = trace["stages"]
    assert stages[0]["stage"] == "decompose"
    decompose = stages[0]
    subqueries = decompose["outputs"]["subqueries"]
    assert decompose["params"]["subqueries"] == 2 and decompose["outputs"]["raw"] is not None
    assert [t for t in decompose["targets"] if t["type"] == "subquery"] == [
        {"type": "subquery", "id": sq["sq_id"]} for sq in subqueries
    ]
    assert subqueries[0] == {
        "sq_id": "sq1",
        "text": question,
        "order": 0,
        "round": 1,
        "origin": "question",
    }
    # Each sub-query of round 1 was retrieved by both retrievers; with two, they were fused.
    ids = [sq["sq_id"] for sq in subqueries]
    retrieved = sorted(
        (s["params"]["sq_id"], s["params"]["retriever"])
        for s in stages
        if s["stage"] == "retrieve" and s["params"].get("sq_id") in ids
    )
    assert retrieved == sorted((i, r) for i in ids for r in ("dense", "bm25"))
    assert ids == ["sq1", "sq2"] and subqueries[1]["origin"] == "decomposed"
    assert subqueries[1]["text"] == "the painter of the Mona Lisa"
    over = [s for s in stages if s["stage"] == "fusion" and s["params"].get("over")]
    assert len(over) == 1 and over[0]["inputs"]["subqueries"] == ids
    fused = over[0]["outputs"]["hits"]
    assert body["rounds"][0]["hit_ids"] == [h["doc_id"] for h in fused[:3]]
    assert "Mona Lisa" in body["rounds"][0]["hit_ids"]
    assert all(set(h["sources"]) <= set(ids) for h in fused)
    # Without a trained critic, the default plan is one round; the trace records the plan.
    assert body["stop_reason"] == "no_critic" and len(body["rounds"]) == 1
    assert trace["request"]["max_rounds"] == 1 and trace["request"]["subqueries"] == 2
    # Feedback can point at a sub-query id of the decompose stage.
    target = "sq2"
    feedback = post(
        slow_stack,
        "/feedback",
        {
            "trace_id": body["trace_id"],
            "stage": "decompose",
            "target_type": "subquery",
            "target_id": target,
            "action": "edit",
            "value": {"text": "Mona Lisa museum"},
        },
    )
    assert feedback.status_code == 201, feedback.text
    unknown = post(
        slow_stack,
        "/feedback",
        {
            "trace_id": body["trace_id"],
            "stage": "decompose",
            "target_type": "subquery",
            "target_id": "sq9",
            "action": "delete",
        },
    )
    assert unknown.status_code == 404, unknown.text
    stored = httpx.get(f"{slow_stack.orchestrator_url}/traces/{body['trace_id']}").json()
    assert any(f["target_id"] == target for f in stored["feedback"])
