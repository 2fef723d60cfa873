"""Natural Questions (open): the dev questions and the gold-passage oracle file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.datasets.errors import DatasetError
from shared.datasets.readers import (
    DATASETS_DIR,
    _check_unique,
    _document,
    _field,
    _iter_jsonl,
    _stable_id,
    _str_list,
)
from shared.schemas import Document, QAExample


def nq_question_id(question: str) -> str:
    """NQ-open has no ids: ``nq-`` + 16 hex digits of the question's SHA-1.

    Content-derived, so a question has the same id in the dev file and the oracle file, and ids
    do not shift if lines are reordered.
    """
    return _stable_id("nq-", question)


def nq_passage_id(title: str, text: str) -> str:
    """``nqp-`` + 16 hex digits of SHA-1(title, text): identical passages share one id."""
    return _stable_id("nqp-", title, text)


def read_nq_open(path: Path) -> list[QAExample]:
    """NQ-open lines ``{"question", "answer": [str, ...]}``; duplicate questions raise."""
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        question = _field(obj, "question", str, path, line=lineno)
        answers = _str_list(obj, "answer", path, line=lineno, non_empty=True)
        qid = nq_question_id(question)
        _check_unique(seen, qid, "question", path, lineno)
        examples.append(QAExample(id=qid, question=question, answers=answers))
    return examples


def read_nq_open_oracle(path: Path) -> tuple[list[QAExample], list[Document]]:
    """The lost-in-the-middle oracle file: each question with exactly one context, its gold passage.

    Line: ``{"question", "answers": [...], "ctxs": [{"title", "text", "isgold", ...}], ...}``.
    ``ctxs`` must hold exactly one passage (the oracle layout) and it must not say
    ``isgold: false``; anything else raises DatasetError instead of dropping passages.
    The corpus pools the gold passages, one Document per distinct (title, text) in order of first
    appearance (ids from :func:`nq_passage_id`); each question's ``supporting_doc_ids`` is its
    passage's id. Question metadata keeps the NQ annotators' ``short_answers`` when present.
    """
    examples: list[QAExample] = []
    documents: dict[str, Document] = {}
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        question = _field(obj, "question", str, path, line=lineno)
        answers = _str_list(obj, "answers", path, line=lineno, non_empty=True)
        ctxs = _field(obj, "ctxs", list, path, line=lineno)
        if len(ctxs) != 1:
            raise DatasetError(
                path, f"expected exactly one ctx (the gold passage), got {len(ctxs)}", line=lineno
            )
        ctx = ctxs[0]
        if not isinstance(ctx, dict):
            raise DatasetError(path, "ctxs[0] must be a JSON object", line=lineno)
        title = _field(ctx, "title", str, path, line=lineno)
        text = _field(ctx, "text", str, path, line=lineno)
        if ctx.get("isgold", True) is not True:
            raise DatasetError(path, "ctxs[0] is not marked as the gold passage", line=lineno)
        qid = nq_question_id(question)
        _check_unique(seen, qid, "question", path, lineno)
        passage_id = nq_passage_id(title, text)
        if passage_id not in documents:
            documents[passage_id] = _document(
                path,
                line=lineno,
                id=passage_id,
                title=title,
                text=text,
                metadata={"source": "nq-open-oracle"},
            )
        metadata: dict[str, Any] = {}
        gold = obj.get("nq_annotated_gold")
        if isinstance(gold, dict) and isinstance(gold.get("short_answers"), list):
            metadata["short_answers"] = list(gold["short_answers"])
        examples.append(
            QAExample(
                id=qid,
                question=question,
                answers=answers,
                supporting_doc_ids=[passage_id],
                metadata=metadata,
            )
        )
    return examples, list(documents.values())


def load_nq_open_dev() -> list[QAExample]:
    """The 3,610 NQ-open dev questions (no passages)."""
    return read_nq_open(DATASETS_DIR / "nq_open" / "NQ-open.dev.jsonl.gz")


def load_nq_open_oracle() -> tuple[list[QAExample], list[Document]]:
    """The 2,655 NQ-open dev questions with a gold passage, and the pool of those passages."""
    return read_nq_open_oracle(DATASETS_DIR / "nq_open" / "nq-open-oracle.jsonl.gz")
