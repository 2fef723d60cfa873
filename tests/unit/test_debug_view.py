"""The debug pages over stored traces, through the ASGI client (no index or model needed): the
rerank card's two orders, feedback forms with and without htmx, the readable error pages, the
API key kept in a cookie, and the ranking comparison and answer diff."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from markupsafe import escape

from services.orchestrator.app import build_app
from services.orchestrator.debug import view
from shared.settings import hash_api_key
from shared.store import StageRun, Trace
from tests.conftest import make_settings

DOCS = {
    "Mona Lisa": "The Mona Lisa is a portrait by Leonardo da Vinci.",
    "Louvre": "The Louvre is an art museum in Paris.",
    "Paris": "Paris is the capital of France.",
}


def hits(order: list[str], scores: list[float]) -> list[dict[str, object]]:
    return [
        {"doc_id": d, "rank": i, "score": s, "title": d, "text": DOCS[d]}
        for i, (d, s) in enumerate(zip(order, scores, strict=True), 1)
    ]


def targets(order: list[str]) -> list[dict[str, str]]:
    return [{"type": "doc", "id": d} for d in order]


def search_trace() -> Trace:
    """A search as the pipeline stores it: two retrievers, RRF, a reranker that reorders."""
    trace = Trace(kind="search", request={"query": "who painted the mona lisa", "k": 3})
    dense = ["Mona Lisa", "Louvre", "Paris"]
    bm25 = ["Louvre", "Mona Lisa", "Paris"]
    for name, order, scores in (
        ("dense", dense, [0.71, 0.52, 0.33]),
        ("bm25", bm25, [12.3, 9.1, 1.2]),
    ):
        trace.stages.append(
            StageRun(
                "retrieve",
                {"query": "who painted the mona lisa", "k": 3},
                {"hits": hits(order, scores)},
                targets(order),
                f"model-{name}",
                {"retriever": name, "collection": "wiki"},
                2.0,
            )
        )
    fused = [
        {
            "doc_id": d,
            "rank": i,
            "score": s,
            "sources": {
                "dense": {"rank": dense.index(d) + 1, "score": 0.5},
                "bm25": {"rank": bm25.index(d) + 1, "score": 5.0},
            },
        }
        for i, (d, s) in enumerate(zip(dense, [0.0325, 0.0325, 0.0317], strict=True), 1)
    ]
    trace.stages.append(
        StageRun("fusion", {"k": 3}, {"hits": fused}, targets(dense), None, {"rrf_k": 60}, 0.1)
    )
    reranked = ["Paris", "Mona Lisa", "Louvre"]
    trace.stages.append(
        StageRun(
            "rerank",
            {"query": "q", "doc_ids": dense},
            {
                "hits": [
                    {"doc_id": d, "rank": i, "score": 1.0 / i} for i, d in enumerate(reranked, 1)
                ]
            },
            targets(reranked),
            "cosine-minilm",
            {"method": "cosine", "depth": 3},
            5.0,
        )
    )
    trace.response = {"hit_ids": reranked, "degraded": [], "judged": {}}
    return trace


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return build_app(make_settings(tmp_path / "data"))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    # No lifespan: reading pages and storing feedback need no model.
    yield TestClient(app)


def stored(app: FastAPI, trace: Trace) -> str:
    return str(app.state.store.save_trace(trace))


def test_rerank_card_shows_input_and_output_order_and_every_score(
    app: FastAPI, client: TestClient
) -> None:
    trace_id = stored(app, search_trace())
    page = client.get(f"/debug/traces/{trace_id}")
    assert page.status_code == 200
    html = page.text
    rerank = html[html.index('data-stage="rerank"') :]
    inputs = re.search(r'rerank input order">(.*?)</ol>', rerank, re.S)
    outputs = re.search(r'rerank output order">(.*?)</ol>', rerank, re.S)
    assert inputs and outputs
    assert re.findall(r"<li>(.*?)</li>", inputs.group(1)) == ["Mona Lisa", "Louvre", "Paris"]
    assert re.findall(r"<li>(.*?)</li>", outputs.group(1)) == ["Paris", "Mona Lisa", "Louvre"]
    # Raw scores beside the fused rank, each with its definition.
    for definition in ("dense", "bm25", "rerank"):
        assert str(escape(view.SCORE_DEFINITIONS[definition])) in html
    assert "rrf_k = 60" in html
    assert "12.3000" in html and "0.7100" in html and "0.0325" in html
    assert "bm25 #1 · 5.0000" in html
    # Three rerunnable stages, each with its form; one feedback block per document per stage.
    for stage in ("retrieve", "fusion", "rerank"):
        assert f'aria-label="rerun from {stage}"' in html
    assert html.count('data-target-type="doc"') == 3 * 4
    assert html.count(f'hx-post="/debug/traces/{trace_id}/feedback"') == 3 * 4
    for action in view.DOC_ACTIONS:
        assert f'value="{action}" aria-label="{action} Louvre (fusion)"' in html


def test_feedback_form_redirects_without_js_and_returns_the_block_with_htmx(
    app: FastAPI, client: TestClient
) -> None:
    trace_id = stored(app, search_trace())
    form = {"stage": "fusion", "target_type": "doc", "target_id": "Louvre", "action": "pin"}
    plain = client.post(f"/debug/traces/{trace_id}/feedback", data=form, follow_redirects=False)
    block_id = view.element_id("fusion", "doc", "Louvre")
    assert plain.status_code == 303
    assert plain.headers["location"] == f"/debug/traces/{trace_id}#{block_id}"
    enhanced = client.post(
        f"/debug/traces/{trace_id}/feedback",
        data={**form, "action": "relevant"},
        headers={"HX-Request": "true"},
    )
    assert enhanced.status_code == 200
    assert enhanced.text.lstrip().startswith(f'<div class="target" id="{block_id}"')
    assert "<html" not in enhanced.text
    assert re.findall(r'class="fb fb-(\w+)"', enhanced.text) == ["pin", "relevant"]
    stored_rows = client.get(f"/traces/{trace_id}").json()["feedback"]
    assert [(f["stage"], f["target_id"], f["action"]) for f in stored_rows] == [
        ("fusion", "Louvre", "pin"),
        ("fusion", "Louvre", "relevant"),
    ]


def test_bad_input_is_a_readable_page_never_a_stack_trace(app: FastAPI, client: TestClient) -> None:
    unknown = client.get("/debug/traces/no-such-trace")
    assert unknown.status_code == 404
    assert "text/html" in unknown.headers["content-type"]
    assert "trace &#39;no-such-trace&#39; does not exist" in unknown.text

    answer = Trace(kind="answer", request={"question": "Who painted the Mona Lisa?", "k": 2})
    answer.stages.append(
        StageRun(
            "decompose",
            {"question": "Who painted the Mona Lisa?"},
            {"subqueries": [{"sq_id": "sq1", "text": "Who painted the Mona Lisa?"}]},
            [{"type": "subquery", "id": "sq1"}],
        )
    )
    trace_id = stored(app, answer)
    emptied = {"stage": "decompose", "target_type": "subquery", "target_id": "sq1"}
    page = client.post(
        f"/debug/traces/{trace_id}/feedback", data={**emptied, "action": "edit", "text": "  "}
    )
    assert page.status_code == 422
    assert "an edit cannot leave a sub-query empty" in page.text
    in_place = client.post(
        f"/debug/traces/{trace_id}/feedback",
        data={**emptied, "action": "edit", "text": ""},
        headers={"HX-Request": "true"},
    )
    assert in_place.status_code == 422
    assert 'role="alert">an edit cannot leave a sub-query empty' in in_place.text
    for response in (
        client.post(f"/debug/traces/{trace_id}/feedback", data={**emptied, "action": "nod"}),
        client.post(
            f"/debug/traces/{trace_id}/feedback",
            data={**emptied, "target_type": "spaceship", "action": "edit", "text": "x"},
        ),
        client.get("/debug?kind=weird"),
        client.get(f"/debug/traces/{trace_id}/compare"),
    ):
        assert response.status_code == 422, response.text
        assert "text/html" in response.headers["content-type"]
        assert "Traceback" not in response.text and 'class="message"' in response.text
    assert client.get(f"/traces/{trace_id}").json()["feedback"] == []


def test_the_api_key_is_checked_and_kept_in_a_cookie(tmp_path: Path) -> None:
    app = build_app(make_settings(tmp_path / "data", api_key_hashes=[hash_api_key("s3cret")]))
    client = TestClient(app)
    asked = client.get("/debug")
    assert asked.status_code == 401
    assert '<label for="key">API key</label>' in asked.text
    assert client.get("/debug", headers={"X-API-Key": "s3cret"}).status_code == 200
    wrong = client.post("/debug/key", data={"key": "nope", "next": "/debug"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.text
    given = client.post(
        "/debug/key", data={"key": "s3cret", "next": "https://elsewhere"}, follow_redirects=False
    )
    assert given.status_code == 303 and given.headers["location"] == "/debug"
    assert "httponly" in given.headers["set-cookie"].lower()
    assert client.get("/debug").status_code == 200  # the cookie, kept by the client
    # The JSON API still wants the header: the cookie opens the debug pages only.
    assert client.get("/traces/x").status_code == 401


def test_compare_marks_moved_new_and_gone_and_diffs_answers() -> None:
    left, right = view.compare_rankings(["a", "b", "c", "d"], ["c", "a", "e"])
    assert [(d.doc_id, d.status, d.delta) for d in left] == [
        ("a", "moved", -1),
        ("b", "gone", 0),
        ("c", "moved", 2),
        ("d", "gone", 0),
    ]
    assert [(d.doc_id, d.status, d.delta) for d in right] == [
        ("c", "moved", 2),
        ("a", "moved", -1),
        ("e", "new", 0),
    ]
    assert view.word_diff("Paris in France", "Paris, France") == [
        ("del", "Paris in"),
        ("ins", "Paris,"),
        ("same", "France"),
    ]
    assert view.word_diff("the answer is Paris", "the answer is Rome") == [
        ("same", "the answer is"),
        ("del", "Paris"),
        ("ins", "Rome"),
    ]
