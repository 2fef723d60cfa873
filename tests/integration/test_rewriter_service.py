"""The rewriter as a real process with real SmolLM2, and its batch job through a real Celery
worker process (Redis broker): context vs query-only rewrites, the cache (a repeat costs no
generation, in the service and in the worker), typed 4xx for bad input, the leakage guard."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_URL, Process, free_port, spawn, stack_env, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.redis]

QUERY = "jaguar top speed"
JAGUAR = {
    "title": "Jaguar",
    "text": "The jaguar (Panthera onca) is a large cat native to the Americas. It is an ambush "
    "predator and can sprint at about 80 km/h over short distances.",
}
CAR = {
    "title": "Jaguar F-Type",
    "text": "The Jaguar F-Type is a two-seat sports car made by Jaguar Land Rover. Its V8 "
    "version reaches a top speed of 300 km/h.",
}


@dataclass
class RewriterStack:
    url: str
    service: Process
    worker: Process


@pytest.fixture(scope="module")
def rewriter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewriterStack]:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    data_dir = tmp_path_factory.mktemp("rewriter-data")
    logs = tmp_path_factory.mktemp("rewriter-logs")
    port = free_port()
    env = stack_env(
        data_dir,
        LODESTAR_REWRITER_PORT=str(port),
        LODESTAR_BROKER_URL=REDIS_URL,
        LODESTAR_REWRITER_MAX_NEW_TOKENS="16",
        LODESTAR_REWRITER_CONTEXT_TOKENS="96",
        LODESTAR_REQUEST_TIMEOUT_S="300",  # generation on a shared 2-core machine
        OMP_NUM_THREADS="1",
    )
    service = spawn("rewriter", ["-m", "services.rewriter"], env, logs)
    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu"], env, logs)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, service)
        yield RewriterStack(url, service, worker)
    finally:
        worker.stop()
        service.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


def post(stack: RewriterStack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, timeout=300)


def llm_calls(stack: RewriterStack) -> int:
    calls: int = httpx.get(f"{stack.url}/cache", timeout=30).json()["llm_calls"]
    return calls


@pytest.mark.redis
def test_context_and_query_only_rewrites_and_the_cache(rewriter: RewriterStack) -> None:
    before = llm_calls(rewriter)
    first = post(rewriter, "/rewrite", {"query": QUERY, "document": JAGUAR, "mode": "context"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert body["prompt_version"].startswith("context-") and body["mode"] == "context"
    assert body["original_query"] == QUERY and body["cached"] is False
    rewritten = body["rewritten_query"]
    assert rewritten.strip() and "\n" not in rewritten and len(rewritten) <= 300
    assert llm_calls(rewriter) == before + 1

    # The same pair again: served from the cache, no generation.
    again = post(rewriter, "/rewrite", {"query": QUERY, "document": JAGUAR, "mode": "context"})
    assert again.json() == {**body, "cached": True}
    assert llm_calls(rewriter) == before + 1

    # Another document for the same query is another pair: it is generated.
    other = post(rewriter, "/rewrite", {"query": QUERY, "document": CAR, "mode": "context"})
    assert other.status_code == 200 and other.json()["cached"] is False
    assert other.json()["doc_id"] != body["doc_id"]
    assert llm_calls(rewriter) == before + 2

    # Query-only (the concept-drift ablation) never sees the document: with either document
    # the prompt is the same, so the second request is a cache hit.
    only = post(rewriter, "/rewrite", {"query": QUERY, "document": JAGUAR, "mode": "query-only"})
    assert only.status_code == 200, only.text
    assert only.json()["prompt_version"].startswith("query-only-") and not only.json()["cached"]
    only_car = post(rewriter, "/rewrite", {"query": QUERY, "document": CAR, "mode": "query-only"})
    assert only_car.json()["cached"] is True
    assert only_car.json()["rewritten_query"] == only.json()["rewritten_query"]
    assert llm_calls(rewriter) == before + 3


@pytest.mark.redis
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": "   ", "document": JAGUAR}, 400, "empty"),
        ({"query": QUERY, "mode": "context"}, 422, "validation"),
        ({"query": QUERY, "document": {"title": " ", "text": ""}}, 422, "validation"),
        ({"query": QUERY, "document": JAGUAR, "mode": "sideways"}, 422, "validation"),
        ({"document": JAGUAR}, 422, "validation"),
        ({"query": QUERY, "document": {"title": "t", "text": "x" * 100_001}}, 413, "too_large"),
    ],
)
def test_bad_input_is_a_typed_4xx(
    rewriter: RewriterStack, body: dict[str, Any], status: int, code: str
) -> None:
    before = llm_calls(rewriter)
    response = post(rewriter, "/rewrite", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert llm_calls(rewriter) == before


def _wait_for_job(stack: RewriterStack, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{stack.url}/jobs/{job_id}", timeout=30).json()
        if status["state"] in ("succeeded", "failed"):
            return status
        time.sleep(0.5)
    return status


PAIRS = [
    {"qid": "train-1", "query": "jaguar habitat", "doc_id": "jaguar", **JAGUAR},
    {"qid": "train-2", "query": "jaguar v8", "doc_id": "f-type", **CAR},
]


@pytest.mark.redis
def test_batch_job_runs_on_a_worker_and_a_rerun_generates_nothing(
    rewriter: RewriterStack,
) -> None:

    accepted = post(rewriter, "/jobs/rewrite", {"mode": "context", "pairs": PAIRS})
    assert accepted.status_code == 202, accepted.text
    status = _wait_for_job(rewriter, accepted.json()["job_id"])
    assert status["state"] == "succeeded", (status, rewriter.worker.log.read_text()[-3000:])
    result = status["result"]
    assert result["records"] == 2 and result["generated"] == 2 and result["cached"] == 0
    records = [json.loads(line) for line in Path(result["output"]).read_text().splitlines()]
    assert [(r["qid"], r["doc_id"]) for r in records] == [
        ("train-1", "jaguar"),
        ("train-2", "f-type"),
    ]
    assert all(r["mode"] == "context" and r["rewritten_query"].strip() for r in records)

    # The same batch again (as a redelivered job would be): every pair comes from the cache.
    rerun = post(rewriter, "/jobs/rewrite", {"mode": "context", "pairs": PAIRS})
    status = _wait_for_job(rewriter, rerun.json()["job_id"])
    assert status["state"] == "succeeded", status
    assert status["result"]["generated"] == 0 and status["result"]["cached"] == 2
    again = [json.loads(line) for line in Path(status["result"]["output"]).read_text().splitlines()]
    assert again == records

    # The service shares the worker's cache file: it serves the worker's rewrite of a pair.
    before = llm_calls(rewriter)
    one = post(
        rewriter,
        "/rewrite",
        {"query": "jaguar habitat", "document": JAGUAR, "qid": "train-1", "doc_id": "jaguar"},
    )
    assert one.json()["cached"] is True
    assert one.json()["rewritten_query"] == records[0]["rewritten_query"]
    assert llm_calls(rewriter) == before


@pytest.mark.redis
def test_batch_jobs_refuse_test_documents_and_bad_requests(rewriter: RewriterStack) -> None:
    leaked = post(rewriter, "/jobs/rewrite", {"pairs": PAIRS, "forbidden_doc_ids": ["f-type", "x"]})
    assert leaked.status_code == 422 and leaked.json()["error"]["code"] == "validation"
    assert "f-type" in leaked.json()["error"]["message"]
    neither = post(rewriter, "/jobs/rewrite", {"mode": "context"})
    assert neither.status_code == 422
    both = post(rewriter, "/jobs/rewrite", {"dataset": "scifact", "pairs": PAIRS})
    assert both.status_code == 422
    unknown = post(rewriter, "/jobs/rewrite", {"dataset": "msmarco"})
    assert unknown.status_code == 422
    bad_split = post(rewriter, "/jobs/rewrite", {"dataset": "scifact", "split": "../x"})
    assert bad_split.status_code == 422


@pytest.mark.redis
def test_a_dataset_split_job_rewrites_train_pairs_only(rewriter: RewriterStack) -> None:
    accepted = post(
        rewriter,
        "/jobs/rewrite",
        {"dataset": "scifact", "split": "train", "mode": "query-only", "limit": 1},
    )
    assert accepted.status_code == 202, accepted.text
    status = _wait_for_job(rewriter, accepted.json()["job_id"])
    assert status["state"] == "succeeded", (status, rewriter.worker.log.read_text()[-3000:])
    result = status["result"]
    assert result["records"] == 1 and result["dropped_test_pairs"] > 0
    assert result["prompt_version"].startswith("query-only-")


def test_synthetic_queries_are_cached_and_filtered_by_retrieval(tmp_path: Path) -> None:
    """InPars / doc2query in-process with real SmolLM2: one query per document, ``syn-<id>``,
    kept only when a real retriever (bm25s over the corpus) ranks the source document top-k."""
    from services.rewriter.engine import PairDocument, RewriterConfig, RewriterEngine
    from services.rewriter.measure import Bm25
    from tests.conftest import make_settings

    corpus = [PairDocument(f"doc-{i}", t["title"], t["text"]) for i, t in enumerate([JAGUAR, CAR])]
    corpus += [
        PairDocument("glacier", "Glacier", "A glacier is a persistent body of dense moving ice."),
        PairDocument(
            "volcano", "Volcano", "A volcano is a rupture in the crust where lava escapes."
        ),
    ]
    retrieve = Bm25(corpus).search

    config = RewriterConfig(max_new_tokens=16, context_tokens=96)
    engine = RewriterEngine.from_settings(make_settings(tmp_path), config)
    batch = engine.generate_queries(corpus[:2], retrieve=retrieve, top_k=2)
    made = batch.kept + batch.dropped
    assert sorted(q.qid for q in made) == ["syn-doc-0", "syn-doc-1"]
    assert engine.llm_calls == 2
    for query in batch.kept:
        assert query.rank is not None and 1 <= query.rank <= 2 and query.query.strip()
        assert query.doc_id in retrieve(query.query, 2)
    assert all(q.rank is None for q in batch.dropped)

    # A rerun (another engine over the same cache) generates nothing and keeps the same queries.
    again = RewriterEngine.from_settings(make_settings(tmp_path), config)
    rerun = again.generate_queries(corpus[:2], retrieve=retrieve, top_k=2)
    assert again.llm_calls == 0 and rerun.kept == batch.kept
    # A retriever that never finds the source document keeps nothing.
    none = again.generate_queries(corpus[:2], retrieve=lambda q, k: ["glacier"], top_k=1)
    assert none.kept == [] and len(none.dropped) == 2 and again.llm_calls == 0
