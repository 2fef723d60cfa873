"""HTTP surface of the index service: validates, calls ``IndexEngine``, maps errors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from services.index.engine import (
    RETRIEVERS,
    IndexEngine,
    Snapshot,
    WriteResult,
    check_k,
    search_response,
)
from shared.app import require_ready
from shared.errors import ErrorCode, LodestarError
from shared.schemas import (
    CollectionInfo,
    IndexSearchRequest,
    IndexSearchResponse,
    UpsertRequest,
    WriteResponse,
)
from shared.settings import Settings


def get_engine(request: Request) -> IndexEngine:
    engine: IndexEngine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


EngineDep = Annotated[IndexEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

router = APIRouter(dependencies=[Depends(require_ready)])


def validate_query(query: str, settings: Settings) -> str:
    stripped = query.strip()
    if not stripped:
        raise LodestarError(ErrorCode.empty, "query is empty", field="query")
    if len(stripped) > settings.max_query_chars:
        raise LodestarError(
            ErrorCode.validation,
            f"query exceeds {settings.max_query_chars} characters",
            field="query",
        )
    return stripped


def _info(snapshot: Snapshot) -> CollectionInfo:
    return CollectionInfo(
        name=snapshot.name,
        version=snapshot.version,
        documents=snapshot.n_documents,
        passages=len(snapshot.passages),
        retrievers={name: True for name in RETRIEVERS},
        manifest={k: v for k, v in snapshot.manifest.items() if k != "files"},
    )


def _write_response(result: WriteResult) -> WriteResponse:
    return WriteResponse(
        collection=result.collection,
        version=result.version,
        documents=result.documents,
        passages=result.passages,
        upserted=result.upserted,
        deleted=result.deleted,
        seconds=round(result.seconds, 3),
    )


@router.post("/search", response_model=IndexSearchResponse)
async def search(
    body: IndexSearchRequest, engine: EngineDep, settings: SettingsDep
) -> IndexSearchResponse:
    query = validate_query(body.query, settings)
    check_k(body.k, settings.max_k)
    snapshot, results, timings = await run_in_threadpool(
        engine.search, body.collection, query, body.k, body.retrievers
    )
    return search_response(snapshot, results, timings)


@router.get("/collections", response_model=list[CollectionInfo])
async def list_collections(engine: EngineDep) -> list[CollectionInfo]:
    return [_info(await run_in_threadpool(engine.snapshot, name)) for name in engine.names()]


@router.get("/collections/{name}", response_model=CollectionInfo)
async def get_collection(name: str, engine: EngineDep) -> CollectionInfo:
    return _info(await run_in_threadpool(engine.snapshot, name))


@router.put("/collections/{name}/documents", response_model=WriteResponse)
async def upsert_documents(name: str, body: UpsertRequest, engine: EngineDep) -> WriteResponse:
    engine.family(name)  # validates the name before any work
    result = await run_in_threadpool(engine.upsert, name, body.documents)
    return _write_response(result)


@router.delete("/collections/{name}/documents/{doc_id:path}", response_model=WriteResponse)
async def delete_document(name: str, doc_id: str, engine: EngineDep) -> WriteResponse:
    result = await run_in_threadpool(engine.delete, name, doc_id)
    return _write_response(result)
