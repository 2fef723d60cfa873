"""Fusion, chunking and answer post-processing, against hand-computed expectations."""

from __future__ import annotations

import pytest

from services.index.engine import chunk_document, embedding_text
from services.orchestrator.fusion import reciprocal_rank_fusion
from services.orchestrator.prompts import build_answer_messages, choose_citations, clean_answer
from services.orchestrator.search import SearchPipeline
from shared.clients import DependencyError
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Document, Hit, IndexSearchRequest, IndexSearchResponse
from shared.store import Trace


def hits(*ids: str) -> list[Hit]:
    return [Hit(doc_id=i, title=i, text=f"text of {i}", score=10.0 - n) for n, i in enumerate(ids)]


def test_rrf_scores_match_hand_computation() -> None:
    fused = reciprocal_rank_fusion(
        {"dense": hits("a", "b", "c"), "bm25": hits("c", "a", "d")}, rrf_k=60, k=4
    )
    expected = {
        "a": 1 / 61 + 1 / 62,
        "c": 1 / 63 + 1 / 61,
        "b": 1 / 62,
        "d": 1 / 63,
    }
    assert [h.doc_id for h in fused] == ["a", "c", "b", "d"]
    for hit in fused:
        assert hit.score == pytest.approx(expected[hit.doc_id])
    assert fused[0].sources["dense"].rank == 1 and fused[0].sources["bm25"].rank == 2
    assert set(fused[2].sources) == {"dense"}


def test_rrf_ties_break_by_best_rank_then_id() -> None:
    fused = reciprocal_rank_fusion({"x": hits("p", "q"), "y": hits("q", "p")}, rrf_k=60, k=2)
    assert [h.doc_id for h in fused] == ["p", "q"]  # equal scores and best ranks: by id
    assert fused[0].score == pytest.approx(fused[1].score)


def test_rrf_truncates_to_k() -> None:
    assert len(reciprocal_rank_fusion({"x": hits("a", "b", "c")}, rrf_k=60, k=2)) == 2


def test_chunking_keeps_the_last_short_chunk_and_maps_to_the_document() -> None:
    doc = Document(id="d1", title="T", text=" ".join(f"w{i}" for i in range(600)))
    passages = chunk_document(doc, passage_words=256)
    assert [len(p.text.split()) for p in passages] == [256, 256, 88]
    assert [p.passage_id for p in passages] == ["d1#0", "d1#1", "d1#2"]
    assert {p.doc_id for p in passages} == {"d1"}
    assert embedding_text(passages[0]).startswith("T w0 ")
    assert len(chunk_document(Document(id="e", title="Only title", text="   "), 256)) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Leonardo da Vinci [1]", "Leonardo da Vinci"),
        ("The answer is: Paris.", "Paris"),
        ("Answer: 1889 [2]\nBecause the passage says so.", "1889"),
        ("answers vary", "answers vary"),
        ("", ""),
    ],
)
def test_clean_answer(raw: str, expected: str) -> None:
    assert clean_answer(raw) == expected


def test_citations_prefer_markers_then_overlap_then_top_passage() -> None:
    passages = [
        Hit(doc_id="Louvre", title="Louvre", text="A museum in Paris.", score=3),
        Hit(doc_id="Mona Lisa", title="Mona Lisa", text="Painted by Leonardo da Vinci.", score=2),
    ]
    cited, rule = choose_citations("Leonardo [2]", passages)
    assert [h.doc_id for h in cited] == ["Mona Lisa"] and rule == "marker"
    cited, rule = choose_citations("Leonardo da Vinci", passages)
    assert [h.doc_id for h in cited] == ["Mona Lisa"] and rule == "overlap"
    cited, rule = choose_citations("I do not know [9]", passages)
    assert [h.doc_id for h in cited] == ["Louvre"] and rule == "top_passage"


def test_answer_prompt_numbers_passages_in_rank_order() -> None:
    messages = build_answer_messages("Who?", hits("first", "second"))
    assert messages[0]["role"] == "system"
    user = messages[1]["content"]
    assert user.index("[1] first:") < user.index("[2] second:") and user.endswith(
        "Question: Who?\nAnswer:"
    )


class ListSearcher:
    """A retriever that answers a fixed list, or fails like a service that is down."""

    def __init__(self, results: dict[str, list[Hit]] | None) -> None:
        self.results = results

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        if self.results is None:
            raise DependencyError("fmindex", "unreachable (ConnectError)")
        return IndexSearchResponse(
            collection=request.collection,
            version="v1",
            results={r: self.results[r][: request.k] for r in request.retrievers},
            timings_ms={r: 1.0 for r in request.retrievers},
        )


async def test_external_retrievers_are_fused_and_a_failing_one_degrades() -> None:
    index = ListSearcher({"dense": hits("a", "b"), "bm25": hits("b", "c")})
    pipeline = SearchPipeline(
        index, external={"fm": ListSearcher({"fm": hits("c", "d")}), "dsi": ListSearcher(None)}
    )
    assert pipeline.retrievers == ("dense", "bm25", "fm", "dsi")
    outcome = await pipeline.run(
        Trace(kind="search", request={}), query="q", collection="c", k=4, retrievers=["dense", "fm"]
    )
    assert {h.doc_id for h in outcome.hits} == {"a", "b", "c", "d"}
    assert outcome.degraded == [] and "fm.fm" in outcome.timings_ms
    outcome = await pipeline.run(
        Trace(kind="search", request={}), query="q", collection="c", k=4, retrievers=["bm25", "dsi"]
    )
    assert [h.doc_id for h in outcome.hits] == ["b", "c"] and outcome.degraded == ["dsi"]
    with pytest.raises(LodestarError) as failed:
        await pipeline.run(
            Trace(kind="search", request={}), query="q", collection="c", k=4, retrievers=["dsi"]
        )
    assert failed.value.code is ErrorCode.dependency_failed
    with pytest.raises(LodestarError) as unknown:
        await pipeline.run(
            Trace(kind="search", request={}), query="q", collection="c", k=4, retrievers=["x"]
        )
    assert unknown.value.code is ErrorCode.validation
