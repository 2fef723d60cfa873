"""The search pipeline: retrieve per retriever, fuse with RRF, optionally re-rank.

Every stage appends a ``StageRun`` to the trace with stable target ids (documents) that feedback
can point at.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from services.orchestrator.adapt import FeedbackAdaptation, Judgement
from services.orchestrator.fusion import reciprocal_rank_fusion
from shared.clients import (
    RERANK_METHODS,
    DependencyError,
    RerankDocumentIn,
    RerankRequest,
    RerankResponse,
)
from shared.errors import ErrorCode, LodestarError
from shared.schemas import (
    EmbedPassage,
    EmbedRequest,
    EmbedResponse,
    Hit,
    IndexSearchRequest,
    IndexSearchResponse,
    Passage,
    SourceRank,
    passage_number,
)
from shared.store import StageRun, Trace

#: First-stage retrievers served by the index service.
INDEX_RETRIEVERS = ("dense", "bm25")
#: How deep each retriever's list is before fusion: RRF needs more than k to work with.
FUSION_DEPTH = 100
#: ``/search`` accepts the reranker service's methods (``RERANK_METHODS``) as ``rerank``; an
#: unpublished cross-encoder answers 503, and ``/search`` then falls back to the first stage
#: (``degraded``).
#: Fused candidates sent to the reranker by default (ICR's multi-hop setting: top 20).
RERANK_DEPTH = 20


class IndexSearcher(Protocol):
    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse: ...


class PassageLookup(Protocol):
    """An index that can send a hit's text later (``IndexClient``, ``InProcessIndex``): the
    pipeline then asks it for text only down to the pool it keeps (``text_k``)."""

    async def passage_texts(self, name: str, wanted: Mapping[str, int | None]) -> list[Passage]: ...


class Reranker(Protocol):
    async def rerank(self, request: RerankRequest) -> RerankResponse: ...


def _doc_targets(hits: Sequence[Hit]) -> list[dict[str, str]]:
    return [{"type": "doc", "id": hit.doc_id} for hit in hits]


@dataclass
class SearchOutcome:
    hits: list[Hit]
    timings_ms: dict[str, float]
    degraded: list[str] = field(default_factory=list)
    judged: dict[str, Judgement] = field(default_factory=dict)
    """Documents feedback judged (``relevant``, ``irrelevant``, ``pinned``), for the response."""


@dataclass(frozen=True)
class QueryAdaptation:
    """The adapted query sent to the index: a Rocchio vector for dense, RM3 terms for BM25."""

    query_vector: list[float] | None = None
    bm25_terms: dict[str, float] | None = None


def retrieve_outputs(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """A retriever's list as its stage persists it: enough to fuse and re-rank again later
    without retrieving (title, text and passage number included; the text is ``""`` past the
    ``text_k`` the index was asked with, and a later stage that needs it looks it up)."""
    rows: list[dict[str, Any]] = []
    for i, h in enumerate(hits, 1):
        row = {"doc_id": h.doc_id, "rank": i, "score": h.score, "title": h.title, "text": h.text}
        if h.passage is not None:
            row["passage"] = h.passage
        rows.append(row)
    return rows


def fusion_outputs(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """The fused list as its stage persists it: ids, fused scores and each hit's per-retriever
    ranks (the text is in the retrieve stages)."""
    return [
        {
            "doc_id": h.doc_id,
            "rank": i,
            "score": h.score,
            "sources": {name: s.model_dump() for name, s in h.sources.items()},
        }
        for i, h in enumerate(hits, 1)
    ]


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
        self.default_adaptation: FeedbackAdaptation | None = None
        """Applied by ``run`` when no adaptation is passed: set on a copy (``adapted``) so that
        callers that do not know about feedback (the multi-round loop) search adapted."""

    def adapted(self, adaptation: FeedbackAdaptation | None) -> SearchPipeline:
        """A shallow copy of this pipeline that applies ``adaptation`` to every ``run``."""
        clone = copy.copy(self)
        clone.default_adaptation = adaptation
        return clone

    @property
    def retrievers(self) -> tuple[str, ...]:
        return INDEX_RETRIEVERS + tuple(self.external)

    @property
    def lookup(self) -> PassageLookup | None:
        """The index, when it can send texts later (``PassageLookup``): it is then asked for
        text only down to the pool kept, and the few kept hits that every list ranked past it
        get theirs looked up. An index that cannot is asked for every text, as before."""
        if callable(getattr(self.index, "passage_texts", None)):
            return cast(PassageLookup, self.index)
        return None

    async def _retrieve(
        self,
        collection: str,
        query: str,
        depth: int,
        retrievers: Sequence[str],
        adapted: QueryAdaptation | None = None,
        text_k: int | None = None,
    ) -> tuple[list[tuple[str, IndexSearchResponse]], list[str]]:
        """Ask the index service and each external retriever concurrently; name who answered.
        An adapted query (Rocchio vector, RM3 terms) and ``text_k`` go to the index service
        only."""
        calls: list[tuple[str, IndexSearcher, IndexSearchRequest]] = []
        on_index = [r for r in retrievers if r in INDEX_RETRIEVERS]
        if on_index:
            request = IndexSearchRequest(
                collection=collection,
                query=query,
                k=depth,
                retrievers=on_index,
                text_k=text_k if self.lookup is not None else None,
            )
            if adapted is not None:
                request.query_vector = adapted.query_vector
                request.bm25_terms = adapted.bm25_terms
            calls.append(("index", self.index, request))
        calls.extend(
            (
                r,
                self.external[r],
                IndexSearchRequest(collection=collection, query=query, k=depth, retrievers=[r]),
            )
            for r in retrievers
            if r in self.external
        )
        outcomes = await asyncio.gather(
            *(searcher.search(request) for _, searcher, request in calls),
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

    def check(self, retrievers: Sequence[str], rerank: str | None) -> None:
        unknown = [r for r in retrievers if r not in self.retrievers]
        if unknown:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown retriever {unknown[0]!r}; available: {', '.join(self.retrievers)}",
                field="retrievers",
            )
        if rerank is not None and rerank not in RERANK_METHODS:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown reranker {rerank!r}; available: {', '.join(RERANK_METHODS) or 'none yet'}",
                field="rerank",
            )

    def pool_size(self, k: int, rerank: str | None) -> int:
        """Fused candidates kept: the reranker's depth when re-ranking (reranking after
        truncation to k wastes its cost), else k."""
        return max(k, self.rerank_depth) if rerank is not None else k

    async def run(
        self,
        trace: Trace,
        *,
        query: str,
        collection: str,
        k: int,
        retrievers: Sequence[str],
        rerank: str | None = None,
        adaptation: FeedbackAdaptation | None = None,
    ) -> SearchOutcome:
        """Stages ``adapt`` (when there is feedback to apply), ``retrieve`` (one per retriever),
        ``fusion``, ``rerank`` (when asked). Each stage's persisted output is enough to recompute
        the stages after it (``services.orchestrator.rerun``): retrieve lists carry the hits'
        title, passage number and (down to the pool kept) text, the fusion list each hit's
        per-retriever ranks, ``lookup`` the texts fetched for the rest."""
        self.check(retrievers, rerank)
        adaptation = adaptation or self.default_adaptation
        adaptation = adaptation if adaptation is None or not adaptation.empty else None
        timings: dict[str, float] = {}
        degraded: list[str] = []
        extra = len(adaptation.pins) + len(adaptation.removes) if adaptation else 0
        pool = self.pool_size(k, rerank)
        depth = max(k, FUSION_DEPTH) if len(retrievers) > 1 else k
        depth = max(depth, pool) + extra
        adapted = None
        if adaptation is not None:
            if adaptation.adapts_query:
                # Judged documents a trace saw only past ``text_k`` get their text first:
                # Rocchio embeds them and RM3 reads them (pins get theirs in ``rank``).
                adaptation = await self._documents_with_texts(
                    trace,
                    collection,
                    adaptation,
                    adaptation.relevant + adaptation.irrelevant,
                    timings,
                    degraded,
                )
            adapted = await self.adapt_query(
                trace, query, collection, retrievers, adaptation, timings, degraded
            )
        started = time.perf_counter()
        responses, failed = await self._retrieve(
            collection, query, depth, list(dict.fromkeys(retrievers)), adapted, pool + extra
        )
        degraded.extend(failed)
        timings["retrieve"] = (time.perf_counter() - started) * 1000
        results: dict[str, list[Hit]] = {}
        for service, response in responses:
            results.update(response.results)
            for name, value in response.timings_ms.items():
                timings[f"{service}.{name}"] = value
            for retriever, hits in response.results.items():
                adapted_here = adapted is not None and service == "index"
                trace.stages.append(
                    StageRun(
                        stage="retrieve",
                        inputs={"query": query, "k": depth, "adapted": adapted_here},
                        outputs={"hits": retrieve_outputs(hits)},
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
        return await self.rank(
            trace,
            query=query,
            collection=collection,
            results=results,
            k=k,
            rerank=rerank,
            adaptation=adaptation,
            timings=timings,
            degraded=degraded,
        )

    async def rank(
        self,
        trace: Trace,
        *,
        query: str,
        collection: str,
        results: Mapping[str, list[Hit]],
        k: int,
        rerank: str | None = None,
        adaptation: FeedbackAdaptation | None = None,
        timings: dict[str, float] | None = None,
        degraded: list[str] | None = None,
        fused: list[Hit] | None = None,
    ) -> SearchOutcome:
        """The stages after retrieval: ``fusion`` of ``results`` (skipped when ``fused``, the
        output of an earlier fusion, is given), removals, ``lookup`` of the texts the kept hits
        and pins lack (``with_texts``), ``rerank``, pins first."""
        timings = {} if timings is None else timings
        degraded = [] if degraded is None else degraded
        adaptation = adaptation if adaptation is None or not adaptation.empty else None
        pool = self.pool_size(k, rerank)
        extra = len(adaptation.pins) + len(adaptation.removes) if adaptation else 0
        if fused is None:
            started = time.perf_counter()
            if len(results) == 1:
                (only,) = results.values()
                hits = only[: pool + extra]
            else:
                hits = reciprocal_rank_fusion(dict(results), self.rrf_k, pool + extra)
            timings["fusion"] = (time.perf_counter() - started) * 1000
            trace.stages.append(
                StageRun(
                    stage="fusion",
                    inputs={"retrievers": list(results), "k": k},
                    outputs={"hits": fusion_outputs(hits)},
                    targets=_doc_targets(hits),
                    params={
                        "method": "rrf" if len(results) > 1 else "none",
                        "rrf_k": self.rrf_k,
                    },
                    latency_ms=timings["fusion"],
                )
            )
        else:
            hits = list(fused)
        if adaptation is not None:
            hits = adaptation.candidates(hits)
        hits = hits[:pool]
        # One lookup for the kept hits and the pins: every hit ranked or shown has its text.
        pinned = (
            []
            if adaptation is None
            else [adaptation.documents[d] for d in adaptation.pins if d in adaptation.documents]
        )
        filled = await self.with_texts(trace, collection, [*hits, *pinned], timings, degraded)
        hits = filled[: len(hits)]
        if adaptation is not None and pinned:
            documents = {**adaptation.documents, **{h.doc_id: h for h in filled[len(hits) :]}}
            adaptation = dataclasses.replace(adaptation, documents=documents)
        if rerank is not None:
            hits = await self._rerank(trace, query, rerank, hits, timings, degraded)
        judged: dict[str, Judgement] = {}
        if adaptation is not None:
            hits = adaptation.apply(hits)
            judged = adaptation.judged()
        return SearchOutcome(hits=hits[:k], timings_ms=timings, degraded=degraded, judged=judged)

    async def with_texts(
        self,
        trace: Trace,
        collection: str,
        hits: Sequence[Hit],
        timings: dict[str, float],
        degraded: list[str],
    ) -> list[Hit]:
        """``hits``, those without text (the index sent none past ``text_k``) with the text of
        their passage looked up from the index, recorded as a ``lookup`` stage so that reruns,
        feedback and the debug pages read it from the trace. No call when none lacks text; a
        failed lookup leaves them without it, with ``lookup`` in ``degraded``."""
        missing = {h.doc_id: h.passage for h in hits if not h.text}
        lookup = self.lookup
        if not missing or lookup is None:
            return list(hits)
        started = time.perf_counter()
        stage = StageRun(
            stage="lookup",
            inputs={"doc_ids": list(missing), "passages": list(missing.values())},
            outputs={},
            targets=[],
            params={"collection": collection},
        )
        found: dict[str, Passage] = {}
        try:
            found = {p.doc_id: p for p in await lookup.passage_texts(collection, missing)}
            stage.outputs = {
                "documents": [
                    {
                        "doc_id": p.doc_id,
                        "title": p.title,
                        "text": p.text,
                        "passage": passage_number(p.passage_id),
                    }
                    for p in found.values()
                ]
            }
        except DependencyError as exc:
            if "lookup" not in degraded:
                degraded.append("lookup")
            stage.outputs = {"error": exc.message}
        elapsed = (time.perf_counter() - started) * 1000
        timings["lookup"] = timings.get("lookup", 0.0) + elapsed
        stage.latency_ms = elapsed
        trace.stages.append(stage)
        return [
            h.model_copy(update={"text": found[h.doc_id].text})
            if not h.text and h.doc_id in found
            else h
            for h in hits
        ]

    async def _documents_with_texts(
        self,
        trace: Trace,
        collection: str,
        adaptation: FeedbackAdaptation,
        doc_ids: Sequence[str],
        timings: dict[str, float],
        degraded: list[str],
    ) -> FeedbackAdaptation:
        """``adaptation`` with the texts its documents ``doc_ids`` lack looked up."""
        wanted = [
            adaptation.documents[d] for d in dict.fromkeys(doc_ids) if d in adaptation.documents
        ]
        if all(h.text for h in wanted):
            return adaptation
        filled = await self.with_texts(trace, collection, wanted, timings, degraded)
        documents = {**adaptation.documents, **{h.doc_id: h for h in filled}}
        return dataclasses.replace(adaptation, documents=documents)

    async def adapt_query(
        self,
        trace: Trace,
        query: str,
        collection: str,
        retrievers: Sequence[str],
        adaptation: FeedbackAdaptation,
        timings: dict[str, float],
        degraded: list[str],
    ) -> QueryAdaptation | None:
        """Record the ``adapt`` stage; with relevance labels, the RM3 terms for BM25 and the
        Rocchio vector for dense retrieval (the index embeds the query and the judged passages).
        An index that cannot embed leaves the dense query as it was, with ``adaptation`` in
        ``degraded``."""
        started = time.perf_counter()
        outputs: dict[str, Any] = {"query_adapted": False}
        adapted: QueryAdaptation | None = None
        if adaptation.adapts_query:
            bm25_terms = adaptation.bm25_terms(query) if "bm25" in retrievers else None
            vector: list[float] | None = None
            if "dense" in retrievers:
                try:
                    vector, cosine = await self._rocchio(query, collection, adaptation)
                    outputs["rocchio"] = {
                        "relevant": sum(d in adaptation.documents for d in adaptation.relevant),
                        "irrelevant": sum(d in adaptation.documents for d in adaptation.irrelevant),
                        "cosine_to_query": round(cosine, 4),
                    }
                except DependencyError as exc:
                    degraded.append("adaptation")
                    outputs["rocchio"] = {"error": exc.message}
            if bm25_terms:
                outputs["bm25_terms"] = {t: round(w, 5) for t, w in bm25_terms.items()}
            if vector is not None or bm25_terms:
                adapted = QueryAdaptation(query_vector=vector, bm25_terms=bm25_terms)
                outputs["query_adapted"] = True
        timings["adapt"] = (time.perf_counter() - started) * 1000
        w = adaptation.weights
        trace.stages.append(
            StageRun(
                stage="adapt",
                inputs={"query": query, **adaptation.describe()},
                outputs=outputs,
                targets=_doc_targets(
                    [adaptation.documents[d] for d in adaptation.pins if d in adaptation.documents]
                ),
                model_id="rocchio+rm3",
                params={
                    "collection": collection,
                    "alpha": w.alpha,
                    "beta": w.beta,
                    "gamma": w.gamma,
                    "rm3_terms": w.rm3_terms,
                    "rm3_original_weight": w.rm3_original_weight,
                },
                latency_ms=timings["adapt"],
            )
        )
        return adapted

    async def _rocchio(
        self, query: str, collection: str, adaptation: FeedbackAdaptation
    ) -> tuple[list[float], float]:
        embed = getattr(self.index, "embed", None)
        if embed is None:
            raise DependencyError("index", "the index client cannot embed")
        relevant = [
            adaptation.documents[d] for d in adaptation.relevant if d in adaptation.documents
        ]
        irrelevant = [
            adaptation.documents[d] for d in adaptation.irrelevant if d in adaptation.documents
        ]
        response: EmbedResponse = await embed(
            EmbedRequest(
                query=query,
                passages=[
                    EmbedPassage(title=h.title, text=h.text, doc_id=h.doc_id)
                    for h in relevant + irrelevant
                ],
                collection=collection,  # judged hits get their stored vectors: no encoding
            )
        )
        assert response.query_vector is not None
        vectors = response.passage_vectors
        moved = adaptation.query_vector(
            response.query_vector, vectors[: len(relevant)], vectors[len(relevant) :]
        )
        q = np.asarray(response.query_vector, dtype=np.float64)
        cosine = float(moved @ q / (np.linalg.norm(q) or 1.0))
        return moved.tolist(), cosine

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
            method=method,  # type: ignore[arg-type]  # checked against RERANK_METHODS above
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
