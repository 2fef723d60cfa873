"""Segmented writes: a write adds a BM25 segment over its own passages and tombstones the rows it
replaces or deletes; a merge compacts to one segment. BM25 statistics stay global (scores equal a
from-scratch index of the live passages); searches during writes and merges never return a
deleted document nor miss an acknowledged one; a crash during a merge leaves the previous
version serving."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import pytest
import Stemmer

from services.index import engine as engine_module
from services.index import segments as segments_module
from services.index.engine import (
    BM25_B,
    BM25_K1,
    BM25_SEGMENTS,
    SEGMENTS_FILE,
    IndexEngine,
    SegmentedBM25Searcher,
    embedding_text,
)
from shared.schemas import Document
from tests.conftest import checking_throughout, engine_over_a_copy

pytestmark = pytest.mark.slow

QUERIES = ["Who painted the Mona Lisa?", "tower in paris", "purple moon Quux", "gravity"]


@pytest.fixture
def engine(built_data_dir: Path, tmp_path: Path) -> IndexEngine:
    return engine_over_a_copy(built_data_dir, tmp_path / "data")


def _segments(engine: IndexEngine) -> list[dict[str, object]]:
    """The current version's BM25 segments (the manifest lists them in the flat layout)."""
    manifest = engine.family("wiki").read_manifest()
    assert manifest["layout"] == "flat"
    entries: list[dict[str, object]] = manifest["bm25"]["segments"]
    return entries


def _assert_scores_equal_from_scratch(engine: IndexEngine) -> None:
    snapshot = engine.snapshot("wiki")
    assert isinstance(snapshot.bm25, SegmentedBM25Searcher)
    live_rows = np.flatnonzero(snapshot.live)
    reference = bm25s.BM25(k1=BM25_K1, b=BM25_B)
    reference.index(
        bm25s.tokenize(
            [embedding_text(snapshot.passages[int(r)]) for r in live_rows],
            stopwords="en",
            stemmer=Stemmer.Stemmer("english"),
            show_progress=False,
        ),
        show_progress=False,
    )
    for query in QUERIES:
        tokens = engine_module.tokenize([query])[0]
        ids = reference.get_tokens_ids(tokens)
        expected = reference.get_scores_from_ids(ids) if ids else np.zeros(live_rows.shape[0])
        got = snapshot.bm25.index.scores(tokens)
        np.testing.assert_allclose(got[live_rows], expected, rtol=1e-5, atol=1e-6, err_msg=query)
        assert not got[~snapshot.live].any()


def test_writes_append_segments_and_scores_stay_those_of_a_fresh_index(
    engine: IndexEngine, wiki_sample: list[Document]
) -> None:
    assert len(_segments(engine)) == 1
    new = Document(id="Zorblax", title="Zorblax", text="Zorblax is a purple moon of Quux.")
    engine.upsert("wiki", [new])
    first = _segments(engine)
    assert [e["rows"] for e in first][-1] == 1 and len(first) == 2
    # The old segment is shared with the previous version (a hard link), not rebuilt.
    family = engine.family("wiki")
    versions = sorted(p for p in family.versions_dir.iterdir() if p.is_dir())
    old, current = versions[-2], versions[-1]
    name = str(first[0]["name"])
    assert (old / f"bm25.{name}.postings.npz").stat().st_ino == (
        current / f"bm25.{name}.postings.npz"
    ).stat().st_ino
    engine.upsert("wiki", [new.model_copy(update={"text": "Zorblax is now a green comet."})])
    engine.delete("wiki", "Eiffel Tower")
    snapshot = engine.snapshot("wiki")
    assert snapshot.manifest["tombstones"] == 2  # the first Zorblax and the Eiffel Tower
    _assert_scores_equal_from_scratch(engine)
    _, results, _ = engine.search("wiki", "purple moon Quux", 5, ["bm25"])
    top = [snapshot.documents[h.doc_index].id for h in results["bm25"]]
    assert "Zorblax" not in top  # the old text is tombstoned, its terms gone from statistics
    _, results, _ = engine.search("wiki", "green comet", 3, ["bm25", "dense"])
    assert all(snapshot.documents[r[0].doc_index].id == "Zorblax" for r in results.values())
    _, results, _ = engine.search("wiki", "Eiffel Tower Paris", 10, ["bm25", "dense"])
    for hits in results.values():
        assert "Eiffel Tower" not in [snapshot.documents[h.doc_index].id for h in hits]

    merged = engine.merge("wiki")
    assert not merged.merge_due
    assert len(_segments(engine)) == 1
    after = engine.snapshot("wiki")
    assert after.manifest["tombstones"] == 0 and after.live.all()
    assert after.n_documents == len(wiki_sample)  # +Zorblax, -Eiffel Tower
    _assert_scores_equal_from_scratch(engine)


