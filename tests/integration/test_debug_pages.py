"""The debug pages through the ASGI client, over real traces: an orchestrator app in this process
(SmolLM2 loaded, the session's index service over loopback, the session store shared with
``live_stack``) asked a ``/search`` and a multi-round ``/answer`` from the page, then fed back on
and rerun from the page."""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from services.orchestrator.app import build_app
from services.orchestrator.debug import view
from services.orchestrator.rerun import RERUN_STAGES
from tests.conftest import Stack, free_port, make_settings

pytestmark = pytest.mark.slow


def escape_text(text: str) -> str:
    return str(escape(text))


QUESTION = "Who painted the Mona Lisa?"
#: Two hops: round 1 answers the first (Paris, France), so round 2's query has new words.
MULTI_HOP = "Which city is the capital of the country where the Mona Lisa is exhibited?"


@pytest.fixture(scope="module")
def client(live_stack: Stack) -> Iterator[TestClient]:
    settings = make_settings(
        live_stack.data_dir,
        index_url=live_stack.index_url,
        # Nothing listens there: the critic and the reranker are down, as the page must show.
        critic_url=f"http://127.0.0.1:{free_port()}",
        reranker_url=f"http://127.0.0.1:{free_port()}",
        answer_max_new_tokens=24,
    )
    with TestClient(build_app(settings)) as client:  # the lifespan loads the generator
        deadline = time.monotonic() + 180
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.3)
        yield client
    # Warm-up froze the heap (right for a server process); later tests here want a normal GC.
    gc.unfreeze()


def trace_id_of(response: Any) -> str:
    match = re.search(r"/debug/traces/([0-9a-f]{32})", str(response.url))
    assert match, response.url
    return match.group(1)


def card_sections(html: str) -> list[tuple[str, str]]:
    """(stage, section html) per stage card, in page order."""
    return re.findall(r'<section class="card stage stage-(\w+)".*?>(.*?)</section>', html, re.S)


