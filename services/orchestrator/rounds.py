"""Answering from retrieved passages: single-round RAG and the multi-round SIM-RAG loop
governed by a critic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from services.orchestrator.prompts import (
    QUERY_MAX_NEW_TOKENS,
    ROUND_PASSAGE_CHARS,
    RoundContext,
    _query_key,
    build_answer_messages,
    build_query_messages,
    build_reasoner_messages,
    choose_citations,
    clean_answer,
    format_round_context,
    is_unsure,
    parse_query,
    parse_reasoner_output,
)
from services.orchestrator.search import (
    FUSION_DEPTH,
    INDEX_RETRIEVERS,
    SearchOutcome,
    SearchPipeline,
)
from shared.clients import DependencyError, JudgeRequest, JudgeResponse
from shared.errors import ErrorCode, LodestarError
from shared.models import Generation
from shared.schemas import Hit
from shared.store import StageRun, Trace


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
