"""Re-ranked systems in the evaluation harness: the orchestrator's pipeline with the reranker
engine in-process, on real SciFact queries (the cached ``eval-scifact`` collection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lodestar.evaluation.retrieval import InProcessBackend, evaluate_retrieval, result_path
from shared.settings import get_settings

pytestmark = pytest.mark.slow


def test_rrf_then_cosine_rerank_reorders_the_fused_pool_on_the_first_queries() -> None:
    result = evaluate_retrieval(
        get_settings(), "scifact", ["rrf", "rrf+cosine"], limit=4, show_progress=False
    )
    assert result["num_queries"] == 4 and result["limit"] == 4
    rrf, reranked = result["per_query"]["rrf"], result["per_query"]["rrf+cosine"]
    assert set(rrf) == set(reranked)
    assert all(len(reranked[q]["top"]) == len(rrf[q]["top"]) == 10 for q in rrf)
    assert any(rrf[q]["top"] != reranked[q]["top"] for q in rrf), "cosine changed no order"
    assert 0.0 <= result["systems"]["rrf+cosine"]["metrics"]["ndcg@10"] <= 1.0
    assert result_path(Path("r"), "scifact", "test", 4).name == "retrieval-scifact-test-4q.json"


async def test_in_process_rerank_permutes_the_fused_pool() -> None:
    settings = get_settings()
    backend = InProcessBackend(settings)
    query = "0-dimensional biomaterials show inductive properties."
    fused = await backend.search(
        query=query,
        collection="eval-scifact",
        k=settings.rerank_depth,
        retrievers=["dense", "bm25"],
    )
    reranked = await backend.search(
        query=query,
        collection="eval-scifact",
        k=settings.rerank_depth,
        retrievers=["dense", "bm25"],
        rerank="cosine",
    )
    assert sorted(reranked.doc_ids) == sorted(fused.doc_ids)  # same pool, re-ordered
    assert reranked.scores == sorted(reranked.scores, reverse=True)
