"""HTTP surface of the rewriter: ``POST /rewrite`` (one pair), ``POST /jobs/rewrite`` (a batch as
a worker job, 202 + job id), ``GET /jobs/{id}`` and ``GET /cache`` (what the caches hold)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.rewriter.engine import (
    MODES,
    LeakageError,
    PairDocument,
    RewriterEngine,
    RewriteResult,
)
from services.rewriter.jobs import incoming_dir
from shared.app import CeleryDep, SettingsDep, check_text, from_state, require_ready
from shared.errors import ErrorCode, LodestarError, error_responses
from shared.ids import DocId, JobIdPath, stage_jsonl
from shared.jobs import TASK_REWRITE_BATCH, QueueChoice, job_status, route_queue
from shared.schemas import QueryText

EngineDep = Annotated[RewriterEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])

#: Longest document text accepted (the prompt keeps only its first ``context_tokens`` tokens).
MAX_DOCUMENT_CHARS = 100_000
MAX_TITLE_CHARS = 1_000
#: Pairs one job request may carry inline (larger batches: a named dataset split).
MAX_JOB_PAIRS = 20_000

ModeIn = Literal["context", "query-only"]


class DocumentIn(BaseModel):
    # Stated, not enforced by the schema: an oversized document is a 413 ``too_large``.
    title: str = Field(default="", json_schema_extra={"maxLength": MAX_TITLE_CHARS})
    text: str = Field(default="", json_schema_extra={"maxLength": MAX_DOCUMENT_CHARS})


#: Rules of ``POST /rewrite`` JSON Schema cannot state (``x-lodestar-rules`` in its 422).
REWRITE_RULES = {"document": "required in `context` mode, with a non-blank `title` or `text`"}
#: ... and of ``POST /jobs/rewrite``.
REWRITE_JOB_RULES = {
    "dataset": "exactly one of `dataset` and `pairs`",
    "pairs": "in `context` mode every pair has a non-blank `title` or `text`, and no pair's "
    "`doc_id` is in `forbidden_doc_ids`",
}


class RewriteRequest(BaseModel):
    query: QueryText
    document: DocumentIn | None = None
    """The relevant document; required in ``context`` mode, ignored in ``query-only``."""
    mode: ModeIn = "context"
    qid: str | None = Field(default=None, min_length=1, max_length=256)
    doc_id: DocId | None = None
    """Ids to key the cache and the record by; content hashes when absent."""


class RewriteResponse(BaseModel):
    rewritten_query: str
    original_query: str
    qid: str
    doc_id: str
    mode: str
    model: str
    prompt_version: str
    cached: bool
    fell_back: bool


class PairIn(BaseModel):
    qid: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1, max_length=2000)
    doc_id: DocId
    title: str = Field(default="", max_length=MAX_TITLE_CHARS)
    text: str = Field(default="", max_length=MAX_DOCUMENT_CHARS)


class RewriteJobRequest(BaseModel):
    """Either a named dataset split (``dataset`` + ``split``) or inline ``pairs``."""

    mode: ModeIn = "context"
    dataset: Literal["scifact"] | None = None
    split: str = Field(default="train", pattern=r"^[a-z0-9_-]{1,32}$")
    offset: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1, le=1_000_000)
    pairs: list[PairIn] | None = Field(default=None, min_length=1, max_length=MAX_JOB_PAIRS)
    forbidden_doc_ids: list[str] = Field(default_factory=list, max_length=1_000_000)
    """Test-judged documents: a pair using one is refused (for a dataset split, the documents
    judged in its other splits are always forbidden)."""
    queue: QueueChoice = "auto"
    """``auto``: ``gpu`` when a GPU worker is registered, else ``cpu`` (``route_queue``)."""


def _check_document(document: DocumentIn) -> None:
    if len(document.text) > MAX_DOCUMENT_CHARS:
        raise LodestarError(
            ErrorCode.too_large,
            f"document text exceeds {MAX_DOCUMENT_CHARS} characters",
            field="document.text",
        )
    if len(document.title) > MAX_TITLE_CHARS:
        raise LodestarError(
            ErrorCode.too_large,
            f"document title exceeds {MAX_TITLE_CHARS} characters",
            field="document.title",
        )


@router.post(
    "/rewrite",
    response_model=RewriteResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.too_large, rules=REWRITE_RULES),
)
async def rewrite(
    body: RewriteRequest, engine: EngineDep, settings: SettingsDep
) -> RewriteResponse:
    """Rewrite one training query (greedy, cached). 400 ``empty`` query, 422 for context mode
    without a document (or one with no text), 413 for an oversized document."""
    query = check_text(body.query, "query", settings)
    document = None
    if body.mode == "context":
        if body.document is None:
            raise LodestarError(
                ErrorCode.validation, "context mode needs the relevant document", field="document"
            )
        _check_document(body.document)
        if not (body.document.text.strip() or body.document.title.strip()):
            raise LodestarError(
                ErrorCode.validation, "the document has no title and no text", field="document"
            )
    if body.mode == "context" and body.document is not None:
        document = PairDocument(body.doc_id or "", body.document.title, body.document.text)
    elif body.doc_id:  # query-only: the id names the training pair; the text is never used
        document = PairDocument(body.doc_id, "", "")
    result: RewriteResult = await run_in_threadpool(
        engine.rewrite, query, document, body.mode, qid=body.qid
    )
    record = result.record
    return RewriteResponse(
        rewritten_query=record.rewritten_query,
        original_query=record.original_query,
        qid=record.qid,
        doc_id=record.doc_id,
        mode=record.mode,
        model=record.model,
        prompt_version=record.prompt_version,
        cached=result.cached,
        fell_back=record.fell_back,
    )


@router.get("/cache")
async def cache_info(engine: EngineDep) -> dict[str, Any]:
    """Generations made by this process and the entries of each mode's current cache."""
    caches = {}
    for mode in MODES:
        cache = await run_in_threadpool(engine.cache, mode)
        await run_in_threadpool(cache.refresh)
        caches[mode] = {"prompt_version": engine.prompt_version(mode), "entries": len(cache)}
    return {"model": engine.model_id, "llm_calls": engine.llm_calls, "caches": caches}


