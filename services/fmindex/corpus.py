"""Corpus encoding and the versioned FM-index collections.

Every passage becomes ``title <TITLE_EOS> body`` in the generator's own tokenizer (leading space
before the title and the body, as the model sees words mid-sentence), and passages are joined by
the document separator, which also opens the first one::

    <SEP> title₀ <TITLE_EOS> body₀ <SEP> title₁ <TITLE_EOS> body₁ <SEP>

``<SEP>`` is ``<|endoftext|>`` and ``<TITLE_EOS>`` is ``<file_sep>``: both are special tokens that
ordinary text never produces (text is tokenised with ``split_special_tokens``), so a title key
``<SEP> title <TITLE_EOS>`` matches whole titles only — SEAL's ``</s> title @@`` with BART.

A collection version (``<data_dir>/fmindex/<name>/versions/<v>/``, published by ``ArtifactFamily``)
holds ``fm/`` (the index), ``tokens.npy`` (the uint16 stream, for full scoring), ``doc_starts.npy``
and ``docs.jsonl`` (ids, titles, texts returned in hits).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.fmindex.fm import DEFAULT_SA_SAMPLE, FMIndex
from shared.artifacts import ArtifactFamily
from shared.errors import not_found
from shared.npy import load_npy
from shared.schemas import Document, is_valid_collection_name

SEPARATOR_TOKEN = "<|endoftext|>"
TITLE_EOS_TOKEN = "<file_sep>"
#: Source markers after the query (SEAL's ``question || body`` / ``question || title``).
BODY_MARKER = " || body"
TITLE_MARKER = " || title"

Progress = Callable[[int, int, str], None]


class Markers:
    """Token ids of the separator and the title end in one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.separator = int(tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN))
        self.title_eos = int(tokenizer.convert_tokens_to_ids(TITLE_EOS_TOKEN))
        found = tokenizer.convert_ids_to_tokens([self.separator, self.title_eos])
        if found != [SEPARATOR_TOKEN, TITLE_EOS_TOKEN]:
            raise ValueError("the tokenizer lacks the fmindex marker tokens")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as it appears mid-stream (leading space, no special tokens)."""
    text = " ".join(text.split())
    if not text:
        return []
    ids: list[int] = tokenizer(
        " " + text, add_special_tokens=False, split_special_tokens=True
    ).input_ids
    return ids


def encode_documents(
    tokenizer: Any, documents: Sequence[Document], progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream and the start offset of each document (its first title token)."""
    markers = Markers(tokenizer)
    stream: list[int] = [markers.separator]
    starts = np.zeros(len(documents) + 1, dtype=np.int64)
    for i, doc in enumerate(documents):
        starts[i] = len(stream)
        stream.extend(encode_text(tokenizer, doc.title))
        stream.append(markers.title_eos)
        stream.extend(encode_text(tokenizer, doc.text))
        stream.append(markers.separator)
        if progress and i % 500 == 0:
            progress(i, len(documents), "tokenising")
    starts[-1] = len(stream)
    if max(stream) >= 1 << 16:
        raise ValueError("token ids above 65535 do not fit the uint16 stream")
    return np.asarray(stream, dtype=np.uint16), starts


