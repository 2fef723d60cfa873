"""Pydantic models that cross service boundaries (the wire format between services)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, field_validator

# The naming rule lives in shared.ids; re-exported here for the modules that import it from here.
from shared.ids import COLLECTION_NAME_PATTERN as COLLECTION_NAME_PATTERN
from shared.ids import DOC_ID_MAX_CHARS as DOC_ID_MAX_CHARS
from shared.ids import CollectionName, DocId, IdBatch
from shared.ids import is_valid_collection_name as is_valid_collection_name
from shared.settings import Settings

#: Bounds of the index's optional query overrides (a dense vector, weighted BM25 terms).
QUERY_VECTOR_MAX_DIM = 4096
BM25_TERMS_MAX = 256

# The text and k limits are settings, checked by ``shared.app.check_text``/``check_k`` so that an
# empty text stays a 400 ``empty`` (docs/api.md, "Errors") rather than a schema 422. The OpenAPI
# document still states them (with the settings' defaults), so a generated client knows the rule.
#: "At least one character ``str.strip`` keeps", as a JSON Schema pattern. The pattern dialect
#: is ECMA-262, whose ``\s`` is not Python's: ``\S`` there matches U+0085 and U+001C-U+001F,
#: which ``strip`` removes (a question of U+0085 passed the schema and got 400 ``empty``). The
#: class lists exactly the characters ``str.isspace`` accepts (tests/unit/test_schemas.py).
NON_BLANK = "[^\\t-\\r\\x1c- \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
MAX_QUERY_CHARS_DEFAULT: int = Settings.model_fields["max_query_chars"].default
MAX_K_DEFAULT: int = Settings.model_fields["max_k"].default
QueryText = Annotated[
    str,
    Field(
        json_schema_extra={"pattern": NON_BLANK, "maxLength": MAX_QUERY_CHARS_DEFAULT},
        description="Text with at least one non-space character (else 400 `empty`)",
    ),
]


def _not_a_bool(value: Any) -> Any:
    """JSON Schema's integer and number exclude booleans; pydantic would read ``true`` as 1."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


#: A validator for integer and number fields: ``true``/``false`` refused (``16.0`` is still an
#: integer, as JSON Schema says). Put it after the field's constraints: pydantic writes
#: constraints that follow a validator as unknown keywords (``ge``), which the schema ignores.
NotBool = BeforeValidator(_not_a_bool)
ResultCount = Annotated[
    int, Field(json_schema_extra={"minimum": 1, "maximum": MAX_K_DEFAULT}), NotBool
]


class Document(BaseModel):
    """A document as users upsert it; the index splits it into passages."""

    id: DocId
    title: str = ""
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Passage(BaseModel):
    """A retrievable unit: a chunk of one document (title prepended when embedding)."""

    passage_id: str
    doc_id: str
    title: str
    text: str


def passage_number(passage_id: str) -> int:
    """A passage's position in its document, from its id (``<doc id>#<n>``)."""
    return int(passage_id.rsplit("#", 1)[1])


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
    passage: int | None = None
    """Which of the document's passages ``text`` is (0-based), where the retriever knows it (the
    index does): a hit sent without its text (``text_k``) gets it back from this."""


class QAExample(BaseModel):
    """A question with its gold answers (any of which counts as correct)."""

    id: str
    question: str
    answers: list[str]
    supporting_doc_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


# --- the index service's wire format ---------------------------------------------------------


#: A ``bm25_terms`` key: a word (the validator also refuses one of spaces only).
BM25Term = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: A ``bm25_terms`` weight: finite and positive.
BM25Weight = Annotated[float, Field(gt=0, allow_inf_nan=False), NotBool]
#: A component of a query vector (``true`` is not a number).
VectorComponent = Annotated[float, NotBool]


