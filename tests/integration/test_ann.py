"""ANN backends held to the exact flat search (congruence tests in qdrant-client's style), and the
ANN collection lifecycle: fresh segment, tombstones, merge, concurrent search, bad parameters."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from services.index.ann import BACKENDS, AnnConfig, build_ann
from services.index.engine import (
    ExactDenseSearcher,
    IndexEngine,
    SearchParams,
    TwoStageDenseSearcher,
)
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Document
from tests.conftest import engine_over_a_copy, make_settings, searching_throughout

ANN_BACKENDS = [b for b in BACKENDS if b != "flat"]
#: Small parameters so that every backend builds in about a second on two cores.
SMALL = {"pq_m": 12, "nprobe": 16, "hnsw_m": 16, "ef_construction": 100, "ef_search": 64}


def clustered_vectors(n: int, dim: int = 384, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Normalised points around random centres: neighbourhoods an ANN can find, like real text
    embeddings (uniform random vectors in 384-d have no near neighbours at all)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """3,000 passage vectors in an on-disk memmap (one passage per document) and 40 queries."""
    vectors = clustered_vectors(3040)
    path = tmp_path_factory.mktemp("ann") / "embeddings.f32"
    memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=(3000, 384))
    memmap[:] = vectors[:3000]
    memmap.flush()
    return np.memmap(path, dtype=np.float32, mode="r", shape=(3000, 384)), vectors[3000:]


@pytest.mark.parametrize("backend", ANN_BACKENDS)
def test_every_backend_agrees_with_exact_flat_search(
    corpus: tuple[np.ndarray, np.ndarray], backend: str
) -> None:
    embeddings, queries = corpus
    n = embeddings.shape[0]
    config = AnnConfig(backend=backend, candidates=200, **SMALL)  # type: ignore[arg-type]
    two_stage = TwoStageDenseSearcher(
        build_ann(config, embeddings),
        config,
        embeddings,
        np.ones(n, dtype=bool),
        n,
        np.arange(n),
    )
    flat = ExactDenseSearcher(embeddings, np.arange(n))
    overlap = []
    for query in queries:
        got = two_stage.search(query, 10)
        want = flat.search(query, 10)
        want_scores = {hit.doc_index: hit.score for hit in want}
        overlap.append(len(want_scores.keys() & {hit.doc_index for hit in got}) / 10)
        # Exact re-scoring: a document both return has the flat score, not an approximate one.
        for hit in got:
            if hit.doc_index in want_scores:
                assert hit.score == pytest.approx(want_scores[hit.doc_index], abs=1e-5)
            assert hit.passage_index == hit.doc_index
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
    assert np.mean(overlap) >= 0.97, (backend, np.mean(overlap))


def test_ivfpq_alone_is_approximate_and_exact_rescoring_repairs_it(
    corpus: tuple[np.ndarray, np.ndarray],
) -> None:
    """The CompactDS shape: recall@10 of PQ scores alone < ANN + exact ≈ flat."""
    embeddings, queries = corpus
    n = embeddings.shape[0]
    config = AnnConfig(backend="ivfpq", candidates=200, pq_m=12, nprobe=16)
    index = build_ann(config, embeddings)
    truth = np.argsort(-(np.asarray(embeddings) @ queries.T), axis=0)[:10].T
    _, pq_top = index.search(queries, 10, nprobe=16, ef_search=None)
    searcher = TwoStageDenseSearcher(
        index, config, embeddings, np.ones(n, dtype=bool), n, np.arange(n)
    )
    rescored = [[h.doc_index for h in searcher.search(q, 10)] for q in queries]
    recall_pq = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_top, truth, strict=True)])
    recall_exact = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(rescored, truth, strict=True)]
    )
    assert recall_pq < recall_exact
    assert recall_exact >= 0.97


def test_per_request_parameters_change_the_candidate_set(
    corpus: tuple[np.ndarray, np.ndarray],
) -> None:
    embeddings, queries = corpus
    n = embeddings.shape[0]
    config = AnnConfig(backend="ivfpq", candidates=100, nprobe=1)
    searcher = TwoStageDenseSearcher(
        build_ann(config, embeddings), config, embeddings, np.ones(n, dtype=bool), n, np.arange(n)
    )
    narrow = searcher.candidate_rows(queries[0], 10, SearchParams())
    wide = searcher.candidate_rows(queries[0], 10, SearchParams(candidates=500, nprobe=64))
    # nprobe=1 visits one list of ~40 rows: fewer than K candidates come back.
    assert narrow.shape[0] < 100 and wide.shape[0] == 500
    assert np.all(np.diff(wide) > 0)  # sorted, unique rows: sequential reads from the memmap


# --- the collection lifecycle on real MiniLM embeddings ---------------------------------------


@pytest.fixture
def ann_engine(built_data_dir: Path, tmp_path: Path) -> IndexEngine:
    """The session's 80-article wiki collection, merged into an hnswlib collection (small
    thresholds so 80 passages get an index)."""
    config = AnnConfig(backend="hnswlib", candidates=40, min_passages=10, ef_search=40)
    engine = engine_over_a_copy(
        built_data_dir, tmp_path / "data", ann=config, max_candidates=500, device="cpu"
    )
    engine.merge("wiki", config)
    return engine


@pytest.mark.slow
def test_ann_collection_answers_like_exact_and_says_which_backend(
    ann_engine: IndexEngine,
) -> None:
    snapshot, results, timings = ann_engine.search(
        "wiki", "Who painted the Mona Lisa?", 5, ["dense", "dense_exact"]
    )
    assert snapshot.dense.name == "hnswlib+exact" and snapshot.exact.name == "flat"
    assert snapshot.indexed_rows == len(snapshot.passages)
    assert [h.doc_index for h in results["dense"]] == [h.doc_index for h in results["dense_exact"]]
    assert [h.score for h in results["dense"]] == pytest.approx(
        [h.score for h in results["dense_exact"]], abs=1e-5
    )
    assert snapshot.documents[results["dense"][0].doc_index].id == "Mona Lisa"
    assert {"dense_ann", "dense_rescore"} <= timings.keys()


@pytest.mark.slow
def test_upserts_join_a_fresh_segment_deletes_apply_at_once_and_merge_folds_them_in(
    ann_engine: IndexEngine,
) -> None:
    before = ann_engine.snapshot("wiki")
    ann_file = Path(ann_engine.family("wiki").current_path() or "") / "ann.index"
    new = Document(id="Zorblax", title="Zorblax", text="Zorblax is a purple moon of Quux.")
    assert not ann_engine.upsert("wiki", [new]).merge_due  # 1 fresh row vs 80 indexed
    snapshot, results, _ = ann_engine.search("wiki", "purple moon Quux", 3, ["dense", "bm25"])
    # No rebuild: the new version shares the previous index file and searches the new row exactly.
    assert snapshot.indexed_rows == before.indexed_rows
    new_file = Path(ann_engine.family("wiki").current_path() or "") / "ann.index"
    assert new_file.stat().st_ino == ann_file.stat().st_ino
    assert all(snapshot.documents[r[0].doc_index].id == "Zorblax" for r in results.values())

    # Delete an indexed document and replace another: both take effect before any merge.
    ann_engine.delete("wiki", "Mona Lisa")
    ann_engine.upsert(
        "wiki", [Document(id="Eiffel Tower", title="Eiffel Tower", text="A green comet.")]
    )
    snapshot, results, _ = ann_engine.search(
        "wiki", "Mona Lisa painting Eiffel Tower Paris", 20, ["dense", "dense_exact", "bm25"]
    )
    assert snapshot.manifest["tombstones"] >= 2
    for hits in results.values():
        ids = [snapshot.documents[h.doc_index].id for h in hits]
        assert "Mona Lisa" not in ids
        assert len(ids) == len(set(ids))
        for h in hits:
            if snapshot.documents[h.doc_index].id == "Eiffel Tower":
                assert "comet" in snapshot.passages[h.passage_index].text
    assert [h.doc_index for h in results["dense"]] == [h.doc_index for h in results["dense_exact"]]

    # Past merge_fraction of the indexed rows outside the index, the write asks for a merge.
    ann_engine.merge_fraction = 0.02
    assert ann_engine.delete("wiki", "Isaac Newton").merge_due

    merged = ann_engine.merge("wiki")
    assert not merged.merge_due
    after = ann_engine.snapshot("wiki")
    assert after.manifest["tombstones"] == 0 and after.live.all()
    assert after.indexed_rows == len(after.passages) == merged.passages
    assert after.n_documents == before.n_documents - 1  # +Zorblax, -Mona Lisa, -Isaac Newton


@pytest.mark.slow
def test_searches_during_writes_and_merges_always_see_a_whole_version(
    ann_engine: IndexEngine,
) -> None:
    with searching_throughout(ann_engine):
        for i in range(2):
            ann_engine.upsert(
                "wiki", [Document(id=f"w{i}", title=f"W{i}", text=f"Concurrent write {i}.")]
            )
            ann_engine.merge("wiki")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("k", "params", "field"),
    [
        (5, SearchParams(nprobe=0), "nprobe"),
        (10, SearchParams(candidates=5), "candidates"),
        (5, SearchParams(candidates=100_000), "candidates"),
        (5, SearchParams(ef_search=-1), "ef_search"),
    ],
)
def test_bad_dense_parameters_raise_typed_validation_errors(
    ann_engine: IndexEngine, k: int, params: SearchParams, field: str
) -> None:
    with pytest.raises(LodestarError) as caught:
        ann_engine.search("wiki", "query", k, ["dense"], params)
    assert caught.value.code is ErrorCode.validation and caught.value.field == field


def test_bad_configurations_are_refused() -> None:
    for bad in ({"backend": "annoy"}, {"pq_m": 50}, {"nprobe": 0}, {"candidates": 0}):
        with pytest.raises(LodestarError) as caught:
            AnnConfig().with_overrides(**bad)
        assert caught.value.code is ErrorCode.validation


@pytest.mark.slow
def test_bad_dense_parameters_are_a_typed_4xx_over_http(built_data_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from services.index.app import build_app

    with TestClient(build_app(make_settings(built_data_dir))) as client:
        for _ in range(600):  # warm-up (embedder, snapshots) runs in a thread
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.1)
        search: dict[str, object] = {"query": "Mona Lisa", "k": 5, "retrievers": ["dense"]}
        ok = client.post("/search", json=search)
        assert ok.status_code == 200 and ok.json()["dense_backend"] == "flat"
        cases: list[tuple[dict[str, object], int, str | None]] = [
            ({"nprobe": 0}, 422, "nprobe"),
            ({"candidates": 2}, 422, "candidates"),
            ({"ef_search": 0}, 422, "ef_search"),
            ({"collection": "nope"}, 404, None),
            ({"collection": "../etc"}, 422, "collection"),
        ]
        for extra, status, field in cases:
            response = client.post("/search", json={**search, **extra})
            assert response.status_code == status, (extra, response.text)
            error = response.json()["error"]
            assert error["code"] == ("not_found" if status == 404 else "validation")
            if field:
                assert error["field"] == field
