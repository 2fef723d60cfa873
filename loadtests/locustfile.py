"""Locust load profile for the Lodestar orchestrator (the public entry point, port 8000).

Three kinds of user, weighted roughly as real traffic is: many searches, some feedback on search
results, a few LLM-bound answers. Run it headless and bounded with ``python -m loadtests.run``.
``LODESTAR_API_KEY``, when set, is sent as ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from typing import Any

from locust import FastHttpUser, between, task

COLLECTION = "wiki"

#: Questions whose answers are in English Wikipedia article summaries (the bundled corpus).
QUERIES: tuple[str, ...] = (
    "Who wrote the novel Pride and Prejudice?",
    "What is the capital city of Australia?",
    "When did the Berlin Wall fall?",
    "Who developed the theory of general relativity?",
    "What is the largest planet in the Solar System?",
    "Which river flows through Cairo?",
    "Who painted the Mona Lisa?",
    "What is photosynthesis?",
    "In which country is Machu Picchu located?",
    "Who was the first person to walk on the Moon?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "Who composed the Ninth Symphony?",
    "How tall is Mount Everest?",
    "What is the Great Barrier Reef?",
    "Who founded the Roman Empire?",
    "What causes the northern lights?",
    "Which element has atomic number 1?",
    "Who invented the telephone?",
    "What is the population of Tokyo?",
)


def auth_headers() -> dict[str, str]:
    key = os.environ.get("LODESTAR_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _search_problem(payload: Any) -> str | None:
    if not payload["hits"]:
        return "no hits"
    return None if isinstance(payload.get("trace_id"), str) else "no trace_id"


def _answer_problem(payload: Any) -> str | None:
    answer = payload["answer"]
    return None if isinstance(answer, str) and answer.strip() else "empty answer"


def _feedback_problem(payload: Any) -> str | None:
    return None if payload["feedback_id"] else "empty feedback_id"


class LodestarUser(FastHttpUser):
    """Common set-up: API key header and helpers that validate responses."""

    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.request_headers = {"Content-Type": "application/json", **auth_headers()}

    def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        name: str,
        status: int,
        what: str,
        problem: Callable[[Any], str | None],
    ) -> Any:
        """POST ``body``; the JSON payload, or ``None`` with the request marked failed: another
        status than ``status``, a payload that is not ``what`` (``problem`` cannot read it), or
        what ``problem`` finds wrong with it."""
        with self.client.post(
            path, json=body, headers=self.request_headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code != status:
                resp.failure(f"status {resp.status_code}: {(resp.text or str(resp.error))[:200]}")
                return None
            try:
                payload = resp.json()
                failure = problem(payload)
            except (ValueError, KeyError, TypeError):
                failure = f"response is not {what}"
            if failure:
                resp.failure(failure)
                return None
            resp.success()
            return payload

    def search(self, name: str = "/search") -> list[dict[str, Any]]:
        """POST /search; a failure unless 200 with at least one hit. Returns the hits."""
        body = {"query": random.choice(QUERIES), "collection": COLLECTION, "k": 10}
        payload = self.post(
            "/search", body, name=name, status=200, what="a search result", problem=_search_problem
        )
        if payload is None:
            return []
        return [dict(hit, trace_id=payload["trace_id"]) for hit in payload["hits"]]


class SearchUser(LodestarUser):
    weight = 6

    @task
    def search_task(self) -> None:
        self.search()


class AnswerUser(LodestarUser):
    """Multi-round RAG with the LLM: seconds per request, so few of these users."""

    weight = 1
    wait_time = between(2.0, 5.0)

    @task
    def answer(self) -> None:
        body = {
            "question": random.choice(QUERIES),
            "collection": COLLECTION,
            "k": 5,
            "max_rounds": 2,
            "stream": False,
        }
        self.post(
            "/answer", body, name="/answer", status=200, what="an answer", problem=_answer_problem
        )


class FeedbackUser(LodestarUser):
    """Searches, then marks one hit relevant: exercises the durable feedback write path."""

    weight = 2

    @task
    def feedback(self) -> None:
        hits = self.search(name="/search (before feedback)")
        if not hits:
            return
        hit = random.choice(hits)
        body = {
            "trace_id": hit["trace_id"],
            "stage": "fusion",
            "target_type": "doc",
            "target_id": str(hit["doc_id"]),
            "action": "relevant",
            "value": 1,
            "source": "user",
            "idempotency_key": uuid.uuid4().hex,
        }
        self.post(
            "/feedback",
            body,
            name="/feedback",
            status=201,
            what="a feedback receipt",
            problem=_feedback_problem,
        )
