"""Search queries in ``/answer``: the validator and fallback of follow-up queries, sub-query
parsing and choice, decomposition through the loop (per-sub-query retrieval, RRF over them,
stable ``sq`` ids), the default plan without a critic and which round's answer is returned.

The loop runs the real ``AnswerPipeline`` and ``SearchPipeline`` over a scripted index and a
scripted reasoner (the model tests are in ``tests/integration/test_answer_defaults.py``)."""

from __future__ import annotations

import pytest

from services.orchestrator.decompose import choose_subqueries
from services.orchestrator.prompts import (
    fallback_query,
    parse_query,
    parse_subqueries,
    query_problem,
)
from services.orchestrator.rounds import AnswerPipeline, AnswerSelection, StopPolicy
from services.orchestrator.search import SearchPipeline
from shared.store import Trace
from tests.scripted import ScriptedCritic, ScriptedIndex, ScriptedReasoner

MONA = "Which city is the capital of the country where the Mona Lisa is exhibited?"

# --- the validator, on what SmolLM2 really wrote -------------------------------------------------


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        # Rounds 2-4 of the reported /answer searched for the previous answer repeated.
        ("The answer is: The answer is: The Mona Lisa is…", "answer_prefix"),
        ("The answer is: The Mona Lisa is exhibited in the Louvre", "answer_prefix"),
        ("Answer: Paris, France", "answer_prefix"),
        ("Rationale: the Mona Lisa hangs in the Louvre", "answer_prefix"),
        ("Paris, France", "answer_echo"),
        ("paris france", "answer_echo"),
        (MONA, "repeated"),
        ("which city is the capital of the country where the mona lisa is exhibited", "repeated"),
        ("The Mona Lisa is exhibited in the Louvre in Paris.", "statement"),
        ("Louvre", "too_short"),
        ("", "empty"),
        ("   ", "empty"),
        (" ".join(["word"] * 21), "too_long"),
        ("Mona Lisa museum location", None),
        ("capital of France", None),
        ("Where is the Mona Lisa exhibited?", None),
    ],
)
def test_query_problem_on_real_bad_strings(query: str, problem: str | None) -> None:
    assert query_problem(query, earlier_queries=[MONA], answers=["Paris, France"]) == problem


def test_queries_copied_from_the_context_or_made_of_sentences_are_refused() -> None:
    # What the reasoner wrote as its round-3 query in the Mona Lisa trajectory.
    copied = (
        "The Mona Lisa is a half-length portrait painting by Leonardo da Vinci. "
        "It is a painting of a woman,"
    )
    context = (
        "Query: x\nRetrieved Document [1]: Title: Mona Lisa Content: The Mona Lisa is a "
        "half-length portrait painting by Italian artist Leonardo da Vinci."
    )
    assert query_problem(copied) == "statement"
    assert query_problem("The Mona Lisa is a half-length portrait", context=context) == (
        "context_copy"
    )
    assert query_problem("Mona Lisa half-length portrait museum", context=context) is None


def test_an_answer_inside_a_query_is_an_echo_only_when_it_is_a_whole_phrase() -> None:
    long_answer = "The Mona Lisa is in the Louvre Museum"
    assert query_problem("where the mona lisa is in the louvre museum", answers=[long_answer]) == (
        "answer_echo"
    )
    # A short answer (a name) inside a query is how a second hop is searched for.
    assert query_problem("Paris capital city history", answers=["Paris"]) is None
    # "unsure" is no answer to echo.
    assert query_problem("unsure about it", answers=["unsure"]) is None


def test_fallback_is_the_question_plus_the_latest_real_answers_new_terms() -> None:
    assert fallback_query(MONA, ["Paris, France"]) == f"{MONA} paris france"
    assert fallback_query(MONA, ["Louvre", "unsure"]) == f"{MONA} louvre"
    # Nothing new to add (the answer's words are all in the question, or no answer): no fallback.
    assert fallback_query(MONA, ["the Mona Lisa"]) is None
    assert fallback_query(MONA, ["unsure"]) is None
    assert fallback_query(MONA, []) is None
    # It is no answer echo (the loop checks it only against exact repeats of earlier queries).
    fallback = fallback_query(MONA, ["Paris, France"])
    assert fallback is not None and query_problem(fallback, answers=["Paris, France"]) is None


def test_parse_query_keeps_its_first_line() -> None:
    assert parse_query('Search query: "Louvre location"\nbecause') == "Louvre location"


