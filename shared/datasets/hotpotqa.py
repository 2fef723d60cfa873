"""HotpotQA (distractor setting, Hugging Face layout) and the vendored subsets."""

from __future__ import annotations

from pathlib import Path

from shared.datasets.errors import DatasetError
from shared.datasets.readers import (
    DATASETS_DIR,
    _check_unique,
    _document,
    _field,
    _iter_jsonl,
    _str_list,
)
from shared.schemas import Document, QAExample

HOTPOTQA_SPLITS = ("train", "dev")


def read_hotpotqa(
    path: Path, *, source: str = "hotpotqa"
) -> tuple[list[QAExample], list[Document]]:
    """Questions and the pooled corpus of all their context paragraphs.

    Each QAExample: ``answers=[answer]``, ``supporting_doc_ids`` = the gold titles in the order
    of ``supporting_facts`` (each once), metadata ``{"type", "level", "supporting_facts"}`` with
    ``supporting_facts`` as ``[[title, sentence_index], ...]``.

    The corpus has one Document per distinct title (id = title = the Wikipedia title, in order of
    first appearance); text = the sentences concatenated as given (HotpotQA sentences carry their
    own leading space, so ``"".join`` restores the paragraph), stripped. The same title can recur
    across questions; its paragraphs must agree once whitespace is normalised (the dev subset has
    one such pair, differing by a no-break space), and the first one is kept. Paragraphs that
    disagree otherwise raise DatasetError, as do gold titles missing from the question's context.
    """
    examples: list[QAExample] = []
    documents: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _field(obj, "id", str, path, line=lineno)
        _check_unique(seen_ids, qid, f"question id {qid!r}", path, lineno)
        question = _field(obj, "question", str, path, line=lineno)
        answer = _field(obj, "answer", str, path, line=lineno)
        qtype = _field(obj, "type", str, path, line=lineno)
        level = _field(obj, "level", str, path, line=lineno)
        facts = _field(obj, "supporting_facts", dict, path, line=lineno)
        fact_titles = _str_list(facts, "title", path, line=lineno, non_empty=True)
        fact_sents = _field(facts, "sent_id", list, path, line=lineno)
        if len(fact_sents) != len(fact_titles) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in fact_sents
        ):
            raise DatasetError(
                path,
                "supporting_facts.sent_id must be integers, one per supporting_facts.title",
                line=lineno,
            )
        context = _field(obj, "context", dict, path, line=lineno)
        titles = _str_list(context, "title", path, line=lineno, non_empty=True)
        sentences = _field(context, "sentences", list, path, line=lineno)
        if len(sentences) != len(titles):
            raise DatasetError(
                path,
                f"context has {len(titles)} titles but {len(sentences)} sentence lists",
                line=lineno,
            )
        for title, paragraph in zip(titles, sentences, strict=True):
            if not isinstance(paragraph, list) or not all(isinstance(s, str) for s in paragraph):
                raise DatasetError(
                    path,
                    f"context sentences of {title!r} must be a list of strings",
                    line=lineno,
                )
            text = "".join(paragraph).strip()
            if title in documents:
                if " ".join(text.split()) != " ".join(documents[title].text.split()):
                    raise DatasetError(
                        path,
                        f"paragraph {title!r} differs from the one on line {first_line[title]}",
                        line=lineno,
                    )
                continue
            documents[title] = _document(
                path, line=lineno, id=title, title=title, text=text, metadata={"source": source}
            )
            first_line[title] = lineno
        missing = [t for t in fact_titles if t not in titles]
        if missing:
            raise DatasetError(
                path, f"supporting titles {missing} are not among the context titles", line=lineno
            )
        examples.append(
            QAExample(
                id=qid,
                question=question,
                answers=[answer],
                supporting_doc_ids=list(dict.fromkeys(fact_titles)),
                metadata={
                    "type": qtype,
                    "level": level,
                    "supporting_facts": [
                        [t, s] for t, s in zip(fact_titles, fact_sents, strict=True)
                    ],
                },
            )
        )
    return examples, list(documents.values())


def load_hotpotqa(split: str) -> tuple[list[QAExample], list[Document]]:
    """The vendored HotpotQA subset ``split`` ("train" or "dev"): 300 questions, pooled corpus."""
    if split not in HOTPOTQA_SPLITS:
        raise ValueError(f"HotpotQA split must be one of {HOTPOTQA_SPLITS}, got {split!r}")
    return read_hotpotqa(
        DATASETS_DIR / "hotpotqa" / f"{split}.jsonl.gz", source=f"hotpotqa-{split}"
    )
