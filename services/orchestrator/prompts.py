"""Prompts for the answerer, the multi-round reasoner and the follow-up query writer, and
the parsing of what the model writes back (answers, citations, rationales, queries)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shared.schemas import Hit

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
