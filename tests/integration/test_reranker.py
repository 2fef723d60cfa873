"""The reranker service with the real SmolLM2 as a process on loopback, and the orchestrator's
``/search`` with ``rerank`` against it and against a reranker that is down."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, free_port, loopback, running, spawn, stack_env

pytestmark = pytest.mark.slow

DOCS = [
    {"doc_id": "eiffel", "title": "Eiffel Tower", "text": "A wrought-iron lattice tower in Paris."},
    {"doc_id": "photo", "title": "Photosynthesis", "text": "Plants turn light into sugar."},
    {
        "doc_id": "newton",
        "title": "Isaac Newton",
        "text": "Newton formulated the laws of motion and universal gravitation.",
    },
    {"doc_id": "cafe", "title": "", "text": "Café — naïve 日本語 🎉"},
]
QUERY = "Who formulated the law of universal gravitation?"


@dataclass
class RerankStack:
    reranker_url: str
    orchestrator_url: str
    orchestrator_down_url: str


@pytest.fixture(scope="module")
def rerank_stack(
    built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RerankStack]:
    """index + reranker + two orchestrators: one wired to the reranker, one to a closed port."""
    logs = tmp_path_factory.mktemp("rerank-logs")
    ports = {name: free_port() for name in ("index", "reranker", "orch", "orch_down", "closed")}
    common = {
        "LODESTAR_INDEX_PORT": str(ports["index"]),
        "LODESTAR_INDEX_URL": loopback(ports["index"]),
        "LODESTAR_RERANK_DEPTH": "4",
        "LODESTAR_RERANK_MAX_DOCUMENTS": "5",
        "LODESTAR_RERANK_MAX_DOC_TOKENS": "48",
    }
    env = stack_env(built_data_dir, **common, LODESTAR_RERANKER_PORT=str(ports["reranker"]))
    processes: dict[str, Process] = {
        "index": spawn("index", ["-m", "services.index"], env, logs),
        "reranker": spawn("reranker", ["-m", "services.reranker"], env, logs),
    }
    for name, target in (("orch", ports["reranker"]), ("orch_down", ports["closed"])):
        orch_env = stack_env(
            built_data_dir,
            **common,
            LODESTAR_ORCHESTRATOR_PORT=str(ports[name]),
            LODESTAR_RERANKER_URL=loopback(target),
        )
        processes[name] = spawn(name, ["-m", "services.orchestrator"], orch_env, logs)
    url = {name: loopback(port) for name, port in ports.items()}
    with running(processes, {name: url[name] for name in processes}):
        yield RerankStack(url["reranker"], url["orch"], url["orch_down"])


def rerank(stack: RerankStack, body: object) -> httpx.Response:
    return httpx.post(f"{stack.reranker_url}/rerank", json=body, timeout=300)


def test_icr_ranks_the_relevant_document_first_in_two_passes(rerank_stack: RerankStack) -> None:
    response = rerank(rerank_stack, {"query": QUERY, "documents": DOCS, "method": "icr"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "icr" and body["forward_passes"] == 2
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert {r["doc_id"] for r in results} == {d["doc_id"] for d in DOCS}
    assert results[0]["doc_id"] == "newton"
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert body["prompt_tokens"] > 40 and body["details"]["computed_tokens"] > body["prompt_tokens"]
    assert body["timings_ms"]["forward"] > 0


def test_ablations_and_baselines_answer_with_their_costs(rerank_stack: RerankStack) -> None:
    uncalibrated = rerank(
        rerank_stack,
        {"query": QUERY, "documents": DOCS, "options": {"calibration": "none", "layers": "last"}},
    ).json()
    assert uncalibrated["forward_passes"] == 1
    cosine = rerank(rerank_stack, {"query": QUERY, "documents": DOCS, "method": "cosine"}).json()
    assert cosine["results"][0]["doc_id"] == "newton"
    rankgpt = rerank(rerank_stack, {"query": QUERY, "documents": DOCS, "method": "rankgpt"})
    assert rankgpt.status_code == 200, rankgpt.text
    body = rankgpt.json()
    assert sorted(r["doc_id"] for r in body["results"]) == sorted(d["doc_id"] for d in DOCS)
    assert body["forward_passes"] >= 1 and body["details"]["windows"] == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": QUERY, "documents": DOCS, "method": "monot5"}, 422, "validation"),
        ({"query": "  ", "documents": DOCS}, 400, "empty"),
        ({"query": "\x06\x07", "documents": DOCS}, 400, "empty"),
        ({"query": QUERY, "documents": []}, 422, "validation"),
        ({"query": QUERY, "documents": DOCS * 2}, 413, "too_large"),
        ({"query": QUERY, "documents": [DOCS[0], DOCS[0]]}, 422, "validation"),
        ({"query": QUERY, "documents": [{"doc_id": "e", "text": " "}]}, 400, "empty"),
        ({"query": QUERY, "documents": DOCS, "options": {"layers": "middle"}}, 422, "validation"),
    ],
)
def test_bad_rerank_input_gets_a_typed_4xx(
    rerank_stack: RerankStack, body: object, status: int, code: str
) -> None:
    response = rerank(rerank_stack, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_cross_encoder_is_unavailable_until_published_then_served_without_restart(
    rerank_stack: RerankStack, built_data_dir: Path
) -> None:
    body = {"query": QUERY, "documents": DOCS, "method": "cross-encoder"}
    missing = rerank(rerank_stack, body)
    assert missing.status_code == 503, missing.text
    assert missing.json()["error"]["code"] == "unavailable"
    assert "no cross-encoder is published" in missing.json()["error"]["message"]

    from services.reranker.cross_encoder import (
        CrossEncoderTrainConfig,
        RankingExample,
        TextDoc,
        publish_cross_encoder,
        train_cross_encoder,
    )
    from tests.conftest import make_settings

    docs = [TextDoc(d["doc_id"], d["title"], d["text"]) for d in DOCS]
    examples = [
        RankingExample("q1", QUERY, docs[2], (docs[0], docs[1], docs[3])),
        RankingExample("q2", "What do plants make from light?", docs[1], (docs[0], docs[2])),
        RankingExample("q3", "a lattice tower in Paris", docs[0], (docs[1], docs[2], docs[3])),
    ]
    config = CrossEncoderTrainConfig(steps=30, batch_size=3, learning_rate=1e-4, max_length=64)
    settings = make_settings(built_data_dir)
    family_dir = built_data_dir / "models" / "cross-encoder"
    try:
        manifest = publish_cross_encoder(settings, train_cross_encoder(examples, config), {})
        served = rerank(rerank_stack, body)
        assert served.status_code == 200, served.text
        result = served.json()
        assert result["method"] == "cross-encoder"
        assert result["details"]["model"] == f"cross-encoder:{manifest['version']}"
        assert result["results"][0]["doc_id"] == "newton"

        # Through the orchestrator's /search, the stage names the served version.
        reranked = search(
            rerank_stack.orchestrator_url,
            {"query": "Who painted the Mona Lisa?", "k": 3, "rerank": "cross-encoder"},
        )
        assert reranked["degraded"] == []
        hits = reranked["hits"]
        assert isinstance(hits, list) and all("rerank" in h["sources"] for h in hits)
        trace = httpx.get(
            f"{rerank_stack.orchestrator_url}/traces/{reranked['trace_id']}", timeout=30
        ).json()
        stage = next(s for s in trace["stages"] if s["stage"] == "rerank")
        assert stage["model_id"] == f"cross-encoder:{manifest['version']}"
    finally:
        # The data dir is shared by later test modules, which expect no published cross-encoder.
        import shutil

        shutil.rmtree(family_dir, ignore_errors=True)


def search(url: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(f"{url}/search", json=body, timeout=300)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def test_search_reranks_through_the_service_and_records_the_stage(
    rerank_stack: RerankStack,
) -> None:
    url = rerank_stack.orchestrator_url
    query = {"query": "Who painted the Mona Lisa?", "k": 3}
    plain = search(url, query)
    reranked = search(url, {**query, "rerank": "icr"})
    assert reranked["degraded"] == []
    hits = reranked["hits"]
    assert isinstance(hits, list) and len(hits) == 3
    assert all("rerank" in hit["sources"] for hit in hits)
    plain_hits = plain["hits"]
    assert isinstance(plain_hits, list)
    trace = httpx.get(f"{url}/traces/{reranked['trace_id']}", timeout=30).json()
    stage = next(s for s in trace["stages"] if s["stage"] == "rerank")
    assert len(stage["targets"]) == 4  # the pool (LODESTAR_RERANK_DEPTH), not k
    assert [t["id"] for t in stage["targets"]][:3] == [h["doc_id"] for h in hits]
    assert stage["outputs"]["forward_passes"] == 2


@pytest.mark.parametrize("method", ["icr", "cross-encoder"])
def test_search_falls_back_to_first_stage_order_when_the_reranker_is_down(
    rerank_stack: RerankStack, method: str
) -> None:
    url = rerank_stack.orchestrator_down_url
    query = {"query": "Who painted the Mona Lisa?", "k": 3}
    plain = search(url, query)
    fallback = search(url, {**query, "rerank": method})
    assert fallback["degraded"] == ["reranker"]
    assert plain["degraded"] == []
    plain_hits, fallback_hits = plain["hits"], fallback["hits"]
    assert isinstance(plain_hits, list) and isinstance(fallback_hits, list)
    assert [h["doc_id"] for h in fallback_hits] == [h["doc_id"] for h in plain_hits]
