"""JsonlRecords: documents and passages read from disk on access, identical to parsing the file."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from services.index import records
from services.index.records import JsonlRecords, SegmentedVectors
from shared.schemas import Document, Passage


def _write(path: Path, rows: list[dict[str, object]], *, final_newline: bool = True) -> None:
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text(text + ("\n" if final_newline and rows else ""), encoding="utf-8")


def _documents(n: int) -> list[Document]:
    return [
        Document(
            id=f"doc-{i}", title=f"Titel {i} — é", text="wörd " * (i % 7 + 1), metadata={"i": i}
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("final_newline", [True, False])
def test_records_match_the_parsed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, final_newline: bool
) -> None:
    monkeypatch.setattr(records, "_SCAN_BYTES", 64)  # many scan windows, lines across their edges
    documents = _documents(50)
    path = tmp_path / "documents.jsonl"
    _write(path, [d.model_dump() for d in documents], final_newline=final_newline)
    stored = JsonlRecords(path, Document)
    assert len(stored) == 50
    assert list(stored) == documents
    assert stored[0] == documents[0] and stored[-1] == documents[-1]
    assert stored[10:13] == documents[10:13]
    assert stored[::-17] == documents[::-17]
    assert stored.nbytes() == 51 * 8  # one offset per record, plus the end
    with pytest.raises(IndexError):
        stored[50]
    with pytest.raises(IndexError):
        stored[-51]


def test_an_empty_file_is_an_empty_sequence(tmp_path: Path) -> None:
    path = tmp_path / "passages.jsonl"
    path.write_bytes(b"")
    stored = JsonlRecords(path, Passage)
    assert len(stored) == 0
    assert list(stored) == []


def test_records_across_files_and_a_selection_match_the_concatenation(tmp_path: Path) -> None:
    """A version's records over its segment files: the files laid end to end, optionally only
    the selected records (the live documents); byte copies keep the stored lines."""
    documents = _documents(30)
    paths = []
    for i, (start, stop) in enumerate([(0, 12), (12, 12), (12, 13), (13, 30)]):
        path = tmp_path / f"part{i}.jsonl"
        _write(path, [d.model_dump() for d in documents[start:stop]], final_newline=i != 3)
        paths.append(path)
    stored = JsonlRecords(paths, Document)
    assert len(stored) == 30 and list(stored) == documents
    assert [stored.raw(i)["id"] for i in (0, 11, 12, 13, 29)] == [
        documents[i].id for i in (0, 11, 12, 13, 29)
    ]
    whole = b"".join(
        p.read_bytes() + (b"" if p.read_bytes().endswith(b"\n") else b"\n")
        for p in paths
        if p.stat().st_size
    )
    assert stored.raw_span(0, 30) == whole
    select = np.array([1, 2, 11, 12, 14, 29])
    chosen = JsonlRecords(paths, Document, select=select)
    assert list(chosen) == [documents[i] for i in select]
    assert chosen[-1] == documents[29]
    out = io.BytesIO()
    chosen.copy_to(out, [0, 1, 2, 3, 5])
    lines = out.getvalue().decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [
        documents[i].id for i in select[[0, 1, 2, 3, 5]]
    ]
    # The file objects are shared by inode: a later version's hard link is not scanned again.
    linked = tmp_path / "linked.jsonl"
    os.link(paths[0], linked)
    assert JsonlRecords(linked, Document).files[0] is stored.files[0]


def test_segmented_vectors_read_like_one_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((23, 8)).astype(np.float32)
    parts = []
    for i, (start, stop) in enumerate([(0, 10), (10, 10), (10, 11), (11, 23)]):
        path = tmp_path / f"v{i}.f32"
        whole[start:stop].tofile(path)
        parts.append(
            np.memmap(path, dtype=np.float32, mode="r", shape=(stop - start, 8))
            if stop > start
            else np.zeros((0, 8), np.float32)
        )
    vectors = SegmentedVectors(parts, 8)
    assert vectors.shape == (23, 8) and len(vectors) == 23
    query = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(vectors @ query, whole @ query, rtol=1e-6)
    for row in (0, 9, 10, 11, 22, -1):
        np.testing.assert_array_equal(vectors[row], whole[row])
    rows = np.array([0, 3, 10, 11, 12, 22])
    np.testing.assert_array_equal(vectors[rows], whole[rows])
    np.testing.assert_array_equal(vectors[[22, 0, 10]], whole[[22, 0, 10]])
    np.testing.assert_array_equal(vectors[5:15], whole[5:15])
    np.testing.assert_array_equal(np.asarray(vectors), whole)
    with pytest.raises(IndexError):
        vectors[23]
    empty = SegmentedVectors([], 8)
    assert (empty @ query).shape == (0,) and empty[np.zeros(0, np.int64)].shape == (0, 8)
