"""``DATASETS_DIR`` and the low-level readers and field checks the loaders share."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.datasets.errors import DatasetError
from shared.schemas import Document

DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"


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


def _check_unique(seen: dict[Any, int], key: Any, what: str, path: Path, lineno: int) -> None:
    """Record ``key`` as first seen on ``lineno``; a repeat raises DatasetError naming both lines."""
    if key in seen:
        raise DatasetError(path, f"duplicate {what} (first on line {seen[key]})", line=lineno)
    seen[key] = lineno


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
