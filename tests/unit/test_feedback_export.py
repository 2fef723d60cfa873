"""Feedback → training examples (``GET /feedback/export``'s engine), on a real SQLite store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.orchestrator.feedback_export import (
    EXPORT_STAGES,
    SOURCES,
    apply_subquery_edits,
    build_export,
    check_filter,
    parse_since,
    to_jsonl,
)
from shared.errors import ErrorCode, LodestarError
from shared.store import FeedbackIn, StageRun, Store, Trace, database_url

RANKING = [f"d{i}" for i in range(1, 9)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(database_url(None, tmp_path))
    yield opened
    opened.close()


def hits(ids: list[str]) -> dict[str, Any]:
    return {"hits": [{"doc_id": d, "rank": i, "score": 1.0 / i} for i, d in enumerate(ids, 1)]}


def answer_trace() -> Trace:
    docs = [{"type": "doc", "id": d} for d in RANKING]
    return Trace(
        kind="answer",
        request={"question": "who painted the mona lisa", "collection": "wiki"},
        response={"answer": "Leonardo da Vinci, in Paris", "citations": [{"doc_id": "d1"}]},
        stages=[
            StageRun(
                stage="decompose",
                inputs={},
                outputs={
                    "subqueries": [
                        {"sq_id": "sq1", "text": "mona lisa painter"},
                        {"sq_id": "sq2", "text": "mona lisa museum"},
                    ]
                },
                targets=[{"type": "subquery", "id": "sq1"}, {"type": "subquery", "id": "sq2"}],
            ),
            StageRun("retrieve", {}, hits(RANKING[:6]), docs[:6], params={"retriever": "bm25"}),
            StageRun("retrieve", {}, hits(RANKING[2:]), docs[2:], params={"retriever": "dense"}),
            StageRun("fusion", {}, hits(RANKING), docs),
            StageRun(
                "generate",
                {"doc_ids": ["d1", "d2"]},
                {"answer": "Leonardo da Vinci, in Paris"},
                [{"type": "answer", "id": "answer"}],
            ),
        ],
    )


def add(store: Store, trace: Trace, **fields: Any) -> str:
    base: dict[str, Any] = {"trace_id": trace.trace_id, "stage": "fusion", "target_type": "doc"}
    feedback_id, created = store.add_feedback(FeedbackIn(**{**base, **fields}))
    assert created
    return feedback_id


def test_relevance_labels_carry_hard_negatives_provenance_and_weight(store: Store) -> None:
    trace = answer_trace()
    store.save_trace(trace)
    user_pos = add(store, trace, target_id="d3", action="relevant")
    user_neg = add(store, trace, target_id="d6", action="irrelevant")
    shadow_pos = add(
        store,
        trace,
        target_id="d5",
        action="relevant",
        source="shadow",
        agent_id="shadow-llm:test",
        confidence=0.8,
    )
    examples = build_export(store)
    labels = {e["derived_from"][0]: e for e in examples if e["type"] == "rel_label"}
    assert set(labels) == {user_pos, user_neg, shadow_pos}

    first = labels[user_pos]
    assert (first["query"], first["doc_id"], first["label"], first["source"]) == (
        "who painted the mona lisa",
        "d3",
        1,
        "user",
    )
    # The user's own irrelevant label first, then the ranking, never a document judged
    # relevant by anyone (d3 itself, the shadow's d5).
    assert first["hard_negatives"] == ["d6", "d1", "d2", "d4", "d7"]
    assert first["negative_ranks"] == [6, 1, 2, 4, 7]
    assert first["rank"] == 3
    assert first["weight"] == 1.0
    assert first["agent_id"] is None

    synthetic = labels[shadow_pos]
    assert synthetic["source"] == "shadow"
    assert synthetic["agent_id"] == "shadow-llm:test"
    assert synthetic["weight"] == pytest.approx(0.8 * 0.5)
    assert synthetic["hard_negatives"] == ["d1", "d2", "d4", "d6", "d7"]
    assert labels[user_neg]["label"] == 0

    only_shadow = build_export(store, source="shadow")
    assert [e["derived_from"] for e in only_shadow] == [[shadow_pos]]
    assert build_export(store, source="user", stage="retrieve") == []
    assert build_export(store, since=labels[user_neg]["created_at"], types=["rel_label"]) == [
        labels[user_neg],
        labels[shadow_pos],
    ]


def test_retrieve_feedback_ranks_by_interleaving_the_retrievers(store: Store) -> None:
    trace = answer_trace()
    store.save_trace(trace)
    add(store, trace, stage="retrieve", target_id="d8", action="pin")
    (example,) = build_export(store)
    # bm25 ranks d1..d6, dense d3..d8: interleaved by rank, d1 d3 d2 d4 d3 ...
    assert example["label"] == 1
    assert example["hard_negatives"] == ["d1", "d3", "d2", "d4", "d5"]


def test_subquery_edits_make_one_preference_pair_per_trace_and_source(store: Store) -> None:
    trace = answer_trace()
    store.save_trace(trace)
    common = {"stage": "decompose", "target_type": "subquery"}
    edit = add(store, trace, **common, target_id="sq1", action="edit", value="who painted it")
    delete = add(store, trace, **common, target_id="sq2", action="delete")
    added = add(
        store,
        trace,
        **common,
        target_id="sq1",
        action="add",
        value={"text": "leonardo da vinci", "position": 0},
    )
    (pair,) = build_export(store, stage="decompose")
    assert pair["type"] == "pref_pair"
    assert pair["rejected"] == ["mona lisa painter", "mona lisa museum"]
    assert pair["chosen"] == ["leonardo da vinci", "who painted it"]
    assert pair["derived_from"] == [edit, delete, added]
    assert pair["source"] == "user"


def test_corrected_answers_become_sft_examples(store: Store) -> None:
    trace = answer_trace()
    store.save_trace(trace)
    base = {"stage": "generate", "target_type": "answer", "target_id": "answer"}
    span = add(
        store,
        trace,
        **base,
        action="correct_span",
        value={"span": "Paris", "correction": "the Louvre"},
    )
    preferred = add(store, trace, **base, action="preferred_answer", value="Leonardo da Vinci")
    add(store, trace, **base, action="thumbs", value="down")
    examples = {e["derived_from"][0]: e for e in build_export(store, stage="generate")}
    assert set(examples) == {span, preferred}  # thumbs make no example
    assert examples[span]["completion"] == "Leonardo da Vinci, in the Louvre"
    assert examples[span]["rejected"] == "Leonardo da Vinci, in Paris"
    assert examples[span]["context_doc_ids"] == ["d1", "d2"]
    assert examples[preferred]["completion"] == "Leonardo da Vinci"
    line = next(iter(to_jsonl([examples[span]])))
    assert line.endswith("\n") and json.loads(line)["type"] == "sft"


def test_reorder_and_unknown_targets() -> None:
    original = [{"id": "a", "text": "A"}, {"id": "b", "text": "B"}, {"id": "c", "text": "C"}]
    rows: list[dict[str, Any]] = [
        {"action": "reorder", "target_id": "c", "value": 0, "feedback_id": "1"},
        {"action": "edit", "target_id": "zzz", "value": "ignored", "feedback_id": "2"},
        {"action": "reorder", "target_id": "a", "value": {"order": 2}, "feedback_id": "3"},
    ]
    assert [sq["text"] for sq in apply_subquery_edits(original, rows)] == ["C", "B", "A"]


def test_query_parameters_are_validated() -> None:
    assert parse_since(None) is None
    assert parse_since("1700000000.5") == 1700000000.5
    assert parse_since("2024-01-01T00:00:00") == 1704067200.0
    assert parse_since("2024-01-01T01:00:00+01:00") == 1704067200.0
    for bad in ("yesterday", "-5", "nan", "inf"):
        with pytest.raises(LodestarError) as caught:
            parse_since(bad)
        assert (caught.value.code, caught.value.field) == (ErrorCode.validation, "since")
    assert check_filter("rerank", EXPORT_STAGES, "stage") == "rerank"
    with pytest.raises(LodestarError) as caught:
        check_filter("agent", SOURCES, "source")
    assert (caught.value.code, caught.value.field) == (ErrorCode.validation, "source")
