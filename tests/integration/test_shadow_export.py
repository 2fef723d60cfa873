"""Shadow user mode, feedback export and the offline update, as real processes over loopback
(index + orchestrator + Celery worker on Redis, ``tests/conftest.py``'s ``live_stack``).

Order matters within this module: the typed-503 check for the cross-encoder agent runs before
the offline update publishes the first cross-encoder into the stack's data directory."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from shared.schemas import Document
from tests.conftest import Stack

pytestmark = [pytest.mark.slow, pytest.mark.redis]

#: Tiny, fixed training for the offline update (seeded: the same run every time).
TINY_TRAIN = {"steps": 12, "batch_size": 4, "negatives_per_query": 3, "max_length": 64}


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{stack.orchestrator_url}{path}", json=body, timeout=600)


def get(stack: Stack, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{stack.orchestrator_url}{path}", params=params, timeout=120)


def search(stack: Stack, query: str, k: int = 10) -> dict[str, Any]:
    response = post(stack, "/search", {"query": query, "k": k})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def feedback(stack: Stack, trace_id: str, doc_id: str, action: str, **extra: Any) -> str:
    body = {
        "trace_id": trace_id,
        "stage": "fusion",
        "target_type": "doc",
        "target_id": doc_id,
        "action": action,
        **extra,
    }
    response = post(stack, "/feedback", body)
    assert response.status_code == 201, response.text
    return str(response.json()["feedback_id"])


def export(stack: Stack, **params: Any) -> list[dict[str, Any]]:
    response = get(stack, "/feedback/export", **params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def metric(stack: Stack, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in get(stack, "/metrics").text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def wait_for_job(stack: Stack, job_id: str, timeout_s: float = 480) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = get(stack, f"/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout_s} s")


def test_shadow_feedback_is_stored_with_provenance_and_kept_apart_in_export(
    live_stack: Stack,
) -> None:
    profile = "An art history student who wants facts about paintings and painters."
    put = httpx.put(
        f"{live_stack.orchestrator_url}/users/art-student/profile",
        json={"profile": profile},
        timeout=30,
    )
    assert put.status_code == 200, put.text
    assert get(live_stack, "/users/art-student/profile").json()["profile"] == profile

    found = search(live_stack, "Who painted the Mona Lisa?", k=5)
    trace_id = found["trace_id"]
    top = [h["doc_id"] for h in found["hits"]]
    user_fb = feedback(live_stack, trace_id, top[0], "relevant")

    def agreement() -> tuple[float, float]:
        name = "orchestrator_shadow_user_agreement_total"
        return metric(live_stack, name, outcome="agree"), metric(
            live_stack, name, outcome="disagree"
        )

    agreement_before = agreement()
    simulations_before = metric(live_stack, "orchestrator_shadow_simulations_total")
    # The request names only the user: the stored profile conditions the agent.
    response = post(
        live_stack,
        "/shadow/simulate",
        {"trace_id": trace_id, "user_id": "art-student", "agent": "llm", "top_k": 1},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["profile"] == profile
    assert body["agent_id"].startswith("shadow-llm:") and "SmolLM2" in body["agent_id"]
    shadow = body["feedback"]
    # The last ranking's top 1 (one LM pass: a loaded 2-core box stays inside the deadline).
    assert [f["target_id"] for f in shadow] == top[:1]
    for item in shadow:
        assert item["source"] == "shadow" and item["stage"] == "fusion"
        assert item["agent_id"] == body["agent_id"]
        assert item["action"] in ("relevant", "irrelevant")
        assert 0.5 <= item["confidence"] <= 1.0 and item["created"]

    # Stored beside the user's feedback, each with its own provenance.
    stored = get(live_stack, f"/traces/{trace_id}").json()["feedback"]
    by_id = {f["feedback_id"]: f for f in stored}
    assert by_id[user_fb]["source"] == "user" and by_id[user_fb]["agent_id"] is None
    for item in shadow:
        row = by_id[item["feedback_id"]]
        assert (row["source"], row["agent_id"]) == ("shadow", body["agent_id"])
        assert row["confidence"] == pytest.approx(item["confidence"])

    # Export: every example derives from feedback of exactly one source, and says which.
    examples = [e for e in export(live_stack) if e["trace_id"] == trace_id]
    assert {e["type"] for e in examples} == {"rel_label"}
    assert len(examples) == 2
    for example in examples:
        (origin,) = example["derived_from"]
        row = by_id[origin]
        assert example["source"] == row["source"]
        assert example["agent_id"] == row["agent_id"]
        assert example["doc_id"] == row["target_id"]
        assert example["label"] == (1 if row["action"] == "relevant" else 0)
        expected_weight = 1.0 if row["source"] == "user" else round(row["confidence"] * 0.5, 4)
        assert example["weight"] == pytest.approx(expected_weight)
        assert example["doc_id"] not in example["hard_negatives"]
    user_only = [e for e in export(live_stack, source="user") if e["trace_id"] == trace_id]
    assert [e["derived_from"] for e in user_only] == [[user_fb]]
    shadow_only = [e for e in export(live_stack, source="shadow") if e["trace_id"] == trace_id]
    assert sorted(e["derived_from"][0] for e in shadow_only) == sorted(
        f["feedback_id"] for f in shadow
    )

    # Metrics: feedback per stage and source, simulations, and shadow/user agreement on the
    # one document both labelled (top[0]: the user said relevant).
    assert metric(live_stack, "orchestrator_feedback_total", stage="fusion", source="shadow") >= 1
    assert metric(live_stack, "orchestrator_feedback_total", stage="fusion", source="user") >= 1
    assert metric(live_stack, "orchestrator_shadow_simulations_total") == simulations_before + 1
    agreed = int(shadow[0]["action"] == "relevant")
    after = agreement()
    assert (after[0] - agreement_before[0], after[1] - agreement_before[1]) == (agreed, 1 - agreed)


def test_shadow_judges_an_answer_with_thumbs(live_stack: Stack) -> None:
    answered = post(
        live_stack, "/answer", {"question": "Who painted the Mona Lisa?", "max_rounds": 1}
    )
    assert answered.status_code == 200, answered.text
    trace_id = answered.json()["trace_id"]
    response = post(
        live_stack,
        "/shadow/simulate",
        {
            "trace_id": trace_id,
            "profile": "A tourist planning a trip to Paris.",
            "agent": "llm",
            "top_k": 1,
        },
    )
    assert response.status_code == 200, response.text
    items = response.json()["feedback"]
    assert [f["target_type"] for f in items] == ["doc", "answer"]
    thumbs = items[1]
    assert (thumbs["stage"], thumbs["action"], thumbs["target_id"]) == (
        "generate",
        "thumbs",
        "answer",
    )
    assert thumbs["value"] in ("up", "down") and thumbs["source"] == "shadow"


def test_bad_input_is_typed_never_a_500(live_stack: Stack) -> None:
    trace_id = search(live_stack, "Eiffel Tower", k=3)["trace_id"]
    missing = post(live_stack, "/shadow/simulate", {"trace_id": "no-such-trace"})
    assert error_of(missing, 404)["code"] == "not_found"
    no_profile = post(live_stack, "/shadow/simulate", {"trace_id": trace_id, "user_id": "nobody"})
    assert error_of(no_profile, 404)["field"] == "user_id"
    assert error_of(get(live_stack, "/users/nobody/profile"), 404)["code"] == "not_found"
    bogus = post(live_stack, "/shadow/simulate", {"trace_id": trace_id, "agent": "oracle"})
    assert error_of(bogus, 422)["field"] == "agent"
    # No cross-encoder is published yet: the agent that needs one is unavailable, typed.
    ce = post(live_stack, "/shadow/simulate", {"trace_id": trace_id, "agent": "cross-encoder"})
    error = error_of(ce, 503)
    assert error["code"] == "unavailable" and "cross-encoder" in error["message"]
    assert ce.headers.get("retry-after")
    empty_profile = httpx.put(
        f"{live_stack.orchestrator_url}/users/u/profile", json={"profile": ""}, timeout=30
    )
    assert error_of(empty_profile, 422)["field"] == "profile"

    for params, field in (
        ({"stage": "nowhere"}, "stage"),
        ({"source": "agent"}, "source"),
        ({"since": "yesterday"}, "since"),
        ({"since": "-1"}, "since"),
        ({"type": "dpo"}, "type"),
    ):
        assert error_of(get(live_stack, "/feedback/export", **params), 422)["field"] == field

    wrong_component = post(live_stack, "/jobs/offline-update", {"component": "generator"})
    assert error_of(wrong_component, 422)["field"] == "component"
    too_few = post(
        live_stack,
        "/jobs/offline-update",
        {"component": "reranker", "since": time.time(), "min_examples": 3},
    )
    # A valid request meeting too little feedback: 409 (the same request succeeds later).
    error = error_of(too_few, 409)
    assert error["code"] == "conflict"
    assert error["field"] == "min_examples" and "0 positive" in error["message"]
    bad_fraction = post(
        live_stack, "/jobs/offline-update", {"component": "reranker", "eval_fraction": 1.5}
    )
    assert error_of(bad_fraction, 422)["field"] == "eval_fraction"
    bad_gate = post(live_stack, "/jobs/offline-update", {"component": "reranker", "max_p": 0})
    assert error_of(bad_gate, 422)["field"] == "max_p"


def label_queries(stack: Stack, queries: list[str], rank: int) -> list[str]:
    """Search each query and mark the document at ``rank`` (1-based) relevant; returns the
    feedback ids."""
    ids = []
    for query in queries:
        found = search(stack, query, k=10)
        ids.append(
            feedback(stack, found["trace_id"], found["hits"][rank - 1]["doc_id"], "relevant")
        )
    return ids


def offline_update(
    stack: Stack, since: float, queries: str = "original", replay: float = 0.0
) -> dict[str, Any]:
    accepted = post(
        stack,
        "/jobs/offline-update",
        {
            "component": "reranker",
            "since": since,
            "min_examples": 8,
            "eval_fraction": 0.5,
            "train": TINY_TRAIN,
            "queries": queries,
            "replay": replay,
        },
    )
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["positive_labels"] == 10
    status = wait_for_job(stack, job["job_id"])
    assert status["kind"] == "lodestar.offline_update"
    assert status["state"] == "succeeded", status
    result: dict[str, Any] = status["result"]
    return result


def test_offline_update_refuses_a_worse_model_and_publishes_a_better_one(
    live_stack: Stack, wiki_sample: list[Document]
) -> None:
    queries = [doc.title for doc in wiki_sample[:10]]
    family = live_stack.data_dir / "models" / "cross-encoder"
    assert not (family / "CURRENT").exists()

    # 1. Every labelled document is the first stage's top hit: on the held-out queries the
    #    serving order is already perfect (nDCG@10 = 1), so no model can be better.
    since = time.time()
    label_queries(live_stack, queries, rank=1)
    refused = offline_update(live_stack, since)
    assert refused["published"] is False and refused["outcome"] == "rejected"
    assert refused["before"]["model"] == "first-stage-order"
    assert refused["before"]["ndcg@10"] == pytest.approx(1.0)
    assert refused["after"]["ndcg@10"] <= refused["before"]["ndcg@10"]
    assert refused["version"] is None
    assert refused["examples"]["held_out_queries"] == 5
    assert refused["examples"]["train_examples"] == 5
    assert refused["examples"]["by_source"] == {"user": 10}
    assert not (family / "CURRENT").exists()  # nothing published

    # 2. Every labelled document is the 10th hit and its hard negatives the top ones: the
    #    serving order ranks each relevant document last of its candidates, the minimum.
    since = time.time()
    label_queries(live_stack, queries, rank=10)
    better = offline_update(live_stack, since)
    # Published at the default gate: all 5 held-out queries better, p = 2^-5 <= 0.05.
    assert better["published"] is True and better["outcome"] == "published", better["reason"]
    assert better["p_value"] <= better["gate"]["max_p"] == 0.05
    assert better["before"]["ndcg@10"] < better["after"]["ndcg@10"]
    assert better["version"] and (family / "CURRENT").read_text().strip() == better["version"]
    manifest = json.loads((family / "versions" / better["version"] / "manifest.json").read_text())
    assert manifest["trained_on"] == "feedback"
    assert manifest["offline_update"]["after"]["ndcg@10"] == better["after"]["ndcg@10"]

    # 3. The same labels with CAR applied to the feedback: the worker's rewriter (SmolLM2)
    #    rewrites each training query with the document marked relevant, once (cached on disk),
    #    and replays the 5 examples the version published in step 2 was trained on.
    car = offline_update(live_stack, since, queries="car", replay=1.0)
    assert car["examples"]["queries"] == "car" and car["examples"]["train_examples"] == 5
    assert car["examples"]["replayed"] == 5
    cache = live_stack.data_dir / "rewriter" / "cache"
    records = [
        json.loads(line)
        for path in cache.rglob("*.jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    assert len(records) == 5, records
    assert {r["record"]["original_query"] for r in records} <= set(queries)

    updates = "orchestrator_offline_updates_total"
    assert metric(live_stack, updates, component="reranker", outcome="rejected") >= 1
    assert metric(live_stack, updates, component="reranker", outcome="published") >= 1

    # The published cross-encoder now serves the shadow agent that needs it, no restart.
    trace_id = search(live_stack, "Isaac Newton", k=3)["trace_id"]
    response = post(
        live_stack, "/shadow/simulate", {"trace_id": trace_id, "agent": "cross-encoder"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["agent_id"] == f"shadow-ce:cross-encoder:{better['version']}"
    assert [f["target_id"] for f in body["feedback"]] == [
        h["doc_id"]
        for h in get(live_stack, f"/traces/{trace_id}").json()["stages"][-1]["outputs"]["hits"]
    ]
    assert all(f["created"] and f["source"] == "shadow" for f in body["feedback"])
    # The same agent on the same trace (and profile) does not write its labels twice.
    again = post(live_stack, "/shadow/simulate", {"trace_id": trace_id, "agent": "cross-encoder"})
    assert again.status_code == 200, again.text
    assert [(f["feedback_id"], f["created"]) for f in again.json()["feedback"]] == [
        (f["feedback_id"], False) for f in body["feedback"]
    ]