def test_tombstones_make_a_merge_due_on_a_flat_collection(engine: IndexEngine) -> None:
    results = [
        engine.delete("wiki", doc.id) for doc in list(engine.snapshot("wiki").documents)[:20]
    ]
    assert not results[0].merge_due  # 1 of 80 rows
    assert results[-1].merge_due  # 20 of 80 > 0.2
    _assert_scores_equal_from_scratch(engine)


def test_many_small_segments_make_a_merge_due(engine: IndexEngine) -> None:
    """One-document upserts add a BM25 segment each (far below the row fraction): past
    ``MAX_FRESH_BM25_SEGMENTS`` of them a merge is due, and the merge leaves one segment."""
    from services.index.engine import MAX_FRESH_BM25_SEGMENTS

    due = []
    for i in range(MAX_FRESH_BM25_SEGMENTS + 1):
        doc = Document(id=f"small-{i}", title=f"Small {i}", text=f"quokka number {i} is small")
        due.append(engine.upsert("wiki", [doc]).merge_due)
    assert due == [False] * MAX_FRESH_BM25_SEGMENTS + [True]
    assert len(_segments(engine)) == MAX_FRESH_BM25_SEGMENTS + 2
    assert not engine.merge("wiki").merge_due
    assert len(_segments(engine)) == 1
    _assert_scores_equal_from_scratch(engine)


def test_search_during_writes_and_merges_never_returns_deleted_nor_misses_acknowledged(
    engine: IndexEngine,
) -> None:
    acknowledged: set[str] = set()
    deleted: set[str] = set()
    lock = threading.Lock()

    def read() -> None:
        """Per search: the sets before it and after it. Acknowledged before and not deleted by
        the end must be found; a delete acknowledged before the search must not be returned."""
        with lock:
            candidates = acknowledged | deleted
        for doc_id in candidates:
            with lock:
                found_before, deleted_before = doc_id in acknowledged, doc_id in deleted
            snapshot, results, _ = engine.search("wiki", doc_id.lower(), 5, ["bm25", "dense"])
            with lock:
                still = doc_id in acknowledged
            ids = {snapshot.documents[h.doc_index].id for hits in results.values() for h in hits}
            bm25_ids = {snapshot.documents[h.doc_index].id for h in results["bm25"]}
            if found_before and still:
                assert doc_id in bm25_ids, (doc_id, "acknowledged but not found")
            if deleted_before:
                assert doc_id not in ids, (doc_id, "deleted but returned")

    with checking_throughout(read):
        for i in range(6):
            doc_id = f"Qxwordalpha{i}"
            engine.upsert("wiki", [Document(id=doc_id, title=doc_id, text=f"{doc_id} moon")])
            with lock:
                acknowledged.add(doc_id)
            if i % 2:
                victim = f"Qxwordalpha{i - 1}"
                # No longer owed to a search once its delete has begun; owed absent once done.
                with lock:
                    acknowledged.discard(victim)
                engine.delete("wiki", victim)
                with lock:
                    deleted.add(victim)
            if i == 3:
                engine.merge("wiki")


