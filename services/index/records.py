"""Documents and passages read from their JSONL file on demand, not held in memory.

A snapshot used to parse ``documents.jsonl`` and ``passages.jsonl`` into lists: at a million
passages that is several GB of Python strings, more than the fp32 vectors the index keeps on
disk. ``JsonlRecords`` memory-maps the file and keeps only the byte offset of each line (8 bytes
a record); a record is parsed when asked for — a search reads the k it returns.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

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


class JsonlRecords(Sequence[RecordT], Generic[RecordT]):
    """A read-only sequence over a JSONL file of ``model`` records (one object per line)."""

    def __init__(self, path: Path, model: type[RecordT]) -> None:
        self.path = path
        self.model = model
        self._buffer: mmap.mmap | bytes = b""
        if path.stat().st_size:
            with path.open("rb") as handle:
                self._buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._offsets = line_offsets(self._buffer)

    def __len__(self) -> int:
        return int(self._offsets.shape[0]) - 1

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
        index %= n
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        # Validated when written; constructing without re-validation is ~3x faster per hit.
        return self.model.model_construct(**json.loads(self._buffer[start:end]))

    def raw_span(self, start: int, stop: int) -> bytes:
        """Records ``[start, stop)`` as the bytes they were written as (one slice)."""
        if start >= stop:
            return b""
        chunk = self._buffer[int(self._offsets[start]) : int(self._offsets[stop])]
        return chunk if chunk.endswith(b"\n") else chunk + b"\n"

    def raw(self, index: int) -> dict[str, Any]:
        """Record ``index`` as the parsed JSON object (no model): for building responses."""
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        row: dict[str, Any] = json.loads(self._buffer[start:end])
        return row

    def __iter__(self) -> Iterator[RecordT]:
        for index in range(len(self)):
            yield self[index]

    def nbytes(self) -> int:
        """Memory held for the index of lines (the records stay in the page cache)."""
        return int(self._offsets.nbytes)
