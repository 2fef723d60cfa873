"""BM25 over several segments with global statistics: the base of segmented writes.

``bm25s`` bakes the collection's statistics (N, each term's document frequency, the average
passage length) into the scores it stores, so adding passages means re-indexing everything: the
O(collection) part of a one-document upsert (docs/index.md). A segment here stores raw term
frequencies instead (``TermStats``: a term -> postings CSR of (row, tf), plus each passage's
token count), so a write builds a segment over its own passages only, and ``SegmentedBM25``
scores a query across every segment with the statistics of the *live* passages of all of them:

    N      = live passages in all segments
    df(t)  = live passages containing t, counted from the postings at query time
    avgdl  = mean token count of the live passages
    score  = sum over query tokens t of  idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))

which is exactly bm25s' ``lucene`` method over the live passages (tested: scores equal a
from-scratch bm25s index of the same passages). Tombstoned rows drop out of N, df and avgdl, not
only out of the results. Tokenisation is the index's (bm25s' English stop words, Snowball
English stemmer), so query and passages agree.

``IndexEngine`` writes one segment per write (``bm25.<name>.vocab.json`` and
``bm25.<name>.postings.npz`` in a version, ``bm25seg/<name>/`` in versions from before the flat
layout; earlier segments hard-linked) and a merge compacts them to one; records and vectors are segmented the same way
(``services.index.segments``).
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.npy import load_npz

VOCAB_FILE = "vocab.json"
ARRAYS_FILE = "postings.npz"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """The index's BM25 tokens: lower-cased words, English stop words out, Snowball-stemmed."""
    import bm25s
    import Stemmer

    stemmed = bm25s.tokenize(
        list(texts),
        stopwords="en",
        stemmer=Stemmer.Stemmer("english"),
        return_ids=False,
        show_progress=False,
    )
    return [[t for t in tokens if t] for tokens in stemmed]


@dataclass(frozen=True)
class TermStats:
    """Raw statistics of one segment's passages (rows 0..n-1 of the segment)."""

    vocab: dict[str, int]
    indptr: np.ndarray  # (terms + 1,) int64: postings of term i are [indptr[i], indptr[i+1])
    rows: np.ndarray  # int32, ascending within a term
    tf: np.ndarray  # float32 term frequency per posting
    doc_len: np.ndarray  # float32 token count per passage

    @property
    def n_rows(self) -> int:
        return int(self.doc_len.shape[0])

    @classmethod
    def build(cls, texts: Sequence[str]) -> TermStats:
        return cls.from_tokens(tokenize(texts))

    @classmethod
    def from_tokens(cls, token_lists: Sequence[Sequence[str]]) -> TermStats:
        vocab: dict[str, int] = {}
        per_term: list[dict[int, int]] = []
        doc_len = np.zeros(len(token_lists), dtype=np.float32)
        for row, tokens in enumerate(token_lists):
            doc_len[row] = len(tokens)
            for token in tokens:
                term = vocab.setdefault(token, len(vocab))
                if term == len(per_term):
                    per_term.append({})
                counts = per_term[term]
                counts[row] = counts.get(row, 0) + 1
        sizes = np.array([len(c) for c in per_term], dtype=np.int64)
        indptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes)])
        rows = np.fromiter((r for c in per_term for r in c), dtype=np.int32, count=int(indptr[-1]))
        tf = np.fromiter(
            (n for c in per_term for n in c.values()), dtype=np.float32, count=int(indptr[-1])
        )
        return cls(vocab, indptr, rows, tf, doc_len)  # rows ascend: passages were visited in order

    def postings(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        term = self.vocab.get(token)
        if term is None:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        start, end = int(self.indptr[term]), int(self.indptr[term + 1])
        return self.rows[start:end], self.tf[start:end]

    def save(self, directory: Path, prefix: str = "") -> None:
        """``vocab.json`` and ``postings.npz`` in ``directory``, each name after ``prefix``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{prefix}{VOCAB_FILE}").write_text(json.dumps(self.vocab, ensure_ascii=False))
        np.savez(
            directory / f"{prefix}{ARRAYS_FILE}",
            indptr=self.indptr,
            rows=self.rows,
            tf=self.tf,
            doc_len=self.doc_len,
        )

    @classmethod
    def load(cls, directory: Path, prefix: str = "") -> TermStats:
        """The segment's statistics; shared while any snapshot holds them. A segment is written
        once and every later version hard-links its files, so one loaded per inode serves all
        versions (an upsert then loads only its own new segment)."""
        arrays_file = directory / f"{prefix}{ARRAYS_FILE}"
        stat = arrays_file.stat()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with _LOADED_LOCK:
            cached = _LOADED.get(key)
        if cached is not None:
            return cached
        vocab = json.loads((directory / f"{prefix}{VOCAB_FILE}").read_text())
        arrays = load_npz(arrays_file)
        loaded = cls(vocab, arrays["indptr"], arrays["rows"], arrays["tf"], arrays["doc_len"])
        with _LOADED_LOCK:
            return _LOADED.setdefault(key, loaded)


#: Loaded segments by (device, inode, size, mtime) of their postings; an entry goes with the
#: last snapshot that holds it.
_LOADED: weakref.WeakValueDictionary[tuple[int, int, int, int], TermStats] = (
    weakref.WeakValueDictionary()
)
_LOADED_LOCK = threading.Lock()


class SegmentedBM25:
    """Scores across segments laid end to end (segment i's rows start at ``offsets[i]``), each
    with a live mask; statistics are those of the live passages of all segments together."""

    def __init__(
        self,
        segments: Sequence[TermStats],
        live: Sequence[np.ndarray],
        *,
        k1: float = 0.9,
        b: float = 0.4,
    ) -> None:
        if len(segments) != len(live):
            raise ValueError("one live mask per segment")
        self.segments = list(segments)
        self.live = [np.asarray(mask, dtype=bool) for mask in live]
        for segment, mask in zip(self.segments, self.live, strict=True):
            if mask.shape[0] != segment.n_rows:
                raise ValueError("a live mask must cover its segment's rows")
        self.offsets = np.concatenate(
            [np.zeros(1, np.int64), np.cumsum([s.n_rows for s in self.segments])]
        )
        self.k1, self.b = k1, b
        self.n_live = int(sum(int(mask.sum()) for mask in self.live))
        total_len = float(
            sum(float(s.doc_len[m].sum()) for s, m in zip(self.segments, self.live, strict=True))
        )
        self.avgdl = total_len / self.n_live if self.n_live else 0.0

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        """A score for every row (0 for dead rows and rows without a query term); a token that
        appears twice in the query counts twice, as in bm25s."""
        out = np.zeros(self.n_rows, dtype=np.float32)
        if not self.n_live or self.avgdl <= 0:
            return out
        for token in tokens:
            parts = []
            for segment, mask, offset in zip(
                self.segments, self.live, self.offsets[:-1], strict=True
            ):
                rows, tf = segment.postings(token)
                if rows.shape[0]:
                    keep = mask[rows]
                    parts.append((rows[keep], tf[keep], segment, int(offset)))
            df = sum(part[0].shape[0] for part in parts)
            if df == 0:
                continue
            idf = np.float32(math.log(1 + (self.n_live - df + 0.5) / (df + 0.5)))
            for rows, tf, segment, offset in parts:
                norm = self.k1 * ((1 - self.b) + self.b * segment.doc_len[rows] / self.avgdl)
                out[rows.astype(np.int64) + offset] += idf * (tf / (norm + tf))
        return out
