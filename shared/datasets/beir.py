"""BEIR-format folders (corpus, queries, qrels) and the vendored SciFact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.datasets.errors import DatasetError
from shared.datasets.readers import (
    DATASETS_DIR,
    _check_unique,
    _document,
    _field,
    _iter_jsonl,
    _require_file,
)
from shared.schemas import Document


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
        _check_unique(seen, doc_id, f"document id {doc_id!r}", path, lineno)
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
        _check_unique(seen, qid, f"query id {qid!r}", path, lineno)
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
            what = f"judgement for query {qid!r}, doc {doc_id!r}"
            _check_unique(lines, (qid, doc_id), what, path, lineno)
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
