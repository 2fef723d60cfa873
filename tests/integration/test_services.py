"""The services as real processes over loopback: index, orchestrator, Celery worker, Redis."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.conftest import Stack, read_sse, wait_ready

pytestmark = pytest.mark.slow


def post(stack: Stack, path: str, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{stack.orchestrator_url}{path}", json=body, timeout=120, **kwargs)  # type: ignore[arg-type]


def test_search_returns_the_right_article_with_fused_sources(live_stack: Stack) -> None:
    response = post(live_stack, "/search", {"query": "Who painted the Mona Lisa?", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [hit["doc_id"] for hit in body["hits"]]
    assert "Mona Lisa" in ids[:2]
    top = body["hits"][ids.index("Mona Lisa")]
    assert set(top["sources"]) == {"dense", "bm25"}
    assert body["degraded"] == [] and body["timings_ms"]["total"] > 0
    assert len(ids) == 5 and len(set(ids)) == 5


def test_search_with_one_retriever_keeps_its_scores(live_stack: Stack) -> None:
    body = post(
        live_stack, "/search", {"query": "Eiffel Tower Paris", "k": 3, "retrievers": ["bm25"]}
    ).json()
    assert body["hits"][0]["doc_id"] == "Eiffel Tower"
    assert body["hits"][0]["score"] == body["hits"][0]["sources"]["bm25"]["score"]


def test_every_search_stage_is_in_the_trace(live_stack: Stack) -> None:
    body = post(live_stack, "/search", {"query": "Isaac Newton gravity", "k": 3}).json()
    trace = httpx.get(f"{live_stack.orchestrator_url}/traces/{body['trace_id']}").json()
    stages = [(s["stage"], s["params"].get("retriever")) for s in trace["stages"]]
    assert stages == [("retrieve", "dense"), ("retrieve", "bm25"), ("fusion", None)]
    fusion = trace["stages"][-1]
    assert [t["id"] for t in fusion["targets"]] == [h["doc_id"] for h in body["hits"]]


def test_answer_cites_retrieved_articles(live_stack: Stack) -> None:
    # One round: this checks single-round answering and citations (multi-round: test_critic_*).
    response = post(
        live_stack, "/answer", {"question": "Who painted the Mona Lisa?", "max_rounds": 1}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"]
    hit_ids = body["rounds"][0]["hit_ids"]
    assert len(hit_ids) == 3 and "Mona Lisa" in hit_ids
    assert body["citations"] and all(c["doc_id"] in hit_ids for c in body["citations"])
    trace = httpx.get(f"{live_stack.orchestrator_url}/traces/{body['trace_id']}").json()
    generate = trace["stages"][-1]
    assert (
        generate["stage"] == "generate"
        and generate["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert generate["outputs"]["new_tokens"] > 0


def test_streamed_answer_ends_with_citations(live_stack: Stack) -> None:
    with httpx.stream(
        "POST",
        f"{live_stack.orchestrator_url}/answer",
        json={"question": "Where is the Eiffel Tower?", "stream": True, "max_rounds": 1},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    names = [name for name, _ in events]
    assert names[0] == "round" and names[-1] == "citations"
    assert "token" in names
    final = events[-1][1]
    streamed = "".join(str(data["text"]) for name, data in events if name == "token")
    assert final["answer"] and str(final["answer"]).split()[0] in streamed
    assert httpx.get(f"{live_stack.orchestrator_url}/traces/{final['trace_id']}").status_code == 200


def test_feedback_is_acknowledged_once_and_tied_to_a_stage_target(live_stack: Stack) -> None:
    search = post(live_stack, "/search", {"query": "photosynthesis in plants", "k": 3}).json()
    doc_id = search["hits"][0]["doc_id"]
    key = uuid.uuid4().hex
    feedback = {
        "trace_id": search["trace_id"],
        "stage": "fusion",
        "target_type": "doc",
        "target_id": doc_id,
        "action": "relevant",
        "value": 1,
        "idempotency_key": key,
    }
    first = post(live_stack, "/feedback", feedback)
    assert first.status_code == 201, first.text
    again = post(live_stack, "/feedback", feedback)
    assert (
        again.json()["feedback_id"] == first.json()["feedback_id"]
        and again.json()["created"] is False
    )
    shadow = post(
        live_stack,
        "/feedback",
        {**feedback, "idempotency_key": None, "source": "shadow", "action": "irrelevant"},
    )
    assert shadow.status_code == 201
    trace = httpx.get(f"{live_stack.orchestrator_url}/traces/{search['trace_id']}").json()
    assert sorted((f["source"], f["action"]) for f in trace["feedback"]) == [
        ("shadow", "irrelevant"),
        ("user", "relevant"),
    ]

    assert (
        post(
            live_stack, "/feedback", {**feedback, "idempotency_key": None, "trace_id": "unknown"}
        ).status_code
        == 404
    )
    assert (
        post(
            live_stack, "/feedback", {**feedback, "idempotency_key": None, "target_id": "Not A Hit"}
        ).status_code
        == 404
    )
    assert post(live_stack, "/feedback", {**feedback, "source": "robot"}).status_code == 422
    assert post(live_stack, "/feedback", {"trace_id": search["trace_id"]}).status_code == 422


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": "", "k": 5}, 400, "empty"),
        ({"query": "   "}, 400, "empty"),
        ({"query": "x", "k": 0}, 422, "validation"),
        ({"query": "x", "k": 1_000_000}, 422, "validation"),
        ({"query": 5}, 422, "validation"),
        ({"query": "x", "k": "ten"}, 422, "validation"),
        ({"query": "x" * 5000}, 422, "validation"),
        ({"query": "x", "collection": "../../etc"}, 422, "validation"),
        ({"query": "x", "collection": "absent"}, 404, "not_found"),
        ({"query": "x", "retrievers": ["splade"]}, 422, "validation"),
        ({"query": "x", "retrievers": []}, 422, "validation"),
        ({"query": "x", "rerank": "monot5"}, 422, "validation"),
        ([1, 2], 422, "validation"),
    ],
)
def test_bad_search_input_gets_a_typed_4xx(
    live_stack: Stack, body: object, status: int, code: str
) -> None:
    response = post(live_stack, "/search", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_bad_input_elsewhere_gets_a_typed_4xx(live_stack: Stack) -> None:
    url = live_stack.orchestrator_url
    huge = b'{"query": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    too_big = httpx.post(
        f"{url}/search", content=huge, headers={"content-type": "application/json"}, timeout=60
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    not_json = httpx.post(
        f"{url}/search", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422
    assert httpx.get(f"{url}/traces/does-not-exist").status_code == 404
    assert httpx.get(f"{url}/jobs/does-not-exist").status_code == 404
    assert post(live_stack, "/answer", {"question": ""}).status_code == 400
    assert post(live_stack, "/answer", {"question": "x", "k": 0}).status_code == 422
    assert post(live_stack, "/answer", {"question": "x", "max_rounds": 0}).status_code == 422
    assert httpx.get(f"{url}/collections/Not_Valid").status_code == 422
    assert httpx.get(f"{url}/collections/absent").status_code == 404
    empty_batch = httpx.put(f"{url}/collections/wiki/documents", json={"documents": []})
    assert empty_batch.status_code == 422
    no_id = httpx.put(f"{url}/collections/wiki/documents", json={"documents": [{"text": "x"}]})
    assert no_id.status_code == 422


def test_small_upserts_are_indexed_inline_and_deletes_apply_at_once(live_stack: Stack) -> None:
    url = live_stack.orchestrator_url
    docs = [
        {
            "id": "Quokka/Fact 1",
            "title": "Quokka",
            "text": "The quokka is a small wallaby living on Rottnest Island.",
        }
    ]
    response = httpx.put(
        f"{url}/collections/animals/documents", json={"documents": docs}, timeout=60
    )
    assert response.status_code == 200, response.text
    info = httpx.get(f"{url}/collections/animals").json()
    assert info["documents"] == 1 and info["retrievers"]["dense"] and info["retrievers"]["bm25"]
    assert "animals" in [c["name"] for c in httpx.get(f"{url}/collections").json()]
    hits = post(
        live_stack, "/search", {"query": "wallaby island", "collection": "animals", "k": 1}
    ).json()["hits"]
    assert hits[0]["doc_id"] == "Quokka/Fact 1"
    deleted = httpx.delete(f"{url}/collections/animals/documents/Quokka/Fact 1", timeout=60)
    assert deleted.status_code == 200, deleted.text
    assert httpx.get(f"{url}/collections/animals").json()["documents"] == 0
    assert (
        post(live_stack, "/search", {"query": "wallaby", "collection": "animals"}).json()["hits"]
        == []
    )
    assert httpx.delete(f"{url}/collections/animals/documents/Quokka/Fact 1").status_code == 404


def test_large_upserts_run_as_a_celery_job_over_redis(live_stack: Stack) -> None:
    url = live_stack.orchestrator_url
    names = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]
    features = ["craters", "acid clouds", "oceans", "red dust", "a great red spot", "icy rings"]
    docs = [
        {"id": f"planet-{i}", "title": name, "text": f"{name} is a planet known for its {feature}."}
        for i, (name, feature) in enumerate(zip(names, features, strict=True))
    ]
    response = httpx.put(
        f"{url}/collections/planets/documents", json={"documents": docs}, timeout=60
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 240
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert status["state"] == "succeeded", status
    assert status["result"]["documents"] == 6  # type: ignore[index]
    assert httpx.get(f"{url}/collections/planets").json()["documents"] == 6
    hits = post(
        live_stack,
        "/search",
        {"query": "which planet has a great red spot?", "collection": "planets", "k": 1},
    ).json()["hits"]
    assert hits[0]["doc_id"] == "planet-4"


def test_readiness_health_and_metrics_on_every_service(live_stack: Stack) -> None:
    for url in (live_stack.orchestrator_url, live_stack.index_url):
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").json()["ready"] is True
        assert "_request_count_total" in httpx.get(f"{url}/metrics").text


def test_index_down_means_424_not_500(live_stack: Stack) -> None:
    """Stops the index service, then brings it back for the modules after this one."""
    index = live_stack.processes["index"]
    index.kill()
    try:
        response = post(live_stack, "/search", {"query": "Mona Lisa", "k": 3})
        assert response.status_code == 424
        assert response.json()["error"]["code"] == "dependency_failed"
        assert "index" in response.json()["error"]["message"]
    finally:
        live_stack.processes["index"] = index.restart()
        wait_ready(live_stack.index_url, live_stack.processes["index"])
