"""The public API (port 8000): /search, /answer, /feedback, traces, collections and jobs.

Thin: validate, call the pipelines and clients, persist the trace, shape the response.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sse_starlette.sse import EventSourceResponse

from services.orchestrator.adapt import FeedbackAdaptation, Judgement
from services.orchestrator.prompts import MAX_SUBQUERIES
from services.orchestrator.rerun import (
    FeedbackMetrics,
    Overrides,
    check_rerun,
    new_trace,
    rerun_adaptation,
    rerun_answer,
    rerun_search,
    session_adaptation,
    stored_subquery_edits,
    trace_doc_ids,
)
from services.orchestrator.rounds import (
    AnswerPiece,
    AnswerPipeline,
    LoopEvent,
    RoundFinished,
    RoundRecord,
    RoundsFinished,
    RoundsOutcome,
    RoundStarted,
    last_outcome,
)
from services.orchestrator.search import SearchOutcome, SearchPipeline
from shared.app import CeleryDep, SettingsDep, check_k, check_text, from_state, require_ready
from shared.auth import scoped_idempotency_key
from shared.clients import IndexClient, RerankMethod
from shared.errors import ErrorCode, LodestarError, error_responses
from shared.ids import (
    CollectionName,
    CollectionPath,
    DocId,
    DocIdPath,
    IdBatch,
    JobIdPath,
    stage_jsonl,
    staging_dir,
)
from shared.jobs import TASK_INDEX_DOCUMENTS, TASK_MERGE_COLLECTION, job_status
from shared.schemas import (
    CollectionInfo,
    Document,
    Hit,
    NotBool,
    QueryText,
    ResultCount,
    WriteResponse,
)
from shared.store import ACTIONS, FeedbackIn, Store, Trace, new_id

# --- request and response models ---------------------------------------------------------------


SessionId = Annotated[str, Field(min_length=1, max_length=64)]


#: Retrievers ``/search`` fuses: the index's two, and the SEAL (fmindex) and DSI++ services'.
RetrieverName = Literal["dense", "bm25", "fm", "dsi"]
#: Stages a rerun may start from (which ones depends on the trace's kind, ``rerun.RERUN_STAGES``).
RerunStage = Literal["retrieve", "fusion", "rerank", "decompose", "generate"]


#: One server-sent event of a streamed ``/answer`` (``data`` is a JSON document).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"enum": ["round", "token", "verdict", "citations", "error"]},
        "data": {"type": "string"},
    },
    "required": ["event", "data"],
}


def _index_retrievers() -> list[RetrieverName]:
    return ["dense", "bm25"]


class SearchRequest(BaseModel):
    query: QueryText
    collection: CollectionName = "wiki"
    k: ResultCount = 10
    retrievers: list[RetrieverName] = Field(default_factory=_index_retrievers, min_length=1)
    fusion: Literal["rrf"] = "rrf"
    rerank: RerankMethod | None = None
    session_id: SessionId | None = None
    """Stored on the trace. Feedback given earlier in the session applies to this search:
    pins and removals from the session's searches of the same query, relevance labels from any
    of its searches (Rocchio and RM3)."""


class ResponseHit(Hit):
    judged: Judgement | None = None
    """How feedback applied to this search judged the document (``pinned`` over a label)."""


class SearchResponse(BaseModel):
    trace_id: str
    hits: list[ResponseHit]
    timings_ms: dict[str, float]
    degraded: list[str]
    parent_trace_id: str | None = None
    """The trace this one reran (``POST /traces/{id}/rerun``)."""


class AnswerRequest(BaseModel):
    question: QueryText
    collection: CollectionName = "wiki"
    k: ResultCount = 3
    max_rounds: Annotated[int, Field(ge=1, le=8), NotBool] | None = None
    """Retrieval rounds at most (SIM-RAG): the critic may stop the loop earlier. Default: the
    critic's loop (up to 4 rounds) while a critic answers, else 1 round (docs/answer.md)."""
    subqueries: Annotated[int, Field(ge=1, le=MAX_SUBQUERIES), NotBool] | None = None
    """Sub-queries the question is decomposed into (1 = none); default by measurement."""
    stream: StrictBool = False
    session_id: SessionId | None = None
    """Stored on the trace; the session's earlier feedback applies to every round's search (the
    rule of ``SearchRequest.session_id``, the question as the query)."""


