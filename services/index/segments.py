"""A version's records and vectors in immutable segments: what makes a one-document write O(new).

A version's rows are its base followed by the segments of the writes since the last merge::

    documents.jsonl  passages.jsonl  embeddings.f32  row_docs.npy  doc_ids.json
                            the base: what a build or a merge wrote (the version directory's
                            own files; every version before segments is a base alone)
    <name>.documents.jsonl ... <name>.doc_ids.json
                            one write's upserted documents, their passages and vectors, each
                            row's document line and the documents' ids (the same five files,
                            named after the segment), listed in the manifest's ``records``
                            ([{"name", "rows", "documents"}, ...] in write order)

Every file sits in the version directory itself (``"layout": "flat"`` in the manifest): a
write creates no directory but its version's, so sealing it fsyncs one directory however many
segments there are. Versions written before that keep each segment in ``records/<name>/``
with the list in ``records/segments.json``; they load as before and the next write links
their files under the flat names.

A write hard-links the base and the earlier segments (their checksums carry over,
``shared.artifacts``) and writes only its own segment; rows it replaces or deletes go to the
version's ``tombstones.npy``. In every segment ``row_docs.npy`` gives each row's line in that
segment's ``documents.jsonl`` (-1: none, only in versions written before segments, whose
tombstoned rows lost their document), and a document is live while any of its rows is: the
rows of one document are tombstoned together. ``load_rows`` derives the version-wide maps
(row -> live document, live document -> record) from these and the tombstones with array
operations; nothing is parsed and nothing is scanned but a new segment's own lines.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.index.records import JsonlRecords, SegmentedVectors, inode_key
from shared.npy import load_npy
from shared.schemas import Document, Passage

DOCUMENTS = "documents.jsonl"
PASSAGES = "passages.jsonl"
EMBEDDINGS = "embeddings.f32"
#: Each row's document line in its segment's ``documents.jsonl``: loading needs no parse.
ROW_DOCS = "row_docs.npy"
#: The segment's document ids in line order: writes find their rows without a parse.
DOC_IDS = "doc_ids.json"
SEGMENT_FILES = (DOCUMENTS, PASSAGES, EMBEDDINGS, ROW_DOCS, DOC_IDS)
RECORDS_DIR = "records"
LIST_FILE = "segments.json"
#: The manifest's ``layout`` of versions whose segment files sit in the version directory.
FLAT = "flat"


def segment_prefix(name: str) -> str:
    """The prefix of segment ``name``'s files in a flat version (``""``: the base)."""
    return f"{name}." if name else ""


class DocIds:
    """A segment's document ids in line order and each id's line."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.line_of = {doc_id: line for line, doc_id in enumerate(ids)}


#: Loaded id lists by the inode of their file, while a snapshot holds them (as ``JsonlFile``).
_IDS: weakref.WeakValueDictionary[tuple[int, int, int, int], DocIds] = weakref.WeakValueDictionary()
_IDS_LOCK = threading.Lock()


def record_ids(records: Sequence[Any], field: str) -> list[str]:
    """One field of every record, from the raw JSON (no models)."""
    if isinstance(records, JsonlRecords):
        return [str(records.raw(i)[field]) for i in range(len(records))]
    return [str(getattr(record, field)) for record in records]


def _doc_ids(directory: Path, prefix: str, documents: JsonlRecords[Document]) -> DocIds:
    path = directory / f"{prefix}{DOC_IDS}"
    source = path if path.exists() else directory / f"{prefix}{DOCUMENTS}"
    key = inode_key(source)
    with _IDS_LOCK:
        cached = _IDS.get(key)
    if cached is not None:
        return cached
    ids: list[str] | None = None
    if path.exists():
        ids = json.loads(path.read_text(encoding="utf-8"))
    if ids is None or len(ids) != len(documents):  # a version from before doc_ids.json
        ids = record_ids(documents, "id")
    loaded = DocIds(ids)
    with _IDS_LOCK:
        return _IDS.setdefault(key, loaded)


@dataclass(frozen=True)
class Segment:
    """One segment's files, opened (``name`` is ``""`` for the base): ``directory`` holds
    them, each named ``prefix`` + its file name."""

    name: str
    directory: Path
    prefix: str
    documents: JsonlRecords[Document]
    passages: JsonlRecords[Passage]
    vectors: np.ndarray
    row_docs: np.ndarray
    ids: DocIds
    opened: _Opened | None = field(default=None, repr=False, compare=False)  # keeps it cached

    @property
    def rows(self) -> int:
        return len(self.passages)

    def path(self, file: str) -> Path:
        return self.directory / f"{self.prefix}{file}"


class _Opened:
    """What opening a segment's files costs (memory maps, its row -> line map, its ids), kept
    once per set of files while a snapshot holds it: every later version hard-links the same
    files, so loading a new version opens only the write's own segment."""

    def __init__(
        self,
        documents: JsonlRecords[Document],
        passages: JsonlRecords[Passage],
        vectors: np.ndarray,
        row_docs: np.ndarray,
        ids: DocIds,
    ) -> None:
        self.documents, self.passages, self.vectors = documents, passages, vectors
        self.row_docs, self.ids = row_docs, ids


