"""Scripted stand-ins for the index service, the reasoner, the critic and the reranker, for tests that
drive the real answer loop (``AnswerPipeline`` over ``SearchPipeline``) with no model and no
server: each returns what its script says, in order, and records what it was asked. And
scripted self-practice rows, for the tests that train a real critic on a few of them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from services.critic.practice import PracticeRow
from services.orchestrator.prompts import DECOMPOSE_SYSTEM_PROMPT, QUERY_SYSTEM_PROMPT
from shared.clients import (
    JudgeRequest,
    JudgeResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
)
from shared.models import ChatModel, Generation
from shared.schemas import Hit, IndexSearchRequest, IndexSearchResponse


def hit(doc_id: str) -> Hit:
    return Hit(doc_id=doc_id, title=doc_id.title(), text=f"text of {doc_id}", score=1.0)


class ScriptedIndex:
    """The index service for a fixed map of query → ranked doc ids (the same list for every
    retriever, so fusion keeps the order); an unknown query finds nothing."""

    def __init__(self, by_query: dict[str, list[str]]) -> None:
        self.by_query = by_query
        self.queries: list[str] = []

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        self.queries.append(request.query)
        ids = self.by_query.get(request.query, [])[: request.k]
        return IndexSearchResponse(
            collection=request.collection,
            version="v1",
            results={r: [hit(i) for i in ids] for r in request.retrievers},
            timings_ms={r: 1.0 for r in request.retrievers},
        )


class ScriptedReasoner(ChatModel):
    """A greedy model stand-in: follow-up queries, decompositions and answers from three
    scripts, in order; the system prompt of each call says which script it takes from."""

    model_id = "scripted"

    def __init__(
        self,
        answers: Sequence[str],
        queries: Sequence[str] = (),
        decompositions: Sequence[str] = (),
    ) -> None:
        self.answers, self.queries = list(answers), list(queries)
        self.decompositions = list(decompositions)
        #: The user message of every call, in order.
        self.prompts: list[str] = []

    def _generate(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation:
        """The next text of the script the system prompt names; a generation's options (its
        token budget, its temperature) change nothing in a script."""
        self.prompts.append(messages[-1]["content"])
        system = messages[0]["content"]
        script = (
            self.queries
            if system == QUERY_SYSTEM_PROMPT
            else self.decompositions
            if system == DECOMPOSE_SYSTEM_PROMPT
            else self.answers
        )
        return Generation(script.pop(0), 10, 5, 0.01)

    def _stream(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str | Generation]:
        """The same text as ``generate``, a word at a time, then the whole generation."""
        generation = self._generate(messages, max_new_tokens, temperature)
        for word in generation.text.split(" "):
            yield word + " "
        yield generation


class ScriptedCritic:
    """Verdicts from a script, in order; records every request it judged."""

    def __init__(self, verdicts: Sequence[bool]) -> None:
        self.verdicts = list(verdicts)
        self.requests: list[JudgeRequest] = []

    async def judge(self, request: JudgeRequest) -> JudgeResponse:
        self.requests.append(request)
        accept = self.verdicts.pop(0)
        return JudgeResponse(accept=accept, p_accept=0.9 if accept else 0.1, model_version="v")


class ReversingReranker:
    """The reranker service that reverses its candidates (so hits from deep in the pool reach
    the top ``k``), reports two forward passes and keeps every request it was given."""

    def __init__(self) -> None:
        self.requests: list[RerankRequest] = []

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        self.requests.append(request)
        order = list(reversed(request.documents))
        return RerankResponse(
            method=request.method,
            results=[
                RerankResult(doc_id=d.doc_id, rank=i, score=float(len(order) - i))
                for i, d in enumerate(order, 1)
            ],
            timings_ms={},
            forward_passes=2,
            prompt_tokens=10,
        )


def practice_turns(
    qid: str,
    question: str,
    gold: str,
    context: str,
    hit_id: str,
    turns: Sequence[tuple[str, str, int]],
) -> list[PracticeRow]:
    """One question's self-practice rows, a row per (answer, rationale, label) turn, the way
    ``run_self_practice`` writes them: the label is both the exact match and the accuracy, an
    "unsure" answer is the reasoner's own doubt, and the retrieval was right."""
    return [
        PracticeRow(
            qid=qid,
            turn=turn,
            question=question,
            golds=[gold],
            context=context,
            answer=answer,
            rationale=rationale,
            raw=f"Answer: {answer}\nRationale: {rationale}",
            em=label,
            acc=label,
            self_unsure=answer == "unsure",
            query=question,
            hit_ids=[hit_id],
            next_query=None,
            correct_retrieval=True,
        )
        for turn, (answer, rationale, label) in enumerate(turns)
    ]
