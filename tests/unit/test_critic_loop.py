"""SIM-RAG's data preparation and the multi-round answer loop's control flow.

The loop tests drive ``AnswerPipeline.rounds`` with a scripted reasoner and a retriever that
answers per query, so each stopping rule is exercised exactly; the critic is either scripted or
the real ``CriticClient`` failing the ways a service fails (refused connection, timeout, 503).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from services.critic.practice import PracticeRow
from services.critic.training import balance_by_downsampling, binary_report, split_by_question
from services.orchestrator.prompts import (
    format_round_context,
    is_unsure,
    parse_query,
    parse_reasoner_output,
)
from services.orchestrator.rounds import (
    AnswerPiece,
    AnswerPipeline,
    RoundFinished,
    RoundsFinished,
    RoundStarted,
    StopPolicy,
)
from services.orchestrator.search import SearchPipeline
from shared.clients import CriticClient, DependencyError, JudgeRequest
from shared.settings import Settings
from shared.store import Trace
from tests.scripted import ScriptedCritic, ScriptedIndex, ScriptedReasoner

# --- data preparation ----------------------------------------------------------------------------


def practice_row(qid: str, turn: int, em: int) -> PracticeRow:
    return PracticeRow(
        qid=qid,
        turn=turn,
        question=f"question {qid}",
        golds=["x"],
        context="",
        answer="x" if em else "y",
        rationale="",
        raw="",
        em=em,
        acc=em,
        self_unsure=False,
        query=f"question {qid}",
        hit_ids=[],
        next_query=None,
        correct_retrieval=False,
    )


def practice_rows() -> list[PracticeRow]:
    """40 questions × 3 turns; the first 10 questions are right at every turn, the rest never."""
    return [practice_row(f"q{i:02d}", turn, int(i < 10)) for i in range(40) for turn in range(3)]


def test_balancing_down_samples_the_majority_label_and_keeps_every_minority_row() -> None:
    rows = practice_rows()
    balanced = balance_by_downsampling(rows, "em", seed=1)
    accepted = [r for r in balanced if r.em]
    rejected = [r for r in balanced if not r.em]
    assert len(accepted) == len(rejected) == 30
    assert accepted == [r for r in rows if r.em]  # the minority is kept whole, in order
    assert balance_by_downsampling(rows, "em", seed=1) == balanced  # seeded: reproducible
    assert balance_by_downsampling([r for r in rows if not r.em], "em") == []


def test_split_is_by_question_and_stratified() -> None:
    balanced = balance_by_downsampling(practice_rows(), "em", seed=3)
    train, dev = split_by_question(balanced, "em", dev_fraction=0.2, seed=3)
    train_q, dev_q = {r.qid for r in train}, {r.qid for r in dev}
    assert not train_q & dev_q
    assert len(train) + len(dev) == len(balanced)
    # Both kinds of question are held out: 20 % of the 10 accepted-mostly ones, of the others.
    assert {r.em for r in dev} == {0, 1} and {r.em for r in train} == {0, 1}
    assert len({r.qid for r in dev if r.em}) == 2


def test_all_practice_reads_every_run_and_names_every_dataset(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    from services.critic.practice import (
        TRAJECTORIES_FILE,
        load_all_trajectories,
        practice_family,
    )

    settings = Settings(data_dir=tmp_path)
    family = practice_family(settings)
    runs = [
        ("nq-oracle", [practice_row("nq-1", 0, 1), practice_row("nq-1", 1, 0)]),
        ("hotpotqa-train", [practice_row("hp-1", 0, 0)]),
    ]
    for dataset, rows in runs:
        with family.lock(), family.build({"kind": "critic-practice", "dataset": dataset}) as d:
            lines = "".join(json.dumps(asdict(r)) + "\n" for r in rows)
            (d / TRAJECTORIES_FILE).write_text(lines, encoding="utf-8")
    rows, manifest = load_all_trajectories(settings)
    assert sorted((r.qid, r.turn) for r in rows) == [("hp-1", 0), ("nq-1", 0), ("nq-1", 1)]
    assert manifest["dataset"] == "hotpotqa-train+nq-oracle"
    assert len(manifest["version"].split("+")) == 2


def test_binary_report() -> None:
    report = binary_report([True, True, False, False], [1, 0, 1, 0])
    assert report == {
        "n": 4,
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "accept_rate": 0.5,
    }


# --- parsing the reasoner ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "answer", "rationale"),
    [
        ("Answer: Paris\nRationale: Document 1 says so.", "Paris", "Document 1 says so."),
        ("**Answer:** 1887 [2]\n**Rationale:** built then", "1887", "built then"),
        (
            "Leonardo da Vinci\nHe painted it in 1503.",
            "Leonardo da Vinci",
            "He painted it in 1503.",
        ),
        ("Answer: unsure", "unsure", ""),
        ("", "", ""),
    ],
)
def test_parse_reasoner_output(raw: str, answer: str, rationale: str) -> None:
    assert parse_reasoner_output(raw) == (answer, rationale)


def test_unsure_and_query_parsing() -> None:
    assert is_unsure("unsure") and is_unsure("Unsure.") and is_unsure("")
    assert not is_unsure("Paris")
    assert parse_query('Search query: "Eiffel tower height"\nbecause') == "Eiffel tower height"
    assert parse_query("\n\n") == ""


# --- the loop ------------------------------------------------------------------------------------


CORPUS = {
    "who built it": ["a", "b", "c"],
    "architect of the tower": ["b", "d", "e"],
    "tower construction year": ["f", "a"],
    "tower height": ["b", "a"],  # nothing round 1 did not already return
}


def pipeline(reasoner: ScriptedReasoner, critic: object | None) -> AnswerPipeline:
    search = SearchPipeline(ScriptedIndex(CORPUS))
    return AnswerPipeline(search, lambda: reasoner, critic=critic)  # type: ignore[arg-type]


async def run(p: AnswerPipeline, policy: StopPolicy = StopPolicy.critic, max_rounds: int = 4):  # type: ignore[no-untyped-def]
    trace = Trace(kind="answer", request={})
    outcome = await p.run_rounds(
        trace, question="who built it", collection="c", k=2, max_rounds=max_rounds, policy=policy
    )
    return outcome, trace


async def test_critic_acceptance_stops_the_loop() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: unsure\nRationale: no idea", "Answer: Eiffel\nRationale: doc d"],
        ["architect of the tower"],
    )
    critic = ScriptedCritic([False, True])
    outcome, trace = await run(pipeline(reasoner, critic))
    assert outcome.stop_reason == "accepted" and outcome.answer == "Eiffel"
    assert [r.query for r in outcome.rounds] == ["who built it", "architect of the tower"]
    # Round 2 reads only documents round 1 had not returned, and the critic saw the whole context.
    assert [[h.doc_id for h in r.hits] for r in outcome.rounds] == [["a", "b"], ["d", "e"]]
    assert [r.accept for r in outcome.rounds] == [False, True]
    assert critic.requests[1].context == format_round_context(
        [type("C", (), {"query": r.query, "hits": r.hits})() for r in outcome.rounds]  # type: ignore[misc]
    )
    assert critic.requests[1].rationale == "doc d" and outcome.degraded == []
    stages = [(s.stage, s.params.get("round")) for s in trace.stages if s.stage != "retrieve"]
    assert stages == [
        ("decompose", 1),
        ("fusion", None),
        ("generate", 1),
        ("critic", 1),
        ("query", 1),
        ("decompose", 2),
        ("fusion", None),
        ("generate", 2),
        ("critic", 2),
        ("select", None),
    ]
    # The follow-up query is sub-query sq2 of round 2 (round 1's only one is the question, sq1).
    decompose = [s for s in trace.stages if s.stage == "decompose"]
    assert [t["id"] for s in decompose for t in s.targets] == ["sq1", "sq2"]
    assert outcome.chosen_round == 2 and outcome.chosen_by == "accepted"


async def test_max_rounds_forces_the_last_answer_without_asking_the_critic() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: A1", "Answer: A2", "Answer: A3"],
        ["architect of the tower", "tower construction year"],
    )
    critic = ScriptedCritic([False, False])
    outcome, _ = await run(pipeline(reasoner, critic), max_rounds=3)
    assert outcome.stop_reason == "max_rounds" and outcome.answer == "A3"
    assert len(outcome.rounds) == 3 and len(critic.requests) == 2
    assert outcome.rounds[-1].accept is None
    assert [h.doc_id for h in outcome.rounds[2].hits] == ["f"]


async def test_a_final_unsure_falls_back_to_the_latest_real_answer() -> None:
    reasoner = ScriptedReasoner(["Answer: A1", "Answer: unsure"], ["architect of the tower"])
    outcome, _ = await run(pipeline(reasoner, ScriptedCritic([False])), max_rounds=2)
    assert outcome.answer == "A1" and outcome.rounds[-1].answer == "unsure"


async def test_a_repeated_query_with_no_fallback_stops_the_loop() -> None:
    # An "unsure" answer adds no term to the question, so there is no fallback query either.
    reasoner = ScriptedReasoner(["Answer: unsure"], ["Who built  it?"])
    outcome, trace = await run(pipeline(reasoner, ScriptedCritic([False])))
    assert outcome.stop_reason == "repeated_query" and len(outcome.rounds) == 1
    assert outcome.rounds[0].next_query is None
    query = next(s for s in trace.stages if s.stage == "query")
    assert query.outputs["repeated"] is True and query.outputs["proposed"] == "Who built  it?"
    assert query.outputs["problem"] == "repeated" and query.targets == []


async def test_a_rejected_query_is_replaced_by_the_fallback() -> None:
    # The reasoner writes its answer back instead of a query: the question plus the answer's
    # new terms is searched instead (CORPUS has no entry for it, so round 2 finds nothing new).
    reasoner = ScriptedReasoner(["Answer: Eiffel"], ["The answer is: Eiffel"])
    outcome, trace = await run(pipeline(reasoner, ScriptedCritic([False])))
    query = next(s for s in trace.stages if s.stage == "query")
    assert query.outputs["problem"] == "answer_prefix" and query.outputs["origin"] == "fallback"
    assert outcome.rounds[0].next_query == "who built it eiffel"
    assert query.targets == [{"type": "subquery", "id": "sq2"}]


async def test_an_empty_query_with_no_fallback_counts_as_repeated() -> None:
    reasoner = ScriptedReasoner(["Answer: unsure"], ["   "])
    outcome, _ = await run(pipeline(reasoner, ScriptedCritic([False])))
    assert outcome.stop_reason == "repeated_query" and len(outcome.rounds) == 1


async def test_retrieval_with_nothing_new_stops_the_loop() -> None:
    reasoner = ScriptedReasoner(["Answer: A1"], ["tower height"])
    outcome, trace = await run(pipeline(reasoner, ScriptedCritic([False])))
    assert outcome.stop_reason == "empty_retrieval" and outcome.answer == "A1"
    assert len(outcome.rounds) == 1
    assert (
        trace.stages[-1].stage == "round" and trace.stages[-1].outputs["stop"] == "empty_retrieval"
    )


async def test_baseline_policies() -> None:
    answers = ["Answer: unsure", "Answer: A2", "Answer: A3"]
    queries = ["architect of the tower", "tower construction year"]
    confident, _ = await run(
        pipeline(ScriptedReasoner(answers, queries), None), StopPolicy.self_confidence
    )
    assert confident.stop_reason == "confident" and confident.answer == "A2"
    assert len(confident.rounds) == 2 and confident.degraded == []
    fixed, _ = await run(pipeline(ScriptedReasoner(answers, queries), None), StopPolicy.fixed, 3)
    assert fixed.stop_reason == "max_rounds" and len(fixed.rounds) == 3


async def test_streaming_yields_each_round_in_order() -> None:
    reasoner = ScriptedReasoner(
        ["Answer: unsure", "Answer: Gustave Eiffel"], ["architect of the tower"]
    )
    p = pipeline(reasoner, ScriptedCritic([False, True]))
    events = [
        e
        async for e in p.rounds(
            Trace(kind="answer", request={}),
            question="who built it",
            collection="c",
            k=2,
            max_rounds=4,
            stream=True,
        )
    ]
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RoundStarted" and kinds[-1] == "RoundsFinished"
    rounds = [e.round for e in events if isinstance(e, RoundStarted)]
    finished = [e.record.round for e in events if isinstance(e, RoundFinished)]
    assert rounds == finished == [1, 2]
    # Each round: started, its tokens, finished, before the next round starts.
    order = [
        (type(e).__name__, getattr(e, "round", None) or e.record.round)  # type: ignore[union-attr]
        for e in events[:-1]
    ]
    first_round_two = order.index(("RoundStarted", 2))
    assert all(r == 1 for _, r in order[:first_round_two])
    assert ("RoundFinished", 1) in order[:first_round_two]
    streamed = "".join(e.text for e in events if isinstance(e, AnswerPiece) and e.round == 2)
    assert "Gustave Eiffel" in streamed
    final = events[-1]
    assert isinstance(final, RoundsFinished) and final.outcome.answer == "Gustave Eiffel"


def critic_client(handler: object) -> CriticClient:
    settings = Settings(downstream_timeout_s=0.5)
    return CriticClient(settings, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def time_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


def untrained(request: httpx.Request) -> httpx.Response:
    body = {"error": {"code": "unavailable", "message": "no critic model is published"}}
    return httpx.Response(503, json=body)


@pytest.mark.parametrize("failure", [refuse, time_out, untrained])
async def test_a_failing_critic_degrades_to_max_rounds(failure: object) -> None:
    client = critic_client(failure)
    with pytest.raises(DependencyError):
        await client.judge(JudgeRequest(question="q", answer="a"))
    reasoner = ScriptedReasoner(
        ["Answer: A1", "Answer: A2", "Answer: A3"],
        ["architect of the tower", "tower construction year"],
    )
    outcome, trace = await run(pipeline(reasoner, client), max_rounds=3)
    assert outcome.stop_reason == "max_rounds" and len(outcome.rounds) == 3
    # No verdict to go by: the first confident answer, not simply the last round's.
    assert outcome.degraded == ["critic"] and outcome.answer == "A1"
    assert outcome.chosen_by == "first_confident"
    critic_stages = [s for s in trace.stages if s.stage == "critic"]
    # Asked once; after a failure the loop does not wait on it again.
    assert len(critic_stages) == 1
    assert critic_stages[0].outputs["fallback"] == "continue_to_max_rounds"
    await client.aclose()


async def test_no_critic_configured_is_degraded_too() -> None:
    reasoner = ScriptedReasoner(["Answer: A1", "Answer: A2"], ["architect of the tower"])
    outcome, _ = await run(pipeline(reasoner, None), max_rounds=2)
    assert outcome.degraded == ["critic"] and len(outcome.rounds) == 2


# --- evaluation: the critic's decisions against the reasoner's own --------------------------------


def test_judgement_report_scores_critic_and_self_assessment_on_the_same_rounds() -> None:
    from lodestar.evaluation.rag import judgement_report

    per_question: dict[str, dict[str, Any]] = {
        "q1": {
            "answers": ["Paris"],
            "judged": [
                {"answer": "Paris", "accept": True, "p_accept": 0.9, "unsure": False},
                {"answer": "Lyon", "accept": False, "p_accept": 0.2, "unsure": False},
            ],
        },
        "q2": {
            "answers": ["1887"],
            "judged": [{"answer": "unsure", "accept": False, "p_accept": 0.1, "unsure": True}],
        },
        "q3": {"answers": ["x"], "judged": None},
    }
    report = judgement_report(per_question)
    assert report is not None and report["rounds_judged"] == 3
    assert report["em"]["positive_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["em"]["critic"]["accuracy"] == 1.0
    # Self-assessment accepts "Lyon" (it was sure): one false accept.
    assert report["em"]["self_assessment"]["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["em"]["self_assessment"]["precision"] == 0.5
    assert judgement_report({"q": {"answers": ["x"], "judged": None}}) is None


def test_greedy_generations_are_replayed_from_disk_and_sampled_ones_never(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lodestar.evaluation.rag import ReplayingGenerator

    reasoner = ScriptedReasoner(["Answer: A", "Answer: B", "Answer: C"], [])
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    cache = tmp_path / "generations.jsonl"
    first = ReplayingGenerator(reasoner, cache)
    assert first.generate(messages).text == "Answer: A"
    assert first.generate(messages).text == "Answer: A"  # remembered
    assert first.generate(messages, temperature=0.6).text == "Answer: B"  # sampled: generated
    second = ReplayingGenerator(reasoner, cache)
    replayed = second.generate(messages)
    assert replayed.text == "Answer: A" and replayed.seconds == 0.01
    assert second.generate(messages, max_new_tokens=8).text == "Answer: C"  # another budget
    assert len(reasoner.answers) == 0


def test_practice_and_training_are_worker_jobs_and_the_critic_is_in_the_stack() -> None:
    from lodestar.stack import STACK
    from services.worker.tasks import app
    from shared.jobs import TASK_CRITIC_PRACTICE, TASK_CRITIC_TRAIN

    assert {TASK_CRITIC_PRACTICE, TASK_CRITIC_TRAIN} <= set(app.tasks)
    critic = next(spec for spec in STACK if spec.name == "critic")
    assert critic.module == "services.critic" and critic.port_service == "critic"