#: Opened segments by the (device, inode, size, mtime) of their files and the dimension.
_OPENED: weakref.WeakValueDictionary[tuple[Any, ...], _Opened] = weakref.WeakValueDictionary()
_OPENED_LOCK = threading.Lock()


def _open_segment(name: str, directory: Path, prefix: str, dim: int) -> Segment:
    keys: list[Any] = [dim]
    for file in (DOCUMENTS, PASSAGES, EMBEDDINGS, ROW_DOCS, DOC_IDS):
        path = directory / f"{prefix}{file}"
        keys.append(inode_key(path) if file in (DOCUMENTS, PASSAGES) or path.exists() else None)
    key = tuple(keys)
    with _OPENED_LOCK:
        opened = _OPENED.get(key)
    if opened is None:
        opened = _open_files(directory, prefix, dim)
        with _OPENED_LOCK:
            opened = _OPENED.setdefault(key, opened)
    return Segment(
        name,
        directory,
        prefix,
        opened.documents,
        opened.passages,
        opened.vectors,
        opened.row_docs,
        opened.ids,
        opened,
    )


def _open_files(directory: Path, prefix: str, dim: int) -> _Opened:
    documents = JsonlRecords(directory / f"{prefix}{DOCUMENTS}", Document)
    passages = JsonlRecords(directory / f"{prefix}{PASSAGES}", Passage)
    n = len(passages)
    vectors = (
        np.memmap(directory / f"{prefix}{EMBEDDINGS}", dtype=np.float32, mode="r", shape=(n, dim))
        if n
        else np.zeros((0, dim), dtype=np.float32)
    )
    ids = _doc_ids(directory, prefix, documents)
    if (directory / f"{prefix}{ROW_DOCS}").exists():
        row_docs = load_npy(directory / f"{prefix}{ROW_DOCS}")
        if row_docs.shape[0] != n:
            raise ValueError(f"{ROW_DOCS} has {row_docs.shape[0]} rows of {n} in {directory}")
    else:  # a version from before row_docs.npy: one sequential scan of the passages
        row_docs = np.array(
            [ids.line_of.get(doc_id, -1) for doc_id in record_ids(passages, "doc_id")],
            dtype=np.int64,
        ).reshape(n)
    return _Opened(documents, passages, vectors, row_docs, ids)


