"""The ``fm`` retriever without HTTP, for the evaluation harness and the benchmark.

``InProcessFm`` answers the index service's ``/search`` contract from an ``FmEngine`` in this
process, so the orchestrator's ``SearchPipeline`` fuses it exactly as it fuses the fmindex
service's answers (``RetrieverClient``) in production
(``services.orchestrator.pipeline.in_process_search(..., fm=True)``).
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool

from services.fmindex.engine import FmEngine, SearchOptions
from services.fmindex.responses import search_response
from shared.schemas import IndexSearchRequest, IndexSearchResponse


class InProcessFm:
    def __init__(self, engine: FmEngine, options: SearchOptions | None = None) -> None:
        self.engine = engine
        self.options = options

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        outcome = await run_in_threadpool(
            self.engine.search, request.collection, request.query, request.k, self.options
        )
        return search_response(self.engine, outcome)
