"""The ``fm`` retriever without HTTP, for the evaluation harness and the benchmark.

``InProcessFm`` answers the index service's ``/search`` contract from an ``FmEngine`` in this
process, so the orchestrator's ``SearchPipeline`` fuses it exactly as it fuses the fmindex
service's answers (``RetrieverClient``) in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool

from services.fmindex.api import RETRIEVER, search_response
from services.fmindex.engine import FmEngine, SearchOptions
from shared.schemas import IndexSearchRequest, IndexSearchResponse

if TYPE_CHECKING:
    from lodestar.evaluation.retrieval import InProcessBackend, SearchResult


class InProcessFm:
    def __init__(self, engine: FmEngine, options: SearchOptions | None = None) -> None:
        self.engine = engine
        self.options = options

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        outcome = await run_in_threadpool(
            self.engine.search, request.collection, request.query, request.k, self.options
        )
        return search_response(self.engine, outcome)


_PIPELINES: dict[int, Any] = {}


def pipeline_for(backend: InProcessBackend) -> Any:
    """The backend's search pipeline with ``fm`` added as an external retriever (one per
    backend: the generator loads once)."""
    from services.index.engine import InProcessIndex
    from services.orchestrator.search import SearchPipeline
    from shared.settings import get_settings

    key = id(backend)
    if key not in _PIPELINES:
        settings = get_settings()
        engine = FmEngine.from_settings(settings)
        _PIPELINES[key] = SearchPipeline(
            InProcessIndex(backend.engine),
            rrf_k=settings.rrf_k,
            external={RETRIEVER: InProcessFm(engine)},
        )
    return _PIPELINES[key]


async def search_with_fm(
    backend: InProcessBackend, *, query: str, collection: str, k: int, retrievers: Sequence[str]
) -> SearchResult:
    from lodestar.evaluation.retrieval import SearchResult
    from shared.store import Trace

    trace = Trace(kind="search", request={"query": query, "collection": collection, "k": k})
    outcome = await pipeline_for(backend).run(
        trace, query=query, collection=collection, k=k, retrievers=list(retrievers), rerank=None
    )
    return SearchResult(
        doc_ids=[hit.doc_id for hit in outcome.hits],
        scores=[hit.score for hit in outcome.hits],
        timings_ms=dict(outcome.timings_ms),
    )
