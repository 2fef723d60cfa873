"""The orchestrator's side of the thin hop (docs/search-performance.md): the pipeline asks the index
for text only down to the pool it keeps (``text_k``), and looks up the text of the few kept hits
that every list ranked past it; a rerun from fusion or rerank does the same with no retrieval call.

The index is the real service app (``services.index.app``) behind ``IndexClient`` (every call
counted per route), and the engine in process (``InProcessIndex``), over a collection chunked
into 40-word passages so that most documents have several: a looked-up hit must get back the
passage its retriever chose, not the document's first one. The reference is the same pipeline
over an index that cannot look texts up, which is asked for every text (the hop before).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from services.index.engine import IndexEngine, InProcessIndex, chunk_document
from services.orchestrator.adapt import FeedbackAdaptation
from services.orchestrator.rerun import new_trace, rerun_search
from services.orchestrator.search import SearchOutcome, SearchPipeline
from shared.clients import IndexClient
from shared.models import get_embedder
from shared.schemas import (
    Document,
    Hit,
    IndexSearchRequest,
    IndexSearchResponse,
)
from shared.store import Store, Trace
from tests.conftest import make_settings
from tests.scripted import ReversingReranker

pytestmark = pytest.mark.slow

PASSAGE_WORDS = 40
QUERIES = [
    "Who painted the Mona Lisa?",
    "when was the eiffel tower built",
    "what is photosynthesis",
    "Isaac Newton laws of motion gravity",
    "Leonardo da Vinci inventions",
    "famous painting in the Louvre museum",
    "light energy plants chlorophyll",
    "tower in Paris iron",
]


@pytest.fixture(scope="module")
def corpus(wiki_sample: list[Document]) -> dict[str, Document]:
    return {doc.id: doc for doc in wiki_sample[:40]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Document]) -> Path:
    """A ``wiki`` collection of 40-word passages (the settings' default is 256)."""
    data_dir = tmp_path_factory.mktemp("thin-hop")
    settings = make_settings(data_dir)
    engine = IndexEngine(data_dir, lambda: get_embedder(settings), PASSAGE_WORDS)
    engine.upsert("wiki", list(corpus.values()))
    return data_dir


class CountedIndex:
    """``IndexClient`` over the index service's app, counting requests per route."""

    def __init__(self, app_client: TestClient, data_dir: Path) -> None:
        self.calls: Counter[str] = Counter()
        self.text_k: list[int | None] = []

        def forward(request: httpx.Request) -> httpx.Response:
            self.calls[request.url.path] += 1
            answer = app_client.request(
                request.method,
                request.url.path,
                content=request.read(),
                headers={"content-type": "application/json"},
            )
            return httpx.Response(
                answer.status_code,
                content=answer.content,
                headers={"content-type": answer.headers["content-type"]},
            )

        # The orchestrator's settings: passage_words is the default (256), the collection's 40:
        # a looked-up passage must be the one the index stored, not a re-chunking.
        settings = make_settings(data_dir, index_url="http://index")
        self.client = IndexClient(settings, transport=httpx.MockTransport(forward))

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        self.text_k.append(request.text_k)
        return await self.client.search(request)

    async def passage_texts(self, name: str, wanted: Mapping[str, int | None]) -> Any:
        return await self.client.passage_texts(name, wanted)


class FullIndex:
    """The hop before: an index client that cannot look texts up, so every text is sent."""

    def __init__(self, inner: IndexClient) -> None:
        self.inner = inner

    async def search(self, request: IndexSearchRequest) -> IndexSearchResponse:
        assert request.text_k is None
        return await self.inner.search(request)


@pytest.fixture(scope="module")
def app_client(data_dir: Path) -> Iterator[TestClient]:
    from services.index.app import build_app

    with TestClient(build_app(make_settings(data_dir))) as client:
        for _ in range(600):  # warm-up runs in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        yield client


def passages_of(doc: Document) -> list[str]:
    return [p.text for p in chunk_document(doc, PASSAGE_WORDS)]


def lookups(trace: Trace | Mapping[str, Any]) -> list[dict[str, Any]]:
    stages = trace.stages if isinstance(trace, Trace) else trace["stages"]
    rows = [s if isinstance(s, dict) else s.__dict__ for s in stages]
    return [row for s in rows if s["stage"] == "lookup" for row in s["outputs"]["documents"]]


async def search(
    pipeline: SearchPipeline, query: str, k: int, rerank: str | None = None
) -> tuple[Trace, SearchOutcome]:
    trace = Trace(kind="search", request={"query": query, "k": k, "rerank": rerank})
    outcome = await pipeline.run(
        trace, query=query, collection="wiki", k=k, retrievers=["dense", "bm25"], rerank=rerank
    )
    return trace, outcome


def assert_same_hits(
    thin: list[Hit], full: list[Hit], looked_up: set[str], corpus: Mapping[str, Document]
) -> None:
    """Same documents in the same order; each text a passage of its document that a retriever
    chose. A looked-up hit has exactly the full pipeline's text (the passage the first list
    chose), as has any hit whose document has one passage."""
    assert [h.doc_id for h in thin] == [h.doc_id for h in full]
    for got, want in zip(thin, full, strict=True):
        assert got.text, got.doc_id
        assert got.text in passages_of(corpus[got.doc_id])
        if got.doc_id in looked_up or len(passages_of(corpus[got.doc_id])) == 1:
            assert got.text == want.text, got.doc_id


def test_lookup_reads_live_documents_and_exact_passages(
    data_dir: Path, tmp_path: Path, corpus: dict[str, Document]
) -> None:
    """The engine's lookup (now through its doc id -> rows map, not a scan): live documents in
    the order asked, a replaced one's new text, deleted and unknown ones left out; ``passages``
    gives the stored passage with that number."""
    shutil.copytree(data_dir / "collections", tmp_path / "collections")
    engine = IndexEngine(tmp_path, lambda: get_embedder(make_settings(tmp_path)), PASSAGE_WORDS)
    long, deleted, replaced = [d for d in corpus if len(passages_of(corpus[d])) > 1][:3]
    engine.delete("wiki", deleted)
    engine.upsert("wiki", [Document(id=replaced, title="New", text="a short new text")])
    got = engine.documents("wiki", [long, "nope", deleted, replaced, long])
    assert [d.id for d in got] == [long, replaced]
    assert got[0].text == corpus[long].text and got[1].text == "a short new text"
    found = engine.passages("wiki", {long: 1, replaced: None, deleted: 0, "nope": 0, long + "x": 9})
    assert [(p.doc_id, p.text) for p in found] == [
        (long, passages_of(corpus[long])[1]),
        (replaced, "a short new text"),
    ]
    assert engine.passages("wiki", {long: 99}) == []


def test_text_k_is_a_count_and_not_a_boolean() -> None:
    assert IndexSearchRequest(query="q", text_k=0).text_k == 0
    for bad in (-1, True):
        with pytest.raises(ValidationError):
            IndexSearchRequest(query="q", text_k=bad)


async def test_search_asks_for_the_pool_and_looks_up_the_rest(
    app_client: TestClient, data_dir: Path, corpus: dict[str, Document]
) -> None:
    index = CountedIndex(app_client, data_dir)
    reranker = ReversingReranker()
    thin = SearchPipeline(index, reranker=reranker, rerank_depth=6)
    full = SearchPipeline(FullIndex(index.client), reranker=ReversingReranker(), rerank_depth=6)
    looked_up_total = 0
    for query in QUERIES:
        for k, rerank, pool in ((1, None, 1), (3, None, 3), (2, "cosine", 6)):
            index.text_k.clear()
            trace, outcome = await search(thin, query, k, rerank)
            _, reference = await search(full, query, k, rerank)
            assert index.text_k == [pool]  # one index call, text only down to the pool kept
            for stage in trace.stages:
                if stage.stage == "retrieve":  # the trace stores what was sent: no text past it
                    hits = stage.outputs["hits"]
                    assert all(h["text"] for h in hits[:pool])
                    assert not any(h["text"] for h in hits[pool:])
                    assert all("passage" in h for h in hits)
            looked_up = {row["doc_id"] for row in lookups(trace)}
            looked_up_total += len(looked_up)
            assert_same_hits(outcome.hits, reference.hits, looked_up, corpus)
            if rerank is not None:
                given = reranker.requests[-1].documents
                assert len(given) == pool
                fused = [
                    h["doc_id"]
                    for s in trace.stages
                    if s.stage == "fusion"
                    for h in s.outputs["hits"]
                ]
                assert [d.doc_id for d in given] == fused[:pool]
                for document in given:  # every candidate carries its passage's text
                    assert document.text in passages_of(corpus[document.doc_id])
    # The queries do reach the case this is about (kept hits no list sent the text of), and
    # each lookup is one /collections/{name}/passages request: no collection or document read,
    # never another search.
    assert looked_up_total > 0
    assert index.calls["/collections/wiki/passages"] > 0
    assert set(index.calls) == {"/search", "/collections/wiki/passages"}
    assert index.calls["/search"] == 2 * 3 * len(QUERIES)


async def test_in_process_index_gives_the_same_hits(
    app_client: TestClient, data_dir: Path, corpus: dict[str, Document]
) -> None:
    """``InProcessIndex`` reads the passage itself (no chunking): the same texts as the service."""
    engine = IndexEngine(data_dir, lambda: get_embedder(make_settings(data_dir)), PASSAGE_WORDS)
    in_process = SearchPipeline(InProcessIndex(engine))
    over_http = SearchPipeline(CountedIndex(app_client, data_dir))
    looked_up = 0
    for query in QUERIES:
        trace, outcome = await search(in_process, query, 2)
        looked_up += len(lookups(trace))
        _, served = await search(over_http, query, 2)
        assert [(h.doc_id, h.text) for h in outcome.hits] == [
            (h.doc_id, h.text) for h in served.hits
        ]
        assert all(h.text in passages_of(corpus[h.doc_id]) for h in outcome.hits)
    assert looked_up > 0


async def test_reruns_from_fusion_and_rerank_get_texts_without_retrieving(
    app_client: TestClient, data_dir: Path, corpus: dict[str, Document], tmp_path: Path
) -> None:
    """A rerun recomputes from the persisted retrieve stages, which hold no text past the pool:
    from fusion it looks up what it keeps, from rerank it reads the parent's lookup (copied);
    a pinned document the parent saw only deep is shown with its text. No /search call."""
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    index = CountedIndex(app_client, data_dir)
    reranker = ReversingReranker()
    pipeline = SearchPipeline(index, reranker=reranker, rerank_depth=4)
    parents = []
    for query in QUERIES:
        trace, outcome = await search(pipeline, query, 2, "cosine")
        trace.response = {"hit_ids": [h.doc_id for h in outcome.hits], "degraded": []}
        store.save_trace(trace)
        parents.append((store.get_trace(trace.trace_id), outcome))
    assert any(lookups(parent) for parent, _ in parents)
    searches = index.calls["/search"]
    for parent, outcome in parents:
        for from_stage in ("fusion", "rerank"):
            child = new_trace(parent, {"rerun": {"from_stage": from_stage}})
            rerun = await rerun_search(
                pipeline,
                parent,
                child,
                from_stage=from_stage,
                adaptation=FeedbackAdaptation(),
                k=2,
            )
            assert [(h.doc_id, h.text) for h in rerun.hits] == [
                (h.doc_id, h.text) for h in outcome.hits
            ]
            given = reranker.requests[-1].documents
            assert all(d.text in passages_of(corpus[d.doc_id]) for d in given)
            if from_stage == "rerank":  # the parent's lookup was copied: nothing to fetch
                assert not [
                    s for s in child.stages if s.stage == "lookup" and "copied_from" not in s.params
                ]
        # A pin on a document the parent's lists ranked past the pool (stored without text).
        top = {h.doc_id for h in outcome.hits}
        deep = next(
            row
            for s in parent["stages"]
            if s["stage"] == "retrieve"
            for row in s["outputs"]["hits"]
            if not row["text"]
            and row["doc_id"] not in top
            and row["doc_id"] not in {r["doc_id"] for r in lookups(parent)}
        )
        child = new_trace(parent, {})
        pinned = await rerun_search(
            pipeline,
            parent,
            child,
            from_stage="fusion",
            adaptation=FeedbackAdaptation(
                pins=[deep["doc_id"]],
                documents={
                    deep["doc_id"]: Hit(
                        doc_id=deep["doc_id"],
                        title=deep["title"],
                        text="",
                        score=0.0,
                        passage=deep["passage"],
                    )
                },
            ),
            k=2,
        )
        assert pinned.hits[0].doc_id == deep["doc_id"]
        assert pinned.hits[0].text == passages_of(corpus[deep["doc_id"]])[deep["passage"]]
    assert index.calls["/search"] == searches
    store.close()
