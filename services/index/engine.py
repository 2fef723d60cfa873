"""The index engine: named collections of passages with exact dense search and BM25.

A collection is an artefact family (``shared.artifacts``): every upsert or delete writes a new
immutable version aside and publishes it atomically, so a reader holding a ``Snapshot`` never sees
a half-built index and a crash leaves the previous version serving.

One version holds::

    documents.jsonl   the documents as upserted (id, title, text, metadata), in passage order
    passages.jsonl    passage_id, doc_id, title, text (chunks of 256 words)
    embeddings.f32    float32 (n_passages, 384), normalised MiniLM; memory-mapped, never read whole
    bm25/             a bm25s index over "title text" of every passage

Passages of one document are contiguous, so document scores are a ``maximum.reduceat`` over
passage scores: exact max-passage aggregation with no top-k truncation artefacts.

The ANN stage of CompactDS (IVF-PQ / HNSW candidates re-scored exactly from ``embeddings.f32``)
plugs in as another ``DenseSearcher``; ``ExactDenseSearcher`` is the brute-force baseline it is
measured against.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.artifacts import ArtifactFamily
from shared.errors import invalid, not_found
from shared.models import EMBEDDER_ID, EMBEDDING_DIM, Embedder
from shared.schemas import (
    Document,
    Hit,
    IndexSearchRequest,
    IndexSearchResponse,
    Passage,
    SourceRank,
    is_valid_collection_name,
)

logger = logging.getLogger(__name__)

RETRIEVERS = ("dense", "bm25")
BM25_K1 = 0.9
BM25_B = 0.4
#: Called with (done, total, stage) during long work, for progress bars and job progress.
Progress = Callable[[int, int, str], None]


def chunk_document(doc: Document, passage_words: int) -> list[Passage]:
    """Split into passages of at most ``passage_words`` whitespace words, keeping the last short
    chunk (CompactDS ``keep_last_chunk``). An empty text still yields one passage (the title)."""
    words = doc.text.split()
    if not words:
        return [Passage(passage_id=f"{doc.id}#0", doc_id=doc.id, title=doc.title, text="")]
    return [
        Passage(
            passage_id=f"{doc.id}#{i // passage_words}",
            doc_id=doc.id,
            title=doc.title,
            text=" ".join(words[i : i + passage_words]),
        )
        for i in range(0, len(words), passage_words)
    ]


def embedding_text(passage: Passage) -> str:
    """Title prepended, as CompactDS (``no_title: False``) and BEIR's dense baselines do."""
    return f"{passage.title} {passage.text}".strip()


def _bm25_tokenize(texts: Sequence[str], *, show_progress: bool = False) -> Any:
    import bm25s
    import Stemmer

    return bm25s.tokenize(
        list(texts),
        stopwords="en",
        stemmer=Stemmer.Stemmer("english"),
        show_progress=show_progress,
    )


@dataclass(frozen=True)
class ScoredDoc:
    doc_index: int
    passage_index: int
    score: float


class DenseSearcher(Protocol):
    name: str

    def search(self, query_vector: np.ndarray, k: int) -> list[ScoredDoc]: ...


class ExactDenseSearcher:
    """Brute-force inner product over every passage vector (the baseline every ANN is held to)."""

    name = "dense"

    def __init__(self, embeddings: np.ndarray, doc_starts: np.ndarray) -> None:
        self.embeddings = embeddings
        self.doc_starts = doc_starts

    def search(self, query_vector: np.ndarray, k: int) -> list[ScoredDoc]:
        if self.embeddings.shape[0] == 0:
            return []
        passage_scores = self.embeddings @ query_vector
        return _top_docs(passage_scores, self.doc_starts, k)


def _top_docs(passage_scores: np.ndarray, doc_starts: np.ndarray, k: int) -> list[ScoredDoc]:
    doc_scores = np.maximum.reduceat(passage_scores, doc_starts)
    k = min(k, doc_scores.shape[0])
    top = np.argpartition(-doc_scores, k - 1)[:k]
    # Sort by score, ties by document order, so results are deterministic.
    top = top[np.lexsort((top, -doc_scores[top]))]
    ends = np.append(doc_starts[1:], passage_scores.shape[0])
    out = []
    for doc_index in top:
        start, end = int(doc_starts[doc_index]), int(ends[doc_index])
        best = start + int(np.argmax(passage_scores[start:end]))
        out.append(ScoredDoc(int(doc_index), best, float(doc_scores[doc_index])))
    return out


