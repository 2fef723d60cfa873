"""The compose stack for real: `docker compose up` on a real engine, driven through 127.0.0.1.

``make compose-test`` runs this module after ``make images``. The stack is docker-compose.yml
with deploy/compose.hostnet.yml (every container on the host network, ports 18000-18007, Redis
16379, PostgreSQL 15432: no bridge, no private-range address) and, where no registry answers,
deploy/compose.localbase.yml (Redis and PostgreSQL built from the local Debian base). The tests
run in file order against one stack: search, answer, feedback, an ingest job on the worker
container, feedback across ``restart orchestrator``, collection and feedback across
``down``/``up`` (volumes), a SIGKILLed service brought back by its restart policy, and worker
replicas scaled through the Docker SDK (lodestar/workers.py). ``down -v`` at the end.

Skipped, with the reason, when no engine answers or the images are missing. Figures (time to
healthy, image sizes) go to reports/compose/figures.json and the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("LODESTAR_COMPOSE_PROJECT", "lodestar-compose-test")
ORCHESTRATOR = "http://127.0.0.1:18000"
BOOTSTRAP_LIMIT = os.environ.get("BOOTSTRAP_LIMIT", "300")
WAIT_TIMEOUT_S = int(os.environ.get("LODESTAR_COMPOSE_WAIT_S", "900"))
FIGURES = ROOT / "reports" / "compose" / "figures.json"
IMAGES = ("lodestar:cpu",)


def _run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=check
    )


def _localbase() -> bool:
    """Redis/PostgreSQL (and BASE_IMAGE) from the local Debian base: when python:3.11-slim is
    absent and lodestar/debian:bookworm present, or LODESTAR_COMPOSE_LOCALBASE=1."""
    forced = os.environ.get("LODESTAR_COMPOSE_LOCALBASE")
    if forced is not None:
        return forced == "1"
    has = lambda image: _run("docker", "image", "inspect", image, check=False).returncode == 0  # noqa: E731
    return not has("python:3.11-slim") and has("lodestar/debian:bookworm")


def _skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (deploy/engine.sh installs one)"
    try:
        if _run("docker", "info", timeout=20, check=False).returncode != 0:
            return "no Docker engine answers `docker info` (deploy/engine.sh starts one)"
        if _run("docker", "compose", "version", timeout=20, check=False).returncode != 0:
            return "no Compose v2 plugin (`docker compose`; deploy/engine.sh installs it)"
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 20 s"
    needed = [
        *IMAGES,
        *(("lodestar/redis:bookworm", "lodestar/postgres:bookworm") if _localbase() else ()),
    ]
    missing = [i for i in needed if _run("docker", "image", "inspect", i, check=False).returncode]
    if missing:
        return f"images missing: {', '.join(missing)} (`make images` builds them)"
    return None


SKIP = _skip_reason()
if SKIP:
    pytestmark.append(pytest.mark.skip(reason=SKIP))


def compose(
    *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    files = ["-f", "docker-compose.yml", "-f", "deploy/compose.hostnet.yml"]
    if _localbase():
        files += ["-f", "deploy/compose.localbase.yml"]
    env = {**os.environ, "BOOTSTRAP_LIMIT": BOOTSTRAP_LIMIT}
    result = subprocess.run(
        ["docker", "compose", "-p", PROJECT, *files, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)}: {result.stderr[-3000:]}")
    return result


def record(**figures: Any) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    current.update(figures)
    FIGURES.write_text(json.dumps(current, indent=2) + "\n")
    for key, value in figures.items():
        print(f"compose figure: {key} = {value}", file=sys.stderr)


def up() -> float:
    started = time.perf_counter()
    result = compose(
        "up",
        "-d",
        "--no-build",
        "--wait",
        "--wait-timeout",
        str(WAIT_TIMEOUT_S),
        timeout=WAIT_TIMEOUT_S + 60,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        logs = compose("logs", "--tail", "40", timeout=60, check=False).stdout
        raise AssertionError(
            f"compose up failed after {seconds:.0f} s: {result.stderr[-2000:]}\n{logs[-6000:]}"
        )
    return seconds


def container_id(service: str) -> str:
    out = compose("ps", "-q", service, timeout=30).stdout.split()
    assert out, f"no container for {service}"
    return out[0]


def inspect(container: str) -> dict[str, Any]:
    return dict(json.loads(_run("docker", "inspect", container, timeout=30).stdout)[0])


def wait_healthy(container: str, timeout_s: float = 300) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        state = inspect(container)["State"]
        if state.get("Running") and state.get("Health", {}).get("Status") == "healthy":
            return time.perf_counter() - started
        time.sleep(2)
    raise AssertionError(
        f"{container} not healthy within {timeout_s} s: {inspect(container)['State']}"
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[httpx.Client]:
    compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    try:
        seconds = up()
        sizes = {
            image: round(
                int(_run("docker", "image", "inspect", image, "--format", "{{.Size}}").stdout)
                / 1e9,
                2,
            )
            for image in IMAGES
        }
        record(
            first_up_to_healthy_s=round(seconds, 1),
            bootstrap_limit=int(BOOTSTRAP_LIMIT),
            image_size_gb=sizes,
        )
        with httpx.Client(base_url=ORCHESTRATOR, timeout=180) as client:
            yield client
    finally:
        if os.environ.get("LODESTAR_COMPOSE_KEEP") != "1":
            compose("down", "-v", "--remove-orphans", timeout=300, check=False)


@pytest.fixture(scope="module")
def shared_state() -> dict[str, Any]:
    return {}


def documents(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}-{i}",
            "title": f"Lighthouse {prefix} {i}",
            "text": f"The lighthouse number {i} of {prefix} stands on a granite cliff and its lamp "
            f"turns every {i + 3} seconds; keepers logged storms, ships and the {prefix} fog.",
        }
        for i in range(n)
    ]


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed"):
            return dict(status)
        time.sleep(2)
    raise AssertionError(f"job {job_id} not finished within {timeout_s} s: {status}")


def test_no_container_has_a_private_network_address(stack: httpx.Client) -> None:
    for cid in compose("ps", "-q", timeout=30).stdout.split():
        attrs = inspect(cid)
        assert attrs["HostConfig"]["NetworkMode"] == "host", attrs["Name"]
        assert not any(
            n.get("IPAddress") for n in attrs["NetworkSettings"]["Networks"].values() if n
        )


def test_search_through_the_container(stack: httpx.Client, shared_state: dict[str, Any]) -> None:
    response = stack.post("/search", json={"query": "Who painted the Mona Lisa?", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["hits"]) == 5
    assert {"dense", "bm25"} <= set(body["hits"][0]["sources"]) | {"dense", "bm25"}
    assert "index" not in body["degraded"]
    shared_state["trace_id"] = body["trace_id"]
    shared_state["doc_id"] = body["hits"][0]["doc_id"]


def test_answer_through_the_container(stack: httpx.Client) -> None:
    response = stack.post(
        "/answer", json={"question": "Who painted the Mona Lisa?", "max_rounds": 1, "k": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"].strip()
    assert len(body["rounds"]) == 1
    assert "generator" not in body["degraded"]


def test_feedback_is_durable_and_idempotent(
    stack: httpx.Client, shared_state: dict[str, Any]
) -> None:
    key = f"compose-{uuid.uuid4()}"
    feedback = {
        "trace_id": shared_state["trace_id"],
        "stage": "fusion",
        "target_type": "doc",
        "target_id": shared_state["doc_id"],
        "action": "relevant",
        "idempotency_key": key,
    }
    first = stack.post("/feedback", json=feedback)
    assert first.status_code == 201, first.text
    again = stack.post("/feedback", json=feedback)
    assert again.json()["feedback_id"] == first.json()["feedback_id"]
    assert again.json()["created"] is False
    shared_state["feedback"] = feedback
    shared_state["feedback_id"] = first.json()["feedback_id"]


def _trace_feedback_ids(client: httpx.Client, trace_id: str) -> set[str]:
    response = client.get(f"/traces/{trace_id}")
    assert response.status_code == 200, response.text
    return {item["feedback_id"] for item in response.json()["feedback"]}


def test_ingest_job_runs_on_the_worker_container(stack: httpx.Client) -> None:
    response = stack.put(
        "/collections/compose-ingest/documents", json={"documents": documents("ingest", 80)}
    )
    assert response.status_code == 202, response.text
    status = wait_job(stack, response.json()["job_id"])
    assert status["state"] == "succeeded", status
    assert status["placement"]["host"] == "lodestar-cpu@worker-cpu", status["placement"]
    found = stack.post(
        "/search",
        json={"query": "granite cliff lighthouse lamp", "collection": "compose-ingest", "k": 3},
    )
    assert found.status_code == 200, found.text
    assert found.json()["hits"][0]["doc_id"].startswith("ingest-")


def test_feedback_survives_an_orchestrator_restart(
    stack: httpx.Client, shared_state: dict[str, Any]
) -> None:
    before = inspect(container_id("orchestrator"))["State"]["StartedAt"]
    compose("restart", "orchestrator", timeout=120)
    cid = container_id("orchestrator")
    record(orchestrator_restart_to_healthy_s=round(wait_healthy(cid), 1))
    assert inspect(cid)["State"]["StartedAt"] != before
    assert shared_state["feedback_id"] in _trace_feedback_ids(stack, shared_state["trace_id"])
    again = stack.post("/feedback", json=shared_state["feedback"])
    assert again.status_code == 201 and again.json()["created"] is False


def test_collection_and_feedback_survive_down_and_up(
    stack: httpx.Client, shared_state: dict[str, Any]
) -> None:
    compose("down", timeout=300)
    assert not compose("ps", "-q", timeout=30).stdout.split()
    record(second_up_to_healthy_s=round(up(), 1))
    names = {c["name"] for c in stack.get("/collections").json()}
    assert {"wiki", "compose-ingest"} <= names
    assert shared_state["feedback_id"] in _trace_feedback_ids(stack, shared_state["trace_id"])


def test_a_killed_service_is_restarted_by_its_policy(stack: httpx.Client) -> None:
    cid = container_id("index")
    state = inspect(cid)
    restarts = state["RestartCount"]
    os.kill(
        state["State"]["Pid"], signal.SIGKILL
    )  # a crash, as the engine sees it (not `docker kill`)
    deadline = time.monotonic() + 60
    while inspect(cid)["RestartCount"] == restarts and time.monotonic() < deadline:
        time.sleep(1)
    assert inspect(cid)["RestartCount"] == restarts + 1
    record(index_crash_to_healthy_s=round(wait_healthy(cid), 1))
    response = stack.post("/search", json={"query": "Mona Lisa", "k": 3})
    assert response.status_code == 200 and "index" not in response.json()["degraded"]


def test_worker_replicas_scaled_through_the_docker_sdk(stack: httpx.Client) -> None:
    from celery import Celery

    from lodestar import workers

    engine = workers.client()
    prefix = PROJECT
    compose("stop", "worker-cpu", timeout=120)  # only the replicas consume while they run
    celery = Celery(broker="redis://127.0.0.1:16379/0")
    try:
        started, _ = workers.scale(engine, "cpu", 2, prefix=prefix)
        assert len(started) == 2
        names = {f"lodestar-cpu@{n}" for n in started}
        deadline = time.monotonic() + 240
        consuming: set[str] = set()
        while time.monotonic() < deadline:
            queues = celery.control.inspect(timeout=3).active_queues() or {}
            consuming = {w for w, qs in queues.items() if any(q["name"] == "cpu" for q in qs)}
            if names <= consuming:
                break
            time.sleep(3)
        assert names <= consuming, (names, consuming)
        listed = _run(
            str(ROOT / ".venv" / "bin" / "lodestar"), "workers", "list", check=False
        ).stdout
        assert all(n in listed for n in started), listed

        jobs = []
        for i in range(4):
            response = stack.put(
                f"/collections/compose-scale-{i}/documents",
                json={"documents": documents(f"scale{i}", 70)},
            )
            assert response.status_code == 202, response.text
            jobs.append(response.json()["job_id"])
        hosts = set()
        for job in jobs:
            status = wait_job(stack, job)
            assert status["state"] == "succeeded", status
            hosts.add(status["placement"]["host"])
        assert hosts == names, f"jobs ran on {hosts}, replicas {names}"
    finally:
        _, removed = workers.scale(engine, "cpu", 0, prefix=prefix)
        compose("start", "worker-cpu", timeout=120, check=False)
    assert len(removed) == 2
    assert not [w for w in workers.list_workers(engine) if w.managed]
