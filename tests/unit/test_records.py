"""JsonlRecords: documents and passages read from disk on access, identical to parsing the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.index import records
from services.index.records import JsonlRecords
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