@router.post("/jobs/rewrite", status_code=202, responses=error_responses(rules=REWRITE_JOB_RULES))
async def rewrite_job(
    body: RewriteJobRequest, settings: SettingsDep, celery: CeleryDep
) -> JSONResponse:
    """Queue a batch rewrite for a worker: 202 with the job id (``GET /jobs/{id}``)."""
    if (body.dataset is None) == (body.pairs is None):
        raise LodestarError(
            ErrorCode.validation, "give either a dataset split or inline pairs", field="dataset"
        )
    job_id = uuid.uuid4().hex
    staged = None
    if body.pairs is not None:
        forbidden = set(body.forbidden_doc_ids)
        offending = [(p.qid, p.doc_id) for p in body.pairs if p.doc_id in forbidden]
        if offending:
            raise LeakageError(offending)
        if body.mode == "context" and any(
            not (p.text.strip() or p.title.strip()) for p in body.pairs
        ):
            raise LodestarError(
                ErrorCode.validation, "a context-mode pair has an empty document", field="pairs"
            )
        staged = await run_in_threadpool(_stage_pairs, incoming_dir(settings), job_id, body.pairs)
    queue = await run_in_threadpool(route_queue, celery, body.queue)
    celery.send_task(
        TASK_REWRITE_BATCH,
        kwargs={
            "mode": body.mode,
            "dataset": body.dataset,
            "split": body.split,
            "offset": body.offset,
            "limit": body.limit,
            "staged": staged,
            "forbidden_doc_ids": body.forbidden_doc_ids,
        },
        task_id=job_id,
        queue=queue,
    )
    return JSONResponse(
        {"job_id": job_id, "status_url": f"/jobs/{job_id}", "mode": body.mode, "queue": queue},
        status_code=202,
    )


@router.get("/jobs/{job_id:job_id}", responses=error_responses(ErrorCode.not_found))
async def get_job(job_id: JobIdPath, celery: CeleryDep) -> dict[str, Any]:
    status: dict[str, Any] = await run_in_threadpool(job_status, celery, job_id)
    return status


def _stage_pairs(directory: Path, job_id: str, pairs: list[PairIn]) -> str:
    """Write the pairs where a worker reads them; returns the file *name* (never a path)."""
    name = f"{job_id}.jsonl"
    stage_jsonl(directory, name, (pair.model_dump() for pair in pairs))
    return name