class BM25Searcher:
    name = "bm25"

    def __init__(self, directory: Path, passage_doc_index: np.ndarray, n_docs: int) -> None:
        import bm25s

        # An empty collection has no BM25 index (bm25s cannot index zero documents).
        self.retriever = (
            bm25s.BM25.load(str(directory), mmap=True) if passage_doc_index.shape[0] else None
        )
        self.passage_doc_index = passage_doc_index
        self.n_docs = n_docs

    def search(self, query: str, k: int) -> list[ScoredDoc]:
        n_passages = self.passage_doc_index.shape[0]
        if self.retriever is None or n_passages == 0:
            return []
        tokens = _bm25_tokenize([query])
        if not tokens.ids or not tokens.ids[0]:
            return []  # every query word is a stop word or unknown: nothing can match
        # Over-fetch passages so that k distinct documents survive max-passage grouping.
        depth = min(n_passages, max(k * 4, k + 32))
        indices, scores = self.retriever.retrieve(tokens, k=depth, show_progress=False, n_threads=1)
        best: dict[int, ScoredDoc] = {}
        for passage_index, score in zip(indices[0].tolist(), scores[0].tolist(), strict=True):
            if score <= 0:
                continue
            doc_index = int(self.passage_doc_index[passage_index])
            if doc_index not in best:
                best[doc_index] = ScoredDoc(doc_index, int(passage_index), float(score))
        ranked = sorted(best.values(), key=lambda hit: (-hit.score, hit.doc_index))
        return ranked[:k]


@dataclass(frozen=True)
class Snapshot:
    """An immutable, loaded version of a collection. Safe to share between threads."""

    name: str
    version: str
    manifest: dict[str, Any]
    documents: list[Document]
    passages: list[Passage]
    doc_starts: np.ndarray
    passage_doc_index: np.ndarray
    dense: ExactDenseSearcher
    bm25: BM25Searcher

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    def search(
        self, retriever: str, query: str, query_vector: np.ndarray | None, k: int
    ) -> list[ScoredDoc]:
        if retriever == "dense":
            if query_vector is None:
                raise ValueError("dense search needs a query vector")
            return self.dense.search(query_vector, k)
        if retriever == "bm25":
            return self.bm25.search(query, k)
        raise invalid(
            f"unknown retriever {retriever!r}; available: {', '.join(RETRIEVERS)}",
            field="retrievers",
        )


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_snapshot(name: str, family: ArtifactFamily) -> Snapshot:
    version = family.current_version()
    if version is None:
        raise not_found("collection", name)
    base = family.versions_dir / version
    manifest = family.read_manifest(version)
    documents = [Document(**row) for row in _read_jsonl(base / "documents.jsonl")]
    passages = [Passage(**row) for row in _read_jsonl(base / "passages.jsonl")]
    n = len(passages)
    embeddings: np.ndarray
    if n:
        embeddings = np.memmap(
            base / "embeddings.f32", dtype=np.float32, mode="r", shape=(n, manifest["dim"])
        )
    else:
        embeddings = np.zeros((0, manifest["dim"]), dtype=np.float32)
    doc_index_of = {doc.id: i for i, doc in enumerate(documents)}
    passage_doc_index = np.fromiter(
        (doc_index_of[p.doc_id] for p in passages), dtype=np.int64, count=n
    )
    doc_starts = (
        np.flatnonzero(np.r_[True, np.diff(passage_doc_index) != 0]) if n else np.zeros(0, np.int64)
    )
    return Snapshot(
        name=name,
        version=version,
        manifest=manifest,
        documents=documents,
        passages=passages,
        doc_starts=doc_starts,
        passage_doc_index=passage_doc_index,
        dense=ExactDenseSearcher(embeddings, doc_starts),
        bm25=BM25Searcher(base / "bm25", passage_doc_index, len(documents)),
    )


@dataclass(frozen=True)
class WriteResult:
    collection: str
    version: str
    documents: int
    passages: int
    upserted: int = 0
    deleted: int = 0
    embedded_passages: int = 0
    seconds: float = 0.0