class Citation(BaseModel):
    doc_id: str
    title: str


class Round(BaseModel):
    round: int
    query: str
    hit_ids: list[str]
    """Documents this round's query retrieved that no earlier round had."""
    answer: str
    rationale: str
    accept: bool | None
    """The critic's verdict; null at the last round and when the critic was unavailable."""
    p_accept: float | None
    next_query: str | None


def round_model(record: RoundRecord) -> Round:
    return Round(
        round=record.round,
        query=record.query,
        hit_ids=[h.doc_id for h in record.hits],
        answer=record.answer,
        rationale=record.rationale,
        accept=record.accept,
        p_accept=None if record.p_accept is None else round(record.p_accept, 4),
        next_query=record.next_query,
    )


class AnswerResponse(BaseModel):
    trace_id: str
    answer: str
    citations: list[Citation]
    rounds: list[Round]
    stop_reason: str
    """Why the loop ended: ``accepted`` (critic), ``max_rounds``, ``repeated_query``,
    ``empty_retrieval``; ``rerun_generate`` for a rerun from ``generate``."""
    timings_ms: dict[str, float]
    degraded: list[str]
    judged: dict[str, Judgement] = Field(default_factory=dict)
    """Documents feedback judged (``relevant``, ``irrelevant``, ``pinned``)."""
    parent_trace_id: str | None = None
    """The trace this one reran (``POST /traces/{id}/rerun``)."""


class SubQueryEdit(BaseModel):
    """One edit of round 1's sub-queries, applied in list order: ``edit`` (``sq_id``, new
    ``text``), ``add`` (``text``, at ``order`` or last), ``delete`` (``sq_id``), ``reorder``
    (``sq_id`` to ``order``)."""

    action: Literal["edit", "add", "delete", "reorder"]
    sq_id: str | None = Field(None, min_length=1, max_length=512)
    text: str | None = Field(None, max_length=300)
    order: Annotated[int, Field(ge=0, le=64), NotBool] | None = None


class RerunOverrides(BaseModel):
    pin: list[DocId] = Field(default_factory=list, max_length=100)
    """Documents to put first, in this order (any document of the trace's stages)."""
    remove: list[DocId] = Field(default_factory=list, max_length=100)
    relevant: list[DocId] = Field(default_factory=list, max_length=100)
    irrelevant: list[DocId] = Field(default_factory=list, max_length=100)
    subqueries: list[SubQueryEdit] | None = Field(default=None, max_length=32)
    """Edits of an ``/answer`` trace's round-1 sub-queries (``from_stage`` ``decompose``): only
    edited and added sub-queries are searched again."""


class RerunRequest(BaseModel):
    from_stage: RerunStage
    """``retrieve``, ``fusion`` or ``rerank`` for a search; ``decompose``, ``retrieve`` or
    ``generate`` for an answer. Stages before it are copied from the trace, it and the ones
    after run again."""
    apply_feedback: StrictBool = False
    """Apply the feedback stored on the trace (and the traces it was rerun from)."""
    overrides: RerunOverrides | None = None
    """Applied on top of stored feedback (an override wins for the documents it names)."""
    k: ResultCount | None = None
    """Results (search) or documents per round (answer); default: the trace's own ``k``."""
    feedback_sources: list[Literal["user", "shadow"]] = Field(default=["user"], min_length=1)
    """Whose stored feedback ``apply_feedback`` applies: users' by default; ``shadow`` agents'
    only when asked, so synthetic feedback never acts unannounced."""


def _actions_by_target() -> dict[str, Any]:
    """The schema's statement of which ``action`` fits which ``target_type`` (one ``oneOf``
    branch per type, from the store's own table ``shared.store.ACTIONS``)."""
    return {
        "oneOf": [
            {
                "properties": {
                    "target_type": {"const": target_type},
                    "action": {"enum": sorted(actions)},
                }
            }
            for target_type, actions in sorted(ACTIONS.items())
        ]
    }