def test_parse_subqueries_strips_markers_and_duplicates() -> None:
    raw = (
        'Search queries:\n1. Where is the Mona Lisa exhibited?\n2) "capital of France"\n'
        "- Query 3: capital of France\n* Q4: Louvre museum city\n\n"
    )
    assert parse_subqueries(raw) == [
        "Where is the Mona Lisa exhibited?",
        "capital of France",
        "Louvre museum city",
    ]
    assert parse_subqueries("") == []


def test_choose_subqueries_keeps_the_question_and_drops_answers() -> None:
    raw = "1. The answer is Paris\n2. Mona Lisa museum\n3. Mona Lisa museum\n4. capital of France"
    one = choose_subqueries(MONA, raw, 1)
    assert [(s.sq_id, s.text, s.origin) for s in one.subqueries] == [("sq1", MONA, "question")]
    two = choose_subqueries(MONA, raw, 2)
    assert [(s.sq_id, s.text) for s in two.subqueries] == [
        ("sq1", MONA),
        ("sq2", "Mona Lisa museum"),
    ]
    assert two.rejected == [{"text": "The answer is Paris", "problem": "answer_prefix"}]
    three = choose_subqueries(MONA, raw, 3)
    assert [s.text for s in three.subqueries] == [MONA, "Mona Lisa museum", "capital of France"]
    assert [s.order for s in three.subqueries] == [0, 1, 2]
    alone = choose_subqueries(MONA, raw, 3, keep_question=False)
    assert [s.sq_id for s in alone.subqueries] == ["sq1", "sq2"]
    # A one-word sub-query may be an entity to look up (a one-word follow-up query may not).
    assert [s.text for s in choose_subqueries(MONA, "Louvre", 2).subqueries] == [MONA, "Louvre"]
    # Nothing usable: the question alone.
    nothing = "Answer: Paris\nThe capital of the country where the Mona Lisa is exhibited is Paris."
    assert [s.text for s in choose_subqueries(MONA, nothing, 3).subqueries] == [MONA]
    with pytest.raises(ValueError):
        choose_subqueries(MONA, raw, 4)


# --- the loop ------------------------------------------------------------------------------------


CORPUS = {
    MONA: ["mona", "leonardo", "eiffel"],
    "Mona Lisa museum": ["louvre", "mona", "leonardo"],
    "capital of France": ["paris", "france", "eiffel"],
    f"{MONA} paris france": ["paris", "france", "newton"],
    f"{MONA} france": ["paris", "newton"],
}


def pipeline(
    reasoner: ScriptedReasoner, critic: ScriptedCritic | None = None
) -> tuple[AnswerPipeline, ScriptedIndex]:
    searcher = ScriptedIndex(CORPUS)
    return AnswerPipeline(SearchPipeline(searcher), lambda: reasoner, critic=critic), searcher


async def test_two_subqueries_are_retrieved_apart_and_fused() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: Paris\nRationale: the Louvre is in Paris"],
        decompositions=["1. Mona Lisa museum\n2. capital of France"],
    )
    p, searcher = pipeline(reasoner)
    trace = Trace(kind="answer", request={"max_rounds": None, "subqueries": 2})
    outcome = await p.run_rounds(
        trace, question=MONA, collection="wiki", k=3, max_rounds=None, subqueries=2
    )
    assert searcher.queries == [MONA, "Mona Lisa museum"]
    decompose = next(s for s in trace.stages if s.stage == "decompose")
    assert decompose.targets == [
        {"type": "subquery", "id": "sq1"},
        {"type": "subquery", "id": "sq2"},
    ]
    assert [sq["text"] for sq in decompose.outputs["subqueries"]] == [MONA, "Mona Lisa museum"]
    retrieves = [s for s in trace.stages if s.stage == "retrieve"]
    assert sorted((s.params["sq_id"], s.params["retriever"]) for s in retrieves) == [
        ("sq1", "bm25"),
        ("sq1", "dense"),
        ("sq2", "bm25"),
        ("sq2", "dense"),
    ]
    over = [s for s in trace.stages if s.stage == "fusion" and s.params.get("over")]
    assert len(over) == 1 and over[0].inputs["subqueries"] == ["sq1", "sq2"]
    # RRF over the two lists: "mona" (ranks 1 and 2), "leonardo" (2 and 3), "louvre" (1 in sq2).
    assert [h.doc_id for h in outcome.rounds[0].hits] == ["mona", "leonardo", "louvre"]
    assert set(over[0].outputs["hits"][0]["sources"]) == {"sq1", "sq2"}
    # No critic, no max_rounds: one round, and the trace's request records the resolved plan.
    assert outcome.stop_reason == "no_critic" and len(outcome.rounds) == 1
    assert trace.request == {"max_rounds": 1, "subqueries": 2}