def segment_list(base: Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The version's write segments in order (none for a base alone): the manifest's list in
    a flat version, ``records/segments.json`` in one from before."""
    if manifest is not None and manifest.get("layout") == FLAT:
        return list(manifest.get("records") or [])
    listing = base / RECORDS_DIR / LIST_FILE
    if not listing.exists():
        return []
    entries: list[dict[str, Any]] = json.loads(listing.read_text())
    return entries


@dataclass(frozen=True)
class VersionRows:
    """A version's rows over its segments, with the maps searches and writes need."""

    segments: list[Segment]
    documents: JsonlRecords[Document]  # live documents, in order
    passages: JsonlRecords[Passage]  # every row, tombstoned ones included
    vectors: SegmentedVectors
    live: np.ndarray  # bool per row
    passage_doc_index: np.ndarray  # row -> live document index (-1: tombstoned)
    doc_offsets: np.ndarray  # each segment's first document record
    doc_live_index: np.ndarray  # document record -> live document index (-1: gone)
    doc_starts: np.ndarray  # each live document's first live row

    def doc_index(self, doc_id: str) -> int | None:
        """The live document ``doc_id``'s index, or None."""
        for segment, offset in zip(self.segments, self.doc_offsets[:-1].tolist(), strict=True):
            line = segment.ids.line_of.get(doc_id)
            if line is not None and self.doc_live_index[offset + line] >= 0:
                return int(self.doc_live_index[offset + line])
        return None

    def rows_of(self, doc_index: int) -> np.ndarray:
        """The live rows of live document ``doc_index`` (contiguous among live rows)."""
        start = int(self.doc_starts[doc_index])
        stop = (
            int(self.doc_starts[doc_index + 1])
            if doc_index + 1 < self.doc_starts.shape[0]
            else self.live.shape[0]
        )
        return start + np.flatnonzero(self.live[start:stop])

    def doc_ids(self, doc_indices: np.ndarray) -> list[str]:
        """The ids of live documents ``doc_indices``."""
        records = np.flatnonzero(self.doc_live_index >= 0)[doc_indices]
        parts = np.searchsorted(self.doc_offsets, records, side="right") - 1
        return [
            self.segments[p].ids.ids[r - int(self.doc_offsets[p])]
            for p, r in zip(parts.tolist(), records.tolist(), strict=True)
        ]


def load_rows(
    base: Path, dim: int, dead_rows: np.ndarray, manifest: dict[str, Any] | None = None
) -> VersionRows:
    """The version at ``base`` (``manifest``: its manifest, which says the layout): its base
    and write segments, tombstones ``dead_rows``."""
    flat = manifest is not None and manifest.get("layout") == FLAT
    segments = [_open_segment("", base, "", dim)]
    for entry in segment_list(base, manifest):
        name = str(entry["name"])
        if flat:
            segments.append(_open_segment(name, base, segment_prefix(name), dim))
        else:
            segments.append(_open_segment(name, base / RECORDS_DIR / name, "", dim))
    n = sum(s.rows for s in segments)
    live = np.ones(n, dtype=bool)
    live[dead_rows] = False
    doc_offsets = np.cumsum([0, *[len(s.documents) for s in segments]], dtype=np.int64)
    record_of_row = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            np.where(s.row_docs >= 0, s.row_docs + offset, -1)
            for s, offset in zip(segments, doc_offsets.tolist(), strict=False)
        ]
    ).astype(np.int64)
    if (record_of_row[live] < 0).any():
        raise ValueError(f"a live row has no document in {base}")
    has_live_row = np.zeros(int(doc_offsets[-1]), dtype=bool)
    has_live_row[record_of_row[live]] = True
    live_records = np.flatnonzero(has_live_row)
    doc_live_index = np.full(has_live_row.shape[0], -1, dtype=np.int64)
    doc_live_index[live_records] = np.arange(live_records.shape[0], dtype=np.int64)
    passage_doc_index = np.where(live, doc_live_index[np.maximum(record_of_row, 0)], -1)
    live_rows = np.flatnonzero(live)
    live_docs = passage_doc_index[live_rows]
    if live_rows.shape[0] and (np.diff(live_docs) < 0).any():
        raise ValueError(f"live passages are not in document order in {base}")
    doc_starts = (
        live_rows[np.r_[True, np.diff(live_docs) != 0]]
        if live_rows.shape[0]
        else np.zeros(0, np.int64)
    )
    return VersionRows(
        segments=segments,
        documents=JsonlRecords(
            [s.path(DOCUMENTS) for s in segments], Document, select=live_records
        ),
        passages=JsonlRecords([s.path(PASSAGES) for s in segments], Passage),
        vectors=SegmentedVectors([s.vectors for s in segments], dim),
        live=live,
        passage_doc_index=passage_doc_index,
        doc_offsets=doc_offsets,
        doc_live_index=doc_live_index,
        doc_starts=doc_starts,
    )


