"""Prompts for the answerer, the multi-round reasoner and the follow-up query writer, and
the parsing of what the model writes back (answers, citations, rationales, queries)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shared.schemas import Hit
from shared.text import FUNCTION_WORDS

ANSWER_SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages you are given. "
    "Reply with the shortest possible answer (a name, a number or a short phrase), "
    "followed by the number of the passage that supports it in brackets, like: Paris [2]."
)
_CITATION_RE = re.compile(r"\[(\d{1,2})\]")
_WORD_RE = re.compile(r"\w+")


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
    words = {
        w for w in _WORD_RE.findall(clean_answer(raw_answer).lower()) if w not in FUNCTION_WORDS
    }
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


# --- search queries: follow-ups and sub-queries -------------------------------------------------

#: A search query has at least this many words and at most this many words / characters.
QUERY_MIN_WORDS = 2
QUERY_MAX_WORDS = 20
QUERY_MAX_CHARS = 200
#: The most sub-queries the decomposer writes (``/answer``'s ``subqueries`` is capped here).
MAX_SUBQUERIES = 3
#: Tokens for the decomposer's reply: a few short lines.
DECOMPOSE_MAX_NEW_TOKENS = 32
#: A query of this many words or more found verbatim in the retrieved context is a copy of it.
CONTEXT_COPY_WORDS = 6
#: Content-word Jaccard overlap from which a query counts as a copy of an earlier one.
NEAR_COPY = 0.6
#: Answer terms the fallback follow-up query appends to the question.
FALLBACK_MAX_TERMS = 6

DECOMPOSE_SYSTEM_PROMPT = (
    "You break a question into simpler search queries for a document collection. Write at most "
    f"{MAX_SUBQUERIES} short search queries, one per line, each looking for one fact the "
    "question needs. Do not answer the question. Reply with the queries only."
)

_QUESTION_WORDS = frozenset(
    [
        "who",
        "whom",
        "whose",
        "what",
        "which",
        "when",
        "where",
        "why",
        "how",
        "is",
        "was",
        "are",
        "were",
        "did",
        "does",
        "do",
        "can",
    ]
)
_ANSWERISH_RE = re.compile(
    r"^\W*(the\s+)?(final\s+|short\s+|correct\s+)?(answer|rationale)\b", re.IGNORECASE
)
_COPULA_RE = re.compile(r"\b(is|was|are|were)\b", re.IGNORECASE)
_LIST_MARKER_RE = re.compile(
    r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|(?:sub-?\s*)?(?:search\s+)?quer(?:y|ies)\s*\d*\s*[:.)-]"
    r"|q\d{1,2}\s*[:.)-])\s*",
    re.IGNORECASE,
)


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text.lower()) if w not in FUNCTION_WORDS]


def query_problem(
    query: str,
    *,
    earlier_queries: Sequence[str] = (),
    answers: Sequence[str] = (),
    min_words: int = QUERY_MIN_WORDS,
    context: str = "",
) -> str | None:
    """Why ``query`` is not a usable search query, or ``None`` when it is.

    A follow-up query or a sub-query is something to *search for*. Rejected, in this order:
    ``empty``; ``answer_prefix`` (it starts like an answer: "The answer is", "Answer:",
    "Rationale:"); ``too_short`` (< ``min_words`` words: a one-word follow-up is an answer, a
    one-word sub-query may be an entity); ``too_long`` (>
    ``QUERY_MAX_WORDS`` words or ``QUERY_MAX_CHARS`` characters); ``repeated`` (the same words
    as an earlier query, the question included, or content words overlapping one's by a Jaccard
    of ``NEAR_COPY`` or more: a rewording, not a new search); ``answer_echo``
    (the same words as one of the reasoner's answers, or containing an answer of three or more
    content words); ``context_copy`` (``CONTEXT_COPY_WORDS`` or more words copied verbatim from
    the retrieved ``context``: it would find the same passage again); ``statement`` (two
    sentences, or a declarative one: four or more words, a copula, a final full stop, and no
    question word first — what the reasoner writes when it answers instead).
    """
    text = query.strip()
    if not text:
        return "empty"
    if _ANSWERISH_RE.match(text):
        return "answer_prefix"
    words = _WORD_RE.findall(text.lower())
    if len(words) < min_words:
        return "too_short"
    if len(words) > QUERY_MAX_WORDS or len(text) > QUERY_MAX_CHARS:
        return "too_long"
    key, content = " ".join(words), set(_content_words(text))
    for earlier in earlier_queries:
        if key == _query_key(earlier):
            return "repeated"
        before = set(_content_words(earlier))
        if content and before and len(content & before) / len(content | before) >= NEAR_COPY:
            return "repeated"
    for answer in answers:
        if is_unsure(answer):
            continue
        answer_key = _query_key(answer)
        if not answer_key:
            continue
        if key == answer_key:
            return "answer_echo"
        if len(_content_words(answer)) >= 3 and f" {answer_key} " in f" {key} ":
            return "answer_echo"
    if len(words) >= CONTEXT_COPY_WORDS and context and f" {key} " in f" {_query_key(context)} ":
        return "context_copy"
    if re.search(r"[a-z]{3,}[.!]\s+[A-Z]", text) or (
        len(words) >= 4
        and text.endswith(".")
        and _COPULA_RE.search(text)
        and words[0] not in _QUESTION_WORDS
    ):
        return "statement"
    return None


def fallback_query(question: str, answers: Sequence[str]) -> str | None:
    """The follow-up query used when the reasoner's is rejected: the question with the content
    terms of the latest real (not "unsure") answer that the question lacks appended (at most
    ``FALLBACK_MAX_TERMS``) — the answer usually names the bridge entity, so this searches for
    what the question *and* the first hop point at. ``None`` when no answer adds a term (the
    loop then stops: the same search again would find nothing new)."""
    in_question = set(_WORD_RE.findall(question.lower()))
    for answer in reversed(answers):
        if is_unsure(answer):
            continue
        terms = list(dict.fromkeys(w for w in _content_words(answer) if w not in in_question))
        if terms:
            return f"{question.strip()} {' '.join(terms[:FALLBACK_MAX_TERMS])}"
        return None
    return None


#: One worked example, given as an earlier chat turn (a 135M model follows a shown format far
#: better than a described one). Its queries are never accepted as sub-queries of another
#: question (``choose_subqueries`` counts them as earlier queries).
DECOMPOSE_EXAMPLE = (
    "Who was born first, the director of Jaws or the author of Dune?",
    ("director of the film Jaws", "author of the novel Dune"),
)


def build_decompose_messages(question: str) -> list[dict[str, str]]:
    """The decomposer's prompt (the same for every ``subqueries`` setting: the first lines are
    taken, so a larger setting extends a smaller one's sub-queries)."""
    example_question, example_queries = DECOMPOSE_EXAMPLE
    return [
        {"role": "system", "content": DECOMPOSE_SYSTEM_PROMPT},
        {"role": "user", "content": f"Question: {example_question}\nSearch queries:"},
        {"role": "assistant", "content": "\n".join(example_queries)},
        {"role": "user", "content": f"Question: {question}\nSearch queries:"},
    ]


def parse_subqueries(raw: str) -> list[str]:
    """The decomposer's lines as candidate sub-queries, in order: list markers ("1.", "-",
    "Query 2:"), a "Search queries:" heading and quotes removed, empty lines and exact duplicates
    dropped. Validation (``query_problem``) is the caller's."""
    found: list[str] = []
    for line in raw.strip().splitlines():
        text = line.strip()
        if re.fullmatch(r"(?i)\W*(sub-?\s*)?(search\s+)?quer(y|ies)\W*", text):
            continue
        for _ in range(3):  # "- Query 3: ..." carries two markers
            text = _LIST_MARKER_RE.sub("", text).strip()
            text = _QUERY_PREFIX_RE.sub("", text).strip().strip("\"'`*").strip()
        if text and _query_key(text) not in {_query_key(f) for f in found}:
            found.append(text[: QUERY_MAX_CHARS * 2])
    return found