class IndexSearchRequest(BaseModel):
    collection: CollectionName = "wiki"
    query: QueryText
    k: ResultCount = 10
    retrievers: list[str] = Field(default_factory=lambda: ["dense", "bm25"], min_length=1)
    """``dense`` (the collection's ANN + exact re-scoring, or flat), ``dense_exact`` (brute
    force, for comparisons) and ``bm25``."""
    candidates: Annotated[int, NotBool] | None = None
    """K, passages the ANN proposes for exact re-scoring (k <= K <= the server's limit)."""
    nprobe: Annotated[int, NotBool] | None = None
    """IVF lists visited (IVF-PQ collections); default: the collection's configuration."""
    ef_search: Annotated[int, NotBool] | None = None
    """HNSW search breadth (HNSW collections); default: the collection's configuration."""
    query_vector: list[VectorComponent] | None = Field(
        default=None, min_length=1, max_length=QUERY_VECTOR_MAX_DIM
    )
    """A dense query vector to search with instead of embedding ``query`` (e.g. a Rocchio
    vector); dense retrievers only, of the collection's embedding dimension (checked there)."""
    bm25_terms: dict[BM25Term, BM25Weight] | None = Field(
        default=None,
        min_length=1,
        max_length=BM25_TERMS_MAX,
        json_schema_extra={
            "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": NON_BLANK}
        },
    )
    """A weighted BM25 query (term -> weight > 0, e.g. RM3 expansion interpolated with the
    query) scored as sum_t weight_t * BM25(t, d) instead of ``query``; bm25 only."""
    text_k: Annotated[int, Field(ge=0), NotBool] | None = None
    """Text only for each list's first ``text_k`` hits (the rest: doc id, title, score, rank,
    passage, ``text: ""``), so a caller fusing ``k`` = 100 per retriever into a final 10 does
    not pay for 200 passages on the wire; default: every hit's text. The index service honours
    it; the fm and dsi services answer every text."""

    @field_validator("query_vector")
    @classmethod
    def _finite_vector(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(math.isfinite(x) for x in value):
            raise ValueError("query_vector must hold finite numbers")
        return value

    @field_validator("bm25_terms")
    @classmethod
    def _positive_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            for term, weight in value.items():
                if not term.strip() or len(term) > 64:
                    raise ValueError("bm25_terms keys are words of 1-64 characters")
                if not (math.isfinite(weight) and weight > 0):
                    raise ValueError("bm25_terms weights must be finite and > 0")
        return value


class PassageRef(BaseModel):
    doc_id: DocId
    passage: Annotated[int, Field(ge=0, le=100_000), NotBool] | None = None
    """Which of the document's passages (a hit's ``passage``); ``None``: the first."""


class PassageLookupRequest(BaseModel):
    """Passages by document and number: the texts of fused hits that every retriever's list
    ranked past the ``text_k`` it was asked with (``IndexClient.passage_texts``)."""

    passages: list[PassageRef] = Field(min_length=1)


class IndexSearchResponse(BaseModel):
    collection: str
    version: str
    results: dict[str, list[Hit]]
    timings_ms: dict[str, float]
    dense_backend: str | None = None
    """Which dense backend answered ``dense``: ``flat`` or e.g. ``ivfpq+exact``."""


class EmbedPassage(BaseModel):
    title: str = ""
    text: str = Field(max_length=20_000)
    doc_id: str | None = Field(default=None, min_length=1, max_length=512)
    """With the request's ``collection``: a passage of this document whose title and text are
    these gets its stored vector back, with no encoding (a hit the caller was shown)."""


class EmbedRequest(BaseModel):
    """Vectors the index's embedder gives a query and passages (passages embedded exactly as the
    index embeds its own, title prepended, so a hit's text gets its stored vector back)."""

    query: QueryText | None = None
    passages: list[EmbedPassage] = Field(default_factory=list, max_length=64)
    collection: CollectionName | None = None
    """Where the passages' ``doc_id`` s point (their stored vectors are read, not recomputed)."""


class EmbedResponse(BaseModel):
    model: str
    dim: int
    query_vector: list[float] | None
    passage_vectors: list[list[float]]


class UpsertRequest(BaseModel):
    documents: IdBatch[Document] = Field(min_length=1)


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
