"""The orchestrator's pipelines: first-stage retrieval with fusion, and answering from passages.

Plain Python over async clients, so the same code runs behind the API, in the evaluation
harness and in tests. Every stage appends a ``StageRun`` to the trace with stable target ids
(documents, the answer, citations) that feedback can point at.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from shared.clients import (
    DependencyError,
    JudgeRequest,
    JudgeResponse,
    RerankDocumentIn,
    RerankRequest,
    RerankResponse,
)
from shared.errors import ErrorCode, LodestarError
from shared.models import Generation
from shared.schemas import Hit, IndexSearchRequest, IndexSearchResponse, SourceRank
from shared.store import StageRun, Trace

#: First-stage retrievers served by the index service.
INDEX_RETRIEVERS = ("dense", "bm25")
#: How deep each retriever's list is before fusion: RRF needs more than k to work with.
FUSION_DEPTH = 100
#: Methods of the reranker service ``/search`` accepts as ``rerank`` (``cross-encoder`` answers
#: 422 "not trained yet" until CAR trains it).
RERANKERS: tuple[str, ...] = ("icr", "rankgpt", "cosine", "cross-encoder")
#: Fused candidates sent to the reranker by default (ICR's multi-hop setting: top 20).
RERANK_DEPTH = 20


class IndexSearcher(Protocol):
    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse: ...


class Reranker(Protocol):
    async def rerank(self, request: RerankRequest) -> RerankResponse: ...


class ChatGenerator(Protocol):
    model_id: str

    def generate(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Generation: ...

    def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Iterator[str | Generation]: ...


def reciprocal_rank_fusion(ranked_lists: dict[str, list[Hit]], rrf_k: int, k: int) -> list[Hit]:
    """RRF (Cormack et al. 2009): score(d) = Σ_r 1 / (rrf_k + rank_r(d)), ranks 1-based.

    Ties break by the best single rank, then by doc id, so the order is deterministic.
    """
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for retriever, hits in ranked_lists.items():
        for rank, hit in enumerate(hits, start=1):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1.0 / (rrf_k + rank)
            best_rank[hit.doc_id] = min(best_rank.get(hit.doc_id, rank), rank)
            entry = fused.get(hit.doc_id)
            if entry is None:
                entry = fused[hit.doc_id] = Hit(
                    doc_id=hit.doc_id, title=hit.title, text=hit.text, score=0.0
                )
            entry.sources[retriever] = SourceRank(rank=rank, score=hit.score)
    order = sorted(fused, key=lambda d: (-scores[d], best_rank[d], d))[:k]
    return [fused[d].model_copy(update={"score": scores[d]}) for d in order]


def _doc_targets(hits: Sequence[Hit]) -> list[dict[str, str]]:
    return [{"type": "doc", "id": hit.doc_id} for hit in hits]


@dataclass
class SearchOutcome:
    hits: list[Hit]
    timings_ms: dict[str, float]
    degraded: list[str] = field(default_factory=list)


#: The model behind each retriever's list, recorded in its trace stage.
RETRIEVER_MODELS = {"dense": "sentence-transformers/all-MiniLM-L6-v2", "bm25": "bm25"}


class SearchPipeline:
    """Retrieve with the index service and any external retrievers, fuse with RRF, re-rank.

    ``external`` maps a retriever name (``fm``, ``dsi``) to the client of the service that
    serves it; those services answer the index service's ``/search`` contract. A failing
    external retriever is listed in ``degraded`` while the others still answer.
    """

    def __init__(
        self,
        index: IndexSearcher,
        rrf_k: int = 60,
        *,
        reranker: Reranker | None = None,
        rerank_depth: int = RERANK_DEPTH,
        external: Mapping[str, IndexSearcher] | None = None,
    ) -> None:
        self.index = index
        self.rrf_k = rrf_k
        self.reranker = reranker
        self.rerank_depth = rerank_depth
        self.external = dict(external or {})

    @property
    def retrievers(self) -> tuple[str, ...]:
        return INDEX_RETRIEVERS + tuple(self.external)

    async def _retrieve(
        self, collection: str, query: str, depth: int, retrievers: Sequence[str]
    ) -> tuple[list[tuple[str, IndexSearchResponse]], list[str]]:
        """Ask the index service and each external retriever concurrently; name who answered."""
        calls: list[tuple[str, IndexSearcher, list[str]]] = []
        on_index = [r for r in retrievers if r in INDEX_RETRIEVERS]
        if on_index:
            calls.append(("index", self.index, on_index))
        calls.extend((r, self.external[r], [r]) for r in retrievers if r in self.external)
        outcomes = await asyncio.gather(
            *(
                searcher.search(
                    IndexSearchRequest(
                        collection=collection, query=query, k=depth, retrievers=names
                    )
                )
                for _, searcher, names in calls
            ),
            return_exceptions=True,
        )
        responses: list[tuple[str, IndexSearchResponse]] = []
        degraded: list[str] = []
        failures: list[str] = []
        for (service, _, _), outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, DependencyError):
                degraded.append(service)
                failures.append(outcome.message)
            elif isinstance(outcome, BaseException):
                raise outcome  # the caller's error (unknown collection, bad input): pass it on
            else:
                responses.append((service, outcome))
        if not responses:
            raise LodestarError(
                ErrorCode.dependency_failed, f"no retriever answered: {'; '.join(failures)}"
            )
        return responses, degraded

    async def run(
        self,
        trace: Trace,
        *,
        query: str,
        collection: str,
        k: int,
        retrievers: Sequence[str],
        rerank: str | None = None,
    ) -> SearchOutcome:
        unknown = [r for r in retrievers if r not in self.retrievers]
        if unknown:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown retriever {unknown[0]!r}; available: {', '.join(self.retrievers)}",
                field="retrievers",
            )
        if rerank is not None and rerank not in RERANKERS:
            raise LodestarError(
                ErrorCode.validation,
                f"unknown reranker {rerank!r}; available: {', '.join(RERANKERS) or 'none yet'}",
                field="rerank",
            )
        timings: dict[str, float] = {}
        depth = max(k, FUSION_DEPTH) if len(retrievers) > 1 else k
        # Rerank the fused pool, not the first k: reranking after truncation wastes its cost.
        pool = max(k, self.rerank_depth) if rerank is not None else k
        depth = max(depth, pool)
        started = time.perf_counter()
        responses, degraded = await self._retrieve(
            collection, query, depth, list(dict.fromkeys(retrievers))
        )
        timings["retrieve"] = (time.perf_counter() - started) * 1000
        results: dict[str, list[Hit]] = {}
        for service, response in responses:
            results.update(response.results)
            for name, value in response.timings_ms.items():
                timings[f"{service}.{name}"] = value
            for retriever, hits in response.results.items():
                trace.stages.append(
                    StageRun(
                        stage="retrieve",
                        inputs={"query": query, "k": depth},
                        outputs={
                            "hits": [
                                {"doc_id": h.doc_id, "rank": i, "score": h.score}
                                for i, h in enumerate(hits, 1)
                            ]
                        },
                        targets=_doc_targets(hits),
                        model_id=RETRIEVER_MODELS.get(retriever, retriever),
                        params={
                            "retriever": retriever,
                            "collection": collection,
                            "version": response.version,
                        },
                        latency_ms=response.timings_ms.get(retriever, 0.0),
                    )
                )
        started = time.perf_counter()
        if len(results) == 1:
            (only,) = results.values()
            hits = only[:pool]
        else:
            hits = reciprocal_rank_fusion(results, self.rrf_k, pool)
        timings["fusion"] = (time.perf_counter() - started) * 1000
        trace.stages.append(
            StageRun(
                stage="fusion",
                inputs={"retrievers": list(results), "k": k},
                outputs={
                    "hits": [
                        {"doc_id": h.doc_id, "rank": i, "score": h.score}
                        for i, h in enumerate(hits, 1)
                    ]
                },
                targets=_doc_targets(hits),
                params={
                    "method": "rrf" if len(results) > 1 else "none",
                    "rrf_k": self.rrf_k,
                },
                latency_ms=timings["fusion"],
            )
        )
        if rerank is not None:
            hits = await self._rerank(trace, query, rerank, hits, timings, degraded)
        return SearchOutcome(hits=hits[:k], timings_ms=timings, degraded=degraded)

    async def _rerank(
        self,
        trace: Trace,
        query: str,
        method: str,
        hits: list[Hit],
        timings: dict[str, float],
        degraded: list[str],
    ) -> list[Hit]:
        """The top ``rerank_depth`` hits in the reranker's order, then the rest; on a reranker
        failure the first-stage order, with ``reranker`` in ``degraded``."""
        candidates, rest = hits[: self.rerank_depth], hits[self.rerank_depth :]
        if not candidates:
            return hits
        started = time.perf_counter()
        request = RerankRequest(
            query=query,
            method=method,  # type: ignore[arg-type]  # checked against RERANKERS above
            documents=[
                RerankDocumentIn(doc_id=h.doc_id, title=h.title, text=h.text) for h in candidates
            ],
        )
        stage = StageRun(
            stage="rerank",
            inputs={"query": query, "doc_ids": [h.doc_id for h in candidates]},
            outputs={},
            targets=_doc_targets(candidates),
            params={"method": method, "depth": self.rerank_depth},
        )
        try:
            if self.reranker is None:
                raise DependencyError("reranker", "no reranker client is configured")
            response = await self.reranker.rerank(request)
        except DependencyError as exc:
            degraded.append("reranker")
            timings["rerank"] = (time.perf_counter() - started) * 1000
            stage.outputs = {"error": exc.message, "fallback": "first_stage_order"}
            stage.latency_ms = timings["rerank"]
            trace.stages.append(stage)
            return hits
        timings["rerank"] = (time.perf_counter() - started) * 1000
        by_id = {h.doc_id: h for h in candidates}
        reranked = []
        for result in response.results:
            hit = by_id.pop(result.doc_id, None)
            if hit is not None:
                sources = {
                    **hit.sources,
                    "rerank": SourceRank(rank=result.rank, score=result.score),
                }
                reranked.append(hit.model_copy(update={"score": result.score, "sources": sources}))
        # Any candidate the reranker did not return keeps its first-stage order after the others.
        reranked += [h for h in candidates if h.doc_id in by_id]
        stage.outputs = {
            "hits": [
                {"doc_id": h.doc_id, "rank": i, "score": h.score} for i, h in enumerate(reranked, 1)
            ],
            "forward_passes": response.forward_passes,
            "prompt_tokens": response.prompt_tokens,
        }
        stage.targets = _doc_targets(reranked)
        stage.model_id = str(response.details.get("model") or method)
        stage.latency_ms = timings["rerank"]
        trace.stages.append(stage)
        return reranked + rest


# --- answering -----------------------------------------------------------------------------------

ANSWER_SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages you are given. "
    "Reply with the shortest possible answer (a name, a number or a short phrase), "
    "followed by the number of the passage that supports it in brackets, like: Paris [2]."
)
_CITATION_RE = re.compile(r"\[(\d{1,2})\]")
_WORD_RE = re.compile(r"\w+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "is",
        "was",
        "by",
        "for",
        "and",
        "or",
        "with",
        "as",
        "from",
        "it",
        "its",
        "this",
        "that",
        "be",
        "are",
        "were",
    ]
)


def build_answer_messages(
    question: str, hits: Sequence[Hit], passage_chars: int = 1200
) -> list[dict[str, str]]:
    passages = "\n\n".join(
        f"[{i}] {hit.title}: {hit.text[:passage_chars]}" for i, hit in enumerate(hits, start=1)
    )
    user = f"Passages:\n{passages}\n\nQuestion: {question}\nAnswer:"
    return [{"role": "system", "content": ANSWER_SYSTEM_PROMPT}, {"role": "user", "content": user}]


_ANSWER_PREFIX_RE = re.compile(
    r"^(the\s+)?(short\s+|final\s+)?answer\b\s*(is\b)?\s*[:\-]?\s*", re.IGNORECASE
)


def build_closed_book_messages(question: str) -> list[dict[str, str]]:
    """The prompt for answering without retrieval (the "no retrieval" baseline of RAG
    evaluations): the same answer format as :func:`build_answer_messages`, no passages."""
    system = (
        "You answer questions from your own knowledge. "
        "Reply with the shortest possible answer (a name, a number or a short phrase), "
        "with no explanation."
    )
    user = f"Question: {question}\nAnswer:"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def clean_answer(raw: str) -> str:
    """The answer without citation markers or a leading "The answer is:", cut at the first line."""
    first_line = raw.strip().splitlines()[0] if raw.strip() else ""
    text = _CITATION_RE.sub("", first_line).strip()
    return _ANSWER_PREFIX_RE.sub("", text).strip().rstrip(".").strip()


def choose_citations(raw_answer: str, hits: Sequence[Hit]) -> tuple[list[Hit], str]:
    """Citations the model wrote as [n]; failing that, the passages that contain the answer's
    content words (a 135M model often omits markers); failing that, the top passage.
    Returns the cited hits and which rule chose them, which the trace records."""
    marked = []
    for match in _CITATION_RE.finditer(raw_answer):
        index = int(match.group(1)) - 1
        if 0 <= index < len(hits) and hits[index] not in marked:
            marked.append(hits[index])
    if marked:
        return marked, "marker"
    words = {w for w in _WORD_RE.findall(clean_answer(raw_answer).lower()) if w not in _STOP}
    if words:
        overlapping = [
            hit for hit in hits if words & set(_WORD_RE.findall(f"{hit.title} {hit.text}".lower()))
        ]
        if overlapping:
            return overlapping[:2], "overlap"
    return list(hits[:1]), "top_passage"


@dataclass
class AnswerOutcome:
    answer: str
    raw_answer: str
    citations: list[Hit]
    hits: list[Hit]
    timings_ms: dict[str, float]
    degraded: list[str]
    generation: Generation


def generation_stage(
    model_id: str,
    question: str,
    hits: Sequence[Hit],
    generation: Generation,
    citations: Sequence[Hit],
    citation_rule: str,
    max_new_tokens: int,
) -> StageRun:
    return StageRun(
        stage="generate",
        inputs={"question": question, "doc_ids": [h.doc_id for h in hits]},
        outputs={
            "answer": clean_answer(generation.text),
            "raw": generation.text,
            "citations": [h.doc_id for h in citations],
            "citation_rule": citation_rule,
            "prompt_tokens": generation.prompt_tokens,
            "new_tokens": generation.new_tokens,
        },
        targets=[{"type": "answer", "id": "answer"}]
        + [{"type": "citation", "id": h.doc_id} for h in citations],
        model_id=model_id,
        params={"max_new_tokens": max_new_tokens, "temperature": 0.0},
        latency_ms=generation.seconds * 1000,
    )


# --- multi-round answering (SIM-RAG) ------------------------------------------------------------

#: What the reasoner writes as its answer when it cannot tell (its self-assessment).
UNSURE = "unsure"
#: Characters of each document the reasoner sees in a multi-round context (grows every round).
ROUND_PASSAGE_CHARS = 600
#: Tokens for a follow-up search query: one short line.
QUERY_MAX_NEW_TOKENS = 24

REASONER_SYSTEM_PROMPT = (
    "You are a knowledgeable assistant that answers questions. Use the retrieved documents "
    "when they help. Give the shortest possible answer: a name, a number, a date or a short "
    f"phrase. If you cannot tell the answer, write {UNSURE} as the answer. Reply in exactly "
    "this format:\nAnswer: <answer>\nRationale: <one sentence on why>"
)
QUERY_SYSTEM_PROMPT = (
    "You help answer a question by searching a document collection. Given the question and the "
    "documents found so far, write one short search query for the information that is still "
    "missing. Do not repeat an earlier query. Reply with the query only."
)


class StopPolicy(StrEnum):
    """When the loop may stop before ``max_rounds``. Only ``critic`` is SIM-RAG; the others are
    its baselines, run by the same loop so that the comparison is the stopping rule alone."""

    critic = "critic"
    """Stop when the critic accepts the round's answer (SIM-RAG)."""
    fixed = "fixed"
    """Never stop early: always ``max_rounds`` rounds (unless retrieval runs dry)."""
    self_confidence = "self"
    """Stop as soon as the reasoner gives an answer other than "unsure"."""