class IndexEngine:
    """Collections under ``<data_dir>/collections``; readers get snapshots, writers publish.

    Several processes may write (the index service for small upserts, Celery workers for large
    ones): each write holds the collection's file lock, and readers notice a new ``CURRENT``.
    """

    def __init__(
        self, data_dir: Path, embedder_factory: Callable[[], Embedder], passage_words: int = 256
    ) -> None:
        self.root = data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self._embedder_factory = embedder_factory
        self._embedder: Embedder | None = None
        self.passage_words = passage_words
        self._snapshots: dict[str, Snapshot] = {}
        self._load_lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self._embedder_factory()
        return self._embedder

    def family(self, name: str) -> ArtifactFamily:
        if not is_valid_collection_name(name):
            raise invalid(
                "collection names are 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
                field="collection",
            )
        return ArtifactFamily(self.root / name)

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / "CURRENT").exists()
        )

    def exists(self, name: str) -> bool:
        return self.family(name).current_version() is not None

    def snapshot(self, name: str) -> Snapshot:
        """The current version, reloaded when another process has published a newer one."""
        family = self.family(name)
        version = family.current_version()
        if version is None:
            raise not_found("collection", name, field="collection")
        cached = self._snapshots.get(name)
        if cached is not None and cached.version == version:
            return cached
        with self._load_lock:
            cached = self._snapshots.get(name)
            if cached is None or cached.version != version:
                cached = load_snapshot(name, family)
                self._snapshots[name] = cached
                logger.info("loaded collection %s version %s", name, version)
            return cached

    def embed_query(self, query: str) -> np.ndarray:
        vector: np.ndarray = self.embedder.encode([query])[0]
        return vector

    def search(
        self, name: str, query: str, k: int, retrievers: Sequence[str]
    ) -> tuple[Snapshot, dict[str, list[ScoredDoc]], dict[str, float]]:
        unknown = [r for r in retrievers if r not in RETRIEVERS]
        if unknown:
            raise invalid(
                f"unknown retriever {unknown[0]!r}; available: {', '.join(RETRIEVERS)}",
                field="retrievers",
            )
        snapshot = self.snapshot(name)
        timings: dict[str, float] = {}
        query_vector = None
        if "dense" in retrievers:
            started = time.perf_counter()
            query_vector = self.embed_query(query)
            timings["embed_query"] = (time.perf_counter() - started) * 1000
        results: dict[str, list[ScoredDoc]] = {}
        for retriever in retrievers:
            started = time.perf_counter()
            results[retriever] = snapshot.search(retriever, query, query_vector, k)
            timings[retriever] = (time.perf_counter() - started) * 1000
        return snapshot, results, timings

    # --- writes ---------------------------------------------------------------------------------

    def upsert(
        self, name: str, documents: Sequence[Document], progress: Progress | None = None
    ) -> WriteResult:
        ids = [doc.id for doc in documents]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise invalid(
                f"document id {duplicate!r} appears twice in one batch", field="documents"
            )
        return self._write(name, upserts=list(documents), deletes=set(), progress=progress)

    def delete(self, name: str, doc_id: str) -> WriteResult:
        if not self.exists(name):
            raise not_found("collection", name, field="collection")
        snapshot = self.snapshot(name)
        if not any(doc.id == doc_id for doc in snapshot.documents):
            raise not_found("document", doc_id)
        return self._write(name, upserts=[], deletes={doc_id}, progress=None)

    def _write(
        self, name: str, *, upserts: list[Document], deletes: set[str], progress: Progress | None
    ) -> WriteResult:
        started = time.perf_counter()
        family = self.family(name)
        with family.lock():
            previous = load_snapshot(name, family) if family.current_version() else None
            replaced = {doc.id for doc in upserts} | deletes
            kept_docs: list[Document] = []
            kept_rows: list[int] = []
            kept_passages: list[Passage] = []
            if previous is not None:
                kept_doc_ids = {doc.id for doc in previous.documents if doc.id not in replaced}
                kept_docs = [doc for doc in previous.documents if doc.id in kept_doc_ids]
                for row, passage in enumerate(previous.passages):
                    if passage.doc_id in kept_doc_ids:
                        kept_rows.append(row)
                        kept_passages.append(passage)
            new_passages = [p for doc in upserts for p in chunk_document(doc, self.passage_words)]
            new_vectors = self._embed_passages(new_passages, progress)
            documents = kept_docs + upserts
            passages = kept_passages + new_passages
            manifest = {
                "collection": name,
                "documents": len(documents),
                "passages": len(passages),
                "embedder": EMBEDDER_ID,
                "dim": EMBEDDING_DIM,
                "dtype": "float32",
                "passage_words": self.passage_words,
                "bm25": {"k1": BM25_K1, "b": BM25_B, "stemmer": "english", "stopwords": "en"},
                "retrievers": list(RETRIEVERS),
            }
            with family.build(manifest) as scratch:
                _write_jsonl(scratch / "documents.jsonl", (doc.model_dump() for doc in documents))
                _write_jsonl(scratch / "passages.jsonl", (p.model_dump() for p in passages))
                self._write_embeddings(scratch / "embeddings.f32", previous, kept_rows, new_vectors)
                if progress:
                    progress(0, len(passages), "bm25")
                self._write_bm25(scratch / "bm25", passages)
                if progress:
                    progress(len(passages), len(passages), "bm25")
            version = family.current_version() or ""
            family.prune(keep=2)
        return WriteResult(
            collection=name,
            version=version,
            documents=len(documents),
            passages=len(passages),
            upserted=len(upserts),
            deleted=len(deletes),
            embedded_passages=len(new_passages),
            seconds=time.perf_counter() - started,
        )

    def _embed_passages(self, passages: list[Passage], progress: Progress | None) -> np.ndarray:
        if not passages:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        texts = [embedding_text(p) for p in passages]
        # Embed in slices so progress is reported while the (dominant) encoding cost is paid.
        step = max(self.embedder.batch_size * 8, 256)
        parts = []
        for start in range(0, len(texts), step):
            parts.append(self.embedder.encode(texts[start : start + step]))
            if progress:
                progress(min(start + step, len(texts)), len(texts), "embed")
        return np.concatenate(parts).astype(np.float32, copy=False)

    @staticmethod
    def _write_embeddings(
        path: Path, previous: Snapshot | None, kept_rows: list[int], new_vectors: np.ndarray
    ) -> None:
        n = len(kept_rows) + new_vectors.shape[0]
        if n == 0:
            path.write_bytes(b"")
            return
        out = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, EMBEDDING_DIM))
        if kept_rows and previous is not None:
            source = previous.dense.embeddings
            # Copy in blocks so a million-row collection is never read into memory at once.
            rows = np.asarray(kept_rows)
            for start in range(0, rows.shape[0], 65536):
                block = rows[start : start + 65536]
                out[start : start + block.shape[0]] = source[block]
        out[len(kept_rows) :] = new_vectors
        out.flush()
        del out

    @staticmethod
    def _write_bm25(directory: Path, passages: list[Passage]) -> None:
        import bm25s

        directory.mkdir()
        if not passages:
            return
        retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B)
        texts = [embedding_text(p) for p in passages]
        retriever.index(_bm25_tokenize(texts), show_progress=False)
        retriever.save(str(directory))


def search_response(
    snapshot: Snapshot, results: dict[str, list[ScoredDoc]], timings: dict[str, float]
) -> IndexSearchResponse:
    """Engine results in the wire format (one document-level hit list per retriever)."""
    hits = {
        retriever: [
            Hit(
                doc_id=snapshot.documents[scored.doc_index].id,
                title=snapshot.documents[scored.doc_index].title,
                text=snapshot.passages[scored.passage_index].text,
                score=scored.score,
                sources={retriever: SourceRank(rank=rank, score=scored.score)},
            )
            for rank, scored in enumerate(scored_docs, start=1)
        ]
        for retriever, scored_docs in results.items()
    }
    return IndexSearchResponse(
        collection=snapshot.name,
        version=snapshot.version,
        results=hits,
        timings_ms={k: round(v, 2) for k, v in timings.items()},
    )


class InProcessIndex:
    """The index service's search without HTTP: the evaluation harness and benchmarks run the
    orchestrator's pipelines on this, so they measure the same code the services run."""

    def __init__(self, engine: IndexEngine) -> None:
        self.engine = engine

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        snapshot, results, timings = self.engine.search(
            request.collection, request.query, request.k, request.retrievers
        )
        return search_response(snapshot, results, timings)
