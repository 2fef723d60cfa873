"""The one place the search and answer pipelines are assembled from settings.

The orchestrator's app wires them over HTTP clients; the evaluation harness, the critic's
self-practice, the cross-encoder's hard-negative mining, the feedback experiment and the fm
retriever's in-process backend wire them over engines in this process. All of them come here,
so a setting (RRF k, rerank depth, answer token budget) means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from services.orchestrator.rounds import AnswerPipeline, Critic
from services.orchestrator.search import IndexSearcher, Reranker, SearchPipeline
from shared.models import ChatModel
from shared.settings import Settings

if TYPE_CHECKING:
    from services.index.engine import IndexEngine


def search_pipeline(
    settings: Settings,
    index: IndexSearcher,
    *,
    reranker: Reranker | None = None,
    external: Mapping[str, IndexSearcher] | None = None,
) -> SearchPipeline:
    """``SearchPipeline`` over ``index`` (a service client or ``InProcessIndex``), configured
    from ``settings``."""
    return SearchPipeline(
        index,
        rrf_k=settings.rrf_k,
        reranker=reranker,
        rerank_depth=settings.rerank_depth,
        external=external,
    )


def in_process_search(
    settings: Settings,
    engine: IndexEngine | None = None,
    *,
    rerank: bool = False,
    fm: bool = False,
) -> SearchPipeline:
    """The pipeline over engines in this process: the index engine (``engine``, or one from
    ``settings``), the reranker engine when ``rerank`` (its models load on first use), and the
    fmindex engine as the ``fm`` retriever when ``fm``."""
    from services.index.engine import IndexEngine, InProcessIndex

    reranker = None
    if rerank:
        from services.reranker.engine import InProcessReranker, rerank_engine_from_settings

        reranker = InProcessReranker(rerank_engine_from_settings(settings))
    external: dict[str, IndexSearcher] = {}
    if fm:
        from services.fmindex.engine import FmEngine
        from services.fmindex.inprocess import InProcessFm
        from services.fmindex.responses import RETRIEVER

        external[RETRIEVER] = InProcessFm(FmEngine.from_settings(settings))
    index = InProcessIndex(engine if engine is not None else IndexEngine.from_settings(settings))
    return search_pipeline(settings, index, reranker=reranker, external=external)


def answer_pipeline(
    settings: Settings,
    search: SearchPipeline,
    generator: Callable[[], ChatModel],
    *,
    critic: Critic | None = None,
    max_new_tokens: int | None = None,
) -> AnswerPipeline:
    """``AnswerPipeline`` over ``search``: answers of ``settings.answer_max_new_tokens`` tokens
    unless ``max_new_tokens`` says otherwise."""
    return AnswerPipeline(
        search,
        generator,
        max_new_tokens=settings.answer_max_new_tokens if max_new_tokens is None else max_new_tokens,
        critic=critic,
    )