def json_trace(client: TestClient, trace_id: str) -> dict[str, Any]:
    response = client.get(f"/traces/{trace_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def assert_cards_and_controls(html: str, trace: dict[str, Any]) -> None:
    """Every stored stage has its card (in order), a timeline entry, inputs and parameters, its
    model and latency; every document, sub-query, answer and citation has its controls."""
    cards = card_sections(html)
    assert [stage for stage, _ in cards] == [s["stage"] for s in trace["stages"]]
    timeline = html[html.index('id="timeline"') :]
    assert timeline.count('<span class="bar"') == len(trace["stages"])
    allowed = RERUN_STAGES[trace["kind"]]
    for (stage, section), stored in zip(cards, trace["stages"], strict=True):
        assert "inputs and parameters" in section and "latency:" in section
        assert (stored["model_id"] or "—") in section
        has_rerun = f'aria-label="rerun from {stage}"' in section
        assert has_rerun == (stage in allowed), stage
        for target in stored["targets"]:
            block = view.element_id(stage, target["type"], target["id"])
            assert f'id="{block}"' in section, (stage, target)
        if stage in ("retrieve", "fusion", "rerank") and "hits" in stored["outputs"]:
            n = len(stored["outputs"]["hits"])
            for action in view.DOC_ACTIONS:
                assert section.count(f'name="action" value="{action}"') == n
        if stage == "decompose":
            for action in view.SUBQUERY_ACTIONS:
                assert section.count(f'value="{action}">{action}</button>') == len(
                    stored["targets"]
                )
            assert "Edit and rerun" in section
        if stage == "generate":
            for control in ("thumbs up", "thumbs down", "flag_hallucination", "Corrected answer"):
                assert control in section
            cited = stored["outputs"]["citations"]
            assert section.count('value="good_citation"') == len(cited)
            assert section.count('value="bad_citation"') == len(cited)
    # Every feedback form posts to this trace's feedback route.
    forms = re.findall(r'hx-post="(/debug/traces/[^"]*)"', html)
    assert forms and set(forms) == {f"/debug/traces/{trace['trace_id']}/feedback"}
    # Documents link to their passages, which are on the page.
    for anchor in set(re.findall(r'href="#(t-[0-9a-f]{12})"', html)):
        assert f'<article id="{anchor}"' in html
    assert 'id="shadow"' in html and "Run the shadow agent" in html


def test_a_search_trace_has_every_card_score_and_control(client: TestClient) -> None:
    page = client.post(
        "/debug/ask",
        data={"mode": "search", "query": QUESTION, "k": "5", "rerank": "cosine"},
    )
    assert page.status_code == 200, page.text
    trace = json_trace(client, trace_id_of(page))
    assert [s["stage"] for s in trace["stages"]] == ["retrieve", "retrieve", "fusion", "rerank"]
    assert_cards_and_controls(page.text, trace)
    html = page.text
    for score in ("dense", "bm25", "rerank"):
        assert escape_text(view.SCORE_DEFINITIONS[score]) in html
    # Raw score, rank and the fused rank side by side: dense's first hit as stored.
    dense = trace["stages"][0]["outputs"]["hits"][0]
    fused = {h["doc_id"]: h for h in trace["stages"][2]["outputs"]["hits"]}
    row = re.search(
        rf'data-doc-id="{re.escape(dense["doc_id"])}">\s*<td>1</td>.*?<td>([\d.]+)</td>\s*'
        r"<td>(\d+|—)</td>",
        card_sections(html)[0][1],
        re.S,
    )
    assert row, "dense's first row"
    assert float(row.group(1)) == pytest.approx(dense["score"], abs=1e-4)
    if dense["doc_id"] in fused:
        assert int(row.group(2)) == fused[dense["doc_id"]]["rank"]
    # The reranker is down: the card says so and keeps the input order.
    rerank = card_sections(html)[3][1]
    assert "rerank input order" in rerank and "first_stage_order" in rerank
    assert "degraded" in html and "reranker" in html


def test_pin_remove_and_rerun_from_fusion_show_parent_and_child(client: TestClient) -> None:
    page = client.post("/debug/ask", data={"mode": "search", "query": "Eiffel Tower Paris"})
    parent_id = trace_id_of(page)
    parent = json_trace(client, parent_id)
    top = parent["response"]["hit_ids"]
    fb = f"/debug/traces/{parent_id}/feedback"
    for doc, action in ((top[3], "pin"), (top[0], "remove")):
        stored = client.post(
            fb,
            data={"stage": "fusion", "target_type": "doc", "target_id": doc, "action": action},
            follow_redirects=False,
        )
        assert stored.status_code == 303, stored.text
    compare = client.post(
        f"/debug/traces/{parent_id}/rerun", data={"from_stage": "fusion", "apply_feedback": "1"}
    )
    assert compare.status_code == 200, compare.text
    assert str(compare.url).endswith("/compare")
    html = compare.text
    parent_list = re.findall(r'<li class="doc (\w+)" data-doc-id="([^"]+)"', html.split("Child")[0])
    child_list = re.findall(r'<li class="doc (\w+)" data-doc-id="([^"]+)"', html.split("Child")[1])
    assert [d for _, d in parent_list] == top
    assert ("gone", top[0]) in parent_list
    assert child_list[0] == ("moved", top[3])
    assert "moved up 3" in html
    assert top[0] not in [d for _, d in child_list]
    assert any(status == "new" for status, _ in child_list)
    child_id = trace_id_of(compare)
    child = json_trace(client, child_id)
    assert child["parent_trace_id"] == parent_id
    assert child["response"]["hit_ids"][0] == top[3]
    # The child's own page: every card and control, upstream stages marked as copied.
    child_page = client.get(f"/debug/traces/{child_id}")
    assert_cards_and_controls(child_page.text, child)
    retrieve_cards = [s for stage, s in card_sections(child_page.text) if stage == "retrieve"]
    assert retrieve_cards and all("copied from the parent" in s for s in retrieve_cards)
    assert f'Rerun of <a href="/debug/traces/{parent_id}"' in child_page.text
    assert f"/debug/traces/{child_id}/compare" in client.get(f"/debug/traces/{parent_id}").text
    # The feedback is the API's: stored on the parent, listed on /traces/{id}.
    rows = [
        (f["target_id"], f["action"], f["source"])
        for f in json_trace(client, parent_id)["feedback"]
    ]
    assert rows == [(top[3], "pin", "user"), (top[0], "remove", "user")]
    # The listing finds both, filtered by kind.
    listing = client.get("/debug", params={"kind": "search"}).text
    assert parent_id[:12] in listing and child_id[:12] in listing
    assert parent_id[:12] not in client.get("/debug", params={"kind": "answer"}).text


def test_a_multi_round_answer_trace_and_its_rerun(client: TestClient) -> None:
    page = client.post(
        "/debug/ask", data={"mode": "answer", "query": MULTI_HOP, "k": "2", "rounds": "2"}
    )
    assert page.status_code == 200, page.text
    trace_id = trace_id_of(page)
    trace = json_trace(client, trace_id)
    rounds = trace["response"]["rounds"]
    assert len(rounds) == 2, (trace["response"]["stop_reason"], rounds)
    html = page.text
    assert_cards_and_controls(html, trace)
    # One row per round: query, new documents, answer, rationale, the critic's verdict.
    rows = re.findall(r'<tr class="round">(.*?)</tr>', html, re.S)
    assert len(rows) == 2
    for row, stored in zip(rows, rounds, strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[0] == str(stored["round"])
        assert escape_text(stored["query"]) == cells[1]
        assert escape_text(stored["answer"]) == cells[3]
        assert cells[5].startswith("no verdict")  # the critic is down
    assert "critic" in trace["response"]["degraded"]
    generate_cards = [s for stage, s in card_sections(html) if stage == "generate"]
    assert len(generate_cards) == 2
    # The answer's citations link to the passages.
    for citation in trace["response"]["citations"]:
        assert f'href="#{view.doc_anchor(citation["doc_id"])}"' in html

    # An edit that empties a sub-query: a readable page, nothing stored.
    emptied = client.post(
        f"/debug/traces/{trace_id}/feedback",
        data={
            "stage": "decompose",
            "target_type": "subquery",
            "target_id": "sq1",
            "action": "edit",
            "text": " ",
        },
    )
    assert emptied.status_code == 422
    assert "an edit cannot leave a sub-query empty" in emptied.text
    assert "Traceback" not in emptied.text
    assert json_trace(client, trace_id)["feedback"] == []
    # Edit and rerun: the edit is stored as feedback and sent to the API's rerun as an override.
    edited = client.post(
        f"/debug/traces/{trace_id}/rerun",
        data={"from_stage": "decompose", "sq_id": "sq1", "text": "Mona Lisa museum city"},
    )
    feedback = json_trace(client, trace_id)["feedback"]
    assert [(f["target_id"], f["action"], f["value"]) for f in feedback] == [
        ("sq1", "edit", {"text": "Mona Lisa museum city"})
    ]
    if "decompose" in RERUN_STAGES["answer"]:
        assert edited.status_code == 200, edited.text
        child = json_trace(client, trace_id_of(edited))
        first = next(s for s in child["stages"] if s["stage"] == "decompose")
        assert [sq["text"] for sq in first["outputs"]["subqueries"]] == ["Mona Lisa museum city"]
        assert "Mona Lisa museum city" in client.get(f"/debug/traces/{child['trace_id']}").text
    else:  # an API whose reruns cannot take sub-query edits refuses, and the page says why
        assert edited.status_code == 422 and "decompose" in edited.text, edited.text

    # Rerun from generate: parent and child answers side by side, diffed.
    compare = client.post(
        f"/debug/traces/{trace_id}/rerun", data={"from_stage": "generate", "apply_feedback": "1"}
    )
    assert compare.status_code == 200, compare.text
    assert "Answer, parent → child" in compare.text
    child = json_trace(client, trace_id_of(compare))
    assert child["parent_trace_id"] == trace_id
    diffed = re.search(r'<p class="answer-diff">(.*?)</p>', compare.text, re.S)
    assert diffed
    # Dropping the insertions gives the parent's answer, dropping the deletions the child's.
    for drop, answer in (
        ("ins", trace["response"]["answer"]),
        ("del", child["response"]["answer"]),
    ):
        kept = re.sub(rf"<{drop}>.*?</{drop}>", " ", diffed.group(1), flags=re.S)
        assert re.sub(r"<[^>]+>", " ", kept).split() == escape_text(answer).split()
    child_page = client.get(f"/debug/traces/{child['trace_id']}")
    assert child_page.status_code == 200
    assert_cards_and_controls(child_page.text, child)


def test_the_shadow_agent_runs_from_the_page_and_its_labels_stay_apart(
    client: TestClient,
) -> None:
    page = client.post("/debug/ask", data={"mode": "search", "query": "Isaac Newton gravity"})
    trace_id = trace_id_of(page)
    shadow = client.post(
        f"/debug/traces/{trace_id}/shadow",
        data={"agent": "llm", "top_k": "1", "profile": "a physics student"},
    )
    assert shadow.status_code == 200, shadow.text
    labels = [f for f in json_trace(client, trace_id)["feedback"] if f["source"] == "shadow"]
    assert len(labels) == 1 and labels[0]["agent_id"].startswith("shadow-llm:"), labels
    table = re.search(r'<table class="shadow-feedback">(.*?)</table>', shadow.text, re.S)
    assert table
    row = re.findall(r"<td>(.*?)</td>", table.group(1), re.S)
    assert row[0] == labels[0]["agent_id"]
    assert row[1] == f"{labels[0]['confidence']:.2f}"
    assert labels[0]["action"] in row[3]
    # Users' feedback is listed apart and has none of it; no target block shows it either.
    users = re.search(r'<ul class="user-feedback">(.*?)</ul>', shadow.text, re.S)
    assert users and "none yet" in users.group(1)
    assert 'class="fb fb-' not in shadow.text
