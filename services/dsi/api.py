"""HTTP surface of the dsi service: validates, calls ``DsiEngine``, maps errors.

``POST /search`` answers the index service's contract (``IndexSearchRequest`` ->
``IndexSearchResponse`` with ``results={"dsi": [...]}``) so the orchestrator fuses it as the
``dsi`` retriever. ``POST /collections/{name}/dsi/index`` turns a batch into one continual step
run by a worker (202 + job id); ``GET /jobs/{id}`` reports its state and progress.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.dsi.engine import DsiEngine, StepOptions, check_collection
from shared.app import CeleryDep, SettingsDep, check_k, check_text, from_state, require_ready
from shared.errors import ErrorCode, LodestarError, error_responses
from shared.ids import CollectionPath, DocId, IdBatch
from shared.jobs import TASK_DSI_INDEX_STEP, QueueChoice, job_status, route_queue
from shared.schemas import (
    Document,
    Hit,
    IndexSearchRequest,
    IndexSearchResponse,
    NotBool,
    SourceRank,
)

EngineDep = Annotated[DsiEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])

RETRIEVER = "dsi"


class TrainingQuery(BaseModel):
    doc_id: DocId
    query: str = Field(min_length=1, max_length=2000)


class StepOptionsIn(BaseModel):
    """Per-step recipe; ``None`` keeps the engine default (see ``StepOptions``)."""

    method: Literal["naive", "sam", "genmem", "genmem+sam"] = "genmem+sam"
    docid: Literal["atomic", "naive", "semantic"] = "semantic"
    epochs: Annotated[int, Field(ge=1, le=500), NotBool] | None = None
    first_epochs: Annotated[int, Field(ge=1, le=500), NotBool] | None = None
    qg_epochs: Annotated[int, Field(ge=1, le=500), NotBool] | None = None
    query_generator: Literal["t5", "lm"] | None = None
    demonstrations: Annotated[int, Field(ge=1, le=8), NotBool] | None = None
    sam_rho: Annotated[float, Field(gt=0, le=1)] | None = None
    pseudo_per_doc: Annotated[int, Field(ge=0, le=20), NotBool] | None = None
    d_model: Annotated[int, Field(ge=16, le=1024, multiple_of=4), NotBool] | None = None
    layers: Annotated[int, Field(ge=1, le=12), NotBool] | None = None
    seed: Annotated[int, NotBool] | None = None

    def to_options(self) -> StepOptions:
        values = {k: v for k, v in self.model_dump().items() if v is not None}
        if values.get("d_model", 0) % 4:
            raise LodestarError(
                ErrorCode.validation, "d_model must be a multiple of 4", field="d_model"
            )
        return StepOptions(**values)


class DsiIndexRequest(BaseModel):
    documents: IdBatch[Document] = Field(min_length=1)
    queries: list[TrainingQuery] = Field(default_factory=list)
    """Real (doc, query) pairs: used by the first step only (retrieval task, query generator)."""
    options: StepOptionsIn = Field(default_factory=lambda: StepOptionsIn())
    queue: QueueChoice = "auto"
    """``auto``: a GPU worker's queue when one is registered (torch then trains on CUDA), else
    ``cpu``; ``gpu`` with no GPU worker is a 503 (``shared.jobs.route_queue``)."""


class DsiJobResponse(BaseModel):
    """A queued continual-indexing step."""

    job_id: str
    status_url: str
    """``GET`` it for the job's state and progress."""
    collection: str
    queue: str


@router.post(
    "/search",
    response_model=IndexSearchResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.not_found),
)
async def search(
    body: IndexSearchRequest, engine: EngineDep, settings: SettingsDep
) -> IndexSearchResponse:
    query = check_text(body.query, "query", settings)
    check_k(body.k, settings)
    check_collection(body.collection)
    started = time.perf_counter()
    snapshot, hits = await run_in_threadpool(engine.search, body.collection, query, body.k)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return IndexSearchResponse(
        collection=body.collection,
        version=snapshot.version,
        results={
            RETRIEVER: [
                Hit(
                    doc_id=doc.id,
                    title=doc.title,
                    text=doc.text,
                    score=score,
                    sources={RETRIEVER: SourceRank(rank=rank, score=score)},
                )
                for rank, (doc, _docid, score) in enumerate(hits, start=1)
            ]
        },
        timings_ms={RETRIEVER: round(elapsed_ms, 2)},
    )


@router.get("/collections")
async def list_collections(engine: EngineDep) -> list[dict[str, Any]]:
    return [await get_collection(name, engine) for name in engine.names()]


@router.get("/collections/{name}/dsi", responses=error_responses(ErrorCode.not_found))
async def get_collection(name: CollectionPath, engine: EngineDep) -> dict[str, Any]:
    family = engine.family(name)
    if family.current_version() is None:
        raise LodestarError(ErrorCode.not_found, f"collection {name!r} has no DSI model yet")
    manifest = await run_in_threadpool(family.read_manifest)
    return {k: v for k, v in manifest.items() if k != "files"}


@router.post(
    "/collections/{name}/dsi/index",
    status_code=202,
    response_model=DsiJobResponse,
    responses=error_responses(ErrorCode.not_found),
)
async def index_batch(
    name: CollectionPath,
    body: DsiIndexRequest,
    settings: SettingsDep,
    engine: EngineDep,
    celery: CeleryDep,
) -> JSONResponse:
    """Stage the batch where a worker can read it and enqueue one continual step."""
    engine.family(name)  # validates the name before any work
    options = body.options.to_options()
    queue = await run_in_threadpool(route_queue, celery, body.queue)
    job_id = uuid.uuid4().hex
    batch = await run_in_threadpool(_stage_batch, settings.data_dir, job_id, body)
    celery.send_task(
        TASK_DSI_INDEX_STEP,
        args=[name, str(batch), asdict(options)],
        task_id=job_id,
        queue=queue,
    )
    return JSONResponse(
        {"job_id": job_id, "status_url": f"/jobs/{job_id}", "collection": name, "queue": queue},
        status_code=202,
    )


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, celery: CeleryDep) -> dict[str, Any]:
    status: dict[str, Any] = await run_in_threadpool(job_status, celery, job_id)
    return status


def _stage_batch(data_dir: Path, job_id: str, body: DsiIndexRequest) -> Path:
    incoming = (data_dir / "incoming").resolve()
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / f"dsi-{job_id}.json"
    tmp = path.with_suffix(".tmp")
    payload = {
        "documents": [doc.model_dump() for doc in body.documents],
        "queries": [[q.doc_id, q.query] for q in body.queries],
    }
    tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    tmp.rename(path)
    return path
