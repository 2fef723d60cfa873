"""Documents, passages and vectors read from their segment files on demand, not held in memory.

A snapshot used to parse ``documents.jsonl`` and ``passages.jsonl`` into lists: at a million
passages that is several GB of Python strings, more than the fp32 vectors the index keeps on
disk. ``JsonlRecords`` memory-maps the files and keeps only the byte offset of each line (8 bytes
a record); a record is parsed when asked for — a search reads the k it returns.

A version's records and vectors live in several immutable segment files laid end to end (its
base plus one segment per write since the last merge, ``services.index.segments``):
``JsonlRecords`` reads records across several JSONL files (optionally a selection of them: the
live documents) and ``SegmentedVectors`` rows across several float32 files. Segment files are
hard-linked from version to version, so a file is scanned for newlines once per process
(``JsonlFile.open`` keeps one per inode while a snapshot holds it).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import mmap
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, overload

import numpy as np
from pydantic import BaseModel

RecordT = TypeVar("RecordT", bound=BaseModel)

_SCAN_BYTES = 1 << 26  # newline scan in 64 MiB windows: never a file-sized temporary


def line_offsets(buffer: mmap.mmap | bytes) -> np.ndarray:
    """Start offsets of every line plus the end of the last one (``len + 1`` values)."""
    size = len(buffer)
    ends = [
        np.flatnonzero(np.frombuffer(buffer[start : start + _SCAN_BYTES], dtype=np.uint8) == 10)
        + start
        + 1
        for start in range(0, size, _SCAN_BYTES)
    ]
    offsets = np.concatenate([np.zeros(1, np.int64), *ends]).astype(np.int64)
    if offsets[-1] != size:  # a last line without its newline
        offsets = np.append(offsets, size)
    return offsets


def inode_key(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime): the same for every hard link of one immutable file."""
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class JsonlFile:
    """One memory-mapped JSONL file and the byte offset of each of its lines."""

    def __init__(self, path: Path) -> None:
        self.buffer: mmap.mmap | bytes = b""
        if path.stat().st_size:
            with path.open("rb") as handle:
                self.buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.offsets = line_offsets(self.buffer)

    @classmethod
    def open(cls, path: Path) -> JsonlFile:
        """The file, shared while any snapshot holds it: a segment file is written once and
        hard-linked into later versions, so only a write's own new file is scanned."""
        key = inode_key(path)
        with _OPEN_LOCK:
            cached = _OPEN.get(key)
        if cached is not None:
            return cached
        opened = cls(path)
        with _OPEN_LOCK:
            return _OPEN.setdefault(key, opened)

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def line(self, index: int) -> bytes:
        return self.buffer[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def span(self, start: int, stop: int) -> bytes:
        """Lines ``[start, stop)`` as written, each ending in a newline."""
        chunk = self.buffer[int(self.offsets[start]) : int(self.offsets[stop])]
        return chunk if chunk.endswith(b"\n") else chunk + b"\n"


_OPEN: weakref.WeakValueDictionary[tuple[int, int, int, int], JsonlFile] = (
    weakref.WeakValueDictionary()
)
_OPEN_LOCK = threading.Lock()


class JsonlRecords(Sequence[RecordT], Generic[RecordT]):
    """A read-only sequence of ``model`` records over one or more JSONL files laid end to end
    (one object per line). ``select`` (record numbers across the files, ascending) makes it the
    sequence of those records only: a version's live documents."""

    def __init__(
        self,
        path: Path | Sequence[Path],
        model: type[RecordT],
        *,
        select: np.ndarray | None = None,
    ) -> None:
        self.paths = [path] if isinstance(path, Path) else list(path)
        self.model = model
        self.files = [JsonlFile.open(p) for p in self.paths]
        self._starts = [0, *itertools.accumulate(len(f) for f in self.files)]
        self._select = None if select is None else np.asarray(select, dtype=np.int64)

    def __len__(self) -> int:
        return self._starts[-1] if self._select is None else int(self._select.shape[0])

    def _locate(self, index: int) -> tuple[JsonlFile, int]:
        record = index if self._select is None else int(self._select[index])
        if len(self.files) == 1:
            return self.files[0], record
        part = bisect.bisect_right(self._starts, record) - 1
        return self.files[part], record - self._starts[part]

    @overload
    def __getitem__(self, index: int) -> RecordT: ...

    @overload
    def __getitem__(self, index: slice) -> list[RecordT]: ...

    def __getitem__(self, index: int | slice) -> RecordT | list[RecordT]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range ({n} records)")
        file, line = self._locate(index % n)
        # Validated when written; constructing without re-validation is ~3x faster per hit.
        return self.model.model_construct(**json.loads(file.line(line)))

    def raw(self, index: int) -> dict[str, Any]:
        """Record ``index`` as the parsed JSON object (no model): for building responses."""
        file, line = self._locate(index)
        row: dict[str, Any] = json.loads(file.line(line))
        return row

    def copy_to(self, handle: IO[bytes], indices: Sequence[int] | np.ndarray) -> None:
        """Records ``indices`` (in that order) written as the bytes they were stored as; each
        run of consecutive lines of one file is one slice."""
        wanted = np.asarray(indices, dtype=np.int64)
        if wanted.shape[0] == 0:
            return
        records = wanted if self._select is None else self._select[wanted]
        starts = np.asarray(self._starts, dtype=np.int64)
        parts = np.searchsorted(starts, records, side="right") - 1
        lines = records - starts[parts]
        breaks = np.flatnonzero((np.diff(parts) != 0) | (np.diff(lines) != 1)) + 1
        bounds = [0, *breaks.tolist(), int(records.shape[0])]
        for a, b in itertools.pairwise(bounds):
            handle.write(self.files[int(parts[a])].span(int(lines[a]), int(lines[b - 1]) + 1))

    def raw_span(self, start: int, stop: int) -> bytes:
        """Records ``[start, stop)`` as the bytes they were written as."""
        out = io.BytesIO()
        self.copy_to(out, range(start, max(start, stop)))
        return out.getvalue()

    def __iter__(self) -> Iterator[RecordT]:
        for index in range(len(self)):
            yield self[index]

    def nbytes(self) -> int:
        """Memory held for the index of lines (the records stay in the page cache)."""
        selected = 0 if self._select is None else int(self._select.nbytes)
        return int(sum(f.offsets.nbytes for f in self.files)) + selected


class SegmentedVectors:
    """float32 rows over several matrices laid end to end (memory maps of a version's segment
    files): what a search reads rows from and what the exact searcher multiplies, without
    ever copying the files into one."""

    def __init__(self, parts: Sequence[np.ndarray], dim: int) -> None:
        self.parts = [part for part in parts if part.shape[0]]
        self.starts = np.concatenate(
            [np.zeros(1, np.int64), np.cumsum([p.shape[0] for p in self.parts], dtype=np.int64)]
        )
        self.shape = (int(self.starts[-1]), dim)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """Every row in one array (a copy unless there is one part): for callers that want the
        whole matrix (tests, offline experiments), never the search path."""
        whole = (
            np.asarray(self.parts[0])
            if len(self.parts) == 1
            else np.concatenate([np.zeros((0, self.shape[1]), np.float32), *self.parts])
        )
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __matmul__(self, query: np.ndarray) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, dtype=np.float32)
        if len(self.parts) == 1:
            return np.asarray(self.parts[0] @ query)
        return np.concatenate([part @ query for part in self.parts])

    def __getitem__(
        self, index: int | np.integer[Any] | slice | Sequence[int] | np.ndarray
    ) -> np.ndarray:
        if isinstance(index, int | np.integer):
            n = self.shape[0]
            if not -n <= int(index) < n:
                raise IndexError(f"row {index} out of range ({n} rows)")
            row = int(index) % n
            part = int(np.searchsorted(self.starts, row, side="right")) - 1
            return np.asarray(self.parts[part][row - int(self.starts[part])])
        rows = (
            np.arange(*index.indices(self.shape[0]))
            if isinstance(index, slice)
            else np.asarray(index, dtype=np.int64)
        )
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][rows])
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(which).tolist():
            mask = which == part
            # Sorted rows read each part front to back (a memmap gathers just those rows).
            out[mask] = self.parts[part][rows[mask] - self.starts[part]]
        return out


def as_vectors(matrix: np.ndarray | SegmentedVectors) -> SegmentedVectors:
    """``matrix`` as row-addressed vectors (one part when it is a plain array or memmap)."""
    if isinstance(matrix, SegmentedVectors):
        return matrix
    return SegmentedVectors([matrix], int(matrix.shape[1]))
