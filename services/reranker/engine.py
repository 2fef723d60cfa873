"""The reranker engine: ICR and its baselines behind one ``rerank`` call, no FastAPI.

Methods (:data:`METHODS`):

- ``icr``: in-context re-ranking from attention (:mod:`services.reranker.icr`), 2 forward passes
  whatever the number of documents;
- ``rankgpt``: RankGPT-style listwise re-ranking by generation with the same LLM: the model
  writes a permutation ``[3] > [1] > ...`` (one forward pass per generated token), parsed
  robustly; ids it forgets keep their input order after the ones it ranked. More documents than
  the window are ranked with RankGPT's sliding window, from the back of the list to the front;
- ``cosine``: bi-encoder cosine between the query and each document (MiniLM);
- ``cross-encoder``: the cross-encoder CAR trains (:mod:`services.reranker.cross_encoder`),
  the published ``CURRENT`` version, reloaded when a new one is published; 503 until one is.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.reranker.cross_encoder import CurrentCrossEncoder, TrainedCrossEncoder
from services.reranker.icr import (
    ICRInputError,
    ICROptions,
    ICRScorer,
    document_text,
    truncate_tokens,
)
from shared.clients import RERANK_METHODS, RerankRequest, RerankResponse, RerankResult
from shared.errors import ErrorCode, LodestarError
from shared.settings import Settings

METHODS = RERANK_METHODS

RANKGPT_SYSTEM = (
    "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy "
    "to the query."
)
_ID_RE = re.compile(r"\[?\s*(\d{1,3})\s*\]?")


@dataclass(frozen=True)
class RerankDocument:
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class RankGPTOptions:
    window_size: int = 20
    step: int = 10
    max_doc_tokens: int = 160
    max_new_tokens: int | None = None
    """Default: enough for every id of a window (≈ 5 tokens per ``[12] > ``)."""


@dataclass
class RerankOutcome:
    """Scores per input document (higher first) and what they cost."""

    method: str
    scores: list[float]
    forward_passes: int
    prompt_tokens: int
    timings_ms: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[int]:
        """Input indices, best first; ties keep the input (first-stage) order."""
        return sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))


class TextEmbedder(Protocol):
    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray: ...


class ChatLM(Protocol):
    """What RankGPT needs of ``shared.models.Generator``."""

    model_id: str
    tokenizer: Any
    model: Any

    def generate(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Any: ...


# --- RankGPT ---------------------------------------------------------------------------------


def rankgpt_messages(query: str, passages: Sequence[str]) -> list[dict[str, str]]:
    """RankGPT's conversation: the passages as turns, then the ranking request."""
    n = len(passages)
    messages = [
        {"role": "system", "content": RANKGPT_SYSTEM},
        {
            "role": "user",
            "content": f"I will provide you with {n} passages, each indicated by number "
            f"identifier []. \nRank the passages based on their relevance to query: {query}.",
        },
        {"role": "assistant", "content": "Okay, please provide the passages."},
    ]
    for i, passage in enumerate(passages, start=1):
        messages.append({"role": "user", "content": f"[{i}] {passage}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    messages.append(
        {
            "role": "user",
            "content": f"Search Query: {query}. \nRank the {n} passages above based on their "
            "relevance to the search query. The passages should be listed in descending order "
            "using identifiers. The most relevant passages should be listed first. The output "
            "format should be [] > [], e.g., [1] > [2]. Only respond with the ranking results, "
            "do not say any word or explain.",
        }
    )
    return messages


def parse_permutation(text: str, n: int) -> tuple[list[int], int]:
    """0-based order from a generated ``[3] > [1] > ...``: ids out of range and repeats are
    dropped, missing ids follow in input order. Returns (order, how many ids the model gave)."""
    seen: list[int] = []
    for match in _ID_RE.finditer(text):
        value = int(match.group(1)) - 1
        if 0 <= value < n and value not in seen:
            seen.append(value)
    given = len(seen)
    seen.extend(i for i in range(n) if i not in seen)
    return seen, given


def sliding_windows(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """RankGPT's windows, from the back of the list to the front: [(start, end), ...]."""
    if n <= window:
        return [(0, n)]
    windows = []
    end = n
    while True:
        start = max(0, end - window)
        windows.append((start, end))
        if start == 0:
            return windows
        end -= step


class RankGPTRanker:
    def __init__(self, lm: ChatLM) -> None:
        self.lm = lm

    def rerank(self, query: str, passages: Sequence[str], options: RankGPTOptions) -> RerankOutcome:
        texts = [truncate_tokens(self.lm.tokenizer, p, options.max_doc_tokens)[0] for p in passages]
        order = list(range(len(texts)))
        passes = prompt_tokens = 0
        given_total = 0
        raw: list[str] = []
        started = time.perf_counter()
        for start, end in sliding_windows(len(texts), options.window_size, options.step):
            window = order[start:end]
            max_new = options.max_new_tokens or 5 * len(window) + 4
            generation = self.lm.generate(
                rankgpt_messages(query, [texts[i] for i in window]), max_new_tokens=max_new
            )
            permutation, given = parse_permutation(generation.text, len(window))
            order[start:end] = [window[i] for i in permutation]
            passes += max(1, int(generation.new_tokens))  # prefill + one pass per further token
            prompt_tokens += int(generation.prompt_tokens)
            given_total += given
            raw.append(generation.text)
        elapsed = (time.perf_counter() - started) * 1000
        n = len(order)
        scores = [0.0] * n
        for rank, index in enumerate(order):
            scores[index] = float(n - rank)
        return RerankOutcome(
            method="rankgpt",
            scores=scores,
            forward_passes=passes,
            prompt_tokens=prompt_tokens,
            timings_ms={"generate": elapsed},
            details={
                "model": self.lm.model_id,
                "windows": len(raw),
                "ids_generated": given_total,
                "raw": raw,
            },
        )


# --- the engine ------------------------------------------------------------------------------


class RerankerEngine:
    """Lazy models (the LLM for ICR and RankGPT, MiniLM for cosine) and one ``rerank`` entry."""

    def __init__(
        self,
        lm_factory: Callable[[], ChatLM],
        embedder_factory: Callable[[], TextEmbedder],
        *,
        max_doc_tokens: int = 160,
        max_prompt_tokens: int = 4096,
        cross_encoder: Callable[[], TrainedCrossEncoder] | None = None,
    ) -> None:
        self._lm_factory = lm_factory
        self._embedder_factory = embedder_factory
        self._cross_encoder = cross_encoder
        self.max_doc_tokens = max_doc_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._icr: ICRScorer | None = None
        self._lock = threading.Lock()
        # ICR hooks the LLM's attention modules: never let RankGPT generate on it meanwhile.
        self._llm_lock = threading.Lock()

    @property
    def cross_encoder_trained(self) -> bool:
        if self._cross_encoder is None:
            return False
        try:
            self._cross_encoder()
        except LodestarError:
            return False
        return True

    @property
    def lm(self) -> ChatLM:
        return self._lm_factory()

    @property
    def icr(self) -> ICRScorer:
        with self._lock:
            if self._icr is None:
                lm = self.lm
                self._icr = ICRScorer(lm.model, lm.tokenizer)
            return self._icr

    def icr_options(self, overrides: dict[str, Any] | None = None) -> ICROptions:
        values: dict[str, Any] = {
            "max_doc_tokens": self.max_doc_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
        }
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return ICROptions(**values)

    def rerank(
        self,
        query: str,
        documents: Sequence[RerankDocument],
        method: str,
        options: dict[str, Any] | None = None,
    ) -> RerankOutcome:
        if method not in METHODS:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown method {method!r}; available: {', '.join(METHODS)}",
                field="method",
            )
        texts = [document_text(d.title, d.text) for d in documents]
        options = options or {}
        if method == "icr":
            with self._llm_lock:
                return self._icr_rerank(query, texts, options)
        if method == "rankgpt":
            rank_options = RankGPTOptions(
                window_size=int(options.get("window_size") or 20),
                step=int(options.get("step") or 10),
                max_doc_tokens=int(options.get("max_doc_tokens") or self.max_doc_tokens),
            )
            if rank_options.step < 1 or rank_options.step > rank_options.window_size:
                raise LodestarError(
                    ErrorCode.validation, "step must be in [1, window_size]", field="options.step"
                )
            with self._llm_lock:
                return RankGPTRanker(self.lm).rerank(query, texts, rank_options)
        if method == "cross-encoder":
            return self._cross_encode(query, texts)
        return self._cosine(query, texts)

    def _cross_encode(self, query: str, texts: list[str]) -> RerankOutcome:
        if self._cross_encoder is None:
            raise LodestarError(
                ErrorCode.unavailable, "this reranker has no cross-encoder configured"
            )
        model = self._cross_encoder()  # raises 503 while none is published
        started = time.perf_counter()
        scores = model.score(query, texts)
        return RerankOutcome(
            method="cross-encoder",
            scores=scores,
            forward_passes=-(-len(texts) // 32),
            prompt_tokens=0,
            timings_ms={"score": (time.perf_counter() - started) * 1000},
            details={"model": model.model_id, "max_length": model.max_length},
        )

    def _icr_rerank(self, query: str, texts: list[str], options: dict[str, Any]) -> RerankOutcome:
        icr_options = self.icr_options(
            {k: options.get(k) for k in ICROptions.__dataclass_fields__ if k in options}
        )
        try:
            result = self.icr.score(query, texts, icr_options)
        except ICRInputError as exc:
            raise LodestarError(ErrorCode.too_large, str(exc), field="documents") from exc
        return RerankOutcome(
            method="icr",
            scores=result.scores,
            forward_passes=result.forward_passes,
            prompt_tokens=len(result.prompt.input_ids),
            timings_ms=result.timings_ms,
            details={
                "model": self.lm.model_id,
                "computed_tokens": result.computed_tokens,
                "doc_token_budget": result.prompt.doc_budget,
                "truncated_documents": result.prompt.truncated,
            },
        )

    def _cosine(self, query: str, texts: list[str]) -> RerankOutcome:
        started = time.perf_counter()
        embedder = self._embedder_factory()
        vectors = embedder.encode([query, *texts])
        scores = (vectors[1:] @ vectors[0]).astype(float).tolist()
        return RerankOutcome(
            method="cosine",
            scores=scores,
            forward_passes=1,
            prompt_tokens=0,
            timings_ms={"embed": (time.perf_counter() - started) * 1000},
            details={"model": str(getattr(embedder, "model_id", "bi-encoder"))},
        )


def rerank_engine_from_settings(settings: Settings) -> RerankerEngine:
    """The engine as the reranker service configures it (shared models, token budgets)."""
    from shared.models import get_embedder, get_generator

    return RerankerEngine(
        lambda: get_generator(settings),
        lambda: get_embedder(settings),
        max_doc_tokens=settings.rerank_max_doc_tokens,
        max_prompt_tokens=settings.rerank_max_prompt_tokens,
        cross_encoder=CurrentCrossEncoder(settings).get,
    )


def rerank_response(documents: Sequence[RerankDocument], outcome: RerankOutcome) -> RerankResponse:
    """The service's wire response: documents in re-ranked order with 1-based ranks."""
    results = [
        RerankResult(doc_id=documents[i].doc_id, score=round(outcome.scores[i], 6), rank=rank)
        for rank, i in enumerate(outcome.ranking(), start=1)
    ]
    return RerankResponse(
        results=results,
        method=outcome.method,
        timings_ms={k: round(v, 2) for k, v in outcome.timings_ms.items()},
        forward_passes=outcome.forward_passes,
        prompt_tokens=outcome.prompt_tokens,
        details={k: v for k, v in outcome.details.items() if k != "raw"},
    )


class InProcessReranker:
    """The reranker service without HTTP, for the orchestrator's pipeline in the evaluation
    harness: same engine, same request and response models."""

    def __init__(self, engine: RerankerEngine) -> None:
        self.engine = engine

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        documents = [RerankDocument(d.doc_id, d.title, d.text) for d in request.documents]
        options = request.options.model_dump(exclude_none=True)
        outcome = await asyncio.to_thread(
            self.engine.rerank, request.query, documents, request.method, options
        )
        return rerank_response(documents, outcome)
