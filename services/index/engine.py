"""The index engine: named collections of passages with exact dense search and BM25.

A collection is an artefact family (``shared.artifacts``): every upsert or delete writes a new
immutable version aside and publishes it atomically, so a reader holding a ``Snapshot`` never sees
a half-built index and a crash leaves the previous version serving.

One version holds::

    documents.jsonl   the documents as upserted (id, title, text, metadata), in passage order
    passages.jsonl    passage_id, doc_id, title, text (chunks of 256 words)
    embeddings.f32    float32 (n_passages, 384), normalised MiniLM; memory-mapped, never read whole
    row_docs.npy      each row's line in documents.jsonl; doc_ids.json: the documents' ids
    w<n>.*            the same files for each write since the last merge, one segment each
                      (``services.index.segments``): a write adds its own and hard-links the
                      base above and the earlier segments
    bm25.s<n>.*       BM25 term statistics of "title text" per passage, in segments
                      (``services.index.bm25seg``): a write adds one over its own rows and
                      hard-links the others; scores use the live rows' global statistics.

Every file sits in the version directory itself (the manifest's ``layout`` is ``flat``; it
lists the segments under ``records`` and ``bm25.segments``), so a write creates one directory
and its seal fsyncs one, however many segments the version has. Versions from before hold the
segments in ``records/<name>/`` and ``bm25seg/<name>/`` with ``segments.json`` lists, and
versions built before BM25 segments a bm25s index in ``bm25/``; both still load.

Passages of one document are contiguous, so document scores are a ``maximum.reduceat`` over
passage scores: exact max-passage aggregation with no top-k truncation artefacts.

Dense search is CompactDS's two stages (``TwoStageDenseSearcher``): an in-memory ANN index
(``services.index.ann``: faiss IVF-PQ, faiss HNSW or hnswlib) proposes K candidate passage rows,
which are re-scored exactly from ``embeddings.f32``. ``ExactDenseSearcher`` is the brute-force
baseline (retriever ``dense_exact``, and ``dense`` itself for small "flat" collections).

Rows of every collection are append-only between merges (a flat one too, except the write that
brings it to ``min_passages``, which compacts and builds its ANN index)::

    ann.index         the ANN index over rows [0, indexed_rows)
    tombstones.npy    rows of deleted or replaced documents (filtered out of every result)
    rows >= indexed_rows  the "fresh segment": searched exactly beside the ANN index

so an upsert or delete never rebuilds the ANN index, re-indexes BM25 nor copies records or
vectors (it adds a record segment and a BM25 segment over its own rows); ``IndexEngine.merge``
(a Celery task) drops the tombstoned rows and rebuilds the index, one base of records and
vectors and one BM25 segment over everything, publishing a new version atomically. Without an
ANN index a merge is due once tombstones exceed ``merge_fraction`` of the rows; with or without,
once more than ``MAX_FRESH_BM25_SEGMENTS`` BM25 segments were written since the last one.
Live passages of one document stay contiguous and in document order, which both searchers rely on.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.index.ann import ANN_FILE, AnnConfig, AnnIndex, build_ann, load_ann
from services.index.batching import QueryBatcher
from services.index.bm25seg import ARRAYS_FILE, VOCAB_FILE, SegmentedBM25, TermStats, tokenize
from services.index.records import JsonlRecords, SegmentedVectors, as_vectors
from services.index.segments import (
    EMBEDDINGS,
    FLAT,
    VersionRows,
    link,
    link_segments,
    load_rows,
    segment_prefix,
    write_segment,
)
from shared.artifacts import ArtifactFamily
from shared.errors import invalid, not_found
from shared.models import EMBEDDER_ID, EMBEDDING_DIM, Embedder
from shared.npy import load_npy
from shared.schemas import (
    Document,
    EmbedRequest,
    EmbedResponse,
    IndexSearchRequest,
    IndexSearchResponse,
    Passage,
    is_valid_collection_name,
    passage_number,
)

if TYPE_CHECKING:
    from shared.settings import Settings

logger = logging.getLogger(__name__)

RETRIEVERS = ("dense", "dense_exact", "bm25")
#: Dense retrievers: ``dense`` is the collection's configured backend, ``dense_exact`` brute force.
DENSE_RETRIEVERS = ("dense", "dense_exact")
TOMBSTONES = "tombstones.npy"
#: BM25 term statistics in segments (``services.index.bm25seg``) of versions from before the
#: flat layout; ``bm25/`` in older versions still.
BM25_SEGMENTS = "bm25seg"
SEGMENTS_FILE = "segments.json"


def bm25_prefix(name: str) -> str:
    """The prefix of BM25 segment ``name``'s files in a flat version."""
    return f"bm25.{name}."


#: BM25 segments written since the last merge before one is due: each costs every BM25 query a
#: pass (ten one-row segments with their tombstones added ~1.2 ms to an 8.4 ms search of wiki).
MAX_FRESH_BM25_SEGMENTS = 8
BM25_K1 = 0.9
BM25_B = 0.4
#: Called with (done, total, stage) during long work, for progress bars and job progress.
Progress = Callable[[int, int, str], None]


def embedding_text(passage: Passage) -> str:
    """Title prepended, as CompactDS (``no_title: False``) and BEIR's dense baselines do."""
    return f"{passage.title} {passage.text}".strip()


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


def _bm25_tokenize(texts: Sequence[str], *, show_progress: bool = False) -> Any:
    import bm25s
    import Stemmer

    return bm25s.tokenize(
        list(texts),
        stopwords="en",
        stemmer=Stemmer.Stemmer("english"),
        show_progress=show_progress,
    )


