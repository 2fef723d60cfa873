"""HTTP surface of the reranker service: validates, calls ``RerankerEngine``, maps errors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from services.reranker.engine import RerankDocument, RerankerEngine, rerank_response
from services.reranker.icr import printable
from shared.app import SettingsDep, check_text, from_state, require_ready
from shared.clients import RerankRequest, RerankResponse
from shared.errors import ErrorCode, LodestarError, error_responses, invalid

EngineDep = Annotated[RerankerEngine, Depends(from_state("engine"))]

router = APIRouter(dependencies=[Depends(require_ready)])


#: Rules of ``POST /rerank`` JSON Schema cannot state (``x-lodestar-rules`` in its 422).
RERANK_RULES = {
    "documents": "document ids are unique",
    "options.step": "rankgpt: step is at most window_size",
}


@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses=error_responses(ErrorCode.empty, ErrorCode.too_large, rules=RERANK_RULES),
)
async def rerank(body: RerankRequest, engine: EngineDep, settings: SettingsDep) -> RerankResponse:
    query = check_text(body.query, "query", settings)
    if not printable(query).strip():  # control characters only: nothing for a model to read
        raise LodestarError(ErrorCode.empty, "query has no printable character", field="query")
    if len(body.documents) > settings.rerank_max_documents:
        raise LodestarError(
            ErrorCode.too_large,
            f"at most {settings.rerank_max_documents} documents per request",
            field="documents",
        )
    ids = [d.doc_id for d in body.documents]
    if len(set(ids)) != len(ids):
        raise invalid("document ids must be unique", field="documents")
    documents = [RerankDocument(d.doc_id, d.title, d.text) for d in body.documents]
    if any(not (d.title.strip() or d.text.strip()) for d in documents):
        raise LodestarError(
            ErrorCode.empty, "a document has no title and no text", field="documents"
        )
    options = body.options.model_dump(exclude_none=True)
    outcome = await run_in_threadpool(engine.rerank, query, documents, body.method, options)
    return rerank_response(documents, outcome)
