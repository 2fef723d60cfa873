"""HTTP surface of the fmindex service.

``POST /search`` answers the index service's contract (``IndexSearchRequest`` →
``IndexSearchResponse`` with ``results={"fm": [...]}``), so the orchestrator's ``RetrieverClient``
fuses it like any retriever. Each hit additionally carries ``ngrams``: the keys that matched the
document, with their corpus frequency, the generator's log-probability, their SEAL weight and
the share they contributed after the coverage penalty — why the document was retrieved. Clients
that only know ``Hit`` ignore the extra field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.fmindex.engine import FmEngine, FmSearchOutcome, with_overrides
from services.fmindex.scoring import Match
from shared.app import check_k, check_text, from_state, require_ready
from shared.errors import ErrorCode, LodestarError, invalid, not_found
from shared.schemas import Hit, IndexSearchRequest, IndexSearchResponse, SourceRank
from shared.settings import Settings

RETRIEVER = "fm"

EngineDep = Annotated[FmEngine, Depends(from_state("engine"))]
SettingsDep = Annotated[Settings, Depends(from_state("settings"))]

router = APIRouter(dependencies=[Depends(require_ready)])


class FmOptions(BaseModel):
    """Per-request decoding knobs; ``None`` keeps the service default."""

    beam: Annotated[int, Field(ge=1, le=50)] | None = None
    length: Annotated[int, Field(ge=1, le=20)] | None = None
    decode_titles: bool | None = None
    groups: Annotated[int, Field(ge=1, le=50)] | None = None
    diversity_penalty: Annotated[float, Field(ge=0.0, le=10.0)] | None = None


class FmSearchRequest(IndexSearchRequest):
    retrievers: list[str] = Field(default_factory=lambda: [RETRIEVER], min_length=1)
    fm: FmOptions = Field(default_factory=FmOptions)


class MatchedNgram(BaseModel):
    ngram: str
    tokens: list[int]
    kind: Literal["body", "title", "unigram"]
    frequency: int
    """Occurrences in the whole corpus (the FM-index count)."""
    logprob: float
    """log P(n | query) under the generator."""
    weight: float
    """SEAL's weight of the n-gram (log-odds, clipped, ** α for n-grams)."""
    contribution: float
    """Weight × coverage coefficient: what it added to this document's score."""


class FmHit(Hit):
    ngrams: list[MatchedNgram] = Field(default_factory=list)


class FmSearchResponse(IndexSearchResponse):
    results: dict[str, list[FmHit]]  # type: ignore[assignment]
    generator: str
    forward_passes: int


class BuildRequest(BaseModel):
    dataset: str | None = None
    """A named dataset whose corpus to index (``scifact``, ``wiki``, ...)."""
    jsonl: str | None = None
    """Or a JSONL file of ``{id, title, text}`` rows readable by the worker."""


def _matched(engine: FmEngine, match: Match) -> MatchedNgram:
    key = match.key
    return MatchedNgram(
        ngram=engine.describe_key(key),
        tokens=list(key.tokens),
        kind=key.kind,  # type: ignore[arg-type]
        frequency=key.count,
        logprob=round(key.logprob, 4),
        weight=round(key.weight, 4),
        contribution=round(match.contribution, 4),
    )


def search_response(engine: FmEngine, outcome: FmSearchOutcome) -> FmSearchResponse:
    hits = [
        FmHit(
            doc_id=hit.doc_id,
            title=hit.title,
            text=hit.text,
            score=round(hit.score, 6),
            sources={RETRIEVER: SourceRank(rank=rank, score=round(hit.score, 6))},
            ngrams=[_matched(engine, m) for m in hit.matches + hit.unigrams],
        )
        for rank, hit in enumerate(outcome.hits, start=1)
    ]
    timings = {k: round(v, 2) for k, v in outcome.timings_ms.items() if k != "forward_passes"}
    return FmSearchResponse(
        collection=outcome.collection,
        version=outcome.version,
        results={RETRIEVER: hits},
        timings_ms=timings,
        generator=outcome.generator,
        forward_passes=int(outcome.timings_ms.get("forward_passes", 0)),
    )


@router.post("/search", response_model=FmSearchResponse)
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
        raise invalid("beam must be a multiple of groups", field="fm.groups")
    outcome = await run_in_threadpool(engine.search, body.collection, query, body.k, options)
    return search_response(engine, outcome)


@router.get("/collections")
async def list_collections(engine: EngineDep) -> list[dict[str, Any]]:
    return [await _info(engine, name) for name in await run_in_threadpool(engine.names)]


@router.get("/collections/{name}")
async def get_collection(name: str, engine: EngineDep) -> dict[str, Any]:
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


@router.post("/collections/{name}/build", status_code=202)
async def build_collection(
    name: str, body: BuildRequest, request_settings: SettingsDep
) -> JSONResponse:
    """Enqueue an FM-index build on the cpu queue (202 + job id); searches keep serving the
    current version until the new one is published."""
    from shared.jobs import TASK_FMINDEX_BUILD, make_celery
    from shared.schemas import is_valid_collection_name

    if not is_valid_collection_name(name):
        raise invalid("collection names are lowercase slugs", field="name")
    if not (body.dataset or body.jsonl) or (body.dataset and body.jsonl):
        raise invalid("give exactly one of dataset or jsonl", field="dataset")
    celery = make_celery(request_settings)
    try:
        result = celery.send_task(
            TASK_FMINDEX_BUILD, args=[name, body.dataset, body.jsonl], queue="cpu"
        )
    except Exception as exc:  # the broker is down: say so instead of a 500
        raise LodestarError(
            ErrorCode.unavailable, f"cannot enqueue the build: {exc}", retry_after_s=30
        ) from exc
    return JSONResponse({"job_id": result.id, "collection": name}, status_code=202)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request_settings: SettingsDep) -> dict[str, Any]:
    from shared.jobs import job_status, make_celery

    return await run_in_threadpool(job_status, make_celery(request_settings), job_id)
