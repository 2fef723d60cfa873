"""Typed async clients for calls between services: one method per endpoint.

Every call carries a timeout capped by the current request's deadline, and propagates that
deadline (``X-Lodestar-Deadline``) so the callee stops working on answers nobody will wait for.
A downstream error in the closed set that concerns the caller's input (404, 422, ...) is re-raised
as is; a downstream that is down, slow or broken raises ``DependencyError`` so the caller can fall
back and report the service in ``degraded``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from shared.app import (
    DEADLINE_HEADER,
    REQUEST_ID_HEADER,
    remaining_seconds,
    request_deadline,
    request_id,
)
from shared.errors import ErrorCode, LodestarError
from shared.schemas import (
    NON_BLANK,
    CollectionInfo,
    Document,
    EmbedResponse,
    IndexSearchResponse,
    NotBool,
    Passage,
    QueryText,
    WriteResponse,
)
from shared.settings import Settings

if TYPE_CHECKING:
    # Request bodies only annotate parameters here; the responses are validated at run time.
    from shared.schemas import EmbedRequest, IndexSearchRequest

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Downstream codes that describe the caller's request, not the downstream's health.
_PASS_THROUGH = {
    ErrorCode.validation,
    ErrorCode.empty,
    ErrorCode.too_large,
    ErrorCode.not_found,
    ErrorCode.conflict,
}


class DependencyError(LodestarError):
    """A downstream service failed; ``service`` names it for the ``degraded`` list."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(ErrorCode.dependency_failed, f"{service}: {message}")
        self.service = service


class ServiceClient:
    def __init__(
        self,
        service: str,
        base_url: str,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        headers = (
            {"authorization": f"Bearer {settings.service_api_key}"}
            if settings.service_api_key
            else {}
        )
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        model: type[ModelT] | None,
        json: Any = None,
        timeout: float | None = None,
    ) -> Any:
        budget = remaining_seconds(timeout or self.settings.downstream_timeout_s)
        if budget <= 0:
            raise DependencyError(self.service, "no time left before the request deadline")
        headers = {REQUEST_ID_HEADER: request_id.get()}
        deadline = request_deadline.get()
        if deadline is not None:
            headers[DEADLINE_HEADER] = f"{deadline:.3f}"
        try:
            response = await self._http.request(
                method, path, json=json, headers=headers, timeout=budget
            )
        except httpx.TimeoutException as exc:
            raise DependencyError(self.service, f"timed out after {budget:.1f} s") from exc
        except httpx.HTTPError as exc:
            raise DependencyError(self.service, f"unreachable ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise self._error(response)
        if model is not None:  # parsed and validated in one pass by pydantic-core
            return model.model_validate_json(response.content)
        return response.json()

    def _error(self, response: httpx.Response) -> LodestarError:
        try:
            error = response.json()["error"]
            code = ErrorCode(error["code"])
        except (ValueError, KeyError, TypeError):
            return DependencyError(self.service, f"HTTP {response.status_code}")
        if code in _PASS_THROUGH:
            return LodestarError(code, error.get("message", ""), field=error.get("field"))
        return DependencyError(self.service, f"{code.value}: {error.get('message', '')}")

    async def ready(self) -> bool:
        try:
            response = await self._http.get("/readyz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


class IndexClient(ServiceClient):
    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__("index", settings.index_url, settings, transport=transport)

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        result: IndexSearchResponse = await self._call(
            "POST", "/search", IndexSearchResponse, request.model_dump()
        )
        return result

    async def collections(self) -> list[CollectionInfo]:
        rows = await self._call("GET", "/collections", None)
        return [CollectionInfo.model_validate(row) for row in rows]

    async def collection(self, name: str) -> CollectionInfo:
        info: CollectionInfo = await self._call("GET", f"/collections/{name}", CollectionInfo)
        return info

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        result: EmbedResponse = await self._call(
            "POST", "/embed", EmbedResponse, request.model_dump()
        )
        return result

    async def upsert(self, name: str, documents: list[Document]) -> WriteResponse:
        body = {"documents": [doc.model_dump() for doc in documents]}
        # Inline upserts embed their documents: allow the whole request budget, not the default.
        result: WriteResponse = await self._call(
            "PUT",
            f"/collections/{name}/documents",
            WriteResponse,
            body,
            timeout=self.settings.request_timeout_s,
        )
        return result

    async def delete(self, name: str, doc_id: str) -> WriteResponse:
        result: WriteResponse = await self._call(
            "DELETE",
            f"/collections/{name}/documents/{quote(doc_id, safe='')}",
            WriteResponse,
            timeout=self.settings.request_timeout_s,
        )
        return result

    async def documents(self, name: str, doc_ids: list[str]) -> list[Document]:
        """The stored documents with these ids, in that order (unknown ids left out)."""
        rows = await self._call("POST", f"/collections/{name}/lookup", None, {"ids": doc_ids})
        return [Document.model_validate(row) for row in rows]

    async def passage_texts(self, name: str, wanted: Mapping[str, int | None]) -> list[Passage]:
        """doc id -> passage number (a hit's ``passage``; ``None``: the first): those stored
        passages, in that order (unknown ones left out), ``max_k`` refs a request."""
        refs = [{"doc_id": doc_id, "passage": number} for doc_id, number in wanted.items()]
        size = max(1, self.settings.max_k)
        batches = await asyncio.gather(
            *(
                self._call("POST", f"/collections/{name}/passages", None, {"passages": part})
                for part in (refs[i : i + size] for i in range(0, len(refs), size))
            )
        )
        return [Passage.model_validate(row) for batch in batches for row in batch]


class RetrieverClient(ServiceClient):
    """A first-stage retriever served by its own service (``fm`` by fmindex, ``dsi`` by dsi).

    The service answers ``POST /search`` with the index service's request and response models,
    so the orchestrator fuses its list like any other.
    """

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        result: IndexSearchResponse = await self._call(
            "POST", "/search", IndexSearchResponse, request.model_dump()
        )
        return result


# --- reranker ----------------------------------------------------------------------------------

#: Methods the reranker service serves (``cross-encoder`` answers 503 until one is published).
RerankMethod = Literal["icr", "rankgpt", "cosine", "cross-encoder"]
RERANK_METHODS: tuple[str, ...] = get_args(RerankMethod)
#: Stated in the OpenAPI document (the setting's default); the reranker enforces the setting (413).
RERANK_MAX_DOCUMENTS_DEFAULT: int = Settings.model_fields["rerank_max_documents"].default
#: The critic's context is everything retrieved over several rounds: more than one query's worth.
JUDGE_MAX_CONTEXT_CHARS = 200_000


class RerankDocumentIn(BaseModel):
    # The schema states "a non-blank title or text"; the check stays in code (400 ``empty``,
    # as for a blank query).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"title": {"pattern": NON_BLANK}}, "required": ["title"]},
                {"properties": {"text": {"pattern": NON_BLANK}}},
            ]
        }
    )

    doc_id: str = Field(min_length=1, max_length=512)
    title: str = ""
    text: str


