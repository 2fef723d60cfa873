"""Settings for every Lodestar process, read from ``LODESTAR_*`` environment variables.

One class serves all services so that a deployment is configured in one place (a ``.env`` file or
the compose file); each field's docstring says what it trades off. ``Settings.check_production``
refuses to start with settings that are only safe on a developer's laptop.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICE_NAMES = (
    "orchestrator",
    "index",
    "fmindex",
    "dsi",
    "reranker",
    "rewriter",
    "critic",
    "generator",
)

#: The port each service listens on unless ``LODESTAR_<NAME>_PORT`` says otherwise.
DEFAULT_PORTS: dict[str, int] = {
    "orchestrator": 8000,
    "index": 8001,
    "fmindex": 8002,
    "dsi": 8003,
    "reranker": 8004,
    "rewriter": 8005,
    "critic": 8006,
    "generator": 8007,
}


def hash_api_key(key: str) -> str:
    """The form in which API keys are stored: a SHA-256 hex digest, never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LODESTAR_", env_file=".env", extra="ignore", use_attribute_docstrings=True
    )

    env: Literal["development", "production"] = "development"
    """`production` refuses unsafe defaults (no API keys, debug endpoints) at start-up."""

    data_dir: Path = Path("var")
    """Where collections, models, the SQLite store and the SQLite broker live. Shared by the index
    service and the workers (the worker writes index versions the service then serves)."""

    models_dir: Path | None = None
    """Converted model weights; defaults to ``<data_dir>/models``. Tests share one across runs."""

    host: str = "127.0.0.1"
    """Interface every service binds to; `0.0.0.0` in containers."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True
    """Structured (JSON) logs for machines; set false for human-readable lines."""

    # --- ports and URLs of the services -------------------------------------------------------
    orchestrator_port: int = DEFAULT_PORTS["orchestrator"]
    index_port: int = DEFAULT_PORTS["index"]
    fmindex_port: int = DEFAULT_PORTS["fmindex"]
    dsi_port: int = DEFAULT_PORTS["dsi"]
    reranker_port: int = DEFAULT_PORTS["reranker"]
    rewriter_port: int = DEFAULT_PORTS["rewriter"]
    critic_port: int = DEFAULT_PORTS["critic"]
    generator_port: int = DEFAULT_PORTS["generator"]
    index_url: str = f"http://127.0.0.1:{DEFAULT_PORTS['index']}"
    """Base URL the orchestrator uses to reach the index service."""
    reranker_url: str = f"http://127.0.0.1:{DEFAULT_PORTS['reranker']}"
    """Base URL the orchestrator uses to reach the reranker service (`/search` with `rerank`)."""
    fmindex_url: str = f"http://127.0.0.1:{DEFAULT_PORTS['fmindex']}"
    """Base URL of the SEAL fmindex service (the orchestrator's ``fm`` retriever)."""
    dsi_url: str = f"http://127.0.0.1:{DEFAULT_PORTS['dsi']}"
    """Base URL of the DSI++ service (the orchestrator's ``dsi`` retriever)."""
    critic_url: str = f"http://127.0.0.1:{DEFAULT_PORTS['critic']}"
    """Base URL of the SIM-RAG critic service (multi-round ``/answer``)."""
    generator_url: str = ""
    """Base URL of an OpenAI-compatible chat server (the ``generator`` service, or ``vllm serve``;
    without ``/v1``) that ``/answer`` generation goes through. Empty runs the same model inside the
    calling process: no extra process, but one generation at a time and no batching."""
    generator_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Model name sent to ``generator_url`` (``vllm serve`` serves the name it was started with)."""
    generator_timeout_s: float = 120.0
    """Timeout of one generation call (capped by the request deadline); a slow or down generator
    makes ``/answer`` answer 424 ``dependency_failed`` (docs/generator.md)."""

    # --- security and limits ------------------------------------------------------------------
    api_key_hashes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated SHA-256 digests of accepted **admin** API keys (`lodestar hash-key KEY`):
    every operation, writes, deletes, jobs and model updates included. Empty (and no read keys)
    means no authentication, which production refuses. The service key's digest belongs here on
    every service: the orchestrator writes to the index with it."""

    read_api_key_hashes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated SHA-256 digests of **read-only** API keys: `/search`, `/answer`,
    `/feedback`, `/traces` and every GET; writes, deletes and jobs answer 403 `forbidden`."""

    service_api_key: str | None = None
    """The key this process presents to other Lodestar services when they require one (an admin
    key; it is not rate-limited by the services that accept it)."""

    rate_limit_per_s: Annotated[float, Field(ge=0)] = 0.0
    """Requests per second each API key may make to one process (a token bucket); past it, 429
    `overloaded` with Retry-After. 0 means no per-key limit. Per process: N replicas admit N
    times as much. The concurrency limit (`max_concurrency`) applies either way."""

    rate_limit_burst: Annotated[int, Field(ge=0)] = 0
    """Requests a key may make at once before `rate_limit_per_s` paces it; 0 means
    max(1, 2 x rate_limit_per_s). Larger absorbs bursts, smaller enforces the rate sooner."""

    protect_docs: bool = False
    """Also require a key (read-only suffices) for `/metrics`, `/docs`, `/redoc` and
    `/openapi.json` when keys are configured; `/healthz` and `/readyz` stay open for probes."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (413 beyond). Bounds memory per request."""

    max_k: int = 1000
    """Largest `k` any endpoint accepts. CompactDS re-scores ~1000 candidates, so 1000 suffices."""

    max_query_chars: int = 2000
    """Longest query or question accepted (422 beyond); long prompts cost LLM time linearly."""

    max_concurrency: int = 16
    """Requests in flight per process before new ones get an immediate 429 with Retry-After,
    instead of queueing without bound and timing out later."""

    request_timeout_s: float = 60.0
    """Wall-clock budget of one request; also the deadline propagated to downstream services."""

    downstream_timeout_s: float = 10.0
    """Timeout of one inter-service call (capped by the remaining request deadline)."""

    # --- storage and jobs ---------------------------------------------------------------------
    database_url: str | None = None
    """SQLAlchemy URL of the trace and feedback store; empty means SQLite in WAL mode under
    data_dir. PostgreSQL: `postgresql+psycopg://user@host/db`."""

    broker_url: str | None = None
    """Celery broker. Empty means a serverless SQLite broker under data_dir, so the same worker
    code runs on a laptop without Redis. Production: `redis://host:6379/0`."""

    result_backend: str | None = None
    """Celery result backend; empty means the broker's Redis, or SQLite when the broker is SQLite."""

    inline_ingest_max_docs: int = 64
    """Upserts of at most this many documents are indexed inside the request; larger batches run
    as a background job (202 + job id) so a request never holds a connection for minutes."""

    # --- models and retrieval -----------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when torch sees a GPU; results are the same on either."""

    embed_batch_size: int = 64
    """Passages embedded per forward pass; larger is faster until memory runs out."""

    query_encoder: Literal["onnx", "onnx-int8", "torch"] = "onnx"
    """How queries are embedded: `onnx` runs MiniLM exported once to `<models_dir>/minilm-onnx`
    by ONNX Runtime (same vectors as fp32, ~3x cheaper per query on one thread); `torch` is
    sentence-transformers fp32 (the reference, and the fallback if the export fails);
    `onnx-int8` is dynamic int8, faster but not within 0.005 nDCG@10 (docs/search-performance.md)."""

    query_encoder_threads: int = 1
    """ONNX Runtime threads per query; one, because concurrent queries already use the cores."""

    passage_words: int = 256
    """Chunk size in whitespace words (CompactDS uses 256, title prepended)."""

    index_ann_backend: Literal["flat", "ivfpq", "faiss_hnsw", "hnswlib"] = "ivfpq"
    """Default dense backend of new collections (each collection records its own in its manifest):
    an ANN index proposes `index_candidates` passages that are re-scored exactly from the on-disk
    vectors. `flat` searches every vector exactly (slower past ~100k passages, perfect recall).
    IVF-PQ keeps only ~1/27 of the fp32 matrix in RAM (HNSW keeps all of it); see
    `lodestar bench index` (docs/index.md) for the measured trade-offs."""

    index_ann_min_passages: int = 20000
    """Collections smaller than this stay flat. Measured on the 10k wiki collection: exact search
    takes ~2.5 ms per query on one core at recall 1.0, the best ANN ~0.7 ms at recall 0.99; the
    saving is below the query-embedding time, so an index would cost build time for nothing."""

    index_candidates: int = 1000
    """K, passages re-scored exactly per query (CompactDS: 1000). Larger raises recall and latency
    (reads K·1.5 KB from the vector file)."""

    index_max_candidates: int = 10000
    """Largest K a request may ask for (422 beyond); bounds per-request I/O."""

    index_merge_fraction: Annotated[float, Field(gt=0)] = 0.2
    """A merge (ANN rebuild over every live row) is scheduled on the CPU queue once the fresh
    segment (rows searched exactly beside the ANN index) plus tombstones exceed this fraction of
    the rows the ANN index holds: the fresh segment costs exact-search time per query, and
    tombstoned rows take candidate slots."""

    index_nprobe: int = 256
    """IVF lists visited per query (faiss's default of 1 gives poor recall); more = slower, better.
    Chosen by ``lodestar bench index`` (docs/index.md): with K = 1000 re-scored exactly, 256 gave
    recall@10 0.9925 at both 100k (nlist 1265) and 1M (nlist 4000) and 1.0 on the real wiki
    vectors, 64 gave 0.969-0.976; CompactDS's 128 sits between."""

    index_ef_search: int = 128
    """HNSW search breadth (hnswlib's default of 10 gives poor recall); the search uses
    max(ef_search, K)."""

    rrf_k: int = 60
    """Reciprocal-rank-fusion constant: larger flattens the advantage of the very top ranks."""

    rerank_depth: Annotated[int, Field(ge=1, le=200)] = 20
    """How many fused first-stage candidates `/search` sends to the reranker (then keeps k).
    ICR's cost grows linearly with it (one prompt holds them all); RankGPT's even faster."""

    rerank_timeout_s: float = 60.0
    """Timeout of one reranker call; past it `/search` returns the first-stage order and lists
    `reranker` in `degraded`. An LLM reranker on two cores needs tens of seconds for 20 docs."""

    rerank_max_doc_tokens: Annotated[int, Field(ge=8)] = 160
    """Tokens kept per document in ICR and RankGPT prompts (the head of the text). The paper
    keeps ~300 words; shorter prompts are linearly cheaper and lose the documents' tails."""

    rerank_max_prompt_tokens: Annotated[int, Field(ge=256)] = 4096
    """Whole ICR prompt budget; more documents than fit are cut to an equal per-document share
    (413 when even 8 tokens each do not fit). SmolLM2 was trained on 8k-token contexts."""

    rerank_max_documents: Annotated[int, Field(ge=1)] = 100
    """Most documents one `/rerank` request may carry (413 beyond)."""

    answer_max_new_tokens: int = 64
    """Longest generated answer; SmolLM2 on two cores writes ~20-30 tokens/s."""

    generator_batch_window_ms: Annotated[float, Field(ge=0, le=1000)] = 20.0
    """How long the generator service waits after a request for others to batch with it (and
    after each that joins, up to four windows): longer batches more concurrent requests, and adds
    that much latency to a lone one (20 ms is ~2% of a 32-token answer on two cores). 8 ms
    batched 4 simultaneous requests only in pairs on the loaded 2-core machine."""
    generator_max_batch: Annotated[int, Field(ge=1, le=256)] = 8
    """Most requests in one batched ``generate``; a step's cost grows with it on the CPU."""
    generator_batch_tokens: Annotated[int, Field(ge=64)] = 16384
    """Token budget of one batch: rows x (longest prompt + most new tokens), the padded size
    the KV cache holds. Bounds memory; a request that alone exceeds it runs alone."""
    generator_max_tokens: Annotated[int, Field(ge=1)] = 1024
    """Largest ``max_tokens`` a chat completion may ask for (422 beyond)."""
    generator_max_prompt_tokens: Annotated[int, Field(ge=16)] = 6144
    """Longest chat prompt in tokens (413 beyond); SmolLM2 was trained on 8k-token contexts."""

    shadow_agent: Literal["auto", "llm", "cross-encoder", "both"] = "auto"
    """The shadow user agent (``services.orchestrator.shadow``) when a request names none:
    ``auto`` = the published cross-encoder for documents and the LLM for answers, or the LLM
    alone while no cross-encoder is published; ``both`` averages the two on documents."""
    shadow_top_k: Annotated[int, Field(ge=1, le=50)] = 10
    """Documents of a trace's last ranking a shadow user judges (one LLM pass each)."""
    shadow_llm_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """P(yes) at or above which the LLM agent says relevant: higher, fewer but surer labels."""
    shadow_ce_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """sigmoid(cross-encoder logit) at or above which the cross-encoder agent says relevant."""
    shadow_max_relevant: Annotated[int, Field(ge=1, le=50)] | None = None
    """At most this many relevant labels per trace from the cross-encoder agent (its most
    probable documents above the threshold); unset: the threshold alone."""
    shadow_weight: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Training weight of shadow feedback per unit of confidence (user feedback weighs 1)."""

    @field_validator("api_key_hashes", "read_api_key_hashes", mode="before")
    @classmethod
    def _split_hashes(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key_hashes", "read_api_key_hashes")
    @classmethod
    def _hashes_are_sha256(cls, value: list[str]) -> list[str]:
        for digest in value:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    "api_key_hashes holds SHA-256 hex digests (lodestar hash-key KEY), not keys"
                )
        return value

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.env == "production" and not self.api_key_hashes:
            raise ValueError(
                "LODESTAR_ENV=production requires LODESTAR_API_KEY_HASHES: "
                "refusing to serve without authentication"
            )
        if (
            self.env == "production"
            and self.service_api_key
            and hash_api_key(self.service_api_key) not in self.api_key_hashes
        ):
            raise ValueError(
                "LODESTAR_SERVICE_API_KEY is not an admin key (its digest is not in "
                "LODESTAR_API_KEY_HASHES): the other services would refuse this one's calls"
            )
        if self.max_k < 1 or self.max_concurrency < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_k and max_concurrency must be >= 1, max_body_bytes >= 1024")
        return self

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    def port_of(self, service: str) -> int:
        if service not in SERVICE_NAMES:
            raise KeyError(f"unknown service {service!r}")
        return int(getattr(self, f"{service}_port"))


#: Where file secrets are read from: compose ``secrets:`` and Kubernetes Secret volumes mount
#: them at /run/secrets. A file named like the variable in lower case
#: (``lodestar_service_api_key``) sets that field; an environment variable of the same name wins.
SECRETS_DIR_ENV = "LODESTAR_SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/run/secrets")


def load_settings() -> Settings:
    """Settings from the environment, ``.env`` and (when the folder exists) file secrets."""
    secrets = Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)
    return Settings(_secrets_dir=secrets) if secrets.is_dir() else Settings()  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
