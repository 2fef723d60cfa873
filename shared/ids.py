"""The one rule for names a caller gives that end up on disk or in an index.

Collection names become directory names, document ids become keys and file rows, and a staged
batch is named by its file. Each is checked here and only here, as a pydantic/OpenAPI constraint
(so a generated client knows the rule) and as a plain function for code that gets the name some
other way. Patterns are anchored and checked with ``fullmatch``: Python's ``$`` also matches
before a trailing newline, so ``re.match`` alone would let ``"wiki\\n"`` through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Path as PathParam
from pydantic import AfterValidator, Field
from starlette.convertors import Convertor, register_url_convertor

from shared.errors import invalid, not_found

COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
COLLECTION_NAME_RULE = "1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
DOC_ID_MAX_CHARS = 256
#: Any printable text: ids come from real corpora (titles, URLs, DOIs), but a control character
#: would break the JSON-lines files and log lines they are written to.
DOC_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
#: A staged batch is a bare file name inside the staging folder: no separator, no leading dot.
STAGED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.jsonl$"

#: Job ids: the 32 hex digits of ``uuid4().hex``, or Celery's dashed UUID.
JOB_ID_REGEX = r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
JOB_ID_PATTERN = rf"^(?:{JOB_ID_REGEX})$"

_COLLECTION_NAME_RE = re.compile(COLLECTION_NAME_PATTERN)
_DOC_ID_RE = re.compile(DOC_ID_PATTERN)
_STAGED_NAME_RE = re.compile(STAGED_NAME_PATTERN)

CollectionName = Annotated[
    str,
    Field(pattern=COLLECTION_NAME_PATTERN, description=f"Collection name: {COLLECTION_NAME_RULE}"),
]
CollectionPath = Annotated[
    str,
    PathParam(
        pattern=COLLECTION_NAME_PATTERN, description=f"Collection name: {COLLECTION_NAME_RULE}"
    ),
]
DocId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=DOC_ID_MAX_CHARS,
        pattern=DOC_ID_PATTERN,
        description="Document id: 1-256 characters, no control characters",
    ),
]
DocIdPath = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=DOC_ID_MAX_CHARS,
        pattern=DOC_ID_PATTERN,
        description="Document id: 1-256 characters, no control characters",
    ),
]
StagedName = Annotated[
    str,
    Field(
        pattern=STAGED_NAME_PATTERN,
        description="A JSON-lines file name inside the staging folder (<data_dir>/incoming)",
    ),
]


def is_valid_collection_name(name: str) -> bool:
    return _COLLECTION_NAME_RE.fullmatch(name) is not None


def is_valid_doc_id(doc_id: str) -> bool:
    return len(doc_id) <= DOC_ID_MAX_CHARS and _DOC_ID_RE.fullmatch(doc_id) is not None


def check_collection_name(name: str, field: str = "collection") -> str:
    if not is_valid_collection_name(name):
        raise invalid(f"collection names are {COLLECTION_NAME_RULE}", field=field)
    return name


def check_doc_id(doc_id: str, field: str = "doc_id") -> str:
    if not is_valid_doc_id(doc_id):
        raise invalid("document ids are 1-256 characters without control characters", field=field)
    return doc_id


# --- batches of documents ---------------------------------------------------------------------

#: What a batch naming one id twice means, as every batch endpoint (index and orchestrator
#: upserts, the dsi's continual index step, the fmindex build) states it in its schema.
BATCH_IDS_RULE = (
    "An id may appear more than once: its last occurrence wins, in the place of its first, as "
    "if the documents were upserted one after another"
)

Item = TypeVar("Item")


def last_occurrence_wins(items: list[Item]) -> list[Item]:
    """``items`` with one entry per ``id``: the last occurrence's content at the first's place
    (a dict keeps a key's first position when it is assigned again)."""
    by_id: dict[Any, Item] = {}
    for item in items:
        by_id[item.id] = item  # type: ignore[attr-defined]
    return items if len(by_id) == len(items) else list(by_id.values())


#: A list of records with ``id`` s (``IdBatch[Document]``): JSON Schema's ``uniqueItems``
#: compares whole items, so "ids unique" cannot be stated; instead every list is valid and means
#: what a sequence of upserts means (``BATCH_IDS_RULE``), decided here for every endpoint.
IdBatch = Annotated[
    list[Item], AfterValidator(last_occurrence_wins), Field(description=BATCH_IDS_RULE)
]


# --- the staging folder ------------------------------------------------------------------------


def staging_dir(data_dir: Path) -> Path:
    """Where services stage batches for workers, and the only folder a caller may name a file in."""
    return (data_dir / "incoming").resolve()


def staged_file(data_dir: Path, name: str, field: str = "jsonl") -> Path:
    """The staged file ``name`` as an absolute path, refusing anything outside the staging folder.

    The name rule already excludes separators and ``..``; resolving and re-checking the parent
    also refuses a symlink planted in the folder that points elsewhere. Messages never carry the
    resolved path (it would tell a caller where the data directory lives).
    """
    if _STAGED_NAME_RE.fullmatch(name) is None:
        raise invalid(
            "jsonl is a file name in the staging folder (letters, digits, '_', '.', '-', "
            "ending in .jsonl), never a path",
            field=field,
        )
    folder = staging_dir(data_dir)
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise not_found("staged file", name, field=field)
    return path


def stage_jsonl(folder: Path, name: str, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``folder/name`` for a worker: aside first, then renamed, so a worker
    never reads half a batch."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = folder / f"{name}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


# --- job ids in paths --------------------------------------------------------------------------


class JobIdConvertor(Convertor[str]):
    """``/jobs/{job_id:job_id}`` matches job ids only, so a sibling route such as
    ``POST /jobs/offline-update`` is not also matched by ``GET /jobs/{job_id}`` (its ``Allow``
    would name GET, and a GET there would answer a job lookup)."""

    regex = JOB_ID_REGEX

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", JobIdConvertor())

JobIdPath = Annotated[
    str,
    PathParam(pattern=JOB_ID_PATTERN, description="Job id, as the 202 that queued the job gave it"),
]
