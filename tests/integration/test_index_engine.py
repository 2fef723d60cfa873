"""The index engine on real MiniLM embeddings and real Wikipedia summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.index.engine import IndexEngine
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Document
from tests.conftest import engine_over_a_copy, searching_throughout

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(built_data_dir: Path, tmp_path: Path) -> IndexEngine:
    return engine_over_a_copy(built_data_dir, tmp_path / "data")


def test_both_retrievers_find_the_article_a_question_is_about(engine: IndexEngine) -> None:
    snapshot, results, _ = engine.search("wiki", "Who painted the Mona Lisa?", 5, ["dense", "bm25"])
    for retriever in ("dense", "bm25"):
        top = [snapshot.documents[hit.doc_index].id for hit in results[retriever]]
        assert "Mona Lisa" in top[:2], (retriever, top)


def test_dense_search_equals_brute_force_over_the_stored_vectors(engine: IndexEngine) -> None:
    snapshot, results, _ = engine.search("wiki", "theory of gravitation", 10, ["dense"])
    query = engine.embed_query("theory of gravitation")
    matrix = np.asarray(snapshot.dense.embeddings)
    expected = np.sort(matrix @ query)[::-1][:10]  # one passage per summary here
    got = np.array([hit.score for hit in results["dense"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_upsert_replaces_and_delete_removes_documents(engine: IndexEngine) -> None:
    before = engine.snapshot("wiki")
    new = Document(
        id="Zorblax",
        title="Zorblax",
        text="Zorblax is a fictional purple moon orbiting the planet Quux.",
    )
    engine.upsert("wiki", [new])
    snapshot, results, _ = engine.search("wiki", "purple moon Quux", 3, ["dense", "bm25"])
    assert snapshot.version != before.version and snapshot.n_documents == before.n_documents + 1
    assert all(snapshot.documents[r[0].doc_index].id == "Zorblax" for r in results.values())

    engine.upsert("wiki", [new.model_copy(update={"text": "Zorblax is now a green comet."})])
    snapshot = engine.snapshot("wiki")
    assert snapshot.n_documents == before.n_documents + 1
    assert [d.text for d in snapshot.documents if d.id == "Zorblax"] == [
        "Zorblax is now a green comet."
    ]

    engine.delete("wiki", "Zorblax")
    snapshot, results, _ = engine.search("wiki", "Zorblax green comet", 5, ["dense", "bm25"])
    assert all(
        snapshot.documents[h.doc_index].id != "Zorblax" for hits in results.values() for h in hits
    )
    with pytest.raises(LodestarError) as caught:
        engine.delete("wiki", "Zorblax")
    assert caught.value.code is ErrorCode.not_found


def test_kept_passages_keep_their_exact_vectors_across_versions(engine: IndexEngine) -> None:
    before = engine.snapshot("wiki")
    row = next(i for i, p in enumerate(before.passages) if p.doc_id == "Eiffel Tower")
    vector = np.array(before.dense.embeddings[row])
    engine.upsert("wiki", [Document(id="Other", title="Other", text="Unrelated text.")])
    after = engine.snapshot("wiki")
    new_row = next(i for i, p in enumerate(after.passages) if p.doc_id == "Eiffel Tower")
    np.testing.assert_array_equal(np.array(after.dense.embeddings[new_row]), vector)


def test_a_second_engine_sees_versions_published_by_another(engine: IndexEngine) -> None:
    other = IndexEngine(engine.root.parent, lambda: engine.embedder)
    assert other.snapshot("wiki").version == engine.snapshot("wiki").version
    engine.upsert(
        "wiki", [Document(id="Fresh", title="Fresh", text="Freshly added text about kites.")]
    )
    assert other.snapshot("wiki").version == engine.snapshot("wiki").version
    _, results, _ = other.search("wiki", "kites", 1, ["bm25"])
    assert other.snapshot("wiki").documents[results["bm25"][0].doc_index].id == "Fresh"


def test_searches_during_writes_always_see_a_whole_version(engine: IndexEngine) -> None:
    with searching_throughout(engine):
        for i in range(3):
            engine.upsert(
                "wiki", [Document(id=f"w{i}", title=f"W{i}", text=f"Concurrent write number {i}.")]
            )


@pytest.mark.parametrize(
    ("name", "k", "retrievers", "code"),
    [
        ("../etc", 5, ["dense"], ErrorCode.validation),
        ("Wiki", 5, ["dense"], ErrorCode.validation),
        ("nope", 5, ["dense"], ErrorCode.not_found),
        ("wiki", 5, ["splade"], ErrorCode.validation),
    ],
)
def test_bad_search_parameters_raise_typed_errors(
    engine: IndexEngine, name: str, k: int, retrievers: list[str], code: ErrorCode
) -> None:
    with pytest.raises(LodestarError) as caught:
        engine.search(name, "query", k, retrievers)
    assert caught.value.code is code


def test_duplicate_ids_in_one_batch_are_refused(engine: IndexEngine) -> None:
    doc = Document(id="dup", title="", text="x")
    with pytest.raises(LodestarError) as caught:
        engine.upsert("wiki", [doc, doc])
    assert caught.value.code is ErrorCode.validation
