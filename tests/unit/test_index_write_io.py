"""What a one-document write costs in I/O, by count (never by clock): it creates its own
segment's files, a manifest and the pointer, fsyncs those and three directories whatever the
number of segments already written, hashes only its own bytes and shares every earlier file by
hard link. A kill at any point of a write leaves the previous version serving and whole.
An embedder of hashed vectors stands in for the model: only the bytes on disk are under test."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import shared.artifacts as artifacts
from services.index.ann import AnnConfig
from services.index.engine import IndexEngine
from shared.schemas import Document

ROOT = Path(__file__).resolve().parents[2]


class HashEmbedder:
    """Unit vectors seeded by the text: deterministic, no model."""

    model_id = "hash"
    dim = 384
    batch_size = 64

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = [
            np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts
        ]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        normed: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
        return normed

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


def make_engine(data_dir: Path) -> IndexEngine:
    embedder = HashEmbedder()
    return IndexEngine(
        data_dir,
        lambda: embedder,  # type: ignore[arg-type, return-value]
        ann=AnnConfig(),
        max_candidates=1000,
        device="cpu",
    )


def seed(engine: IndexEngine, n: int = 30) -> None:
    docs = [
        Document(id=f"doc-{i}", title=f"Doc {i}", text=f"alpha beta gamma{i} delta {i}")
        for i in range(n)
    ]
    engine.upsert("c", docs)


def one_doc(i: int) -> Document:
    return Document(id=f"new-{i}", title=f"New {i}", text=f"zorblax{i} is a purple moon")


@dataclass
class IoCount:
    file_fsyncs: int = 0
    dir_fsyncs: int = 0
    hashed_bytes: int = 0
    links: int = 0
    mkdirs: list[str] = field(default_factory=list)


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[IoCount]:
    count = IoCount()
    lock = threading.Lock()  # a seal fsyncs and hashes on several threads
    real_fsync, real_mkdir, real_link, real_sha = os.fsync, os.mkdir, os.link, artifacts.sha256_of

    def fsync(fd: int) -> None:
        with lock:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                count.dir_fsyncs += 1
            else:
                count.file_fsyncs += 1
        real_fsync(fd)

    def mkdir(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]
        with lock:
            count.mkdirs.append(os.fspath(path))  # only the ones that were created

    def link(*args: object, **kwargs: object) -> None:
        with lock:
            count.links += 1
        real_link(*args, **kwargs)  # type: ignore[arg-type]

    def sha(path: Path) -> str:
        with lock:
            count.hashed_bytes += path.stat().st_size
        return real_sha(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(artifacts, "sha256_of", sha)
    try:
        yield count
    finally:
        monkeypatch.undo()


def inodes(directory: Path) -> dict[int, int]:
    """Inode -> size of every file under ``directory``."""
    out: dict[int, int] = {}
    for path in directory.rglob("*"):
        if path.is_file():
            info = path.stat()
            out[info.st_ino] = info.st_size
    return out


def test_a_one_document_upserts_io_does_not_grow_with_the_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tmp_path)
    seed(engine)
    engine.delete("c", "doc-0")  # tombstones from here on: a file every later write rewrites
    root = engine.root / "c"
    counts: dict[int, IoCount] = {}
    for i in range(9):
        before = inodes(root)
        segments = len(engine.snapshot("c").rows.segments)
        with counting(monkeypatch) as count:
            engine.upsert("c", [one_doc(i)])
        created = {ino: size for ino, size in inodes(root).items() if ino not in before}
        # Its own segment (5 record files, 2 BM25 files), tombstones, manifest, CURRENT.
        assert len(created) == 10, created
        current = engine.family("c").current_path()
        assert current is not None
        unhashed = (root / "CURRENT").stat().st_size + (current / "manifest.json").stat().st_size
        assert count.hashed_bytes == sum(created.values()) - unhashed  # only its own files
        assert count.file_fsyncs == 10
        assert count.dir_fsyncs == 3  # the new version, the versions directory, the root
        assert [Path(p).name.endswith(".tmp") for p in count.mkdirs] == [True]
        assert not [p for p in current.iterdir() if p.is_dir()]
        counts[segments] = count
    assert set(counts) == set(range(1, 10))
    # Earlier segments are hard links: 7 more a segment, no more fsyncs, directories nor bytes.
    assert counts[9].links - counts[1].links == 8 * 7
    snapshot, results, _ = engine.search("c", "zorblax8 purple", 3, ["bm25"])
    assert snapshot.documents[results["bm25"][0].doc_index].id == "new-8"
    assert [d.id for d in snapshot.documents][-9:] == [f"new-{i}" for i in range(9)]


def test_segment_files_are_shared_by_every_later_version_not_copied(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    seed(engine)
    engine.upsert("c", [one_doc(0)])
    family = engine.family("c")
    first = family.current_path()
    assert first is not None
    own = {p.name: p.stat().st_ino for p in first.glob("w00001.*")}
    own |= {p.name: p.stat().st_ino for p in first.glob("bm25.s00001.*")}
    assert len(own) == 7
    recorded = family.read_manifest()["files"]["w00001.passages.jsonl"]
    engine.upsert("c", [one_doc(1)])
    engine.delete("c", "doc-3")
    current = family.current_path()
    assert current is not None and current != first
    assert {name: (current / name).stat().st_ino for name in own} == own
    assert not first.exists()  # pruned: the links keep the files
    assert family.read_manifest()["files"]["w00001.passages.jsonl"] == recorded
    family.verify()  # every byte of the linked files against the manifest


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.unit.test_index_write_io import make_engine, one_doc
import services.index.engine as engine_module
import shared.artifacts as artifacts

point = sys.argv[2]
def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "segment-written":  # its own files written, the earlier ones linked, not sealed
    real = engine_module.link_segments
    def after(*args, **kwargs):
        real(*args, **kwargs)
        kill()
    engine_module.link_segments = after
elif point == "sealed":  # the version renamed into place, CURRENT not yet pointed at it
    real_pointer = artifacts.ArtifactFamily._write_pointer
    def pointer(self, *args, **kwargs):
        real_pointer(self, *args, **kwargs)
        kill()
    artifacts.ArtifactFamily._write_pointer = pointer
make_engine(Path(sys.argv[1])).upsert("c", [one_doc(99)])
"""


