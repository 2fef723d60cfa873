"""The search pipeline: retrieve per retriever, fuse with RRF, optionally re-rank.

Every stage appends a ``StageRun`` to the trace with stable target ids (documents) that feedback
can point at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.orchestrator.fusion import reciprocal_rank_fusion
from shared.clients import (
    DependencyError,
    RerankDocumentIn,
    RerankRequest,
    RerankResponse,
)
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Hit, IndexSearchRequest, IndexSearchResponse, SourceRank
from shared.store import StageRun, Trace

#: First-stage retrievers served by the index service.
INDEX_RETRIEVERS = ("dense", "bm25")
#: How deep each retriever's list is before fusion: RRF needs more than k to work with.
FUSION_DEPTH = 100
#: Methods of the reranker service ``/search`` accepts as ``rerank`` (``cross-encoder`` answers
#: 422 "not trained yet" until CAR trains it).
RERANKERS: tuple[str, ...] = ("icr", "rankgpt", "cosine", "cross-encoder")
#: Fused candidates sent to the reranker by default (ICR's multi-hop setting: top 20).
RERANK_DEPTH = 20


class IndexSearcher(Protocol):
    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse: ...


class Reranker(Protocol):
    async def rerank(self, request: RerankRequest) -> RerankResponse: ...


def _doc_targets(hits: Sequence[Hit]) -> list[dict[str, str]]:
    return [{"type": "doc", "id": hit.doc_id} for hit in hits]


@dataclass
class SearchOutcome:
    hits: list[Hit]
    timings_ms: dict[str, float]
    degraded: list[str] = field(default_factory=list)


#: The model behind each retriever's list, recorded in its trace stage.
RETRIEVER_MODELS = {"dense": "sentence-transformers/all-MiniLM-L6-v2", "bm25": "bm25"}


class SearchPipeline:
    """Retrieve with the index service and any external retrievers, fuse with RRF, re-rank.

    ``external`` maps a retriever name (``fm``, ``dsi``) to the client of the service that
    serves it; those services answer the index service's ``/search`` contract. A failing
    external retriever is listed in ``degraded`` while the others still answer.
    """

    def __init__(
        self,
        index: IndexSearcher,
        rrf_k: int = 60,
        *,
        reranker: Reranker | None = None,
        rerank_depth: int = RERANK_DEPTH,
        external: Mapping[str, IndexSearcher] | None = None,
    ) -> None:
        self.index = index
        self.rrf_k = rrf_k
        self.reranker = reranker
        self.rerank_depth = rerank_depth
        self.external = dict(external or {})

    @property
    def retrievers(self) -> tuple[str, ...]:
        return INDEX_RETRIEVERS + tuple(self.external)

    async def _retrieve(
        self, collection: str, query: str, depth: int, retrievers: Sequence[str]
    ) -> tuple[list[tuple[str, IndexSearchResponse]], list[str]]:
        """Ask the index service and each external retriever concurrently; name who answered."""
        calls: list[tuple[str, IndexSearcher, list[str]]] = []
        on_index = [r for r in retrievers if r in INDEX_RETRIEVERS]
        if on_index:
            calls.append(("index", self.index, on_index))
        calls.extend((r, self.external[r], [r]) for r in retrievers if r in self.external)
        outcomes = await asyncio.gather(
            *(
                searcher.search(
                    IndexSearchRequest(
                        collection=collection, query=query, k=depth, retrievers=names
                    )
                )
                for _, searcher, names in calls
            ),
            return_exceptions=True,
        )
        responses: list[tuple[str, IndexSearchResponse]] = []
        degraded: list[str] = []
        failures: list[str] = []
        for (service, _, _), outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, DependencyError):
                degraded.append(service)
                failures.append(outcome.message)
            elif isinstance(outcome, BaseException):
                raise outcome  # the caller's error (unknown collection, bad input): pass it on
            else:
                responses.append((service, outcome))
        if not responses:
            raise LodestarError(
                ErrorCode.dependency_failed, f"no retriever answered: {'; '.join(failures)}"
            )
        return responses, degraded

    async def run(
        self,
        trace: Trace,
        *,
        query: str,
        collection: str,
        k: int,
        retrievers: Sequence[str],
        rerank: str | None = None,
    ) -> SearchOutcome:
        unknown = [r for r in retrievers if r not in self.retrievers]
        if unknown:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown retriever {unknown[0]!r}; available: {', '.join(self.retrievers)}",
                field="retrievers",
            )
        if rerank is not None and rerank not in RERANKERS:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown reranker {rerank!r}; available: {', '.join(RERANKERS) or 'none yet'}",
                field="rerank",
            )
        timings: dict[str, float] = {}
        depth = max(k, FUSION_DEPTH) if len(retrievers) > 1 else k
        # Rerank the fused pool, not the first k: reranking after truncation wastes its cost.
        pool = max(k, self.rerank_depth) if rerank is not None else k
        depth = max(depth, pool)
        started = time.perf_counter()
        responses, degraded = await self._retrieve(
            collection, query, depth, list(dict.fromkeys(retrievers))
        )
        timings["retrieve"] = (time.perf_counter() - started) * 1000
        results: dict[str, list[Hit]] = {}
        for service, response in responses:
            results.update(response.results)
            for name, value in response.timings_ms.items():
                timings[f"{service}.{name}"] = value
            for retriever, hits in response.results.items():
                trace.stages.append(
                    StageRun(
                        stage="retrieve",
                        inputs={"query": query, "k": depth},
                        outputs={
                            "hits": [
                                {"doc_id": h.doc_id, "rank": i, "score": h.score}
                                for i, h in enumerate(hits, 1)
                            ]
                        },
                        targets=_doc_targets(hits),
                        model_id=RETRIEVER_MODELS.get(retriever, retriever),
                        params={
                            "retriever": retriever,
                            "collection": collection,
                            "version": response.version,
                        },
                        latency_ms=response.timings_ms.get(retriever, 0.0),
                    )
                )
        started = time.perf_counter()
        if len(results) == 1:
            (only,) = results.values()
            hits = only[:pool]
        else:
            hits = reciprocal_rank_fusion(results, self.rrf_k, pool)
        timings["fusion"] = (time.perf_counter() - started) * 1000
        trace.stages.append(
            StageRun(
                stage="fusion",
                inputs={"retrievers": list(results), "k": k},
                outputs={
                    "hits": [
                        {"doc_id": h.doc_id, "rank": i, "score": h.score}
                        for i, h in enumerate(hits, 1)
                    ]
                },
                targets=_doc_targets(hits),
                params={
                    "method": "rrf" if len(results) > 1 else "none",
                    "rrf_k": self.rrf_k,
                },
                latency_ms=timings["fusion"],
            )
        )
        if rerank is not None:
            hits = await self._rerank(trace, query, rerank, hits, timings, degraded)
        return SearchOutcome(hits=hits[:k], timings_ms=timings, degraded=degraded)

    async def _rerank(
        self,
        trace: Trace,
        query: str,
        method: str,
        hits: list[Hit],
        timings: dict[str, float],
        degraded: list[str],
    ) -> list[Hit]:
        """The top ``rerank_depth`` hits in the reranker's order, then the rest; on a reranker
        failure the first-stage order, with ``reranker`` in ``degraded``."""
        candidates, rest = hits[: self.rerank_depth], hits[self.rerank_depth :]
        if not candidates:
            return hits
        started = time.perf_counter()
        request = RerankRequest(
            query=query,
            method=method,  # type: ignore[arg-type]  # checked against RERANKERS above
            documents=[
                RerankDocumentIn(doc_id=h.doc_id, title=h.title, text=h.text) for h in candidates
            ],
        )
        stage = StageRun(
            stage="rerank",
            inputs={"query": query, "doc_ids": [h.doc_id for h in candidates]},
            outputs={},
            targets=_doc_targets(candidates),
            params={"method": method, "depth": self.rerank_depth},
        )
        try:
            if self.reranker is None:
                raise DependencyError("reranker", "no reranker client is configured")
            response = await self.reranker.rerank(request)
        except DependencyError as exc:
            degraded.append("reranker")
            timings["rerank"] = (time.perf_counter() - started) * 1000
            stage.outputs = {"error": exc.message, "fallback": "first_stage_order"}
            stage.latency_ms = timings["rerank"]
            trace.stages.append(stage)
            return hits
        timings["rerank"] = (time.perf_counter() - started) * 1000
        by_id = {h.doc_id: h for h in candidates}
        reranked = []
        for result in response.results:
            hit = by_id.pop(result.doc_id, None)
            if hit is not None:
                sources = {
                    **hit.sources,
                    "rerank": SourceRank(rank=result.rank, score=result.score),
                }
                reranked.append(hit.model_copy(update={"score": result.score, "sources": sources}))
        # Any candidate the reranker did not return keeps its first-stage order after the others.
        reranked += [h for h in candidates if h.doc_id in by_id]
        stage.outputs = {
            "hits": [
                {"doc_id": h.doc_id, "rank": i, "score": h.score} for i, h in enumerate(reranked, 1)
            ],
            "forward_passes": response.forward_passes,
            "prompt_tokens": response.prompt_tokens,
        }
        stage.targets = _doc_targets(reranked)
        stage.model_id = str(response.details.get("model") or method)
        stage.latency_ms = timings["rerank"]
        trace.stages.append(stage)
        return reranked + rest
