"""The critic service as a real process with a tiny critic trained in the fixture (seconds), an
untrained one, and the orchestrator's multi-round ``/answer`` against each of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.critic.practice import PracticeRow
from services.critic.training import TrainConfig, train_critic
from tests.conftest import (
    Process,
    free_port,
    loopback,
    make_settings,
    read_sse,
    running,
    spawn,
    stack_env,
)
from tests.scripted import practice_turns

pytestmark = pytest.mark.slow

FACTS = [
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Mona Lisa"),
    ("Where is the Eiffel Tower?", "Paris", "Eiffel Tower"),
    ("Who formulated universal gravitation?", "Isaac Newton", "Isaac Newton"),
    ("What do plants turn light into?", "sugar", "Photosynthesis"),
    ("Which city hosts the Louvre?", "Paris", "Louvre"),
    ("Who wrote Hamlet?", "William Shakespeare", "Hamlet"),
]


def tiny_practice_rows() -> list[PracticeRow]:
    """Per question: an answer the context supports (accept) and an "unsure" one plus a wrong
    one (reject), as self-practice labels them."""
    rows = []
    for i, (question, answer, title) in enumerate(FACTS):
        context = (
            f"Query: {question}\nRetrieved Document [1]: Title: {title} Content: "
            f"The answer to '{question}' is {answer}."
        )
        turns = [
            (answer, f"Document 1 states that the answer is {answer}.", 1),
            ("unsure", "The documents do not say.", 0),
            ("Napoleon", "I guessed.", 0),
        ]
        rows += practice_turns(f"q{i}", question, answer, context, title, turns)
    return rows


TINY = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-4, max_input_tokens=96)


@dataclass
class CriticStack:
    critic_url: str
    untrained_url: str
    orchestrator_url: str
    orchestrator_untrained_url: str
    critic_dir: Path
    first_version: str


@pytest.fixture(scope="module")
def critic_stack(
    built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CriticStack]:
    logs = tmp_path_factory.mktemp("critic-logs")
    critic_dir = tmp_path_factory.mktemp("critic-data")
    empty_dir = tmp_path_factory.mktemp("critic-empty")
    manifest = train_critic(make_settings(critic_dir), TINY, rows=tiny_practice_rows())
    ports = {n: free_port() for n in ("index", "critic", "untrained", "orch", "orch_untrained")}
    processes: dict[str, Process] = {}
    common = {
        "LODESTAR_INDEX_PORT": str(ports["index"]),
        "LODESTAR_INDEX_URL": f"http://127.0.0.1:{ports['index']}",
        "LODESTAR_ANSWER_MAX_NEW_TOKENS": "16",
        # Several rounds of generation on a shared CPU: no request deadline gets in the way.
        "LODESTAR_REQUEST_TIMEOUT_S": "900",
    }
    processes["index"] = spawn(
        "index", ["-m", "services.index"], stack_env(built_data_dir, **common), logs
    )
    for name, data_dir in (("critic", critic_dir), ("untrained", empty_dir)):
        env = stack_env(data_dir, LODESTAR_CRITIC_PORT=str(ports[name]))
        processes[name] = spawn(name, ["-m", "services.critic"], env, logs)
    for name, critic in (("orch", "critic"), ("orch_untrained", "untrained")):
        env = stack_env(
            built_data_dir,
            **common,
            LODESTAR_ORCHESTRATOR_PORT=str(ports[name]),
            LODESTAR_CRITIC_URL=f"http://127.0.0.1:{ports[critic]}",
        )
        processes[name] = spawn(name, ["-m", "services.orchestrator"], env, logs)
    url = {n: loopback(p) for n, p in ports.items()}
    with running(processes, {name: url[name] for name in processes}):
        yield CriticStack(
            critic_url=url["critic"],
            untrained_url=url["untrained"],
            orchestrator_url=url["orch"],
            orchestrator_untrained_url=url["orch_untrained"],
            critic_dir=critic_dir,
            first_version=manifest["version"],
        )


def judge(url: str, **body: str) -> httpx.Response:
    return httpx.post(f"{url}/judge", json=body, timeout=60)


def ask_two_rounds(orchestrator_url: str, question: str) -> dict[str, Any]:
    """The body of a 200 from ``/answer`` with up to two rounds."""
    body = {"question": question, "max_rounds": 2}
    response = httpx.post(f"{orchestrator_url}/answer", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_judge_answers_with_the_published_critic(critic_stack: CriticStack) -> None:
    question, answer, title = FACTS[0]
    context = f"Query: {question}\nRetrieved Document [1]: Title: {title} Content: x"
    response = judge(
        critic_stack.critic_url,
        question=question,
        context=context,
        answer=answer,
        rationale="Document 1 says so.",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0.0 <= body["p_accept"] <= 1.0 and body["accept"] == (body["p_accept"] >= 0.5)
    assert body["model_version"] == critic_stack.first_version
    model = httpx.get(f"{critic_stack.critic_url}/model").json()
    assert model["version"] == critic_stack.first_version
    assert model["examples"]["train"] + model["examples"]["dev"] == model["examples"]["balanced"]
    assert judge(critic_stack.critic_url, question=" ", answer="x").status_code == 400


def test_an_untrained_critic_is_ready_and_refuses_to_judge(critic_stack: CriticStack) -> None:
    ready = httpx.get(f"{critic_stack.untrained_url}/readyz")
    assert ready.status_code == 200
    response = judge(critic_stack.untrained_url, question="q", answer="a")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"


def test_answer_rounds_are_governed_by_the_critic(critic_stack: CriticStack) -> None:
    body = ask_two_rounds(critic_stack.orchestrator_url, "Who painted the Mona Lisa?")
    assert "critic" not in body["degraded"]
    first = body["rounds"][0]
    assert first["round"] == 1 and first["query"] == "Who painted the Mona Lisa?"
    assert first["accept"] is not None and 0.0 <= first["p_accept"] <= 1.0
    if first["accept"]:
        assert body["stop_reason"] == "accepted" and len(body["rounds"]) == 1
    else:
        assert first["next_query"] is not None
    trace = httpx.get(f"{critic_stack.orchestrator_url}/traces/{body['trace_id']}").json()
    critic_stages = [s for s in trace["stages"] if s["stage"] == "critic"]
    assert critic_stages[0]["outputs"]["p_accept"] == pytest.approx(first["p_accept"], abs=1e-3)
    generated = [s["params"]["round"] for s in trace["stages"] if s["stage"] == "generate"]
    assert generated == [r["round"] for r in body["rounds"]]


def test_without_a_trained_critic_the_loop_runs_to_max_rounds_degraded(
    critic_stack: CriticStack,
) -> None:
    body = ask_two_rounds(critic_stack.orchestrator_untrained_url, "Where is the Eiffel Tower?")
    assert body["degraded"] == ["critic"] and body["answer"]
    assert all(r["accept"] is None for r in body["rounds"])
    # Only retrieval running dry or a repeated query may end it before max_rounds.
    if body["stop_reason"] == "max_rounds":
        assert len(body["rounds"]) == 2
    else:
        assert body["stop_reason"] in ("repeated_query", "empty_retrieval")


def test_streaming_sends_each_round_as_it_happens(critic_stack: CriticStack) -> None:
    with httpx.stream(
        "POST",
        f"{critic_stack.orchestrator_untrained_url}/answer",
        json={"question": "Who formulated universal gravitation?", "max_rounds": 2, "stream": True},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        events = read_sse(response)
    names = [name for name, _ in events]
    assert names[0] == "round" and names[-1] == "citations"
    final = events[-1][1]
    # Per round: "round", its tokens, then its "verdict", before the next round begins.
    expected_round = 1
    current = None
    for name, data in events[:-1]:
        if name == "round":
            assert data["round"] == expected_round and current is None
            current = expected_round
        elif name == "token":
            assert data["round"] == current
        elif name == "verdict":
            assert data["round"] == current
            current, expected_round = None, expected_round + 1
    assert expected_round - 1 == len(final["rounds"])
    assert final["answer"] and final["degraded"] == ["critic"]


def test_a_new_critic_version_is_served_without_a_restart(critic_stack: CriticStack) -> None:
    manifest = train_critic(make_settings(critic_stack.critic_dir), TINY, rows=tiny_practice_rows())
    assert manifest["version"] != critic_stack.first_version
    body = judge(critic_stack.critic_url, question="q", answer="a").json()
    assert body["model_version"] == manifest["version"]
