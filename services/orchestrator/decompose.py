"""Query decomposition, the first stage of ``/answer``: the question becomes up to N search
sub-queries with stable ids (``sq1``, ``sq2``, … — feedback's ``subquery`` targets); each is
retrieved and the lists are fused with RRF. The multi-round loop's follow-up queries are
sub-queries of later rounds, their ids continuing the sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.fusion import reciprocal_rank_fusion
from services.orchestrator.prompts import (
    DECOMPOSE_EXAMPLE,
    MAX_SUBQUERIES,
    parse_subqueries,
    query_problem,
)
from shared.schemas import Hit

#: ``/answer``'s default ``subqueries`` (1 = no decomposition, the question is the only
#: sub-query). Set from ``benchmarks/results/decompose-hotpotqa-dev-40q.json``.
DEFAULT_SUBQUERIES = 1
#: Whether the question itself is one of the sub-queries (``sq1``), beside the decomposer's
#: (measured in the same file).
KEEP_QUESTION = True


@dataclass(frozen=True)
class SubQuery:
    sq_id: str
    text: str
    order: int
    """Position within its round (0-based)."""
    round: int
    origin: str
    """``question`` (the question itself), ``decomposed`` (written by the decomposer),
    ``follow_up`` (the reasoner's next query) or ``fallback`` (its replacement)."""

    def output(self) -> dict[str, Any]:
        return {
            "sq_id": self.sq_id,
            "text": self.text,
            "order": self.order,
            "round": self.round,
            "origin": self.origin,
        }

    def target(self) -> dict[str, str]:
        return {"type": "subquery", "id": self.sq_id}


def sq_id(number: int) -> str:
    return f"sq{number}"


def sq_number(sub_query_id: str) -> int:
    """The number in ``sqN`` (0 for an id not of that form)."""
    digits = sub_query_id.removeprefix("sq")
    return int(digits) if digits.isdigit() else 0


@dataclass
class Decomposition:
    """Round 1's sub-queries and what was dropped on the way (for the trace)."""

    subqueries: list[SubQuery]
    proposed: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


def choose_subqueries(
    question: str, raw: str | None, n: int, *, keep_question: bool = KEEP_QUESTION
) -> Decomposition:
    """With ``keep_question``, the question first (``sq1``), then up to ``n - 1`` of the
    decomposer's lines that are usable search queries (``query_problem``: not answers, not copies
    of the question or of one another, within the length bounds); without it, up to ``n`` of
    those lines. ``n`` = 1, or nothing usable: the question alone."""
    if not 1 <= n <= MAX_SUBQUERIES:
        raise ValueError(f"subqueries must be between 1 and {MAX_SUBQUERIES}, got {n}")
    question_sq = SubQuery(sq_id(1), question, 0, 1, "question")
    if n == 1:
        return Decomposition([question_sq])
    chosen = [question_sq] if keep_question else []
    proposed = parse_subqueries(raw) if raw else []
    rejected: list[dict[str, str]] = []
    for text in proposed:
        if len(chosen) >= n:
            break
        earlier = [question, *DECOMPOSE_EXAMPLE[1]] + [sq.text for sq in chosen]
        problem = query_problem(text, earlier_queries=earlier, min_words=1)
        if problem is not None:
            rejected.append({"text": text, "problem": problem})
            continue
        chosen.append(SubQuery(sq_id(len(chosen) + 1), text, len(chosen), 1, "decomposed"))
    return Decomposition(chosen or [question_sq], proposed, rejected)


def fuse_subquery_lists(lists: Sequence[tuple[str, list[Hit]]], rrf_k: int, k: int) -> list[Hit]:
    """RRF over the sub-queries' (already fused) result lists; each fused hit's ``sources`` are
    its rank per sub-query id."""
    if len(lists) == 1:
        return list(lists[0][1][:k])
    return reciprocal_rank_fusion(dict(lists), rrf_k, k)