class RerankOptions(BaseModel):
    """Per-request knobs; ``None`` means the service's default. ICR fields follow
    ``services.reranker.icr.ICROptions``; ``window_size``/``step`` are RankGPT's."""

    model_config = ConfigDict(extra="forbid")

    calibration: Literal["masked_na", "none"] | None = None
    layers: Literal["all", "last"] | None = None
    query_tokens: Literal["span", "last"] | None = None
    query_span: Literal["instruction", "query"] | None = None
    doc_order: Literal["reverse", "input"] | None = None
    retrieval_type: Literal["ie", "qa"] | None = None
    reuse_cache: StrictBool | None = None
    max_doc_tokens: Annotated[int, Field(ge=8, le=2048), NotBool] | None = None
    max_prompt_tokens: Annotated[int, Field(ge=256, le=8192), NotBool] | None = None
    window_size: Annotated[int, Field(ge=2, le=100), NotBool] | None = None
    step: Annotated[int, Field(ge=1, le=100), NotBool] | None = None


class RerankRequest(BaseModel):
    query: QueryText
    documents: list[RerankDocumentIn] = Field(
        min_length=1, json_schema_extra={"maxItems": RERANK_MAX_DOCUMENTS_DEFAULT}
    )
    method: RerankMethod = "icr"
    options: RerankOptions = Field(default_factory=lambda: RerankOptions())


class RerankResult(BaseModel):
    doc_id: str
    score: float
    rank: int


class RerankResponse(BaseModel):
    results: list[RerankResult]
    """Every input document, best first (``rank`` 1-based)."""
    method: str
    timings_ms: dict[str, float]
    forward_passes: int
    """Model forward passes: 2 for ICR, one per generated token for RankGPT."""
    prompt_tokens: int
    details: dict[str, Any] = Field(default_factory=dict)


class RerankerClient(ServiceClient):
    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__("reranker", settings.reranker_url, settings, transport=transport)

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        result: RerankResponse = await self._call(
            "POST",
            "/rerank",
            RerankResponse,
            request.model_dump(exclude_none=True),
            timeout=self.settings.rerank_timeout_s,
        )
        return result


# --- critic (SIM-RAG) --------------------------------------------------------------------------


class JudgeRequest(BaseModel):
    """One round of a multi-round answer, as the SIM-RAG critic reads it."""

    question: QueryText
    context: str = Field(default="", json_schema_extra={"maxLength": JUDGE_MAX_CONTEXT_CHARS})
    """Everything retrieved so far, as the reasoner saw it (queries and documents)."""
    answer: str
    rationale: str = ""


class JudgeResponse(BaseModel):
    accept: bool
    p_accept: float
    model_version: str = ""


class CriticClient(ServiceClient):
    """The critic service's ``POST /judge``. Every failure, including a critic that answers
    "not trained yet", is a ``DependencyError``: the answer loop then goes on without it."""

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__("critic", settings.critic_url, settings, transport=transport)

    async def judge(self, request: JudgeRequest) -> JudgeResponse:
        try:
            result: JudgeResponse = await self._call(
                "POST", "/judge", JudgeResponse, request.model_dump()
            )
        except DependencyError:
            raise
        except LodestarError as exc:
            raise DependencyError(self.service, f"{exc.code.value}: {exc.message}") from exc
        return result
