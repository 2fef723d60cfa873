"""HTTP surface of the index service: validates, calls ``IndexEngine``, maps errors."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydantic_core import to_json

from services.index.engine import (
    RETRIEVERS,
    IndexEngine,
    Snapshot,
    WriteResult,
    params_of,
    search_payload,
)
from shared.app import SettingsDep, check_k, check_text, from_state, require_ready
from shared.errors import ErrorCode, error_responses
from shared.ids import CollectionPath, DocId, DocIdPath
from shared.schemas import (
    CollectionInfo,
    Document,
    EmbedRequest,
    EmbedResponse,
    IndexSearchRequest,
    IndexSearchResponse,
    NotBool,
    Passage,
    PassageLookupRequest,
    UpsertRequest,
    WriteResponse,
)
from shared.settings import Settings

EngineDep = Annotated[IndexEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])

IndexRetriever = Literal["dense", "dense_exact", "bm25"]
assert set(get_args(IndexRetriever)) == set(RETRIEVERS)  # the schema names what the engine serves


def _default_retrievers() -> list[IndexRetriever]:
    return ["dense", "bm25"]


MAX_CANDIDATES_DEFAULT: int = Settings.model_fields["index_max_candidates"].default
SearchBreadth = Annotated[
    int, Field(json_schema_extra={"minimum": 1, "maximum": MAX_CANDIDATES_DEFAULT}), NotBool
]


class SearchRequest(IndexSearchRequest):
    """``IndexSearchRequest`` (``text_k`` included) with the retrievers this service serves as
    an enum (the shared model also carries ``fm`` and ``dsi`` requests to their services)."""

    retrievers: list[IndexRetriever] = Field(  # type: ignore[assignment]
        default_factory=_default_retrievers, min_length=1
    )
    # The dense knobs' bounds, stated (the limit is the setting ``index_max_candidates``, shown
    # with its default as ``k``'s is; ``SearchParams.check`` enforces the configured one).
    candidates: SearchBreadth | None = None
    """K, passages the ANN proposes for exact re-scoring: at least ``k`` (a rule across fields,
    stated in the 422)."""
    nprobe: SearchBreadth | None = None
    ef_search: SearchBreadth | None = None


#: Rules of ``POST /search`` JSON Schema cannot state (``x-lodestar-rules`` in its 422).
SEARCH_RULES = {
    "query_vector": "of the collection's embedding dimension (`GET /collections/{name}`: the "
    "manifest's `dim`)",
    "candidates": "at least `k`",
}


def _info(snapshot: Snapshot) -> CollectionInfo:
    return CollectionInfo(
        name=snapshot.name,
        version=snapshot.version,
        documents=snapshot.n_documents,
        passages=snapshot.n_passages,
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
        merge_due=result.merge_due,
    )


@router.post(
    "/search",
    response_model=IndexSearchResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.not_found, rules=SEARCH_RULES),
)
async def search(body: SearchRequest, engine: EngineDep, settings: SettingsDep) -> Response:
    """Search, then one serialisation of plain objects (``search_payload``): the response is
    ``IndexSearchResponse`` (documented above) without a model round trip per hit."""
    query = check_text(body.query, "query", settings)
    check_k(body.k, settings)

    def run() -> bytes:
        snapshot, results, timings = engine.search(
            body.collection,
            query,
            body.k,
            body.retrievers,
            params_of(body),
            query_vector=body.query_vector,
            bm25_terms=body.bm25_terms,
        )
        return to_json(search_payload(snapshot, results, timings, body.text_k))

    return Response(content=await run_in_threadpool(run), media_type="application/json")


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.not_found),
)
async def embed(body: EmbedRequest, engine: EngineDep, settings: SettingsDep) -> EmbedResponse:
    """The embedder's vectors for a query and passages, so a caller can move a dense query
    (Rocchio relevance feedback) and search with ``query_vector``; passages that name a
    ``doc_id`` of ``collection`` (404 if it does not exist) and match a stored passage get its
    stored vector."""
    if body.query is not None:
        check_text(body.query, "query", settings)
    return await run_in_threadpool(engine.embed, body)


@router.get("/collections", response_model=list[CollectionInfo])
async def list_collections(engine: EngineDep) -> list[CollectionInfo]:
    return [_info(await run_in_threadpool(engine.snapshot, name)) for name in engine.names()]


@router.get(
    "/collections/{name}",
    response_model=CollectionInfo,
    responses=error_responses(ErrorCode.not_found),
)
async def get_collection(name: CollectionPath, engine: EngineDep) -> CollectionInfo:
    return _info(await run_in_threadpool(engine.snapshot, name))


@router.put("/collections/{name}/documents", response_model=WriteResponse)
async def upsert_documents(
    name: CollectionPath, body: UpsertRequest, engine: EngineDep
) -> WriteResponse:
    engine.family(name)  # validates the name before any work
    result = await run_in_threadpool(engine.upsert, name, body.documents)
    return _write_response(result)


@router.delete(
    "/collections/{name}/documents/{doc_id:path}",
    response_model=WriteResponse,
    responses=error_responses(ErrorCode.not_found),
)
async def delete_document(
    name: CollectionPath, doc_id: DocIdPath, engine: EngineDep
) -> WriteResponse:
    result = await run_in_threadpool(engine.delete, name, doc_id)
    return _write_response(result)


class LookupRequest(BaseModel):
    ids: list[DocId] = Field(min_length=1)


@router.post(
    # Not under .../documents/: DELETE .../documents/{doc_id:path} would also match it (so its
    # Allow named DELETE, and a document with that id could not be told from the route).
    "/collections/{name}/lookup",
    response_model=list[Document],
    responses=error_responses(ErrorCode.not_found),
)
async def lookup_documents(
    name: CollectionPath, body: LookupRequest, engine: EngineDep, settings: SettingsDep
) -> list[Document]:
    """The stored documents with these ids (unknown ids are left out), e.g. for judging the
    documents a trace ranked; at most ``max_k`` ids per request."""
    check_k(len(body.ids), settings)
    return await run_in_threadpool(engine.documents, name, body.ids)


@router.post(
    "/collections/{name}/passages",
    response_model=list[Passage],
    responses=error_responses(ErrorCode.not_found),
)
async def lookup_passages(
    name: CollectionPath, body: PassageLookupRequest, engine: EngineDep, settings: SettingsDep
) -> Response:
    """The stored passages these refs name, as the serving version chunked them, in request
    order (unknown documents or numbers left out; a repeated document, its last ref); at most
    ``max_k`` refs per request. What a caller fusing hits sent without text (``text_k``) asks
    for the few it keeps."""
    check_k(len(body.passages), settings)
    wanted = {ref.doc_id: ref.passage for ref in body.passages}

    def run() -> bytes:
        return to_json(engine.passage_records(name, wanted))

    return Response(content=await run_in_threadpool(run), media_type="application/json")
