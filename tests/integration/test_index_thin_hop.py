"""The index's thin /search hop (docs/search-performance.md): same results, less work per request.

- BM25 scores straight from the sparse matrix equal ``bm25s.BM25.retrieve`` (which started a
  thread pool per query);
- the response is built from passage records and serialised once, and equals the response
  model's view of it;
- ``text_k`` keeps every hit's id, title, score and rank but drops text past rank ``text_k``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.index.engine import IndexEngine, _bm25_tokenize, chunk_document, search_payload
from shared.schemas import Document, IndexSearchResponse
from tests.conftest import engine_over_a_copy, make_settings

pytestmark = pytest.mark.slow

QUERIES = [
    "Who painted the Mona Lisa?",
    "when was the eiffel tower built",
    "what is photosynthesis",
    "Isaac Newton laws of motion gravity",
    "the of and a",  # stop words only: nothing matches
    "zzqx unknownword",  # no known term
    "tower tower tower paris",  # a repeated term counts each time, as in bm25s
]


@pytest.fixture
def engine(built_data_dir: Path, tmp_path: Path) -> IndexEngine:
    return engine_over_a_copy(built_data_dir, tmp_path / "data")


def test_bm25_equals_bm25s_retrieve_over_the_live_passages(engine: IndexEngine) -> None:
    import bm25s

    from services.index.engine import BM25_B, BM25_K1, embedding_text

    engine.delete("wiki", "Eiffel Tower")  # a tombstone: statistics are of the live rows
    snapshot = engine.snapshot("wiki")
    live_rows = np.flatnonzero(snapshot.live)
    reference = bm25s.BM25(k1=BM25_K1, b=BM25_B)
    reference.index(
        _bm25_tokenize([embedding_text(snapshot.passages[int(r)]) for r in live_rows]),
        show_progress=False,
    )
    for query in QUERIES:
        got = snapshot.bm25.search(query, 20)
        tokens = _bm25_tokenize([query])
        if not tokens.ids or not tokens.ids[0]:
            assert got == [], query
            continue
        depth = min(live_rows.shape[0], 20 * 4)
        indices, scores = reference.retrieve(tokens, k=depth, show_progress=False)
        expected = {}
        for index, score in zip(indices[0].tolist(), scores[0].tolist(), strict=True):
            doc = int(snapshot.passage_doc_index[live_rows[index]])
            if score > 0 and doc not in expected:
                expected[doc] = score
        ranked = sorted(expected.items(), key=lambda item: (-item[1], item[0]))[:20]
        assert [h.doc_index for h in got] == [d for d, _ in ranked], query
        assert [h.score for h in got] == pytest.approx([s for _, s in ranked], rel=1e-5)


def test_payload_is_the_response_model_and_text_k_drops_only_text(
    engine: IndexEngine, wiki_sample: list[Document]
) -> None:
    snapshot, results, timings = engine.search("wiki", QUERIES[0], 15, ["dense", "bm25"])
    full = IndexSearchResponse.model_validate(search_payload(snapshot, results, timings))
    by_id = {doc.id: doc for doc in wiki_sample}
    for retriever, hits in full.results.items():
        assert [h.sources[retriever].rank for h in hits] == list(range(1, len(hits) + 1))
        for hit in hits:  # doc id and title from the passage record are the document's
            assert hit.title == by_id[hit.doc_id].title
            chunks = [p.text for p in chunk_document(by_id[hit.doc_id], engine.passage_words)]
            assert hit.text and hit.text in chunks
    thin = IndexSearchResponse.model_validate(search_payload(snapshot, results, timings, text_k=3))
    for retriever, hits in thin.results.items():
        assert [h.text for h in hits[:3]] == [h.text for h in full.results[retriever][:3]]
        assert all(h.text == "" for h in hits[3:])
        assert [(h.doc_id, h.title, h.score, h.sources) for h in hits] == [
            (h.doc_id, h.title, h.score, h.sources) for h in full.results[retriever]
        ]


def test_service_search_answers_the_same_with_and_without_text_k(built_data_dir: Path) -> None:
    from services.index.app import build_app

    with TestClient(build_app(make_settings(built_data_dir))) as client:
        for _ in range(200):  # warm-up runs in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        body = {"query": "Who painted the Mona Lisa?", "collection": "wiki", "k": 12}
        full = client.post("/search", json=body)
        thin = client.post("/search", json={**body, "text_k": 2})
        bad = client.post("/search", json={**body, "text_k": -1})
    assert full.status_code == thin.status_code == 200
    assert full.headers["content-type"] == "application/json"
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "text_k"
    full_body = IndexSearchResponse.model_validate(full.json())
    thin_body = IndexSearchResponse.model_validate(thin.json())
    assert full_body.results["dense"][0].doc_id == "Mona Lisa"
    for retriever, hits in thin_body.results.items():
        assert [h.doc_id for h in hits] == [h.doc_id for h in full_body.results[retriever]]
        assert all(h.text for h in hits[:2]) and not any(h.text for h in hits[2:])


def test_service_passages_answers_the_stored_passages_named(built_data_dir: Path) -> None:
    """``POST /collections/{name}/passages``: the passages a thin search left without text, as
    stored (the number selects the passage), in request order; unknown ids and numbers left
    out; typed errors for an unknown collection, an empty or oversized request."""
    from services.index.app import build_app

    settings = make_settings(built_data_dir)
    with TestClient(build_app(settings)) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        hits = client.post("/search", json={"query": "painting", "collection": "wiki", "k": 6})
        listed = hits.json()["results"]["bm25"]
        refs = [{"doc_id": h["doc_id"], "passage": h["passage"]} for h in reversed(listed)]
        refs.append({"doc_id": "no such document"})
        refs.append({"doc_id": listed[0]["doc_id"], "passage": 9999})  # no such passage
        found = client.post("/collections/wiki/passages", json={"passages": refs[:-1]})
        too_deep = client.post("/collections/wiki/passages", json={"passages": refs[-1:]})
        missing = client.post("/collections/nope/passages", json={"passages": refs[:1]})
        empty = client.post("/collections/wiki/passages", json={"passages": []})
        many = [{"doc_id": f"d{i}"} for i in range(settings.max_k + 1)]
        oversized = client.post("/collections/wiki/passages", json={"passages": many})
    assert found.status_code == 200
    assert [p["doc_id"] for p in found.json()] == [h["doc_id"] for h in reversed(listed)]
    for passage, hit in zip(found.json(), reversed(listed), strict=True):
        assert passage["passage_id"] == f"{hit['doc_id']}#{hit['passage'] or 0}"
        assert passage["text"] == hit["text"] and passage["title"] == hit["title"]
    assert too_deep.status_code == 200 and too_deep.json() == []
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert empty.status_code == 422 and oversized.status_code == 422