@dataclass
class FmCollection:
    """One published version of a collection, memory-mapped."""

    name: str
    version: str
    fm: FMIndex
    tokens: np.ndarray
    doc_starts: np.ndarray
    doc_ids: list[str]
    titles: list[str]
    texts: list[str]
    manifest: dict[str, Any]

    @property
    def n_documents(self) -> int:
        return len(self.doc_ids)

    def doc_of(self, positions: np.ndarray) -> np.ndarray:
        """Document index of each stream position (-1 for the leading separator)."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def doc_tokens(self, doc: int) -> np.ndarray:
        """``<SEP> title <TITLE_EOS> body`` of one document: the span keys can match in
        (the separator before it belongs to it, so title keys match)."""
        return np.asarray(self.tokens[self.doc_starts[doc] - 1 : self.doc_starts[doc + 1] - 1])

    @classmethod
    def load(cls, name: str, version: str, directory: Path) -> FmCollection:
        manifest = json.loads((directory / "manifest.json").read_text())
        doc_ids, titles, texts = [], [], []
        with (directory / "docs.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                doc_ids.append(row["id"])
                titles.append(row["title"])
                texts.append(row["text"])
        return cls(
            name=name,
            version=version,
            fm=FMIndex.load(directory / "fm"),
            tokens=load_npy(directory / "tokens.npy", mmap_mode="r"),
            doc_starts=load_npy(directory / "doc_starts.npy"),
            doc_ids=doc_ids,
            titles=titles,
            texts=texts,
            manifest=manifest,
        )


@dataclass(frozen=True)
class BuildResult:
    collection: str
    version: str
    documents: int
    tokens: int
    index_bytes: int
    stream_bytes: int
    seconds: dict[str, float]


class CollectionStore:
    """Versioned FM-index collections under ``<root>/<name>`` with atomic publication."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / "CURRENT").exists()
        )

    def load(self, name: str) -> FmCollection:
        family = self._family_or_404(name)
        version = family.current_version()
        if version is None:
            raise not_found("fm-index collection", name, field="collection")
        return FmCollection.load(name, version, family.loadable(version))

    def current_version(self, name: str) -> str | None:
        return self._family_or_404(name).current_version()

    def _family_or_404(self, name: str) -> ArtifactFamily:
        if not is_valid_collection_name(name):
            raise not_found("fm-index collection", name, field="collection")
        return ArtifactFamily(self.root / name)

    def build(
        self,
        name: str,
        documents: Iterable[Document],
        tokenizer: Any,
        *,
        tokenizer_id: str,
        sa_sample: int = DEFAULT_SA_SAMPLE,
        progress: Progress | None = None,
    ) -> BuildResult:
        """Tokenise, index and publish a new version of ``name`` (previous one keeps serving)."""
        family = self._family_or_404(name)
        docs = list(documents)
        if not docs:
            raise ValueError("cannot build an fm-index over no documents")
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be unique")
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        tokens, starts = encode_documents(tokenizer, docs, progress)
        seconds["tokenise"] = time.perf_counter() - started
        if progress:
            progress(len(docs), len(docs), "indexing")
        mark = time.perf_counter()
        fm, stats = FMIndex.build(
            tokens,
            sa_sample=sa_sample,
            progress=(lambda s: progress(0, 1, s)) if progress else None,
        )
        seconds["index"] = time.perf_counter() - mark
        seconds.update({f"index.{k}": v for k, v in stats.seconds.items()})
        markers = Markers(tokenizer)
        manifest: dict[str, Any] = {
            "kind": "fmindex",
            "collection": name,
            "documents": len(docs),
            "tokens": int(tokens.shape[0]),
            "tokenizer": tokenizer_id,
            "separator_id": markers.separator,
            "title_eos_id": markers.title_eos,
            "alphabet": stats.alphabet,
            "levels": stats.levels,
            "sa_sample": sa_sample,
        }
        with family.lock():
            mark = time.perf_counter()
            with family.build(manifest) as scratch:
                sizes = fm.save(scratch / "fm")
                np.save(scratch / "tokens.npy", tokens)
                np.save(scratch / "doc_starts.npy", starts)
                with (scratch / "docs.jsonl").open("w", encoding="utf-8") as handle:
                    for doc in docs:
                        row = {"id": doc.id, "title": doc.title, "text": doc.text}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                index_bytes = sum(sizes.values())
                stream_bytes = int(tokens.nbytes)
                sizes_doc = {
                    "fm_bytes": sizes,
                    "index_bytes": index_bytes,
                    "stream_bytes": stream_bytes,
                    "tokens_file_bytes": (scratch / "tokens.npy").stat().st_size,
                }
                (scratch / "sizes.json").write_text(json.dumps(sizes_doc, indent=2))
            seconds["publish"] = time.perf_counter() - mark
            family.prune(keep=2)
        version = family.current_version() or ""
        seconds["total"] = time.perf_counter() - started
        return BuildResult(
            name, version, len(docs), int(tokens.shape[0]), index_bytes, stream_bytes, seconds
        )