class Critic(Protocol):
    async def judge(self, request: JudgeRequest) -> JudgeResponse: ...


@dataclass
class RoundContext:
    """The documents one round's query retrieved (only ones no earlier round returned)."""

    query: str
    hits: list[Hit]


def format_round_context(
    rounds: Sequence[RoundContext], passage_chars: int = ROUND_PASSAGE_CHARS
) -> str:
    """Everything retrieved so far as the reasoner and the critic read it: each query followed
    by its documents, numbered across rounds so the reasoner can cite them as [n]."""
    lines = []
    number = 0
    for round_context in rounds:
        lines.append(f"Query: {round_context.query}")
        for hit in round_context.hits:
            number += 1
            lines.append(
                f"Retrieved Document [{number}]: Title: {hit.title} "
                f"Content: {hit.text[:passage_chars]}"
            )
    return "\n".join(lines)


def build_reasoner_messages(question: str, context: str) -> list[dict[str, str]]:
    documents = context or "(no documents retrieved)"
    user = f"Question: {question}\n\n{documents}\n\nAnswer the question in the format given."
    return [
        {"role": "system", "content": REASONER_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]


def build_query_messages(
    question: str, context: str, earlier_queries: Sequence[str]
) -> list[dict[str, str]]:
    earlier = "; ".join(earlier_queries) or "(none)"
    user = (
        f"Question: {question}\n\n{context or '(no documents retrieved)'}\n\n"
        f"Earlier queries: {earlier}\nNext search query:"
    )
    return [
        {"role": "system", "content": QUERY_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]


_FIELD_RE = re.compile(r"^\s*\**\s*(answer|rationale)\s*\**\s*:\s*\**\s*(.*)$", re.IGNORECASE)


def parse_reasoner_output(raw: str) -> tuple[str, str]:
    """``(answer, rationale)`` from "Answer: … / Rationale: …"; a reply that ignores the format
    is its first line as the answer and the rest as the rationale."""
    answer: str | None = None
    rationale: list[str] = []
    current = None
    for line in raw.strip().splitlines():
        match = _FIELD_RE.match(line)
        if match:
            current = match.group(1).lower()
            if current == "answer" and answer is None:
                answer = match.group(2).strip()
            elif current == "rationale":
                rationale.append(match.group(2).strip())
        elif current == "rationale":
            rationale.append(line.strip())
        elif answer is None and line.strip():
            answer, current = line.strip(), "answer"
        elif current == "answer" and line.strip() and not rationale:
            current = "rationale"
            rationale.append(line.strip())
    return clean_answer(answer or ""), " ".join(r for r in rationale if r).strip()


def is_unsure(answer: str) -> bool:
    """The reasoner's own "I don't know" (or no answer at all)."""
    normalized = answer.strip().lower().strip(".!")
    return (
        not normalized or normalized.startswith(UNSURE) or normalized in {"unknown", "i don't know"}
    )


_QUERY_PREFIX_RE = re.compile(r"^((next\s+)?(search\s+)?query|question)\s*:\s*", re.IGNORECASE)


def parse_query(raw: str) -> str:
    """The first line of the reasoner's reply without a "Query:" prefix or quotes."""
    for line in raw.strip().splitlines():
        text = _QUERY_PREFIX_RE.sub("", line.strip()).strip().strip("\"'`").strip()
        if text:
            return text[:300]
    return ""


def _query_key(query: str) -> str:
    return " ".join(_WORD_RE.findall(query.lower()))


@dataclass
class RoundRecord:
    """One round: what was searched and found, what the reasoner answered, what the critic said."""

    round: int
    query: str
    hits: list[Hit]
    context: str
    """The reasoner's whole context this round (all rounds' queries and documents so far)."""
    answer: str
    rationale: str
    raw: str
    generation: Generation
    accept: bool | None = None
    """The critic's verdict; ``None`` when it was not asked (last round, baselines) or failed."""
    p_accept: float | None = None
    next_query: str | None = None
    query_generation: Generation | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        extra = self.query_generation.new_tokens if self.query_generation else 0
        return self.generation.new_tokens + extra

    @property
    def prompt_tokens(self) -> int:
        extra = self.query_generation.prompt_tokens if self.query_generation else 0
        return self.generation.prompt_tokens + extra


@dataclass
class RoundsOutcome:
    answer: str
    rounds: list[RoundRecord]
    citations: list[Hit]
    stop_reason: str
    """``accepted`` (critic), ``confident`` (self-assessment), ``max_rounds``,
    ``repeated_query`` or ``empty_retrieval``."""
    timings_ms: dict[str, float]
    degraded: list[str]

    @property
    def hits(self) -> list[Hit]:
        return [hit for record in self.rounds for hit in record.hits]


@dataclass
class RoundStarted:
    round: int
    query: str
    hits: list[Hit]


@dataclass
class AnswerPiece:
    round: int
    text: str


@dataclass
class RoundFinished:
    record: RoundRecord


@dataclass
class RoundsFinished:
    outcome: RoundsOutcome


LoopEvent = RoundStarted | AnswerPiece | RoundFinished | RoundsFinished


def final_answer(records: Sequence[RoundRecord]) -> RoundRecord:
    """The round whose answer is returned: the last one, unless it says "unsure" and an earlier
    round gave a real answer (the loop forces an answer at the end rather than an abstention)."""
    for record in reversed(records):
        if not is_unsure(record.answer):
            return record
    return records[-1]


class AnswerPipeline:
    """Answering from retrieved passages: single-round RAG (``run``) and the multi-round
    SIM-RAG loop governed by a critic (``rounds``/``run_rounds``).

    Each round of the loop the reasoner answers with a rationale from the question and everything
    retrieved so far; the critic accepts or rejects; on a rejection the reasoner writes the next
    query (earlier queries and documents are excluded), retrieval runs through ``SearchPipeline``,
    and the loop continues up to ``max_rounds``, where the answer is forced. A critic that is down,
    slow or untrained counts as a rejection, so the loop runs to ``max_rounds`` and lists
    ``critic`` in ``degraded``.
    """

    def __init__(
        self,
        search: SearchPipeline,
        generator_factory: Callable[[], ChatGenerator],
        max_new_tokens: int = 64,
        *,
        critic: Critic | None = None,
        query_max_new_tokens: int = QUERY_MAX_NEW_TOKENS,
        passage_chars: int = ROUND_PASSAGE_CHARS,
    ) -> None:
        self.search = search
        self.generator_factory = generator_factory
        self.max_new_tokens = max_new_tokens
        self.critic = critic
        self.query_max_new_tokens = query_max_new_tokens
        self.passage_chars = passage_chars

    async def retrieve(self, trace: Trace, question: str, collection: str, k: int) -> SearchOutcome:
        return await self.search.run(
            trace, query=question, collection=collection, k=k, retrievers=INDEX_RETRIEVERS
        )

    def _generate(self, question: str, hits: Sequence[Hit]) -> Generation:
        return self.generator_factory().generate(
            build_answer_messages(question, hits), max_new_tokens=self.max_new_tokens
        )

    async def run(self, trace: Trace, *, question: str, collection: str, k: int) -> AnswerOutcome:
        """Single-round RAG: retrieve with the question, answer once from the top ``k``."""
        outcome = await self.retrieve(trace, question, collection, k)
        generation = await asyncio.to_thread(self._generate, question, outcome.hits)
        return self.finish(trace, question, outcome, generation)

    def finish(
        self, trace: Trace, question: str, outcome: SearchOutcome, generation: Generation
    ) -> AnswerOutcome:
        citations, rule = choose_citations(generation.text, outcome.hits)
        generator = self.generator_factory()
        trace.stages.append(
            generation_stage(
                generator.model_id,
                question,
                outcome.hits,
                generation,
                citations,
                rule,
                self.max_new_tokens,
            )
        )
        timings = {**outcome.timings_ms, "generate": generation.seconds * 1000}
        return AnswerOutcome(
            answer=clean_answer(generation.text),
            raw_answer=generation.text,
            citations=citations,
            hits=outcome.hits,
            timings_ms=timings,
            degraded=outcome.degraded,
            generation=generation,
        )

    async def stream(self, question: str, hits: Sequence[Hit]) -> AsyncIterator[str | Generation]:
        """Text pieces as they are generated, then the final ``Generation``, without blocking the
        event loop on the model."""
        async for piece in self._stream_messages(
            build_answer_messages(question, hits), self.max_new_tokens, 0.0
        ):
            yield piece

    async def _stream_messages(
        self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> AsyncIterator[str | Generation]:
        generator = self.generator_factory()
        iterator = iter(
            generator.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature)
        )
        sentinel = object()
        while True:
            piece: Any = await asyncio.to_thread(next, iterator, sentinel)
            if piece is sentinel:
                return
            yield piece

    async def _generate_messages(
        self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation:
        generator = self.generator_factory()
        return await asyncio.to_thread(
            generator.generate, messages, max_new_tokens=max_new_tokens, temperature=temperature
        )

    async def run_rounds(
        self,
        trace: Trace,
        *,
        question: str,
        collection: str,
        k: int,
        max_rounds: int,
        policy: StopPolicy = StopPolicy.critic,
        temperature: float = 0.0,
    ) -> RoundsOutcome:
        """The multi-round loop without streaming: its final outcome."""
        async for event in self.rounds(
            trace,
            question=question,
            collection=collection,
            k=k,
            max_rounds=max_rounds,
            policy=policy,
            temperature=temperature,
        ):
            if isinstance(event, RoundsFinished):
                return event.outcome
        raise AssertionError("the answer loop ended without an outcome")  # pragma: no cover

    async def rounds(
        self,
        trace: Trace,
        *,
        question: str,
        collection: str,
        k: int,
        max_rounds: int,
        policy: StopPolicy = StopPolicy.critic,
        temperature: float = 0.0,
        stream: bool = False,
    ) -> AsyncIterator[LoopEvent]:
        """The multi-round loop as events: per round ``RoundStarted`` (query and new hits),
        ``AnswerPiece``s when ``stream``, ``RoundFinished``; then one ``RoundsFinished``."""
        started = time.perf_counter()
        model_id = self.generator_factory().model_id
        records: list[RoundRecord] = []
        contexts: list[RoundContext] = []
        seen: set[str] = set()
        queries: list[str] = []
        degraded: list[str] = []
        critic_failed = False
        if policy is StopPolicy.critic and self.critic is None:
            degraded.append("critic")
            critic_failed = True
        stop_reason = "max_rounds"
        query = question
        for round_number in range(1, max_rounds + 1):
            timings: dict[str, float] = {}
            queries.append(query)
            # Ask for enough to fill k after dropping what earlier rounds already returned.
            searched = await self.search.run(
                trace,
                query=query,
                collection=collection,
                k=min(k + len(seen), FUSION_DEPTH),
                retrievers=INDEX_RETRIEVERS,
            )
            timings["retrieve"] = sum(
                v for name, v in searched.timings_ms.items() if name in ("retrieve", "fusion")
            )
            degraded.extend(d for d in searched.degraded if d not in degraded)
            new_hits = [hit for hit in searched.hits if hit.doc_id not in seen][:k]
            if round_number > 1 and not new_hits:
                # Nothing new to read: another answer would repeat the last one.
                stop_reason = "empty_retrieval"
                trace.stages.append(
                    StageRun(
                        stage="round",
                        inputs={"round": round_number, "query": query},
                        outputs={"stop": stop_reason},
                        targets=[],
                    )
                )
                break
            seen.update(hit.doc_id for hit in new_hits)
            contexts.append(RoundContext(query, new_hits))
            yield RoundStarted(round_number, query, new_hits)
            context = format_round_context(contexts, self.passage_chars)
            messages = build_reasoner_messages(question, context)
            generation: Generation | None = None
            if stream:
                async for piece in self._stream_messages(
                    messages, self.max_new_tokens, temperature
                ):
                    if isinstance(piece, Generation):
                        generation = piece
                    elif piece:
                        yield AnswerPiece(round_number, piece)
            else:
                generation = await self._generate_messages(
                    messages, self.max_new_tokens, temperature
                )
            assert generation is not None  # Generator.stream always ends with its Generation
            timings["generate"] = generation.seconds * 1000
            answer, rationale = parse_reasoner_output(generation.text)
            all_hits = [hit for c in contexts for hit in c.hits]
            citations, rule = choose_citations(generation.text, all_hits)
            trace.stages.append(
                StageRun(
                    stage="generate",
                    inputs={"question": question, "doc_ids": [h.doc_id for h in all_hits]},
                    outputs={
                        "answer": answer,
                        "rationale": rationale,
                        "raw": generation.text,
                        "citations": [h.doc_id for h in citations],
                        "citation_rule": rule,
                        "prompt_tokens": generation.prompt_tokens,
                        "new_tokens": generation.new_tokens,
                    },
                    targets=[{"type": "answer", "id": "answer"}]
                    + [{"type": "citation", "id": h.doc_id} for h in citations],
                    model_id=model_id,
                    params={
                        "round": round_number,
                        "query": query,
                        "max_new_tokens": self.max_new_tokens,
                        "temperature": temperature,
                    },
                    latency_ms=timings["generate"],
                )
            )
            record = RoundRecord(
                round=round_number,
                query=query,
                hits=new_hits,
                context=context,
                answer=answer,
                rationale=rationale,
                raw=generation.text,
                generation=generation,
                timings_ms=timings,
            )
            records.append(record)
            if round_number == max_rounds:
                # The last round's answer is forced: nobody is asked whether to go on.
                yield RoundFinished(record)
                break
            if policy is StopPolicy.self_confidence and not is_unsure(answer):
                stop_reason = "confident"
                yield RoundFinished(record)
                break
            if policy is StopPolicy.critic and not critic_failed:
                critic_failed = not await self._judge(trace, question, record)
                if critic_failed:
                    degraded.append("critic")
                elif record.accept:
                    stop_reason = "accepted"
                    yield RoundFinished(record)
                    break
            query_generation = await self._generate_messages(
                build_query_messages(question, context, queries), self.query_max_new_tokens, 0.0
            )
            record.query_generation = query_generation
            timings["query"] = query_generation.seconds * 1000
            next_query = parse_query(query_generation.text)
            record.next_query = next_query
            repeated = not next_query or _query_key(next_query) in {_query_key(q) for q in queries}
            trace.stages.append(
                StageRun(
                    stage="query",
                    inputs={"question": question, "earlier_queries": list(queries)},
                    outputs={
                        "query": next_query,
                        "raw": query_generation.text,
                        "repeated": repeated,
                        "new_tokens": query_generation.new_tokens,
                    },
                    targets=[{"type": "subquery", "id": next_query or "(empty)"}],
                    model_id=model_id,
                    params={"round": round_number, "max_new_tokens": self.query_max_new_tokens},
                    latency_ms=timings["query"],
                )
            )
            yield RoundFinished(record)
            if repeated:
                # The same search again would find nothing new: stop with this round's answer.
                stop_reason = "repeated_query"
                break
            query = next_query
        if not records:
            raise LodestarError(ErrorCode.internal, "the answer loop ran no round")
        chosen = final_answer(records)
        all_hits = [hit for record in records for hit in record.hits]
        citations, _ = choose_citations(chosen.raw, all_hits)
        total: dict[str, float] = {}
        for record in records:
            for name, value in record.timings_ms.items():
                total[name] = total.get(name, 0.0) + value
        total["loop"] = (time.perf_counter() - started) * 1000
        yield RoundsFinished(
            RoundsOutcome(
                answer=chosen.answer,
                rounds=records,
                citations=citations,
                stop_reason=stop_reason,
                timings_ms=total,
                degraded=degraded,
            )
        )

    async def _judge(self, trace: Trace, question: str, record: RoundRecord) -> bool:
        """Ask the critic about ``record`` and note its verdict; False when it failed."""
        request = JudgeRequest(
            question=question,
            context=record.context,
            answer=record.answer,
            rationale=record.rationale,
        )
        started = time.perf_counter()
        stage = StageRun(
            stage="critic",
            inputs={"round": record.round, "answer": record.answer},
            outputs={},
            targets=[{"type": "answer", "id": "answer"}],
            params={"round": record.round},
        )
        try:
            if self.critic is None:
                raise DependencyError("critic", "no critic client is configured")
            verdict = await self.critic.judge(request)
        except DependencyError as exc:
            stage.outputs = {"error": exc.message, "fallback": "continue_to_max_rounds"}
            stage.latency_ms = (time.perf_counter() - started) * 1000
            record.timings_ms["critic"] = stage.latency_ms
            trace.stages.append(stage)
            return False
        record.accept, record.p_accept = verdict.accept, verdict.p_accept
        stage.latency_ms = (time.perf_counter() - started) * 1000
        record.timings_ms["critic"] = stage.latency_ms
        stage.outputs = {"accept": verdict.accept, "p_accept": verdict.p_accept}
        stage.model_id = f"critic:{verdict.model_version}" if verdict.model_version else "critic"
        trace.stages.append(stage)
        return True
