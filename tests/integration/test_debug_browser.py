"""The debug pages in a real browser: Playwright driving Debian's Chromium against the session's
live orchestrator process (``live_stack``). Asks from the page, gives feedback with the mouse
(htmx updates the card in place), reruns, and checks what landed in ``/traces/{id}``. Writes
the screenshots of docs/debug.md (``docs/img/debug-*.png``)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.orchestrator.rerun import RERUN_STAGES
from tests.conftest import Stack

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
#: Where the screenshots go: a temporary folder, so a test run leaves the checkout clean;
#: ``LODESTAR_SCREENSHOTS=docs/img`` regenerates the ones the docs show.
IMAGES = Path(os.environ.get("LODESTAR_SCREENSHOTS") or tempfile.mkdtemp(prefix="debug-shots-"))
#: Playwright's own browser download does not work on these machines: Debian's Chromium,
#: without the background services that would try the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: An /answer on a shared 2-core machine can take a while; a click waits for it.
ACTION_TIMEOUT_MS = 150_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # .ci/run installs it; a missing browser is a failure, not a skip
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(ACTION_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # htmx and the pages ran without a script error


def trace_of(stack: Stack, trace_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.orchestrator_url}/traces/{trace_id}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def trace_id_in(url: str) -> str:
    match = re.search(r"/debug/traces/([0-9a-f]{32})", url)
    assert match, url
    return match.group(1)


def ask(page: Page, stack: Stack, mode: str, query: str, **fields: str) -> str:
    page.goto(f"{stack.orchestrator_url}/debug")
    page.get_by_label(mode, exact=True).check()
    page.get_by_label("Query or question").fill(query)
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Ask").click()
    page.wait_for_url(re.compile(r"/debug/traces/[0-9a-f]{32}$"))
    return trace_id_in(page.url)


def test_pin_remove_and_rerun_from_fusion_in_the_browser(page: Page, live_stack: Stack) -> None:
    trace_id = ask(page, live_stack, "search", "Who painted the Mona Lisa?", k="5")
    expect(page.get_by_role("heading", name=re.compile("search trace"))).to_be_visible()
    page.screenshot(path=str(IMAGES / "debug-trace.png"))
    fusion = page.locator('section[data-stage="fusion"]')
    rows = fusion.locator("tr.hit")
    expect(rows).to_have_count(len(trace_of(live_stack, trace_id)["stages"][2]["targets"]))
    removed = str(rows.nth(0).get_attribute("data-doc-id"))
    pinned = str(rows.nth(3).get_attribute("data-doc-id"))
    at = page.url
    rows.nth(3).get_by_role("button", name=f"pin {pinned} (fusion)").click()
    expect(rows.nth(3).locator(".saved")).to_have_text("Saved: pin")
    rows.nth(0).get_by_role("button", name=f"remove {removed} (fusion)").click()
    expect(rows.nth(0).locator(".saved")).to_have_text("Saved: remove")
    expect(rows.nth(0).locator("li.fb-remove")).to_have_count(1)
    assert page.url == at  # updated in place by htmx, no navigation
    fusion.screenshot(path=str(IMAGES / "debug-fusion.png"))
    stored = [(f["target_id"], f["action"]) for f in trace_of(live_stack, trace_id)["feedback"]]
    assert stored == [(pinned, "pin"), (removed, "remove")]

    fusion.get_by_role("button", name="rerun from fusion").click()
    page.wait_for_url(re.compile(r"/compare$"))
    child_id = trace_id_in(page.url)
    child = page.locator("ol.child li.doc")
    expect(child.first).to_have_attribute("data-doc-id", pinned)
    expect(child.first.locator(".mark")).to_have_text("moved up 3")
    expect(page.locator(f'ol.child li[data-doc-id="{removed}"]')).to_have_count(0)
    expect(page.locator(f'ol.parent li[data-doc-id="{removed}"]')).to_have_attribute(
        "data-status", "gone"
    )
    expect(page.locator("ol.child li.new")).not_to_have_count(0)
    page.screenshot(path=str(IMAGES / "debug-compare.png"))
    child_trace = trace_of(live_stack, child_id)
    assert child_trace["parent_trace_id"] == trace_id
    assert child_trace["response"]["hit_ids"][0] == pinned
    assert removed not in child_trace["response"]["hit_ids"]


def test_edit_a_sub_query_and_rerun_in_the_browser(page: Page, live_stack: Stack) -> None:
    question = "Who painted the Mona Lisa?"
    trace_id = ask(page, live_stack, "answer", question, k="2", **{"Rounds (answer)": "1"})
    expect(page.locator("p.final-answer")).not_to_be_empty()
    page.locator("#rounds").scroll_into_view_if_needed()
    page.screenshot(path=str(IMAGES / "debug-answer.png"))
    # The answer's feedback, in place.
    answer_card = page.locator('section[data-stage="generate"]')
    answer_card.get_by_role("button", name="thumbs up").click()
    expect(answer_card.locator(".saved")).to_have_text("Saved: thumbs")
    # An edit that empties the sub-query: the block says why, nothing is stored.
    decompose = page.locator('section[data-stage="decompose"]').first
    sq1 = decompose.locator('li.subquery[data-sq-id="sq1"]')
    sq1.get_by_label("Text for sq1").fill("   ")
    sq1.get_by_role("button", name="edit", exact=True).click()
    expect(sq1.get_by_role("alert")).to_contain_text("an edit cannot leave a sub-query empty")
    actions = [f["action"] for f in trace_of(live_stack, trace_id)["feedback"]]
    assert actions == ["thumbs"]

    decompose.get_by_label("New text").fill("Leonardo da Vinci painting")
    decompose.get_by_role("button", name="Edit and rerun").click()
    page.wait_for_load_state()
    feedback = trace_of(live_stack, trace_id)["feedback"]
    assert [(f["target_id"], f["action"], f["value"]) for f in feedback][1:] == [
        ("sq1", "edit", {"text": "Leonardo da Vinci painting"})
    ]
    if "decompose" in RERUN_STAGES["answer"]:
        page.wait_for_url(re.compile(r"/compare$"))
        expect(page.locator("p.answer-diff")).to_be_visible()
        child = trace_of(live_stack, trace_id_in(page.url))
        first = next(s for s in child["stages"] if s["stage"] == "decompose")
        assert [sq["text"] for sq in first["outputs"]["subqueries"]] == [
            "Leonardo da Vinci painting"
        ]
    else:  # an API that cannot rerun sub-query edits: a readable refusal, never a stack trace
        expect(page.get_by_role("alert")).to_contain_text("decompose")
    assert "Traceback" not in page.content()


def test_the_home_page_lists_and_filters_traces(page: Page, live_stack: Stack) -> None:
    page.goto(f"{live_stack.orchestrator_url}/debug")
    page.get_by_label("Kind").select_option("answer")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"kind=answer"))
    kinds = page.locator("table.traces tbody tr td:nth-child(2)").all_inner_texts()
    assert kinds and set(kinds) == {"answer"}
    page.screenshot(path=str(IMAGES / "debug-home.png"))
    page.goto(f"{live_stack.orchestrator_url}/debug/traces/no-such-trace")
    expect(page.get_by_role("alert")).to_contain_text("trace 'no-such-trace' does not exist")
