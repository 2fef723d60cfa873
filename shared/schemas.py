"""Pydantic models that cross service boundaries (the wire format between services)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator

COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_COLLECTION_NAME_RE = re.compile(COLLECTION_NAME_PATTERN)
DOC_ID_MAX_CHARS = 256


def is_valid_collection_name(name: str) -> bool:
    """Collection names become directory names: lowercase slugs only, never a path."""
    return bool(_COLLECTION_NAME_RE.match(name))


class Document(BaseModel):
    """A document as users upsert it; the index splits it into passages."""

    id: str = Field(min_length=1, max_length=DOC_ID_MAX_CHARS)
    title: str = ""
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_has_no_control_characters(cls, value: str) -> str:
        if any(ch in value for ch in "\n\r\t\x00"):
            raise ValueError("document id must not contain control characters")
        return value


class Passage(BaseModel):
    """A retrievable unit: a chunk of one document (title prepended when embedding)."""

    passage_id: str
    doc_id: str
    title: str
    text: str


class SourceRank(BaseModel):
    """Where one retriever placed a hit (1-based rank) and the score it gave."""

    rank: int
    score: float


class Hit(BaseModel):
    doc_id: str
    title: str
    text: str
    score: float
    sources: dict[str, SourceRank] = Field(default_factory=dict)


class QAExample(BaseModel):
    """A question with its gold answers (any of which counts as correct)."""

    id: str
    question: str
    answers: list[str]
    supporting_doc_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


# --- the index service's wire format ---------------------------------------------------------


class IndexSearchRequest(BaseModel):
    collection: str = "wiki"
    query: str
    k: int = 10
    retrievers: list[str] = Field(default_factory=lambda: ["dense", "bm25"], min_length=1)
    """``dense`` (the collection's ANN + exact re-scoring, or flat), ``dense_exact`` (brute
    force, for comparisons) and ``bm25``."""
    candidates: int | None = None
    """K, passages the ANN proposes for exact re-scoring (k <= K <= the server's limit)."""
    nprobe: int | None = None
    """IVF lists visited (IVF-PQ collections); default: the collection's configuration."""
    ef_search: int | None = None
    """HNSW search breadth (HNSW collections); default: the collection's configuration."""


class IndexSearchResponse(BaseModel):
    collection: str
    version: str
    results: dict[str, list[Hit]]
    timings_ms: dict[str, float]
    dense_backend: str | None = None
    """Which dense backend answered ``dense``: ``flat`` or e.g. ``ivfpq+exact``."""


class UpsertRequest(BaseModel):
    documents: list[Document] = Field(min_length=1)


class WriteResponse(BaseModel):
    collection: str
    version: str
    documents: int
    passages: int
    upserted: int
    deleted: int
    seconds: float
    merge_due: bool = False
    """The fresh segment and tombstones outgrew the ANN index's share: a merge should run."""
    merge_job: str | None = None
    """The merge job the orchestrator scheduled for it (``GET /jobs/{id}``)."""


class CollectionInfo(BaseModel):
    name: str
    version: str
    documents: int
    passages: int
    retrievers: dict[str, bool]
    manifest: dict[str, object]
