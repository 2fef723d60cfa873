"""Locust load profile for the Lodestar orchestrator (the public entry point, port 8000).

Three kinds of user, weighted roughly as real traffic is: many searches, some feedback on search
results, a few LLM-bound answers. Run it headless and bounded with ``python -m loadtests.run``.
``LODESTAR_API_KEY``, when set, is sent as ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import os
import random
import uuid
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


class LodestarUser(FastHttpUser):
    """Common set-up: API key header and helpers that validate responses."""

    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.request_headers = {"Content-Type": "application/json", **auth_headers()}

    def search(self, name: str = "/search") -> list[dict[str, Any]]:
        """POST /search; a failure unless 200 with at least one hit. Returns the hits."""
        body = {"query": random.choice(QUERIES), "collection": COLLECTION, "k": 10}
        with self.client.post(
            "/search", json=body, headers=self.request_headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or str(resp.error))[:200]}")
                return []
            try:
                payload = resp.json()
                hits = payload["hits"]
            except (ValueError, KeyError, TypeError):
                resp.failure("response is not a search result")
                return []
            if not hits:
                resp.failure("no hits")
                return []
            if not isinstance(payload.get("trace_id"), str):
                resp.failure("no trace_id")
                return []
            resp.success()
            return [dict(hit, trace_id=payload["trace_id"]) for hit in hits]


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
        with self.client.post(
            "/answer", json=body, headers=self.request_headers, name="/answer", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or str(resp.error))[:200]}")
                return
            try:
                answer = resp.json()["answer"]
            except (ValueError, KeyError, TypeError):
                resp.failure("response is not an answer")
                return
            if not isinstance(answer, str) or not answer.strip():
                resp.failure("empty answer")
                return
            resp.success()


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
        with self.client.post(
            "/feedback",
            json=body,
            headers=self.request_headers,
            name="/feedback",
            catch_response=True,
        ) as resp:
            if resp.status_code != 201:
                resp.failure(f"status {resp.status_code}: {(resp.text or str(resp.error))[:200]}")
                return
            try:
                feedback_id = resp.json()["feedback_id"]
            except (ValueError, KeyError, TypeError):
                resp.failure("response has no feedback_id")
                return
            if not feedback_id:
                resp.failure("empty feedback_id")
                return
            resp.success()