def test_a_crash_during_a_merge_leaves_the_previous_version_serving(
    engine: IndexEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.delete("wiki", "Eiffel Tower")
    before = engine.snapshot("wiki")

    def crash(*_: object, **__: object) -> None:
        raise RuntimeError("killed mid-merge")

    monkeypatch.setattr(engine_module.TermStats, "build", classmethod(crash))
    with pytest.raises(RuntimeError, match="mid-merge"):
        engine.merge("wiki")
    monkeypatch.undo()
    family = engine.family("wiki")
    assert family.current_version() == before.version
    assert not list(family.versions_dir.glob("*.tmp"))
    snapshot, results, _ = engine.search("wiki", "Who painted the Mona Lisa?", 3, ["bm25"])
    assert snapshot.version == before.version
    assert snapshot.documents[results["bm25"][0].doc_index].id == "Mona Lisa"
    _assert_scores_equal_from_scratch(engine)


def test_a_version_from_before_segments_loads_and_its_next_write_segments_it(
    engine: IndexEngine,
) -> None:
    """Collections built before segments carry a bm25s index (``bm25/``) and no ``bm25seg/``,
    ``row_docs.npy`` or ``doc_ids.json``."""
    family = engine.family("wiki")
    version = family.current_version()
    assert version is not None
    base = family.versions_dir / version
    snapshot = engine.snapshot("wiki")
    live_texts = [embedding_text(p) for p in snapshot.passages]
    legacy = bm25s.BM25(k1=BM25_K1, b=BM25_B)
    legacy.index(engine_module._bm25_tokenize(live_texts), show_progress=False)
    legacy.save(str(base / "bm25"))
    for path in base.glob("bm25.*"):
        path.unlink()
    (base / segments_module.ROW_DOCS).unlink()  # nor row -> document map, nor the id list
    (base / segments_module.DOC_IDS).unlink()
    manifest = json.loads((base / "manifest.json").read_text())
    del manifest["layout"]  # verified already in this process: the manifest is not re-checked
    (base / "manifest.json").write_text(json.dumps(manifest))
    fresh = IndexEngine(engine.root.parent, engine._embedder_factory)
    old = fresh.snapshot("wiki")
    assert isinstance(old.bm25, engine_module.BM25Searcher)
    _, results, _ = fresh.search("wiki", "Who painted the Mona Lisa?", 3, ["bm25"])
    assert old.documents[results["bm25"][0].doc_index].id == "Mona Lisa"
    fresh.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a purple moon")])
    fresh.delete("wiki", "Mona Lisa")
    _assert_scores_equal_from_scratch(fresh)
    snapshot = fresh.snapshot("wiki")
    ids = [snapshot.documents[int(i)].id for i in np.unique(snapshot.passage_doc_index) if i >= 0]
    assert "Zorblax" in ids and "Mona Lisa" not in ids and len(ids) == snapshot.n_documents


def _version_dirs(engine: IndexEngine) -> tuple[Path, Path]:
    """The previous and the current version's directories."""
    family = engine.family("wiki")
    versions = sorted(p for p in family.versions_dir.iterdir() if p.is_dir())
    return versions[-2], versions[-1]


def _live_view(snapshot: engine_module.Snapshot) -> list[tuple[str, str, str, bytes]]:
    """(document id, passage id, passage text, vector bytes) of every live row, in order."""
    return [
        (
            snapshot.documents[int(snapshot.passage_doc_index[row])].id,
            snapshot.passages[int(row)].passage_id,
            snapshot.passages[int(row)].text,
            snapshot.exact.embeddings[int(row)].tobytes(),
        )
        for row in np.flatnonzero(snapshot.live)
    ]


def test_a_write_adds_only_its_own_record_segment_and_links_the_rest(
    engine: IndexEngine,
) -> None:
    """Records and vectors in segments: a one-document upsert writes its own small segment
    (records, vectors, row -> document lines, ids) and hard-links the base and the earlier
    segments, whose checksums carry over; a delete writes no segment, only tombstones. Every
    version still verifies byte for byte, also after older versions were pruned."""
    family = engine.family("wiki")
    base_files = segments_module.SEGMENT_FILES
    engine.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a purple moon")])
    old, current = _version_dirs(engine)
    for name in base_files:
        assert (old / name).stat().st_ino == (current / name).stat().st_ino, name
    manifest = family.read_manifest()
    assert manifest["records"] == [{"name": "w00001", "rows": 1, "documents": 1}]
    assert not [p for p in current.iterdir() if p.is_dir()]  # the flat layout: files only
    assert (current / "w00001.embeddings.f32").stat().st_size == 384 * 4
    assert json.loads((current / "w00001.doc_ids.json").read_text()) == ["Zorblax"]
    assert np.load(current / "w00001.row_docs.npy").tolist() == [0]
    previous = json.loads((old / "manifest.json").read_text())
    for name in base_files:
        assert manifest["files"][name] == previous["files"][name]

    engine.upsert("wiki", [Document(id="Quokka", title="Quokka", text="a small green comet")])
    engine.delete("wiki", "Eiffel Tower")
    old, current = _version_dirs(engine)
    assert not list(current.glob("w00003.*"))  # a delete adds no segment
    for name in ("w00001", "w00002"):
        for file in base_files:
            path = f"{name}.{file}"
            assert (old / path).stat().st_ino == (current / path).stat().st_ino, path
    tombstones = np.load(current / engine_module.TOMBSTONES)
    assert tombstones.shape[0] == family.read_manifest()["tombstones"] > 0
    assert len(list(family.versions_dir.iterdir())) == 2  # pruned; the links keep the files
    for version in sorted(p.name for p in family.versions_dir.iterdir()):
        family.verify(version)  # every byte against the manifest, as another process does
    snapshot = engine.snapshot("wiki")
    assert "Eiffel Tower" not in [d.id for d in snapshot.documents]
    assert snapshot.rows_of("Eiffel Tower") == []
    assert [snapshot.passages[r].doc_id for r in snapshot.rows_of("Quokka")] == ["Quokka"]


def test_segmented_records_read_what_a_compacted_version_holds(engine: IndexEngine) -> None:
    """Documents, passages and vectors read across the base and the write segments (with
    tombstones) are those the merge compacts them into, in the same order; so are the dense
    and BM25 results. A replaced document's id lives in two segments, only the new one live."""
    engine.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a purple moon of Quux")])
    engine.upsert(
        "wiki",
        [
            Document(id="Zorblax", title="Zorblax", text="now a green comet " * 100),
            Document(id="Mona Lisa", title="Mona Lisa", text="Replaced: a painting of a moon."),
        ],
    )
    engine.delete("wiki", "Isaac Newton")
    segmented = engine.snapshot("wiki")
    assert len(segmented.rows.segments) == 3 and segmented.manifest["tombstones"] > 0
    assert len(segmented.rows_of("Zorblax")) == 2  # 400 words: two passages
    view = _live_view(segmented)
    ids = [d.id for d in segmented.documents]
    queries = ["green comet", "painting of a moon", "gravity apple"]
    searches = [engine.search("wiki", q, 5, ["dense", "bm25"])[1] for q in queries]

    def ranked(snapshot: engine_module.Snapshot, results: dict[str, Any]) -> dict[str, Any]:
        return {
            retriever: [(snapshot.documents[h.doc_index].id, round(h.score, 5)) for h in hits]
            for retriever, hits in results.items()
        }

    before = [ranked(segmented, r) for r in searches]
    engine.merge("wiki")
    merged = engine.snapshot("wiki")
    assert len(merged.rows.segments) == 1 and merged.live.all()
    current = engine.family("wiki").current_path()
    assert current is not None and not list(current.glob("w0*"))
    assert engine.family("wiki").read_manifest()["records"] == []
    assert _live_view(merged) == view
    assert [d.id for d in merged.documents] == ids
    after = [ranked(merged, engine.search("wiki", q, 5, ["dense", "bm25"])[1]) for q in queries]
    assert after == before
    _assert_scores_equal_from_scratch(engine)


def test_a_crash_while_writing_a_segment_leaves_the_previous_version_whole(
    engine: IndexEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upsert killed after its segment's files are written, and a merge killed while writing
    the new base, publish nothing: the previous version serves, still verifies (the scratch
    version's hard links went, its own files stayed), and the next write succeeds."""
    engine.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a purple moon")])
    before = engine.snapshot("wiki")
    family = engine.family("wiki")

    def crash_after(name: str) -> None:
        real = getattr(segments_module, name)

        def crash(*args: Any, **kwargs: Any) -> None:
            real(*args, **kwargs)
            raise RuntimeError(f"killed after {name}")

        monkeypatch.setattr(engine_module, name, crash)

    crash_after("link_segments")  # the new segment written, the rest linked
    with pytest.raises(RuntimeError, match="killed"):
        engine.upsert("wiki", [Document(id="Quokka", title="Quokka", text="a green comet")])
    crash_after("write_segment")  # a merge's new base written
    with pytest.raises(RuntimeError, match="killed"):
        engine.merge("wiki")
    monkeypatch.undo()
    assert family.current_version() == before.version
    assert not list(family.versions_dir.glob("*.tmp"))
    family.verify(before.version)
    _, results, _ = engine.search("wiki", "purple moon", 3, ["bm25", "dense"])
    assert all(before.documents[r[0].doc_index].id == "Zorblax" for r in results.values())
    engine.upsert("wiki", [Document(id="Quokka", title="Quokka", text="a green comet")])
    assert engine.snapshot("wiki").rows_of("Quokka")


def _flatten_to_the_layout_before_record_segments(engine: IndexEngine) -> None:
    """Publish the current version as the write path before record segments left it: every
    row (tombstoned ones too) in one passages.jsonl and embeddings.f32, live documents only in
    documents.jsonl, row_docs.npy the row's live document index (-1 when tombstoned)."""
    snapshot = engine.snapshot("wiki")
    family = engine.family("wiki")
    source = family.versions_dir / snapshot.version
    manifest = {
        k: v
        for k, v in snapshot.manifest.items()
        if k not in ("files", "version", "records", "layout")
    }
    with family.lock(), family.build(manifest) as scratch:
        (scratch / "passages.jsonl").write_bytes(
            snapshot.rows.passages.raw_span(0, len(snapshot.passages))
        )
        (scratch / "documents.jsonl").write_bytes(
            snapshot.rows.documents.raw_span(0, snapshot.n_documents)
        )
        snapshot.exact.embeddings[np.arange(len(snapshot.passages))].tofile(
            scratch / "embeddings.f32"
        )
        np.save(scratch / segments_module.ROW_DOCS, snapshot.passage_doc_index)
        (scratch / segments_module.DOC_IDS).write_text(
            json.dumps([d.id for d in snapshot.documents])
        )
        for name in (engine_module.TOMBSTONES,):
            shutil.copyfile(source / name, scratch / name)
        listed = snapshot.manifest["bm25"]["segments"]
        for entry in listed:  # BM25 segments in bm25seg/<name>/, listed in bm25seg/segments.json
            (scratch / BM25_SEGMENTS / entry["name"]).mkdir(parents=True)
            for file in ("vocab.json", "postings.npz"):
                shutil.copyfile(
                    source / f"bm25.{entry['name']}.{file}",
                    scratch / BM25_SEGMENTS / entry["name"] / file,
                )
        (scratch / BM25_SEGMENTS / SEGMENTS_FILE).write_text(json.dumps(listed))


def test_a_version_from_before_record_segments_loads_and_its_next_write_links_it(
    engine: IndexEngine,
) -> None:
    """A collection last written before record segments (appended rows and tombstones in one
    set of files) serves the same results, and its next write hard-links those files as the
    base and adds a segment."""
    engine.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a purple moon")])
    engine.delete("wiki", "Eiffel Tower")
    engine.upsert("wiki", [Document(id="Zorblax", title="Zorblax", text="a green comet")])
    view = _live_view(engine.snapshot("wiki"))
    _flatten_to_the_layout_before_record_segments(engine)
    fresh = IndexEngine(engine.root.parent, engine._embedder_factory)
    old = fresh.snapshot("wiki")
    assert len(old.rows.segments) == 1 and old.manifest["tombstones"] == 2
    assert (old.passage_doc_index[~old.live] == -1).all()
    assert _live_view(old) == view
    fresh.upsert("wiki", [Document(id="Quokka", title="Quokka", text="a small marsupial")])
    previous, current = _version_dirs(fresh)
    for name in segments_module.SEGMENT_FILES:
        assert (previous / name).stat().st_ino == (current / name).stat().st_ino, name
    snapshot = fresh.snapshot("wiki")
    assert _live_view(snapshot)[: len(view)] == view
    assert [d.id for d in snapshot.documents][-2:] == ["Zorblax", "Quokka"]
    _assert_scores_equal_from_scratch(fresh)
    fresh.merge("wiki")
    assert _live_view(fresh.snapshot("wiki"))[: len(view)] == view