def link(source: Path, target: Path) -> None:
    """Share an earlier version's immutable file (a hard link; a copy across devices)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_segment(
    directory: Path,
    documents: Sequence[Document],
    passages: Sequence[Passage],
    row_docs: np.ndarray,
    vectors: np.ndarray,
    *,
    kept_from: VersionRows | None = None,
    kept_docs: np.ndarray | None = None,
    kept_rows: np.ndarray | None = None,
    prefix: str = "",
) -> None:
    """A segment's five files (in ``directory``, each named ``prefix`` + its name): ``kept_from``'s live documents ``kept_docs`` and rows
    ``kept_rows`` first (a compaction: their bytes copied, their vectors gathered in blocks),
    then ``documents`` and ``passages`` serialised here with ``vectors``. ``row_docs`` covers
    every row of the segment."""
    docs_kept = np.zeros(0, np.int64) if kept_docs is None else kept_docs
    rows_kept = np.zeros(0, np.int64) if kept_rows is None else kept_rows
    directory.mkdir(parents=True, exist_ok=True)
    for name, kept, new, source in (
        (DOCUMENTS, docs_kept, documents, None if kept_from is None else kept_from.documents),
        (PASSAGES, rows_kept, passages, None if kept_from is None else kept_from.passages),
    ):
        with (directory / f"{prefix}{name}").open("wb") as handle:
            if source is not None:
                source.copy_to(handle, kept)
            for record in new:
                handle.write((json.dumps(record.model_dump(), ensure_ascii=False) + "\n").encode())
    np.save(directory / f"{prefix}{ROW_DOCS}", np.asarray(row_docs, dtype=np.int64))
    ids = kept_from.doc_ids(docs_kept) if kept_from is not None else []
    (directory / f"{prefix}{DOC_IDS}").write_text(
        json.dumps(ids + [doc.id for doc in documents], ensure_ascii=False), encoding="utf-8"
    )
    n = rows_kept.shape[0] + vectors.shape[0]
    if kept_from is None or rows_kept.shape[0] == 0:
        # A write's own rows: one plain write (a memmap's flush is an msync the seal's fsync
        # repeats: 37 ms of a one-document write on the loaded machine).
        np.ascontiguousarray(vectors, dtype=np.float32).tofile(directory / f"{prefix}{EMBEDDINGS}")
        return
    out = np.memmap(
        directory / f"{prefix}{EMBEDDINGS}",
        dtype=np.float32,
        mode="w+",
        shape=(n, vectors.shape[1]),
    )
    # In blocks, so a million-row collection is never read into memory at once.
    for start in range(0, rows_kept.shape[0], 65536):
        block = rows_kept[start : start + 65536]
        out[start : start + block.shape[0]] = kept_from.vectors[block]
    out[rows_kept.shape[0] :] = vectors
    out.flush()
    del out


def link_segments(
    previous: VersionRows, target: Path, new: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """``target`` (a flat version being built) gets ``previous``'s base and write segments as
    hard links in its own directory, and ``new`` (already written there) after them; returns
    the list for the manifest's ``records``. A base from before ``row_docs.npy`` /
    ``doc_ids.json`` gets them written (once: later versions link them)."""
    base = previous.segments[0]
    for name in (DOCUMENTS, PASSAGES, EMBEDDINGS):
        link(base.path(name), target / name)
    if base.path(ROW_DOCS).exists():
        link(base.path(ROW_DOCS), target / ROW_DOCS)
    else:
        np.save(target / ROW_DOCS, base.row_docs.astype(np.int64))
    if base.path(DOC_IDS).exists() and len(base.ids.ids) == len(base.documents):
        link(base.path(DOC_IDS), target / DOC_IDS)
    else:
        (target / DOC_IDS).write_text(json.dumps(base.ids.ids, ensure_ascii=False))
    listed: list[dict[str, Any]] = []
    for segment in previous.segments[1:]:
        prefix = segment_prefix(segment.name)
        for name in SEGMENT_FILES:
            link(segment.path(name), target / f"{prefix}{name}")
        listed.append(
            {"name": segment.name, "rows": segment.rows, "documents": len(segment.documents)}
        )
    if new is not None:
        listed.append(new)
    return listed