async def test_default_without_a_critic_is_one_round() -> None:
    p, searcher = pipeline(ScriptedReasoner(["Answer: Paris, France"], ["The answer is: Paris"]))
    trace = Trace(kind="answer", request={"max_rounds": None})
    outcome = await p.run_rounds(trace, question=MONA, collection="wiki", k=3)
    assert outcome.stop_reason == "no_critic" and outcome.answer == "Paris, France"
    assert len(outcome.rounds) == 1 and outcome.degraded == ["critic"]
    assert searcher.queries == [MONA] and trace.request["max_rounds"] == 1


async def test_default_with_a_critic_is_the_critics_loop_and_ids_continue() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: France", "Answer: Paris"],
        ["The answer is: The answer is: France"],
        decompositions=["capital of France"],
    )
    p, _ = pipeline(reasoner, ScriptedCritic([False, True]))
    trace = Trace(kind="answer", request={"max_rounds": None})
    outcome = await p.run_rounds(trace, question=MONA, collection="wiki", k=2, subqueries=2)
    assert outcome.stop_reason == "accepted" and outcome.answer == "Paris"
    assert outcome.chosen_round == 2 and outcome.chosen_by == "accepted"
    # The answer echo was replaced by the fallback; it is sub-query sq3 (sq1, sq2 in round 1).
    assert outcome.rounds[0].next_query == f"{MONA} france"
    assert [sq.sq_id for sq in outcome.rounds[1].subqueries] == ["sq3"]
    assert outcome.rounds[1].subqueries[0].origin == "fallback"
    ids = [t["id"] for s in trace.stages if s.stage == "decompose" for t in s.targets]
    assert ids == ["sq1", "sq2", "sq3"]
    assert trace.request["max_rounds"] == 4


async def test_without_verdicts_the_first_confident_answer_is_returned() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: unsure", "Answer: Paris", "Answer: Rome"],
        ["capital of France", "Mona Lisa museum"],
    )
    p, _ = pipeline(reasoner)
    trace = Trace(kind="answer", request={})
    outcome = await p.run_rounds(
        trace, question=MONA, collection="wiki", k=1, max_rounds=3, policy=StopPolicy.fixed
    )
    assert [r.answer for r in outcome.rounds] == ["unsure", "Paris", "Rome"]
    assert outcome.answer == "Paris" and outcome.chosen_by == "first_confident"
    select = trace.stages[-1]
    assert select.stage == "select" and select.outputs == {
        "round": 2,
        "answer": "Paris",
        "rule": "first_confident",
    }
    again = ScriptedReasoner(
        ["Answer: unsure", "Answer: Paris", "Answer: Rome"],
        ["capital of France", "Mona Lisa museum"],
    )
    last = await pipeline(again)[0].run_rounds(
        Trace(kind="answer", request={}),
        question=MONA,
        collection="wiki",
        k=1,
        max_rounds=3,
        policy=StopPolicy.fixed,
        selection=AnswerSelection.last,
    )
    assert last.answer == "Rome" and last.chosen_by == "last"


async def test_a_critic_that_rejects_every_round_returns_the_forced_last_one() -> None:
    reasoner = ScriptedReasoner(["Answer: France", "Answer: Paris"], ["capital of France"])
    p, _ = pipeline(reasoner, ScriptedCritic([False]))
    outcome = await p.run_rounds(
        Trace(kind="answer", request={}), question=MONA, collection="wiki", k=2, max_rounds=2
    )
    assert outcome.answer == "Paris" and outcome.chosen_by == "critic_forced"


def test_selection_rules_of_the_decomposition_evaluation() -> None:
    from lodestar.evaluation.decompose import select_answer

    answers = ["unsure", "Paris", "Rome", "paris."]
    assert select_answer(answers, "first_confident") == "Paris"
    assert select_answer(answers, "last") == "paris."
    assert select_answer(answers, "majority") == "Paris"  # "Paris" twice (normalised)
    assert select_answer(["A", "B"], "majority") == "A"  # a tie: the earliest
    assert select_answer(["unsure"], "first_confident") == "unsure"
    with pytest.raises(ValueError):
        select_answer(answers, "best")
