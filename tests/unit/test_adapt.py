"""Online adaptation logic: Rocchio, RM3, pins, removals, feedback precedence, rerun checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.orchestrator.adapt import (
    AdaptationWeights,
    FeedbackAdaptation,
    relevance_model,
    rm3_terms,
    rocchio,
    terms,
)
from services.orchestrator.rerun import Overrides, check_rerun, query_key, trace_doc_ids
from services.orchestrator.search import SearchPipeline
from shared.errors import LodestarError
from shared.schemas import EmbedRequest, EmbedResponse, Hit, IndexSearchRequest, IndexSearchResponse
from shared.store import Trace


def hit(doc_id: str, text: str = "", score: float = 1.0) -> Hit:
    return Hit(doc_id=doc_id, title=doc_id, text=text, score=score)


# --- Rocchio ---------------------------------------------------------------------------------


def test_rocchio_is_the_weighted_sum_renormalised() -> None:
    q = np.array([1.0, 0.0, 0.0])
    rel = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    nonrel = [[1.0, 0.0, 0.0]]
    moved = rocchio(q, rel, nonrel, alpha=1.0, beta=0.5, gamma=0.25)
    expected = np.array([1.0 - 0.25, 0.25, 0.25])
    np.testing.assert_allclose(moved, expected / np.linalg.norm(expected), rtol=1e-6)
    assert abs(float(np.linalg.norm(moved)) - 1.0) < 1e-6


def test_rocchio_moves_the_query_towards_relevant_and_away_from_irrelevant() -> None:
    rng = np.random.default_rng(0)
    q, r, n = (v / np.linalg.norm(v) for v in rng.normal(size=(3, 16)))
    moved = rocchio(q, [r], [n])
    assert moved @ r > q @ r
    assert moved @ n < q @ n


def test_rocchio_without_feedback_or_with_a_zero_result_keeps_the_query() -> None:
    q = np.array([3.0, 4.0])
    np.testing.assert_allclose(rocchio(q, [], []), [0.6, 0.8], rtol=1e-6)
    # q cancelled exactly by the irrelevant document: fall back to q, never a NaN vector
    np.testing.assert_allclose(
        rocchio(q, [], [[3.0, 4.0]], alpha=1.0, gamma=1.0), [0.6, 0.8], rtol=1e-6
    )


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError):
        AdaptationWeights(beta=-1)
    with pytest.raises(ValueError):
        AdaptationWeights(rm3_original_weight=1.5)


# --- RM3 -------------------------------------------------------------------------------------


def test_terms_drop_stop_words_numbers_and_single_letters() -> None:
    assert terms("The Mona Lisa is a painting by Leonardo, 1503 x") == [
        "mona",
        "lisa",
        "painting",
        "leonardo",
    ]


def test_relevance_model_averages_document_language_models() -> None:
    model = relevance_model(["apple apple pear", "pear"])
    # P(apple) = (2/3 + 0) / 2, P(pear) = (1/3 + 1) / 2
    assert model["apple"] == pytest.approx(1 / 3)
    assert model["pear"] == pytest.approx(2 / 3)
    assert sum(model.values()) == pytest.approx(1.0)
    weighted = relevance_model(["apple", "pear"], doc_weights=[3.0, 1.0])
    assert weighted["apple"] == pytest.approx(0.75)


def test_rm3_interpolates_the_query_with_top_expansion_terms() -> None:
    docs = ["renaissance painter leonardo painted portrait", "leonardo renaissance florence"]
    weighted = rm3_terms("mona lisa", docs, n_terms=2, original_weight=0.5)
    # the query's terms keep half the mass, the two most probable expansion terms the rest
    assert weighted["mona"] == pytest.approx(0.25)
    assert weighted["lisa"] == pytest.approx(0.25)
    assert set(weighted) == {"mona", "lisa", "leonardo", "renaissance"}
    assert weighted["leonardo"] == pytest.approx(0.25)
    assert sum(weighted.values()) == pytest.approx(1.0)
    assert "the" not in rm3_terms("the", ["the the of"], n_terms=5)
    # λ = 1 is the original query alone; no relevant text leaves the query unchanged
    assert rm3_terms("mona lisa", docs, original_weight=1.0) == {"mona": 0.5, "lisa": 0.5}
    assert rm3_terms("mona lisa", []) == {"mona": 0.5, "lisa": 0.5}


# --- pins, removals, precedence --------------------------------------------------------------


def test_pins_come_first_in_pin_order_and_removals_leave() -> None:
    hits = [hit(d) for d in "abcdef"]
    adaptation = FeedbackAdaptation(
        pins=["e", "z", "c"], removes=["b"], documents={"z": hit("z", "stored")}
    )
    ranked = adaptation.apply(hits)
    assert [h.doc_id for h in ranked] == ["e", "z", "c", "a", "d", "f"]
    assert [h.doc_id for h in adaptation.apply(hits, k=4)] == ["e", "z", "c", "a"]
    # a pin with no text anywhere is skipped rather than shown empty
    assert [h.doc_id for h in FeedbackAdaptation(pins=["q"]).apply(hits[:2])] == ["a", "b"]
    assert [h.doc_id for h in adaptation.candidates(hits)] == ["a", "d", "f"]


def test_conflicting_adaptation_is_refused() -> None:
    with pytest.raises(ValueError):
        FeedbackAdaptation(pins=["a"], removes=["a"])
    with pytest.raises(ValueError):
        FeedbackAdaptation(relevant=["a"], irrelevant=["a"])


def row(action: str, doc: str, fid: str = "", target_type: str = "doc") -> dict[str, Any]:
    return {"action": action, "target_id": doc, "target_type": target_type, "feedback_id": fid}


def test_latest_feedback_wins_per_document_and_overrides_win_over_stored() -> None:
    rows = [
        row("pin", "a", "1"),
        row("relevant", "b", "2"),
        row("remove", "a", "3"),  # a: removed after being pinned
        row("irrelevant", "b", "4"),  # b: irrelevant after relevant
        row("pin", "c", "5"),
        row("pin", "d", "6"),
        row("thumbs", "answer", "7", "answer"),  # not a document action: ignored
    ]
    adaptation = FeedbackAdaptation.from_feedback(rows, pins=["a"], relevant=["e"])
    assert adaptation.removes == []
    assert adaptation.pins == ["c", "d", "a"]  # pin order: when each was pinned
    assert adaptation.irrelevant == ["b"]
    assert adaptation.relevant == ["e"]
    assert adaptation.feedback_ids == ["1", "2", "3", "4", "5", "6"]
    assert adaptation.judged() == {
        "b": "irrelevant",
        "e": "relevant",
        "c": "pinned",
        "d": "pinned",
        "a": "pinned",
    }


def test_relevance_labels_adapt_the_query_only_with_their_text() -> None:
    without_text = FeedbackAdaptation(relevant=["a"])
    assert not without_text.adapts_query and without_text.bm25_terms("mona lisa") is None
    with_text = FeedbackAdaptation(relevant=["a"], documents={"a": hit("a", "leonardo painter")})
    assert with_text.adapts_query
    expansion = with_text.bm25_terms("mona lisa")
    assert expansion is not None and "leonardo" in expansion and "mona" in expansion


# --- the search pipeline with an adaptation --------------------------------------------------


class FakeIndex:
    def __init__(self) -> None:
        self.requests: list[IndexSearchRequest] = []
        self.embeds: list[EmbedRequest] = []

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        self.requests.append(request)
        ranked = {
            r: [hit(d, f"text of {d}", 1.0 / i) for i, d in enumerate("abcdefgh", 1)]
            for r in request.retrievers
        }
        return IndexSearchResponse(collection="c", version="v1", results=ranked, timings_ms={})

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.embeds.append(request)
        return EmbedResponse(
            model="m",
            dim=2,
            query_vector=[1.0, 0.0],
            passage_vectors=[[0.0, 1.0] for _ in request.passages],
        )


async def test_pipeline_sends_rocchio_and_rm3_and_records_the_adapt_stage() -> None:
    index = FakeIndex()
    adaptation = FeedbackAdaptation(
        pins=["h"],
        removes=["a"],
        relevant=["b"],
        documents={"b": hit("b", "leonardo painter renaissance"), "h": hit("h", "x")},
    )
    trace = Trace(kind="search", request={})
    outcome = await SearchPipeline(index).run(
        trace,
        query="mona lisa",
        collection="c",
        k=3,
        retrievers=["dense", "bm25"],
        adaptation=adaptation,
    )
    assert [h.doc_id for h in outcome.hits] == ["h", "b", "c"]
    assert outcome.judged == {"b": "relevant", "h": "pinned"}
    (request,) = index.requests
    assert request.query_vector is not None
    moved = np.array(request.query_vector)
    assert moved[1] > 0 and abs(np.linalg.norm(moved) - 1) < 1e-6  # moved towards b's vector
    assert request.bm25_terms is not None and "leonardo" in request.bm25_terms
    assert [p.text for p in index.embeds[0].passages] == ["leonardo painter renaissance"]
    stages = [s.stage for s in trace.stages]
    assert stages[0] == "adapt" and stages.count("retrieve") == 2 and "fusion" in stages
    assert trace.stages[0].outputs["query_adapted"] is True
    retrieve = next(s for s in trace.stages if s.stage == "retrieve")
    assert retrieve.outputs["hits"][0]["text"] == "text of a"  # persisted for reruns


async def test_pipeline_without_feedback_sends_the_plain_query() -> None:
    index = FakeIndex()
    trace = Trace(kind="search", request={})
    await SearchPipeline(index).run(
        trace, query="q", collection="c", k=3, retrievers=["dense", "bm25"]
    )
    assert index.requests[0].query_vector is None and index.requests[0].bm25_terms is None
    assert not index.embeds and "adapt" not in [s.stage for s in trace.stages]


# --- rerun checks ----------------------------------------------------------------------------


def stored_trace() -> dict[str, Any]:
    return {
        "trace_id": "t",
        "kind": "search",
        "request": {"query": "q"},
        "stages": [
            {
                "stage": "retrieve",
                "inputs": {},
                "outputs": {"hits": [{"doc_id": "a", "rank": 1, "score": 1.0, "text": "x"}]},
                "targets": [{"type": "doc", "id": "a"}],
            },
            {
                "stage": "fusion",
                "inputs": {},
                "outputs": {"hits": [{"doc_id": "a", "rank": 1, "score": 1.0}]},
                "targets": [{"type": "doc", "id": "a"}],
            },
        ],
    }


def test_rerun_checks_are_typed_422s() -> None:
    trace = stored_trace()
    known = trace_doc_ids(trace)
    check_rerun(trace, "fusion", Overrides(pin=["a"]), known)
    cases = [
        ("rerank", Overrides(), "from_stage"),  # the trace has no rerank stage
        ("generate", Overrides(), "from_stage"),
        ("fusion", Overrides(pin=["nope"]), "overrides.pin"),
        ("fusion", Overrides(remove=["nope"]), "overrides.remove"),
        ("fusion", Overrides(pin=["a"], remove=["a"]), "overrides.pin"),
        ("fusion", Overrides(subqueries=[{"sq_id": "x"}]), "overrides.subqueries"),
    ]
    for stage, overrides, field in cases:
        with pytest.raises(LodestarError) as info:
            check_rerun(trace, stage, overrides, known)
        assert info.value.status == 422 and info.value.field == field


def test_query_key_ignores_case_and_punctuation() -> None:
    assert query_key("Who painted the Mona Lisa?") == query_key("who painted  the mona lisa")
