"""Rerun from any stage and online adaptation, on real processes over loopback: an index, a
reranker (cosine) and an orchestrator on the small Wikipedia sample, SQLite as the store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Stack, start_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    db = tmp_path_factory.mktemp("rerun-db") / "store.sqlite"
    with start_stack(
        built_data_dir,
        tmp_path_factory.mktemp("rerun-logs"),
        services=["reranker"],
        LODESTAR_DATABASE_URL=f"sqlite:///{db}",
        LODESTAR_ANSWER_MAX_NEW_TOKENS="16",
    ) as stack:
        yield stack


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{stack.orchestrator_url}{path}", json=body, timeout=120)


def trace_of(stack: Stack, trace_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.orchestrator_url}/traces/{trace_id}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def index_calls(stack: Stack, route: str) -> float:
    """Requests the index service has answered on ``route`` (its Prometheus counter)."""
    text = httpx.get(f"{stack.index_url}/metrics", timeout=10).text
    pattern = rf'index_request_count_total\{{method="POST",route="{re.escape(route)}"\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def ids(body: dict[str, Any]) -> list[str]:
    return [h["doc_id"] for h in body["hits"]]


def stages(trace: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [s for s in trace["stages"] if s["stage"] == name]


def rerun(stack: Stack, trace_id: str, body: dict[str, Any]) -> httpx.Response:
    return post(stack, f"/traces/{trace_id}/rerun", body)


def test_rerun_from_fusion_and_rerank_copies_upstream_and_calls_no_retriever(stack: Stack) -> None:
    first = post(
        stack, "/search", {"query": "Who painted the Mona Lisa?", "k": 5, "rerank": "cosine"}
    )
    assert first.status_code == 200, first.text
    parent = first.json()
    assert "reranker" not in parent["degraded"]
    original = trace_of(stack, parent["trace_id"])
    searches = index_calls(stack, "/search")

    from_fusion = rerun(stack, parent["trace_id"], {"from_stage": "fusion"})
    from_rerank = rerun(stack, parent["trace_id"], {"from_stage": "rerank", "k": 3})
    assert from_fusion.status_code == 200, from_fusion.text
    assert from_rerank.status_code == 200, from_rerank.text
    # No retrieval call: the index's /search counter did not move.
    assert index_calls(stack, "/search") == searches

    for response, copied, recomputed in (
        (from_fusion.json(), ["retrieve"], ["fusion", "rerank"]),
        (from_rerank.json(), ["retrieve", "fusion"], ["rerank"]),
    ):
        assert response["trace_id"] != parent["trace_id"]
        assert response["parent_trace_id"] == parent["trace_id"]
        child = trace_of(stack, response["trace_id"])
        assert child["parent_trace_id"] == parent["trace_id"]
        for name in copied:
            pairs = list(zip(stages(child, name), stages(original, name), strict=True))
            assert pairs
            for new, old in pairs:
                assert new["params"]["copied_from"] == old["stage_run_id"]
                assert new["stage_run_id"] != old["stage_run_id"]
                assert new["outputs"] == old["outputs"]
        for name in recomputed:
            (stage,) = stages(child, name)
            assert "copied_from" not in stage["params"]
    # Nothing changed, so the recomputed stages reproduce the parent's ranking.
    assert ids(from_fusion.json()) == ids(parent)
    assert ids(from_rerank.json()) == ids(parent)[:3]
    assert trace_of(stack, parent["trace_id"])["children"] == [
        from_fusion.json()["trace_id"],
        from_rerank.json()["trace_id"],
    ]
    metrics = httpx.get(f"{stack.orchestrator_url}/metrics").text
    assert 'orchestrator_reruns_total{from_stage="fusion",kind="search"} 1.0' in metrics
    assert 'orchestrator_reruns_total{from_stage="rerank",kind="search"} 1.0' in metrics


def test_pins_and_removals_from_overrides_and_from_stored_feedback(stack: Stack) -> None:
    parent = post(stack, "/search", {"query": "Eiffel Tower Paris", "k": 5}).json()
    top = ids(parent)
    deep = next(
        h["doc_id"]
        for s in stages(trace_of(stack, parent["trace_id"]), "retrieve")
        for h in s["outputs"]["hits"]
        if h["doc_id"] not in top
    )  # retrieved, but not in the first 5: a pin may still name it
    overrides = {"pin": [deep, top[3]], "remove": [top[0]]}
    response = rerun(stack, parent["trace_id"], {"from_stage": "fusion", "overrides": overrides})
    assert response.status_code == 200, response.text
    body = response.json()
    assert ids(body)[:2] == [deep, top[3]]
    assert top[0] not in ids(body)
    assert len(body["hits"]) == 5
    assert [h["judged"] for h in body["hits"][:2]] == ["pinned", "pinned"]
    assert all(h["judged"] is None for h in body["hits"][2:])
    assert next(h for h in body["hits"] if h["doc_id"] == deep)["text"]  # shown with its text

    # The same through stored feedback: applied only when asked.
    for action, doc, stage in (("pin", deep, "retrieve"), ("remove", top[0], "fusion")):
        fb = {
            "trace_id": parent["trace_id"],
            "stage": stage,
            "target_type": "doc",
            "target_id": doc,
            "action": action,
        }
        assert post(stack, "/feedback", fb).status_code == 201
    ignored = rerun(stack, parent["trace_id"], {"from_stage": "fusion"}).json()
    assert ids(ignored) == top
    applied = rerun(stack, parent["trace_id"], {"from_stage": "fusion", "apply_feedback": True})
    assert ids(applied.json())[0] == deep and top[0] not in ids(applied.json())
    # A rerun of the rerun keeps the feedback given on its parent (feedback of the lineage).
    again = rerun(
        stack, applied.json()["trace_id"], {"from_stage": "fusion", "apply_feedback": True}
    )
    assert ids(again.json())[0] == deep


def test_relevance_feedback_adapts_both_queries_on_a_rerun_from_retrieve(stack: Stack) -> None:
    parent = post(stack, "/search", {"query": "Leonardo painting", "k": 8}).json()
    top = ids(parent)
    relevant, irrelevant = top[4], top[1]
    searches, embeds = index_calls(stack, "/search"), index_calls(stack, "/embed")
    fb = {"trace_id": parent["trace_id"], "stage": "fusion", "target_type": "doc"}
    post(stack, "/feedback", {**fb, "target_id": relevant, "action": "relevant"})
    post(stack, "/feedback", {**fb, "target_id": irrelevant, "action": "irrelevant"})
    response = rerun(stack, parent["trace_id"], {"from_stage": "retrieve", "apply_feedback": True})
    assert response.status_code == 200, response.text
    body = response.json()
    # Retrieval ran again, once, with the Rocchio vector embedded by the index.
    assert index_calls(stack, "/search") == searches + 1
    assert index_calls(stack, "/embed") == embeds + 1
    child = trace_of(stack, body["trace_id"])
    (adapt,) = stages(child, "adapt")
    assert adapt["outputs"]["query_adapted"] is True
    assert adapt["outputs"]["rocchio"]["relevant"] == 1
    assert adapt["outputs"]["rocchio"]["irrelevant"] == 1
    expansion = adapt["outputs"]["bm25_terms"]
    assert {"leonardo", "painting"} <= set(expansion) and len(expansion) > 2
    assert all(s["inputs"]["adapted"] for s in stages(child, "retrieve"))
    new = ids(body)
    assert new.index(relevant) < top.index(relevant)
    assert irrelevant not in new or new.index(irrelevant) > top.index(irrelevant)
    judged = {h["doc_id"]: h["judged"] for h in body["hits"] if h["judged"]}
    assert judged[relevant] == "relevant"
    assert judged.get(irrelevant, "irrelevant") == "irrelevant"


def test_a_session_applies_its_earlier_feedback_to_later_searches(stack: Stack) -> None:
    session = "session-adapt-1"
    query = "Isaac Newton gravity"
    first = post(stack, "/search", {"query": query, "k": 5, "session_id": session}).json()
    assert trace_of(stack, first["trace_id"])["session_id"] == session
    top = ids(first)
    fb = {"trace_id": first["trace_id"], "stage": "fusion", "target_type": "doc"}
    post(stack, "/feedback", {**fb, "target_id": top[2], "action": "pin"})
    post(stack, "/feedback", {**fb, "target_id": top[0], "action": "remove"})
    post(stack, "/feedback", {**fb, "target_id": top[1], "action": "relevant"})

    # The same query (case and punctuation aside) in the session: pins, removals and labels.
    second = post(
        stack, "/search", {"query": "isaac newton, gravity?", "k": 5, "session_id": session}
    )
    body = second.json()
    assert ids(body)[0] == top[2] and top[0] not in ids(body)
    assert body["hits"][0]["judged"] == "pinned"
    assert {h["doc_id"]: h["judged"] for h in body["hits"]}[top[1]] == "relevant"
    (adapt,) = stages(trace_of(stack, body["trace_id"]), "adapt")
    assert adapt["inputs"]["pins"] == [top[2]] and len(adapt["inputs"]["feedback_ids"]) == 3
    assert adapt["outputs"]["query_adapted"] is True

    # Another query in the session: relevance labels still adapt it, pins and removals do not.
    other = post(stack, "/search", {"query": "laws of motion", "k": 5, "session_id": session})
    (adapt,) = stages(trace_of(stack, other.json()["trace_id"]), "adapt")
    assert adapt["inputs"]["pins"] == [] and adapt["inputs"]["removes"] == []
    assert adapt["inputs"]["relevant"] == [top[1]]
    # Without the session nothing is applied.
    plain = post(stack, "/search", {"query": query, "k": 5}).json()
    assert ids(plain) == top and not stages(trace_of(stack, plain["trace_id"]), "adapt")
    metrics = httpx.get(f"{stack.orchestrator_url}/metrics").text
    assert 'orchestrator_online_adaptations_total{effect="pin",trigger="session"} 1.0' in metrics


def test_answer_rerun_from_generate_answers_again_without_retrieving(stack: Stack) -> None:
    first = post(stack, "/answer", {"question": "Who painted the Mona Lisa?", "max_rounds": 1})
    assert first.status_code == 200, first.text
    parent = first.json()
    read = parent["rounds"][0]["hit_ids"]
    original = trace_of(stack, parent["trace_id"])
    searches = index_calls(stack, "/search")
    body = {"from_stage": "generate", "overrides": {"pin": [read[-1]], "remove": [read[0]]}}
    response = rerun(stack, parent["trace_id"], body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert index_calls(stack, "/search") == searches
    assert answer["parent_trace_id"] == parent["trace_id"] and answer["answer"]
    assert answer["stop_reason"] == "rerun_generate"
    assert (
        answer["rounds"][0]["hit_ids"][0] == read[-1]
        and read[0] not in answer["rounds"][0]["hit_ids"]
    )
    assert answer["judged"] == {read[-1]: "pinned"}
    child = trace_of(stack, answer["trace_id"])
    assert [s["params"]["copied_from"] for s in stages(child, "retrieve")] == [
        s["stage_run_id"] for s in stages(original, "retrieve")
    ]
    (generate,) = stages(child, "generate")
    assert generate["inputs"]["doc_ids"][0] == read[-1]


def test_answer_rerun_with_edited_subqueries_searches_only_the_new_ones(stack: Stack) -> None:
    first = post(stack, "/answer", {"question": "Who painted the Mona Lisa?", "max_rounds": 1})
    assert first.status_code == 200, first.text
    parent = first.json()
    original = trace_of(stack, parent["trace_id"])
    (decompose,) = stages(original, "decompose")
    assert [sq["sq_id"] for sq in decompose["outputs"]["subqueries"]] == ["sq1"]
    searches = index_calls(stack, "/search")
    edits = [{"action": "add", "text": "Leonardo da Vinci painter", "order": 0}]
    response = rerun(
        stack, parent["trace_id"], {"from_stage": "decompose", "overrides": {"subqueries": edits}}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    # sq1 is unchanged: its retrieval is the parent's, copied; only the added sq2 is searched.
    assert index_calls(stack, "/search") == searches + 1
    child = trace_of(stack, answer["trace_id"])
    (edited,) = stages(child, "decompose")
    assert [(sq["sq_id"], sq["origin"]) for sq in edited["outputs"]["subqueries"]] == [
        ("sq2", "user"),
        ("sq1", "question"),
    ]
    retrieved = {
        s["params"]["sq_id"]: s["params"].get("copied_from") for s in stages(child, "retrieve")
    }
    assert retrieved["sq1"] is not None and retrieved["sq2"] is None
    (over,) = [s for s in stages(child, "fusion") if s["params"].get("over") == "subqueries"]
    assert over["inputs"]["subqueries"] == ["sq2", "sq1"]
    assert "Leonardo da Vinci" in answer["rounds"][0]["hit_ids"]
    # Edits that cannot stand are typed 422s naming the field.
    for bad in (
        [{"action": "edit", "sq_id": "sq1", "text": "   "}],
        [{"action": "delete", "sq_id": "sq1"}],
        [{"action": "reorder", "sq_id": "sq9", "order": 0}],
    ):
        body = {"from_stage": "decompose", "overrides": {"subqueries": bad}}
        refused = rerun(stack, parent["trace_id"], body)
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["error"]["field"] == "overrides.subqueries"


def test_stored_subquery_feedback_acts_on_a_rerun_that_applies_feedback(stack: Stack) -> None:
    first = post(stack, "/answer", {"question": "Who painted the Mona Lisa?", "max_rounds": 1})
    assert first.status_code == 200, first.text
    parent = first.json()
    on_sq1 = {
        "trace_id": parent["trace_id"],
        "stage": "decompose",
        "target_type": "subquery",
        "target_id": "sq1",
    }
    added = {"action": "add", "value": {"text": "Leonardo da Vinci painter", "position": 0}}
    # The second edit would give sq1 the added one's text: it cannot stand, so it is skipped.
    clash = {"action": "edit", "value": {"text": "leonardo da vinci painter"}}
    for row in (added, clash):
        assert post(stack, "/feedback", {**on_sq1, **row}).status_code == 201
    ignored = rerun(stack, parent["trace_id"], {"from_stage": "decompose"})
    assert ignored.status_code == 200, ignored.text
    (kept,) = stages(trace_of(stack, ignored.json()["trace_id"]), "decompose")
    assert [sq["sq_id"] for sq in kept["outputs"]["subqueries"]] == ["sq1"]

    searches = index_calls(stack, "/search")
    response = rerun(stack, parent["trace_id"], {"from_stage": "decompose", "apply_feedback": True})
    assert response.status_code == 200, response.text
    child = trace_of(stack, response.json()["trace_id"])
    (edited,) = stages(child, "decompose")
    assert [(sq["sq_id"], sq["text"]) for sq in edited["outputs"]["subqueries"]] == [
        ("sq2", "Leonardo da Vinci painter"),
        ("sq1", "Who painted the Mona Lisa?"),
    ]
    assert index_calls(stack, "/search") == searches + 1  # only the added sub-query is searched
    applied = child["request"]["rerun"]["adaptation"]["subquery_feedback"]
    assert [e["action"] for e in applied] == [
        "add",
        "edit",
    ]  # as stored; the clash was skipped in applying
    # The child's decomposition carries the edits: rerun it, they are kept (not decomposed
    # afresh) and not applied twice, and both sub-queries reuse the child's retrieval.
    searches = index_calls(stack, "/search")
    again = rerun(stack, child["trace_id"], {"from_stage": "decompose", "apply_feedback": True})
    assert again.status_code == 200, again.text
    (same,) = stages(trace_of(stack, again.json()["trace_id"]), "decompose")
    assert [sq["sq_id"] for sq in same["outputs"]["subqueries"]] == ["sq2", "sq1"]
    assert index_calls(stack, "/search") == searches


def test_bad_rerun_input_gets_a_typed_4xx(stack: Stack) -> None:
    parent = post(stack, "/search", {"query": "photosynthesis", "k": 3}).json()
    trace_id = parent["trace_id"]
    missing = rerun(stack, "no-such-trace", {"from_stage": "fusion"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"from_stage": "rerank"}, "from_stage"),  # this search did not re-rank
        ({"from_stage": "generate"}, "from_stage"),
        ({"from_stage": "bogus"}, "from_stage"),
        ({"from_stage": "fusion", "overrides": {"pin": ["Not A Doc"]}}, "overrides.pin"),
        ({"from_stage": "fusion", "overrides": {"relevant": ["Not A Doc"]}}, "overrides.relevant"),
        (
            {
                "from_stage": "fusion",
                "overrides": {
                    "pin": [parent["hits"][0]["doc_id"]],
                    "remove": [parent["hits"][0]["doc_id"]],
                },
            },
            "overrides.pin",
        ),
        (
            {
                "from_stage": "fusion",
                "overrides": {"subqueries": [{"action": "edit", "sq_id": "x"}]},
            },
            "overrides.subqueries",
        ),
        ({"from_stage": "fusion", "k": 0}, None),
        ({"overrides": {}}, None),
        ({"from_stage": "fusion", "feedback_sources": ["robot"]}, None),
    ]
    for body, field in cases:
        response = rerun(stack, trace_id, body)
        assert response.status_code == 422, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation", body
        if field is not None:
            assert error["field"] == field, (body, error)
    # A bad session id is a 422 too, never a 500.
    assert post(stack, "/search", {"query": "x", "session_id": ""}).status_code == 422