def _bm25_tokenize_strings(query: str) -> list[str]:
    """One query's BM25 tokens (stemmed, stop words out), as ``_bm25_tokenize`` makes them."""
    import bm25s

    (tokens,) = bm25s.tokenize(
        [query], stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )
    return [t for t in tokens if t]


def _top_rows(scores: np.ndarray, depth: int) -> tuple[list[int], list[float]]:
    """The ``depth`` best rows by score, ties by row (deterministic), best first."""
    top = np.argpartition(-scores, depth - 1)[:depth]
    top = top[np.lexsort((top, -scores[top]))]
    return top.tolist(), scores[top].tolist()


@dataclass(frozen=True)
class ScoredDoc:
    doc_index: int
    passage_index: int
    score: float


@dataclass(frozen=True)
class SearchParams:
    """Per-request dense-search knobs; ``None`` means the collection's configured value."""

    candidates: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None

    def check(self, k: int, max_candidates: int) -> None:
        if self.candidates is not None and not k <= self.candidates <= max_candidates:
            raise invalid(
                f"candidates must be between k ({k}) and {max_candidates}", field="candidates"
            )
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= max_candidates:
                raise invalid(f"{name} must be between 1 and {max_candidates}", field=name)


class DenseSearcher(ABC):
    """A dense backend: ``search``'s signature and defaults are declared once here, each
    backend implements ``_search``."""

    name: str
    """The backend that answers, e.g. ``flat`` or ``ivfpq+exact``."""
    embeddings: SegmentedVectors

    def search(
        self,
        query_vector: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[ScoredDoc]:
        """The top ``k`` documents; ``timings`` (when given) gets the backend's stage times."""
        return self._search(query_vector, k, params or SearchParams(), timings)

    @abstractmethod
    def _search(
        self, query: np.ndarray, k: int, params: SearchParams, timings: dict[str, float] | None
    ) -> list[ScoredDoc]: ...


class ExactDenseSearcher(DenseSearcher):
    """Brute-force inner product over every live passage vector (the baseline every ANN is held
    to). Tombstoned rows score -inf, so they can never win their document's max."""

    name = "flat"

    def __init__(
        self,
        embeddings: np.ndarray | SegmentedVectors,
        doc_starts: np.ndarray,
        dead_rows: np.ndarray | None = None,
    ) -> None:
        self.embeddings = as_vectors(embeddings)
        self.doc_starts = doc_starts
        self.dead_rows = dead_rows if dead_rows is not None else np.zeros(0, np.int64)

    def _search(
        self, query: np.ndarray, k: int, params: SearchParams, timings: dict[str, float] | None
    ) -> list[ScoredDoc]:
        if self.doc_starts.shape[0] == 0:
            return []
        passage_scores = self.embeddings @ query
        if self.dead_rows.shape[0]:
            passage_scores[self.dead_rows] = -np.inf
        return _top_docs(passage_scores, self.doc_starts, k)


class TwoStageDenseSearcher(DenseSearcher):
    """CompactDS: the ANN proposes K candidate rows (plus every live row of the fresh segment);
    their full-precision vectors are gathered from the memmap in sorted row order, scored exactly,
    and documents ranked by their best candidate passage. Never re-scores PQ reconstructions and
    never reads the whole matrix."""

    def __init__(
        self,
        ann: AnnIndex,
        config: AnnConfig,
        embeddings: np.ndarray | SegmentedVectors,
        live: np.ndarray,
        indexed_rows: int,
        passage_doc_index: np.ndarray,
    ) -> None:
        self.ann = ann
        self.config = config
        self.name = config.label()
        self.embeddings = as_vectors(embeddings)
        self.live = live
        self.passage_doc_index = passage_doc_index
        self.fresh_rows = indexed_rows + np.flatnonzero(live[indexed_rows:])
        self.dead_indexed = int(indexed_rows - live[:indexed_rows].sum())

    def candidate_rows(self, query_vector: np.ndarray, k: int, params: SearchParams) -> np.ndarray:
        """Sorted, unique, live row ids: ANN candidates plus the fresh segment."""
        wanted = max(params.candidates or self.config.candidates, k)
        # Over-fetch by the tombstones inside the index (bounded) so K live candidates remain.
        fetch = wanted + min(self.dead_indexed, wanted)
        _, ids = self.ann.search(
            query_vector[None, :], fetch, nprobe=params.nprobe, ef_search=params.ef_search
        )
        rows = ids[0][ids[0] >= 0]
        rows = rows[self.live[rows]][:wanted]
        return np.union1d(rows, self.fresh_rows)

    def _search(
        self, query: np.ndarray, k: int, params: SearchParams, timings: dict[str, float] | None
    ) -> list[ScoredDoc]:
        started = time.perf_counter()
        rows = self.candidate_rows(query, k, params)
        ann_done = time.perf_counter()
        if rows.shape[0] == 0:
            return []
        # Fancy indexing a memmap with sorted rows reads just those rows, front to back.
        scores = np.asarray(self.embeddings[rows], dtype=np.float32) @ query
        docs = self.passage_doc_index[rows]  # non-decreasing: live passages are in doc order
        starts = np.flatnonzero(np.r_[True, np.diff(docs) != 0])
        ranked = [
            ScoredDoc(int(docs[hit.passage_index]), int(rows[hit.passage_index]), hit.score)
            for hit in _top_docs(scores, starts, k)
        ]
        if timings is not None:
            timings["dense_ann"] = (ann_done - started) * 1000
            timings["dense_rescore"] = (time.perf_counter() - ann_done) * 1000
        return ranked


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

    def __init__(
        self, directory: Path, live_rows: np.ndarray, passage_doc_index: np.ndarray, n_docs: int
    ) -> None:
        import bm25s

        # BM25 indexes live passages only (it is rebuilt per version): its ids map to live_rows.
        # An empty collection has no BM25 index (bm25s cannot index zero documents).
        self.retriever = bm25s.BM25.load(str(directory), mmap=True) if live_rows.shape[0] else None
        self.live_rows = live_rows
        self.passage_doc_index = passage_doc_index
        self.n_docs = n_docs

    def search(self, query: str, k: int) -> list[ScoredDoc]:
        n_passages = self.live_rows.shape[0]
        if self.retriever is None or n_passages == 0:
            return []
        tokens = _bm25_tokenize_strings(query)
        token_ids = self.retriever.get_tokens_ids(tokens)
        if not token_ids:
            return []  # every query word is a stop word or unknown: nothing can match
        # Scores straight from the sparse matrix: ``BM25.retrieve`` computes the same ones but
        # starts a thread pool per call (~2 ms a query here, more than the scoring itself).
        scores = self.retriever.get_scores_from_ids(token_ids)
        # Over-fetch passages so that k distinct documents survive max-passage grouping.
        depth = min(n_passages, max(k * 4, k + 32))
        return self._by_document(*_top_rows(scores, depth), k)

    def search_weighted(self, terms: dict[str, float], k: int) -> list[ScoredDoc]:
        """A weighted query: score(p) = sum_t w_t * BM25(t, p) over the terms' stems (terms that
        stem alike add their weights), then documents by their best passage like ``search``.
        This is how an RM3-expanded query (Lavrenko and Croft's relevance model interpolated
        with the original query) is scored: one weighted term list, not a re-tokenised string."""
        n_passages = self.live_rows.shape[0]
        if self.retriever is None or n_passages == 0:
            return []
        import bm25s

        weights: dict[int, float] = {}
        words = list(terms)
        stems = bm25s.tokenize(
            words, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
        )
        for word, tokens in zip(words, stems, strict=True):
            for token_id in self.retriever.get_tokens_ids([t for t in tokens if t]):
                weights[token_id] = weights.get(token_id, 0.0) + terms[word]
        if not weights:
            return []
        scores = np.zeros(n_passages, dtype=np.float32)
        for token_id, weight in weights.items():
            scores += weight * self.retriever.get_scores_from_ids([token_id])
        depth = min(n_passages, max(k * 4, k + 32))
        return self._by_document(*_top_rows(scores, depth), k)

    def _by_document(self, live_indices: list[int], scores: list[float], k: int) -> list[ScoredDoc]:
        """Ranked passages (positions among live passages) to documents by their best one."""
        best: dict[int, ScoredDoc] = {}
        for live_index, score in zip(live_indices, scores, strict=True):
            if score <= 0:
                continue
            passage_index = int(self.live_rows[live_index])
            doc_index = int(self.passage_doc_index[passage_index])
            if doc_index not in best:
                best[doc_index] = ScoredDoc(doc_index, int(passage_index), float(score))
        ranked = sorted(best.values(), key=lambda hit: (-hit.score, hit.doc_index))
        return ranked[:k]


class SegmentedBM25Searcher:
    """BM25 over the version's rows in segments (``services.index.bm25seg``): statistics of the
    live rows of every segment, tombstoned rows scoring 0. A write adds a segment over its own
    passages instead of re-indexing the collection; scores equal a from-scratch index."""

    name = "bm25"

    def __init__(self, index: SegmentedBM25, passage_doc_index: np.ndarray) -> None:
        self.index = index
        self.passage_doc_index = passage_doc_index

    def search(self, query: str, k: int) -> list[ScoredDoc]:
        tokens = tokenize([query])[0]
        if not tokens or self.index.n_live == 0:
            return []
        return self._ranked(self.index.scores(tokens), k)

    def search_weighted(self, terms: dict[str, float], k: int) -> list[ScoredDoc]:
        """score(p) = sum_t w_t * BM25(t, p) over the terms' stems (terms that stem alike add
        their weights), documents by their best passage (see ``BM25Searcher.search_weighted``)."""
        if self.index.n_live == 0:
            return []
        words = list(terms)
        weights: dict[str, float] = {}
        for word, stems in zip(words, tokenize(words), strict=True):
            for stem in stems:
                weights[stem] = weights.get(stem, 0.0) + terms[word]
        scores = np.zeros(self.index.n_rows, dtype=np.float32)
        for stem, weight in weights.items():
            scores += np.float32(weight) * self.index.scores([stem])
        return self._ranked(scores, k)

    def _ranked(self, scores: np.ndarray, k: int) -> list[ScoredDoc]:
        depth = min(self.index.n_live, max(k * 4, k + 32))
        rows, values = _top_rows(scores, depth)
        best: dict[int, ScoredDoc] = {}
        for row, score in zip(rows, values, strict=True):
            if score <= 0:
                continue
            doc_index = int(self.passage_doc_index[row])
            if doc_index not in best:
                best[doc_index] = ScoredDoc(doc_index, int(row), float(score))
        return sorted(best.values(), key=lambda hit: (-hit.score, hit.doc_index))[:k]


def _load_bm25(
    base: Path,
    manifest: dict[str, Any],
    live: np.ndarray,
    live_rows: np.ndarray,
    passage_doc_index: np.ndarray,
    n_docs: int,
) -> BM25Searcher | SegmentedBM25Searcher:
    listing = base / BM25_SEGMENTS / SEGMENTS_FILE
    if manifest.get("layout") == FLAT:
        entries = manifest["bm25"]["segments"]
        segments = [TermStats.load(base, bm25_prefix(str(e["name"]))) for e in entries]
    elif listing.exists():
        entries = json.loads(listing.read_text())
        segments = [TermStats.load(base / BM25_SEGMENTS / str(e["name"])) for e in entries]
    else:  # a version built before segments: one bm25s index of live rows
        return BM25Searcher(base / "bm25", live_rows, passage_doc_index, n_docs)
    bounds = np.cumsum([0, *[s.n_rows for s in segments]])
    if int(bounds[-1]) != live.shape[0]:
        raise ValueError(f"BM25 segments cover {bounds[-1]} rows of {live.shape[0]} in {base}")
    masks = [live[a:b] for a, b in itertools.pairwise(bounds)]
    return SegmentedBM25Searcher(
        SegmentedBM25(segments, masks, k1=BM25_K1, b=BM25_B), passage_doc_index
    )


@dataclass(frozen=True)
class Snapshot:
    """An immutable, loaded version of a collection. Safe to share between threads.

    ``passages`` and the rows of ``exact.embeddings`` include tombstoned rows (``live`` is False
    there) until the next merge; ``documents`` holds live documents only. Both read the
    version's segment files (``rows``: ``services.index.segments``)."""

    name: str
    version: str
    manifest: dict[str, Any]
    documents: Sequence[Document]  # read from disk on access (services/index/records.py)
    passages: Sequence[Passage]
    doc_starts: np.ndarray
    passage_doc_index: np.ndarray
    live: np.ndarray
    ann_config: AnnConfig
    indexed_rows: int
    dense: DenseSearcher
    exact: ExactDenseSearcher
    bm25: BM25Searcher | SegmentedBM25Searcher
    rows: VersionRows

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    @property
    def n_passages(self) -> int:
        """Live passages (tombstoned rows excluded)."""
        return int(self.live.sum())

    def rows_of(self, doc_id: str) -> list[int]:
        """The live passage rows of live document ``doc_id`` (none when it is not one)."""
        index = self.rows.doc_index(doc_id)
        return [] if index is None else self.rows.rows_of(index).tolist()

    def search(
        self,
        retriever: str,
        query: str,
        query_vector: np.ndarray | None,
        k: int,
        params: SearchParams | None = None,
        timings: dict[str, float] | None = None,
        bm25_terms: dict[str, float] | None = None,
    ) -> list[ScoredDoc]:
        if retriever in DENSE_RETRIEVERS:
            if query_vector is None:
                raise ValueError("dense search needs a query vector")
            searcher: DenseSearcher = self.dense if retriever == "dense" else self.exact
            return searcher.search(query_vector, k, params, timings)
        if retriever == "bm25":
            if bm25_terms:
                return self.bm25.search_weighted(bm25_terms, k)
            return self.bm25.search(query, k)
        raise invalid(
            f"unknown retriever {retriever!r}; available: {', '.join(RETRIEVERS)}",
            field="retrievers",
        )


def chunk_document(doc: Document, passage_words: int) -> list[Passage]:
    """Split into passages of at most ``passage_words`` whitespace words, keeping the last short
    chunk (CompactDS ``keep_last_chunk``). An empty text still yields one passage (the title).
    """
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


def load_snapshot(
    name: str,
    family: ArtifactFamily,
    *,
    default_ann: AnnConfig | None = None,
    with_ann: bool = True,
    device: str = "cpu",
) -> Snapshot:
    """Load the current version. ``with_ann=False`` skips the ANN index (writers need rows only).
    A version without an ``ann`` manifest entry (built before ANN existed) is flat."""
    version = family.current_version()
    if version is None:
        raise not_found("collection", name)
    base = family.loadable(version)
    manifest = family.read_manifest(version)
    dead_rows = (
        load_npy(base / TOMBSTONES) if (base / TOMBSTONES).exists() else np.zeros(0, np.int64)
    )
    rows = load_rows(base, int(manifest["dim"]), dead_rows, manifest)
    ann_meta: dict[str, Any] = manifest.get("ann") or {}
    ann_config = (
        AnnConfig.from_dict(ann_meta["config"])
        if "config" in ann_meta
        else (default_ann or AnnConfig())
    )
    indexed_rows = int(ann_meta.get("indexed_rows", 0))
    live = rows.live
    exact = ExactDenseSearcher(rows.vectors, rows.doc_starts, dead_rows)
    dense: DenseSearcher = exact
    if with_ann and indexed_rows and ann_meta.get("file"):
        index = load_ann(ann_config, base / ann_meta["file"], int(manifest["dim"]), device)
        dense = TwoStageDenseSearcher(
            index, ann_config, rows.vectors, live, indexed_rows, rows.passage_doc_index
        )
    return Snapshot(
        name=name,
        version=version,
        manifest=manifest,
        documents=rows.documents,
        passages=rows.passages,
        doc_starts=rows.doc_starts,
        passage_doc_index=rows.passage_doc_index,
        live=live,
        ann_config=ann_config,
        indexed_rows=indexed_rows,
        dense=dense,
        exact=exact,
        bm25=_load_bm25(
            base, manifest, live, np.flatnonzero(live), rows.passage_doc_index, len(rows.documents)
        ),
        rows=rows,
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
    merge_due: bool = False
    """The fresh segment and tombstones outgrew ``merge_fraction`` of the ANN index."""


class IndexEngine:
    """Collections under ``<data_dir>/collections``; readers get snapshots, writers publish.

    Several processes may write (the index service for small upserts, Celery workers for large
    ones and merges): each write holds the collection's file lock, and readers notice a new
    ``CURRENT``. ``ann`` is the dense configuration new collections get (default: from settings);
    an existing collection keeps the one recorded in its manifest until a merge changes it.
    """

    def __init__(
        self,
        data_dir: Path,
        embedder_factory: Callable[[], Embedder],
        passage_words: int = 256,
        *,
        ann: AnnConfig | None = None,
        max_candidates: int | None = None,
        device: str | None = None,
        merge_fraction: float = 0.2,
    ) -> None:
        self.root = data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self._embedder_factory = embedder_factory
        self._embedder: Embedder | None = None
        self.passage_words = passage_words
        if ann is None or max_candidates is None or device is None:
            from shared.settings import get_settings

            settings = get_settings()
            ann = ann or AnnConfig.from_settings(settings)
            max_candidates = max_candidates or settings.index_max_candidates
            device = device or settings.device
        self.ann = ann.validated()
        self.max_candidates = max_candidates
        self.device = device
        self.merge_fraction = merge_fraction
        self._snapshots: dict[str, Snapshot] = {}
        self._load_lock = threading.Lock()
        # One query encoding per core at a time; concurrent queries share batches.
        self._query_batcher = QueryBatcher(
            lambda texts: self.embedder.encode_queries(texts),
            slots=max(1, min(os.cpu_count() or 1, 4)),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexEngine:
        from shared.models import get_embedder

        return cls(
            settings.data_dir,
            lambda: get_embedder(settings),
            settings.passage_words,
            ann=AnnConfig.from_settings(settings),
            max_candidates=settings.index_max_candidates,
            device=settings.device,
            merge_fraction=settings.index_merge_fraction,
        )

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

    def _load(self, name: str, family: ArtifactFamily, *, with_ann: bool = True) -> Snapshot:
        return load_snapshot(
            name, family, default_ann=self.ann, with_ann=with_ann, device=self.device
        )

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
                cached = self._load(name, family)
                self._snapshots[name] = cached
                logger.info(
                    "loaded collection %s version %s (dense: %s)", name, version, cached.dense.name
                )
            return cached

    def _serving(self, name: str, family: ArtifactFamily) -> Snapshot | None:
        """The current version as a writer (holding the family lock) reads it: the snapshot
        searches use when it is the current one (nothing loaded again), else loaded without
        the ANN index."""
        version = family.current_version()
        if version is None:
            return None
        cached = self._snapshots.get(name)
        if cached is not None and cached.version == version:
            return cached
        return self._load(name, family, with_ann=False)

    def embed_query(self, query: str) -> np.ndarray:
        """The query's vector from the embedder's query path (ONNX Runtime when exported, else
        sentence-transformers fp32: the same vectors, cosine 1.000 on real passages), in one
        batch with the queries other threads are encoding at the same time."""
        return self._query_batcher.encode(query)

    def embed(self, request: EmbedRequest) -> EmbedResponse:
        """The query's vector (as ``search`` embeds it) and the passages' (their text as
        indexing embeds it, title prepended): what a caller needs to move a query vector
        (Rocchio) without the embedder.

        A passage naming a ``doc_id`` of the request's ``collection`` whose title and text are a
        stored passage of that document gets the stored vector, with no encoding: a hit shown to
        a user comes back as it was indexed. The rest, and the query, go through the query path
        in one call: ONNX Runtime when it is loaded, which embeds passages as sentence-
        transformers does (cosine >= 0.99 on SciFact abstracts,
        ``tests/integration/test_onnx_encoder.py``); bulk indexing stays fp32."""
        vectors: list[np.ndarray | None] = [None] * len(request.passages)
        if request.collection is not None and any(p.doc_id for p in request.passages):
            snapshot = self.snapshot(request.collection)
            for i, p in enumerate(request.passages):
                for row in snapshot.rows_of(p.doc_id or ""):
                    record = snapshot.passages[row]
                    if record.text == p.text and record.title == p.title:
                        vectors[i] = np.asarray(snapshot.exact.embeddings[row], dtype=np.float32)
                        break
        missing = [i for i, v in enumerate(vectors) if v is None]
        texts = [
            embedding_text(
                Passage(
                    passage_id="",
                    doc_id="",
                    title=request.passages[i].title,
                    text=request.passages[i].text,
                )
            )
            for i in missing
        ]
        if request.query is not None:
            texts.insert(0, request.query)
        encoded = list(self.embedder.encode_queries(texts)) if texts else []
        query = encoded.pop(0) if request.query is not None else None
        for i, vector in zip(missing, encoded, strict=True):
            vectors[i] = vector
        return EmbedResponse(
            model=self.embedder.model_id,
            dim=int(self.embedder.dim),
            query_vector=None if query is None else query.tolist(),
            passage_vectors=[v.tolist() for v in vectors if v is not None],
        )

    def search(
        self,
        name: str,
        query: str,
        k: int,
        retrievers: Sequence[str],
        params: SearchParams | None = None,
        *,
        query_vector: Sequence[float] | None = None,
        bm25_terms: dict[str, float] | None = None,
    ) -> tuple[Snapshot, dict[str, list[ScoredDoc]], dict[str, float]]:
        """Search ``retrievers``; ``query_vector`` replaces the embedded ``query`` for the dense
        retrievers (its dimension must be the collection's) and ``bm25_terms`` replaces
        ``query`` for BM25 (a weighted term list)."""
        unknown = [r for r in retrievers if r not in RETRIEVERS]
        if unknown:
            raise invalid(
                f"unknown retriever {unknown[0]!r}; available: {', '.join(RETRIEVERS)}",
                field="retrievers",
            )
        params = params or SearchParams()
        params.check(k, self.max_candidates)
        snapshot = self.snapshot(name)
        timings: dict[str, float] = {}
        vector = None
        if query_vector is not None:
            dim = int(snapshot.manifest["dim"])
            if len(query_vector) != dim:
                raise invalid(
                    f"query_vector has {len(query_vector)} dimensions; the collection's "
                    f"embeddings have {dim}",
                    field="query_vector",
                )
            vector = np.asarray(query_vector, dtype=np.float32)
        elif any(r in DENSE_RETRIEVERS for r in retrievers):
            started = time.perf_counter()
            vector = self.embed_query(query)
            timings["embed_query"] = (time.perf_counter() - started) * 1000
        results: dict[str, list[ScoredDoc]] = {}
        for retriever in retrievers:
            started = time.perf_counter()
            results[retriever] = snapshot.search(
                retriever, query, vector, k, params, timings, bm25_terms
            )
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

    def documents(self, name: str, doc_ids: Sequence[str]) -> list[Document]:
        """The live documents among ``doc_ids`` (in that order; unknown ids are left out).
        Through each segment's doc id -> line map (loaded once per segment file, as ``embed``
        uses it): a lookup reads the records it returns, not the whole collection, since the
        orchestrator looks up the few fused hits the index sent without text on the search
        path."""
        snapshot = self.snapshot(name)
        indices = (snapshot.rows.doc_index(doc_id) for doc_id in dict.fromkeys(doc_ids))
        return [snapshot.documents[i] for i in indices if i is not None]

    def passages(self, name: str, wanted: Mapping[str, int | None]) -> list[Passage]:
        """doc id -> passage number (``None``: the first): those live passages, in that order
        (unknown ones left out). What ``InProcessIndex.passage_texts`` answers."""
        return [Passage.model_validate(r) for r in self.passage_records(name, wanted)]

    def passage_records(self, name: str, wanted: Mapping[str, int | None]) -> list[dict[str, Any]]:
        """``passages`` as the stored JSON objects (no model round trip: what the service
        serialises)."""
        snapshot = self.snapshot(name)
        records = snapshot.passages
        raw = records.raw if isinstance(records, JsonlRecords) else None
        found = []
        for doc_id, number in wanted.items():
            target = f"{doc_id}#{number or 0}"
            for row in snapshot.rows_of(doc_id):
                record = raw(row) if raw is not None else records[row].model_dump()
                if record["passage_id"] == target:
                    found.append(record)
                    break
        return found

    def delete(self, name: str, doc_id: str) -> WriteResult:
        if not self.exists(name):
            raise not_found("collection", name, field="collection")
        if self.snapshot(name).rows.doc_index(doc_id) is None:
            raise not_found("document", doc_id)
        return self._write(name, upserts=[], deletes={doc_id}, progress=None)

    def ann_config(self, name: str) -> AnnConfig:
        """The collection's recorded dense configuration (the engine default if none yet),
        read from its manifest without loading the index."""
        family = self.family(name)
        if family.current_version() is None:
            raise not_found("collection", name, field="collection")
        recorded = family.read_manifest().get("ann") or {}
        return AnnConfig.from_dict(recorded["config"]) if "config" in recorded else self.ann

    def merge(
        self, name: str, config: AnnConfig | None = None, progress: Progress | None = None
    ) -> WriteResult:
        """Drop tombstoned rows and rebuild the ANN index over every live row (optionally with a
        new configuration), publishing a new version. Searches keep using the old snapshot until
        then; writers wait on the collection lock."""
        if not self.exists(name):
            raise not_found("collection", name, field="collection")
        return self._write(
            name, upserts=[], deletes=set(), progress=progress, merge=True, config=config
        )

    def _write(
        self,
        name: str,
        *,
        upserts: list[Document],
        deletes: set[str],
        progress: Progress | None,
        merge: bool = False,
        config: AnnConfig | None = None,
    ) -> WriteResult:
        started = time.perf_counter()
        family = self.family(name)
        with family.lock():
            previous = self._serving(name, family)
            config = (config or (previous.ann_config if previous else self.ann)).validated()
            replaced = {doc.id for doc in upserts} | deletes
            # The live documents replaced or deleted, through each segment's id -> line map.
            found = [previous.rows.doc_index(d) for d in replaced] if previous is not None else []
            replaced_idx = np.array([i for i in found if i is not None], dtype=np.int64)
            n_previous = previous.n_documents if previous is not None else 0
            n_documents = n_previous - replaced_idx.shape[0] + len(upserts)
            chunks = [chunk_document(doc, self.passage_words) for doc in upserts]
            new_passages = [p for chunk in chunks for p in chunk]
            new_vectors = self._embed_passages(new_passages, progress)
            # Each new row's document line among the upserts.
            new_row_docs = np.repeat(
                np.arange(len(upserts), dtype=np.int64), [len(chunk) for chunk in chunks]
            )
            # Append mode keeps every previous row (and the record segments, the ANN index and
            # the BM25 segments over them), tombstoning the rows of replaced or deleted
            # documents; otherwise (a merge, or the write that brings a collection without an
            # ANN index to ``min_passages``) rows are compacted into a new base.
            append = previous is not None and not merge
            dead: np.ndarray = np.zeros(0, np.int64)
            if previous is not None and append:
                dead = np.flatnonzero(
                    ~previous.live | np.isin(previous.passage_doc_index, replaced_idx)
                )
                live_after = len(previous.passages) - dead.shape[0] + len(new_passages)
                append = (
                    previous.indexed_rows > 0
                    or config.backend == "flat"
                    or live_after < config.min_passages
                )
            kept_docs = kept_rows = np.zeros(0, np.int64)  # what a compaction copies
            if previous is not None and append:
                n_rows = len(previous.passages) + len(new_passages)
            else:
                dead = np.zeros(0, np.int64)
                if previous is not None:
                    kept_docs = np.setdiff1d(np.arange(n_previous, dtype=np.int64), replaced_idx)
                    kept_rows = np.flatnonzero(
                        previous.live & ~np.isin(previous.passage_doc_index, replaced_idx)
                    )
                n_rows = kept_rows.shape[0] + len(new_passages)
            live_passages = np.ones(n_rows, dtype=bool)
            live_passages[dead] = False
            build_index = (
                not append
                and config.backend != "flat"
                and int(live_passages.sum()) >= config.min_passages
            )
            ann_meta: dict[str, Any] = {"config": config.to_dict(), "indexed_rows": 0}
            has_ann = append and previous is not None and previous.indexed_rows > 0
            if has_ann and previous is not None:
                ann_meta = dict(previous.manifest["ann"])
            manifest: dict[str, Any] = {
                "collection": name,
                "documents": n_documents,
                "passages": int(live_passages.sum()),
                "rows": n_rows,
                "tombstones": int(dead.shape[0]),
                "embedder": EMBEDDER_ID,
                "dim": EMBEDDING_DIM,
                "dtype": "float32",
                "passage_words": self.passage_words,
                "bm25": {"k1": BM25_K1, "b": BM25_B, "stemmer": "english", "stopwords": "en"},
                "retrievers": list(RETRIEVERS),
                "ann": ann_meta,  # filled in while building: ``build`` seals it on exit
                "dense_backend": config.label() if has_ann or build_index else "flat",
                "layout": FLAT,  # every file in the version directory (services.index.segments)
            }
            with family.build(manifest) as scratch:
                if previous is not None and append:
                    # Only this write's own records and vectors are written; the base and the
                    # earlier segments are hard links (their checksums carry over).
                    segment: dict[str, Any] | None = None
                    if new_passages:
                        segment_name = f"w{len(previous.rows.segments):05d}"
                        segment = {
                            "name": segment_name,
                            "rows": len(new_passages),
                            "documents": len(upserts),
                        }
                        write_segment(
                            scratch,
                            upserts,
                            new_passages,
                            new_row_docs,
                            new_vectors,
                            prefix=segment_prefix(segment_name),
                        )
                    manifest["records"] = link_segments(previous.rows, scratch, segment)
                else:
                    # A compaction: kept records copied as the bytes they were written as, in
                    # their order, then the upserts; one base, no write segments.
                    kept_lines = np.full(n_previous, -1, dtype=np.int64)
                    kept_lines[kept_docs] = np.arange(kept_docs.shape[0], dtype=np.int64)
                    row_docs = np.concatenate(
                        [
                            kept_lines[previous.passage_doc_index[kept_rows]]
                            if previous is not None
                            else np.zeros(0, np.int64),
                            kept_docs.shape[0] + new_row_docs,
                        ]
                    )
                    write_segment(
                        scratch,
                        upserts,
                        new_passages,
                        row_docs,
                        new_vectors,
                        kept_from=previous.rows if previous is not None else None,
                        kept_docs=kept_docs,
                        kept_rows=kept_rows,
                    )
                    manifest["records"] = []
                if dead.shape[0]:
                    np.save(scratch / TOMBSTONES, dead.astype(np.int64))
                if has_ann and previous is not None:
                    link(
                        family.versions_dir / previous.version / ann_meta["file"],
                        scratch / ann_meta["file"],
                    )
                elif build_index:
                    if progress:
                        progress(0, n_rows, "ann")
                    ann_meta.update(self._build_ann(scratch, config, n_rows), indexed_rows=n_rows)
                    if progress:
                        progress(n_rows, n_rows, "ann")
                if progress:
                    progress(0, n_rows, "bm25")
                manifest["bm25"]["segments"] = self._write_bm25_segments(
                    scratch,
                    (family.versions_dir / previous.version, previous.manifest)
                    if previous and append
                    else None,
                    # Parsed only for a compaction or a version from before BM25 segments.
                    lambda: (
                        []
                        if previous is None
                        else [
                            previous.passages[int(r)]
                            for r in (range(len(previous.passages)) if append else kept_rows)
                        ]
                    ),
                    new_passages,
                )
                if progress:
                    progress(n_rows, n_rows, "bm25")
            version = family.current_version() or ""
            family.prune(keep=2)
        indexed = int(ann_meta.get("indexed_rows", 0))
        outside_index = n_rows - indexed + int(dead.shape[0])
        return WriteResult(
            collection=name,
            version=version,
            documents=n_documents,
            passages=int(live_passages.sum()),
            upserted=len(upserts),
            deleted=len(deletes),
            embedded_passages=len(new_passages),
            seconds=time.perf_counter() - started,
            # Without an ANN index, tombstoned rows (kept until a merge) are what a merge drops.
            # Many small segments cost every query a pass each, whatever their size.
            merge_due=(
                outside_index > self.merge_fraction * indexed
                if indexed > 0
                else int(dead.shape[0]) > self.merge_fraction * max(n_rows, 1)
            )
            or len(manifest["bm25"]["segments"]) > 1 + MAX_FRESH_BM25_SEGMENTS,
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

    @classmethod
    def _write_bm25_segments(
        cls,
        directory: Path,
        previous: tuple[Path, dict[str, Any]] | None,
        kept: Callable[[], list[Passage]],
        new: list[Passage],
    ) -> list[dict[str, int | str]]:
        """BM25 term statistics as segments over the version's rows, in ``directory`` (the
        flat version being built): the previous version's segments hard-linked (they cover the
        kept rows) plus one over ``new``. ``previous`` (its directory and manifest) None (a
        first build or a compaction) or a version without segments (built before them) means
        one segment over every row (``kept()`` then ``new``). Returns the segment list."""
        listed: list[dict[str, int | str]] = []
        sources: list[tuple[str, Path, str]] = []  # (name, directory, prefix) of each segment
        if previous is not None:
            base, manifest = previous
            old_list = base / BM25_SEGMENTS / SEGMENTS_FILE
            if manifest.get("layout") == FLAT:
                listed = [dict(entry) for entry in manifest["bm25"]["segments"]]
                sources = [(str(e["name"]), base, bm25_prefix(str(e["name"]))) for e in listed]
            elif old_list.exists():
                listed = json.loads(old_list.read_text())
                sources = [
                    (str(e["name"]), base / BM25_SEGMENTS / str(e["name"]), "") for e in listed
                ]
        if sources:
            for name, source, prefix in sources:
                for file in (VOCAB_FILE, ARRAYS_FILE):
                    link(source / f"{prefix}{file}", directory / f"{bm25_prefix(name)}{file}")
            rows = new
        else:
            listed = []
            rows = kept() + new
        if rows:
            name = f"s{len(listed):05d}"
            TermStats.build([embedding_text(p) for p in rows]).save(directory, bm25_prefix(name))
            listed.append({"name": name, "rows": len(rows)})
        return listed

    def _build_ann(self, scratch: Path, config: AnnConfig, n_rows: int) -> dict[str, Any]:
        """Build the ANN index over the scratch version's vectors (read from its memmap)."""
        started = time.perf_counter()
        vectors = np.memmap(
            scratch / EMBEDDINGS, dtype=np.float32, mode="r", shape=(n_rows, EMBEDDING_DIM)
        )
        index = build_ann(config, vectors, self.device)
        index.save(scratch / ANN_FILE)
        seconds = time.perf_counter() - started
        logger.info("built %s over %d rows in %.1f s", config.backend, n_rows, seconds)
        return {"file": ANN_FILE, "build_seconds": round(seconds, 3)}


def params_of(request: IndexSearchRequest) -> SearchParams:
    return SearchParams(
        candidates=request.candidates, nprobe=request.nprobe, ef_search=request.ef_search
    )


def search_payload(
    snapshot: Snapshot,
    results: dict[str, list[ScoredDoc]],
    timings: dict[str, float],
    text_k: int | None = None,
) -> dict[str, Any]:
    """Engine results in the wire format as plain JSON-ready objects (one document-level hit
    list per retriever), built from the hits' passage records alone (each carries its doc id
    and title): the service serialises this once, with no model round trip. Hits ranked past
    ``text_k`` in their list carry ``text: ""`` (ids, titles, scores and passage numbers only:
    what fusion needs, and what fetches the text of a fused hit later); ``None`` gives every
    hit its text."""
    passages = snapshot.passages
    raw = passages.raw if isinstance(passages, JsonlRecords) else None
    hits: dict[str, list[dict[str, Any]]] = {}
    for retriever, scored_docs in results.items():
        rows = []
        for rank, scored in enumerate(scored_docs, start=1):
            record = (
                raw(scored.passage_index)
                if raw is not None
                else passages[scored.passage_index].model_dump()
            )
            rows.append(
                {
                    "doc_id": record["doc_id"],
                    "title": record["title"],
                    "text": record["text"] if text_k is None or rank <= text_k else "",
                    "score": scored.score,
                    "sources": {retriever: {"rank": rank, "score": scored.score}},
                    "passage": passage_number(record["passage_id"]),
                }
            )
        hits[retriever] = rows
    return {
        "collection": snapshot.name,
        "version": snapshot.version,
        "results": hits,
        "timings_ms": {k: round(v, 2) for k, v in timings.items()},
        "dense_backend": snapshot.dense.name if "dense" in results else None,
    }


def search_response(
    snapshot: Snapshot,
    results: dict[str, list[ScoredDoc]],
    timings: dict[str, float],
    text_k: int | None = None,
) -> IndexSearchResponse:
    """``search_payload`` as the response model (in-process callers: evaluation, benchmarks)."""
    return IndexSearchResponse.model_validate(search_payload(snapshot, results, timings, text_k))


class InProcessIndex:
    """The index service's search without HTTP: the evaluation harness and benchmarks run the
    orchestrator's pipelines on this, so they measure the same code the services run."""

    def __init__(self, engine: IndexEngine) -> None:
        self.engine = engine

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        snapshot, results, timings = self.engine.search(
            request.collection,
            request.query,
            request.k,
            request.retrievers,
            params_of(request),
            query_vector=request.query_vector,
            bm25_terms=request.bm25_terms,
        )
        return search_response(snapshot, results, timings, request.text_k)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        return self.engine.embed(request)

    async def passage_texts(self, name: str, wanted: Mapping[str, int | None]) -> list[Passage]:
        """The passages the search sent without text (``IndexClient.passage_texts``)."""
        return self.engine.passages(name, wanted)