@pytest.mark.parametrize("point", ["segment-written", "sealed"])
def test_a_write_killed_at_any_point_leaves_the_previous_version(
    tmp_path: Path, point: str
) -> None:
    engine = make_engine(tmp_path)
    seed(engine)
    engine.upsert("c", [one_doc(0)])
    family = engine.family("c")
    before = family.current_version()
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(tmp_path), point, str(ROOT)],
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL
    assert family.current_version() == before
    family.verify(before)
    fresh = make_engine(tmp_path)  # as a restarted service
    snapshot = fresh.snapshot("c")
    assert snapshot.version == before and snapshot.rows_of("new-99") == []
    assert snapshot.rows_of("new-0")
    fresh.upsert("c", [one_doc(99)])  # the stale scratch version is cleaned, the write lands
    assert not list(family.versions_dir.glob("*.tmp"))
    assert fresh.snapshot("c").rows_of("new-99")
    family.verify()


def test_loading_a_new_version_opens_only_the_writes_own_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.index import segments

    engine = make_engine(tmp_path)
    seed(engine)
    for i in range(5):
        engine.upsert("c", [one_doc(i)])
    engine.snapshot("c")
    opened: list[str] = []
    real = segments._open_files

    def spy(directory: Path, prefix: str, dim: int) -> object:
        opened.append(prefix)
        return real(directory, prefix, dim)

    monkeypatch.setattr(segments, "_open_files", spy)
    engine.upsert("c", [one_doc(5)])
    snapshot = engine.snapshot("c")
    assert opened == ["w00006."]
    assert len(snapshot.rows.segments) == 7
    assert [snapshot.passages[r].doc_id for r in snapshot.rows_of("new-5")] == ["new-5"]
    assert [snapshot.passages[r].doc_id for r in snapshot.rows_of("new-0")] == ["new-0"]