class FeedbackRequest(BaseModel):
    """Feedback on one target of one stage of a trace; ``action`` depends on ``target_type``
    (``subquery``: add, delete, edit, reorder; ``doc``: relevant, irrelevant, pin, remove; ...)."""

    model_config = ConfigDict(json_schema_extra=_actions_by_target())

    trace_id: str = Field(min_length=1, max_length=64)
    stage: str = Field(min_length=1, max_length=32)
    target_type: Literal["subquery", "doc", "answer", "claim", "citation"]
    target_id: str = Field(min_length=1, max_length=512)
    action: str = Field(min_length=1, max_length=32)
    value: Any = None
    source: Literal["user", "shadow"] = "user"
    agent_id: str | None = Field(None, max_length=128)
    confidence: Annotated[float, Field(ge=0.0, le=1.0), NotBool] | None = None
    rationale: str | None = Field(None, max_length=4000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class FeedbackResponse(BaseModel):
    feedback_id: str
    created: bool


class JobAccepted(BaseModel):
    job_id: str
    status_url: str
    """``GET`` it for the job's state and progress."""


class UpsertDocumentsRequest(BaseModel):
    documents: IdBatch[Document] = Field(min_length=1)


# --- dependencies ------------------------------------------------------------------------------


StoreDep = Annotated[Store, Depends(from_state("store"))]
IndexDep = Annotated[IndexClient, Depends(from_state("index"))]
SearchDep = Annotated[SearchPipeline, Depends(from_state("search"))]
AnswerDep = Annotated[AnswerPipeline, Depends(from_state("answer"))]


def _feedback_metrics(request: Request) -> FeedbackMetrics:
    """The rerun/adaptation counters, registered once on the service's ``/metrics`` registry."""
    state = request.app.state
    metrics: FeedbackMetrics | None = getattr(state, "feedback_metrics", None)
    if metrics is None:
        registry = getattr(state, "metrics_registry", None) or CollectorRegistry()
        metrics = state.feedback_metrics = FeedbackMetrics(registry)
    return metrics


MetricsDep = Annotated[FeedbackMetrics, Depends(_feedback_metrics)]

router = APIRouter()
ready = [Depends(require_ready)]


# --- search and answer -------------------------------------------------------------------------


@router.post(
    "/search",
    response_model=SearchResponse,
    dependencies=ready,
    responses=error_responses(ErrorCode.empty, ErrorCode.not_found, ErrorCode.dependency_failed),
)
async def search(
    body: SearchRequest,
    settings: SettingsDep,
    store: StoreDep,
    pipeline: SearchDep,
    metrics: MetricsDep,
) -> SearchResponse:
    query = check_text(body.query, "query", settings)
    check_k(body.k, settings)
    started = time.perf_counter()
    trace = Trace(kind="search", request=body.model_dump(), session_id=body.session_id)
    adaptation = await _session_adaptation(store, body.session_id, query, metrics)
    outcome = await pipeline.run(
        trace,
        query=query,
        collection=body.collection,
        k=body.k,
        retrievers=body.retrievers,
        rerank=body.rerank,
        adaptation=adaptation,
    )
    return await _finish_search(trace, outcome, started, store)


async def _session_adaptation(
    store: Store, session_id: str | None, query: str, metrics: FeedbackMetrics
) -> FeedbackAdaptation | None:
    if session_id is None:
        return None
    adaptation = await run_in_threadpool(session_adaptation, store, session_id, query)
    if adaptation.empty:
        return None
    metrics.adapted("session", adaptation)
    return adaptation


async def _finish_search(
    trace: Trace, outcome: SearchOutcome, started: float, store: Store
) -> SearchResponse:
    timings = {**outcome.timings_ms, "total": (time.perf_counter() - started) * 1000}
    response = SearchResponse(
        trace_id=trace.trace_id,
        hits=[
            ResponseHit(**h.model_dump(), judged=outcome.judged.get(h.doc_id)) for h in outcome.hits
        ],
        timings_ms=_round(timings),
        degraded=outcome.degraded,
        parent_trace_id=trace.parent_trace_id,
    )
    trace.response = {
        "hit_ids": [h.doc_id for h in outcome.hits],
        "degraded": outcome.degraded,
        "judged": outcome.judged,
    }
    await run_in_threadpool(store.save_trace, trace)
    return response


@router.post(
    "/answer",
    response_model=AnswerResponse,
    dependencies=ready,
    responses={
        200: {
            "description": "The answer; with `stream: true`, server-sent events (`round`, "
            "`token`, `verdict`, then `citations` with the whole response, or `error`)",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
        **error_responses(ErrorCode.empty, ErrorCode.not_found, ErrorCode.dependency_failed),
    },
)
async def answer(
    body: AnswerRequest,
    settings: SettingsDep,
    store: StoreDep,
    pipeline: AnswerDep,
    metrics: MetricsDep,
) -> Any:
    """Multi-round answering (SIM-RAG): up to ``max_rounds`` rounds of retrieve, answer with a
    rationale, ask the critic; every round is in ``rounds`` and in the trace."""
    question = check_text(body.question, "question", settings)
    check_k(body.k, settings)
    trace = Trace(kind="answer", request=body.model_dump(), session_id=body.session_id)
    adaptation = await _session_adaptation(store, body.session_id, question, metrics)
    if adaptation is not None:
        pipeline = copy.copy(pipeline)
        pipeline.search = pipeline.search.adapted(adaptation)
    if body.stream:
        return EventSourceResponse(_answer_events(trace, question, body, store, pipeline))
    started = time.perf_counter()
    outcome = await last_outcome(_rounds(trace, question, body, pipeline))
    timings = {**outcome.timings_ms, "total": (time.perf_counter() - started) * 1000}
    response = _answer_response(trace, outcome, timings, adaptation)
    trace.response = response.model_dump(exclude={"timings_ms"})
    await run_in_threadpool(store.save_trace, trace)
    return response


def _answer_response(
    trace: Trace,
    outcome: RoundsOutcome,
    timings: dict[str, float],
    adaptation: FeedbackAdaptation | None = None,
) -> AnswerResponse:
    read = {h.doc_id for h in outcome.hits}
    judged = adaptation.judged() if adaptation is not None else {}
    return AnswerResponse(
        trace_id=trace.trace_id,
        answer=outcome.answer,
        citations=[Citation(doc_id=h.doc_id, title=h.title) for h in outcome.citations],
        rounds=[round_model(record) for record in outcome.rounds],
        stop_reason=outcome.stop_reason,
        timings_ms=_round(timings),
        degraded=outcome.degraded,
        judged={d: label for d, label in judged.items() if d in read},
        parent_trace_id=trace.parent_trace_id,
    )


def _rounds(
    trace: Trace, question: str, body: AnswerRequest, pipeline: AnswerPipeline, stream: bool = False
) -> AsyncIterator[LoopEvent]:
    """The loop as the request asks for it, streamed or not."""
    return pipeline.rounds(
        trace,
        question=question,
        collection=body.collection,
        k=body.k,
        max_rounds=body.max_rounds,
        subqueries=body.subqueries,
        stream=stream,
    )


async def _answer_events(
    trace: Trace, question: str, body: AnswerRequest, store: Store, pipeline: AnswerPipeline
) -> AsyncIterator[dict[str, str]]:
    """SSE, round by round as it happens: ``round`` (query and new hits), ``token`` events as
    the round's answer is written, ``verdict`` (answer, rationale, critic verdict, next query);
    then a final ``citations`` event (the whole response, with the trace id) once the trace is
    stored."""
    started = time.perf_counter()
    try:
        async for event in _rounds(trace, question, body, pipeline, stream=True):
            if isinstance(event, RoundStarted):
                data: dict[str, Any] = {
                    "round": event.round,
                    "query": event.query,
                    "hits": [h.model_dump() for h in event.hits],
                }
                yield {"event": "round", "data": json.dumps(data)}
            elif isinstance(event, AnswerPiece):
                yield {
                    "event": "token",
                    "data": json.dumps({"round": event.round, "text": event.text}),
                }
            elif isinstance(event, RoundFinished):
                yield {"event": "verdict", "data": round_model(event.record).model_dump_json()}
            elif isinstance(event, RoundsFinished):
                timings = {
                    **event.outcome.timings_ms,
                    "total": (time.perf_counter() - started) * 1000,
                }
                response = _answer_response(trace, event.outcome, timings)
                trace.response = response.model_dump(exclude={"timings_ms"})
                await run_in_threadpool(store.save_trace, trace)
                yield {"event": "citations", "data": response.model_dump_json()}
    except LodestarError as exc:
        yield {"event": "error", "data": json.dumps(exc.body())}


def _round(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in timings.items()}


# --- feedback and traces -----------------------------------------------------------------------


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses=error_responses(ErrorCode.not_found),
)
async def post_feedback(body: FeedbackRequest, store: StoreDep) -> FeedbackResponse:
    # Idempotency keys are the caller's own: scoped to its API key (shared.auth).
    item = FeedbackIn(
        **{**body.model_dump(), "idempotency_key": scoped_idempotency_key(body.idempotency_key)}
    )
    feedback_id, created = await run_in_threadpool(store.add_feedback, item)
    return FeedbackResponse(feedback_id=feedback_id, created=created)


@router.get("/traces/{trace_id}", responses=error_responses(ErrorCode.not_found))
async def get_trace(trace_id: str, store: StoreDep) -> dict[str, Any]:
    """The trace with its stages, feedback, ``parent_trace_id`` and ``children`` (reruns)."""
    trace: dict[str, Any] = await run_in_threadpool(store.get_trace, trace_id)
    return trace


#: The rerun's rules against the trace it names (``rerun.check_rerun``): a request naming what
#: the trace does not hold is bad input, so a 422, and the rules are stated in the route's 422 so
#: a client knows them (docs/api.md, "The contract test").
RERUN_RULES = {
    "from_stage": "a stage the trace has and a rerun of its kind starts from (a search: "
    "retrieve, fusion, rerank; an answer: decompose, retrieve, generate), whose inputs the trace "
    "stored",
    "overrides.pin": "documents the trace holds, none also in `remove`",
    "overrides.remove": "documents the trace holds",
    "overrides.relevant": "documents the trace holds, none also in `irrelevant`",
    "overrides.irrelevant": "documents the trace holds",
    "overrides.subqueries": "with `from_stage: decompose` only; edits of sub-queries the trace's "
    "round 1 has, leaving at least one, with non-empty, distinct texts",
}


@router.post(
    "/traces/{trace_id}/rerun",
    response_model=SearchResponse | AnswerResponse,
    dependencies=ready,
    responses=error_responses(ErrorCode.not_found, ErrorCode.dependency_failed, rules=RERUN_RULES),
)
async def rerun_trace(
    trace_id: str,
    body: RerunRequest,
    settings: SettingsDep,
    store: StoreDep,
    search_pipeline: SearchDep,
    answer_pipeline: AnswerDep,
    metrics: MetricsDep,
) -> SearchResponse | AnswerResponse:
    """A new trace from ``from_stage`` on (``parent_trace_id`` = this one), upstream stages
    copied, with the overrides and (``apply_feedback``) stored feedback applied; the response
    has the shape of the original call's."""
    started = time.perf_counter()
    parent: dict[str, Any] = await run_in_threadpool(store.get_trace, trace_id)
    request = parent.get("request") or {}
    k = body.k if body.k is not None else int(request.get("k", 10))
    check_k(k, settings)
    given = body.overrides or RerunOverrides()
    overrides = Overrides(
        pin=list(given.pin),
        remove=list(given.remove),
        relevant=list(given.relevant),
        irrelevant=list(given.irrelevant),
        subqueries=None
        if given.subqueries is None
        else [edit.model_dump() for edit in given.subqueries],
    )
    check_rerun(parent, body.from_stage, overrides, trace_doc_ids(parent))
    adaptation = await run_in_threadpool(
        lambda: rerun_adaptation(
            store,
            parent,
            overrides,
            apply_feedback=body.apply_feedback,
            sources=body.feedback_sources,
        )
    )
    stored_edits = (
        stored_subquery_edits(parent, body.feedback_sources)
        if body.apply_feedback and overrides.subqueries is None
        else None
    )
    trace = new_trace(
        parent,
        {
            "k": k,
            "rerun": {
                **body.model_dump(),
                "adaptation": {**adaptation.describe(), "subquery_feedback": stored_edits},
            },
        },
    )
    metrics.reruns.labels(body.from_stage, trace.kind).inc()
    if not adaptation.empty:
        metrics.adapted("rerun", adaptation)
    if trace.kind == "search":
        outcome = await rerun_search(
            search_pipeline,
            parent,
            trace,
            from_stage=body.from_stage,
            adaptation=adaptation,
            k=k,
        )
        return await _finish_search(trace, outcome, started, store)
    rounds = await rerun_answer(
        answer_pipeline,
        parent,
        trace,
        from_stage=body.from_stage,
        adaptation=adaptation,
        k=k,
        subquery_edits=overrides.subqueries,
        stored_edits=stored_edits,
    )
    timings = {**rounds.timings_ms, "total": (time.perf_counter() - started) * 1000}
    response = _answer_response(trace, rounds, timings, adaptation)
    trace.response = response.model_dump(exclude={"timings_ms"})
    await run_in_threadpool(store.save_trace, trace)
    return response


# --- collections and jobs ----------------------------------------------------------------------


@router.get(
    "/collections",
    response_model=list[CollectionInfo],
    responses=error_responses(ErrorCode.dependency_failed),
)
async def list_collections(index: IndexDep) -> list[CollectionInfo]:
    return await index.collections()


@router.get(
    "/collections/{name}",
    response_model=CollectionInfo,
    responses=error_responses(ErrorCode.not_found, ErrorCode.dependency_failed),
)
async def get_collection(name: CollectionPath, index: IndexDep) -> CollectionInfo:
    return await index.collection(name)


@router.put(
    "/collections/{name}/documents",
    responses={
        200: {"model": WriteResponse, "description": "Indexed inside the request"},
        202: {"model": JobAccepted, "description": "Queued as a job (a large batch)"},
        **error_responses(ErrorCode.not_found, ErrorCode.dependency_failed),
    },
)
async def upsert_documents(
    name: CollectionPath,
    body: UpsertDocumentsRequest,
    settings: SettingsDep,
    store: StoreDep,
    index: IndexDep,
    celery: CeleryDep,
) -> Response:
    """Small batches are indexed inside the request; large ones become a job (202 + job id)."""
    if len(body.documents) <= settings.inline_ingest_max_docs:
        result = await schedule_merge_if_due(
            await index.upsert(name, body.documents), store, celery
        )
        return JSONResponse(result.model_dump(), status_code=200)
    job_id = new_id()
    batch = await run_in_threadpool(_stage_batch, settings.data_dir, job_id, body.documents)
    await run_in_threadpool(
        store.record_job,
        job_id,
        TASK_INDEX_DOCUMENTS,
        {"collection": name, "documents": len(body.documents)},
    )
    celery.send_task(TASK_INDEX_DOCUMENTS, args=[name, str(batch)], task_id=job_id, queue="cpu")
    return JSONResponse({"job_id": job_id, "status_url": f"/jobs/{job_id}"}, status_code=202)


def _stage_batch(data_dir: Path, job_id: str, documents: list[Document]) -> Path:
    """Write the batch where the worker can read it (the shared data directory)."""
    rows = [doc.model_dump() for doc in documents]
    return stage_jsonl(staging_dir(data_dir), f"{job_id}.jsonl", rows)


async def schedule_merge_if_due(
    result: WriteResponse, store: Store, celery: Celery
) -> WriteResponse:
    """Writes append to the fresh segment; once it (with tombstones) outgrows the ANN index's
    share, a merge job rebuilds the index in the background while searches keep serving."""
    if not result.merge_due:
        return result
    job_id = new_id()
    await run_in_threadpool(
        store.record_job, job_id, TASK_MERGE_COLLECTION, {"collection": result.collection}
    )
    celery.send_task(TASK_MERGE_COLLECTION, args=[result.collection], task_id=job_id, queue="cpu")
    return result.model_copy(update={"merge_job": job_id})


@router.delete(
    "/collections/{name}/documents/{doc_id:path}",
    response_model=WriteResponse,
    responses=error_responses(ErrorCode.not_found, ErrorCode.dependency_failed),
)
async def delete_document(
    name: CollectionPath, doc_id: DocIdPath, index: IndexDep, store: StoreDep, celery: CeleryDep
) -> dict[str, Any]:
    result = await schedule_merge_if_due(await index.delete(name, doc_id), store, celery)
    return result.model_dump()


@router.get("/jobs/{job_id:job_id}", responses=error_responses(ErrorCode.not_found))
async def get_job(job_id: JobIdPath, store: StoreDep, celery: CeleryDep) -> dict[str, Any]:
    job = await run_in_threadpool(store.get_job, job_id)
    status = await run_in_threadpool(job_status, celery, job_id)
    return {**status, "kind": job["kind"], "params": job["params"], "created_at": job["created_at"]}
