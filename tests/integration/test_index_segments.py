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

import bm25s
import numpy as np
import pytest
import Stemmer

from services.index import engine as engine_module
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
    family = engine.family("wiki")
    version = family.current_version()
    assert version is not None
    listing = family.versions_dir / version / BM25_SEGMENTS / SEGMENTS_FILE
    entries: list[dict[str, object]] = json.loads(listing.read_text())
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
    assert (old / BM25_SEGMENTS / name / "postings.npz").stat().st_ino == (
        current / BM25_SEGMENTS / name / "postings.npz"
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
    shutil.rmtree(base / BM25_SEGMENTS)
    (base / engine_module.ROW_DOCS).unlink()  # nor row -> document map, nor the id list
    (base / engine_module.DOC_IDS).unlink()
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
