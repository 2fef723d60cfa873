"""HTTP surface of the fmindex service.

``POST /search`` answers the index service's contract (``IndexSearchRequest`` →
``IndexSearchResponse`` with ``results={"fm": [...]}``), so the orchestrator's ``RetrieverClient``
fuses it like any retriever. Each hit additionally carries ``ngrams``: the keys that matched the
document, with their corpus frequency, the generator's log-probability, their SEAL weight and
the share they contributed after the coverage penalty — why the document was retrieved. Clients
that only know ``Hit`` ignore the extra field.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from services.fmindex.engine import FmEngine, with_overrides
from services.fmindex.responses import RETRIEVER, FmSearchResponse, search_response
from shared.app import SettingsDep, check_k, check_text, from_state, require_ready
from shared.datasets import DATASETS
from shared.errors import ErrorCode, LodestarError, error_responses, invalid, not_found
from shared.ids import (
    CollectionPath,
    IdBatch,
    StagedName,
    stage_jsonl,
    staged_file,
    staging_dir,
)
from shared.schemas import (
    Document,
    IndexSearchRequest,
    NotBool,
)

logger = logging.getLogger(__name__)

EngineDep = Annotated[FmEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])


class FmOptions(BaseModel):
    """Per-request decoding knobs; ``None`` keeps the service default."""

    beam: Annotated[int, Field(ge=1, le=50), NotBool] | None = None
    length: Annotated[int, Field(ge=1, le=20), NotBool] | None = None
    decode_titles: StrictBool | None = None
    groups: Annotated[int, Field(ge=1, le=50), NotBool] | None = None
    """Diverse beam search groups; they split the beam, so a ``groups`` that does not divide
    ``beam`` is lowered to the largest divisor of ``beam`` not above it (JSON Schema cannot state
    "a multiple of another field")."""
    diversity_penalty: Annotated[float, Field(ge=0.0, le=10.0), NotBool] | None = None


def _fm_only() -> list[Literal["fm"]]:
    return ["fm"]


class FmSearchRequest(IndexSearchRequest):
    retrievers: list[Literal["fm"]] = Field(  # type: ignore[assignment]
        default_factory=_fm_only, min_length=1
    )
    """This service serves the ``fm`` retriever only."""
    fm: FmOptions = Field(default_factory=FmOptions)


def _one_source(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    others = {other: {"type": "null"} for other in ("dataset", "documents", "jsonl")}
    return {"required": [name], "properties": {**others, name: schema}}


class BuildRequest(BaseModel):
    """Exactly one source (the schema's ``oneOf``). The worker reads files, so a caller never
    names a path: a dataset by name, the documents themselves, or a file already in the staging
    folder."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                _one_source("dataset", {"type": "string"}),
                _one_source("documents", {"type": "array"}),
                _one_source("jsonl", {"type": "string"}),
            ]
        }
    )

    dataset: Annotated[str, Field(json_schema_extra={"enum": sorted(DATASETS)})] | None = None
    """A named dataset whose corpus to index (``scifact``, ``wiki``, ...)."""
    documents: IdBatch[Document] | None = Field(default=None, min_length=1)
    """Or the documents themselves (bounded by the request-size limit; an id named twice: the
    last occurrence wins)."""
    jsonl: StagedName | None = None
    """Or the name of a JSONL file of ``{id, title, text}`` rows in ``<data_dir>/incoming``."""

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str | None) -> str | None:
        if value is not None and value not in DATASETS:
            raise ValueError(f"unknown dataset; known: {', '.join(sorted(DATASETS))}")
        return value


class BuildResponse(BaseModel):
    job_id: str
    """``GET /jobs/{job_id}`` reports its state."""
    collection: str


@router.post(
    "/search",
    response_model=FmSearchResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.not_found),
)
async def search(
    body: FmSearchRequest, engine: EngineDep, settings: SettingsDep
) -> FmSearchResponse:
    query = check_text(body.query, "query", settings)
    check_k(body.k, settings)
    unknown = [r for r in body.retrievers if r != RETRIEVER]
    if unknown:
        raise invalid(f"this service serves only the {RETRIEVER!r} retriever", field="retrievers")
    if body.collection not in await run_in_threadpool(engine.names):
        raise not_found("fm-index collection", body.collection, field="collection")
    options = with_overrides(
        engine.default_options(),
        beam=body.fm.beam,
        length=body.fm.length,
        decode_titles=body.fm.decode_titles,
        groups=body.fm.groups,
        diversity_penalty=body.fm.diversity_penalty,
    )
    if options.beam % options.groups:
        groups = max(g for g in range(1, options.groups + 1) if options.beam % g == 0)
        options = replace(options, groups=groups)
    outcome = await run_in_threadpool(engine.search, body.collection, query, body.k, options)
    return search_response(engine, outcome)


@router.get("/collections")
async def list_collections(engine: EngineDep) -> list[dict[str, Any]]:
    return [await _info(engine, name) for name in await run_in_threadpool(engine.names)]


@router.get("/collections/{name}", responses=error_responses(ErrorCode.not_found))
async def get_collection(name: CollectionPath, engine: EngineDep) -> dict[str, Any]:
    return await _info(engine, name)


async def _info(engine: FmEngine, name: str) -> dict[str, Any]:
    collection = await run_in_threadpool(engine.collection, name)
    manifest = {k: v for k, v in collection.manifest.items() if k != "files"}
    return {
        "name": collection.name,
        "version": collection.version,
        "documents": collection.n_documents,
        "tokens": int(collection.tokens.shape[0]),
        "index_bytes": collection.fm.nbytes,
        "manifest": manifest,
    }


@router.post(
    "/collections/{name}/build",
    status_code=202,
    response_model=BuildResponse,
    responses=error_responses(ErrorCode.not_found),
)
async def build_collection(
    name: CollectionPath, body: BuildRequest, request_settings: SettingsDep
) -> JSONResponse:
    """Enqueue an FM-index build on the cpu queue (202 + job id); searches keep serving the
    current version until the new one is published."""
    from shared.jobs import TASK_FMINDEX_BUILD, make_celery

    given = [body.dataset is not None, body.documents is not None, body.jsonl is not None]
    if sum(given) != 1:
        raise invalid("give exactly one of dataset, documents or jsonl", field="dataset")
    data_dir = request_settings.data_dir
    jsonl = None
    if body.jsonl is not None:
        jsonl = str(await run_in_threadpool(staged_file, data_dir, body.jsonl))
    elif body.documents is not None:
        rows = [doc.model_dump() for doc in body.documents]
        name_ = f"fmindex-{uuid.uuid4().hex}.jsonl"
        jsonl = str(await run_in_threadpool(stage_jsonl, staging_dir(data_dir), name_, rows))
    celery = make_celery(request_settings)
    try:
        result = celery.send_task(TASK_FMINDEX_BUILD, args=[name, body.dataset, jsonl], queue="cpu")
    except Exception as exc:  # the broker is down: say so instead of a 500
        logger.warning("cannot enqueue an fm-index build", exc_info=exc)
        raise LodestarError(
            ErrorCode.unavailable,
            "cannot enqueue the build: the job broker is unreachable",
            retry_after_s=30,
        ) from exc
    return JSONResponse({"job_id": result.id, "collection": name}, status_code=202)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request_settings: SettingsDep) -> dict[str, Any]:
    from shared.jobs import job_status, make_celery

    return await run_in_threadpool(job_status, make_celery(request_settings), job_id)
