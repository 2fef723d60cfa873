"""Keys on, end to end (docs/api.md, "Keys and roles"): the index and the orchestrator as real
processes with admin, read-only and service keys, a per-key rate limit and protected metrics.

The index accepts only admin keys (the service key among them), so every orchestrator answer
that needed the index proves the orchestrator's calls carry the service key.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import hash_api_key
from tests.conftest import Stack, start_stack

ADMIN, READER, READER_2, THROTTLED, SERVICE = (
    "admin-9f2c",
    "reader-41aa",
    "reader-77b0",
    "reader-throttled",
    "service-5e1d",
)
BURST = 10


@pytest.fixture(scope="module")
def keyed_stack(built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("keys") / "data"
    shutil.copytree(built_data_dir, data_dir)  # this module writes to its own copy
    readers = ",".join(hash_api_key(k) for k in (READER, READER_2, THROTTLED))
    # Probes need no key, so the stack gets ready as any other does.
    with start_stack(
        data_dir,
        tmp_path_factory.mktemp("keys-logs"),
        # Admin keys only for the index: no reader reaches it.
        orchestrator_env={"LODESTAR_READ_API_KEY_HASHES": readers},
        LODESTAR_API_KEY_HASHES=f"{hash_api_key(ADMIN)},{hash_api_key(SERVICE)}",
        LODESTAR_SERVICE_API_KEY=SERVICE,
        # Slow refill: within the test a key has its burst and nothing more.
        LODESTAR_RATE_LIMIT_PER_S="0.01",
        LODESTAR_RATE_LIMIT_BURST=str(BURST),
        LODESTAR_PROTECT_DOCS="true",
        LODESTAR_ANSWER_MAX_NEW_TOKENS="8",
    ) as stack:
        yield stack


def call(stack: Stack, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(
        method, f"{stack.orchestrator_url}{path}", headers=headers, timeout=120, **kw
    )


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_keys_roles_limits_and_propagation_across_real_processes(keyed_stack: Stack) -> None:
    stack = keyed_stack
    query = {"query": "Who painted the Mona Lisa?", "k": 3}

    # No key, a wrong key: 401. Probes stay open.
    assert code(call(stack, "POST", "/search", None, json=query)) == "unauthorized"
    assert code(call(stack, "POST", "/search", "wrong", json=query)) == "unauthorized"
    assert httpx.get(f"{stack.orchestrator_url}/healthz").status_code == 200

    # A read key searches; the orchestrator reached the admin-only index with the service key.
    found = call(stack, "POST", "/search", READER, json=query)
    assert found.status_code == 200, found.text
    assert found.json()["hits"] and "index" not in found.json()["degraded"]
    assert found.json()["hits"][0]["doc_id"] == "Mona Lisa"
    # The reader's key means nothing to the index itself.
    direct = httpx.post(
        f"{stack.index_url}/search",
        json={"query": "Mona Lisa", "collection": "wiki", "k": 1},
        headers={"authorization": f"Bearer {READER}"},
    )
    assert direct.status_code == 401

    # Writes, deletes and jobs need admin: 403 for the reader, done for the admin.
    doc = {"id": "keys-doc", "title": "Zyxwv quokka", "text": "The zyxwv quokka lives on Qix."}
    path = "/collections/wiki/documents"
    refused = call(stack, "PUT", path, READER, json={"documents": [doc]})
    assert refused.status_code == 403 and code(refused) == "forbidden"
    written = call(stack, "PUT", path, ADMIN, json={"documents": [doc]})
    assert written.status_code == 200, written.text
    hits = call(stack, "POST", "/search", READER_2, json={"query": "zyxwv quokka", "k": 1})
    assert hits.json()["hits"][0]["doc_id"] == "keys-doc"
    assert call(stack, "DELETE", f"{path}/keys-doc", READER).status_code == 403
    assert call(stack, "DELETE", f"{path}/keys-doc", ADMIN).status_code == 200
    job = call(stack, "POST", "/jobs/offline-update", READER, json={"component": "reranker"})
    assert job.status_code == 403 and code(job) == "forbidden"

    # /answer is a read.
    answer = call(
        stack,
        "POST",
        "/answer",
        READER_2,
        json={"question": "Who painted the Mona Lisa?", "max_rounds": 1},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["answer"]

    # Idempotency keys are each caller's own.
    trace_id = found.json()["trace_id"]
    feedback = {
        "trace_id": trace_id,
        "stage": "fusion",
        "target_type": "doc",
        "target_id": "Mona Lisa",
        "action": "relevant",
        "idempotency_key": "same-key",
    }
    first = call(stack, "POST", "/feedback", READER, json=feedback)
    other = call(stack, "POST", "/feedback", READER_2, json=feedback)
    again = call(stack, "POST", "/feedback", READER, json=feedback)
    assert first.status_code == other.status_code == again.status_code == 201, first.text
    assert first.json()["created"] and other.json()["created"]
    assert first.json()["feedback_id"] != other.json()["feedback_id"]
    assert again.json() == {"feedback_id": first.json()["feedback_id"], "created": False}

    # Metrics and docs are protected (protect_docs); a read key opens them.
    assert call(stack, "GET", "/metrics", None).status_code == 401
    assert call(stack, "GET", "/metrics", READER).status_code == 200
    assert call(stack, "GET", "/openapi.json", None).status_code == 401

    # A key past its burst gets 429 with Retry-After; other keys, and the service key's calls
    # to the index (every one of these went through it), are not slowed.
    for _ in range(BURST):
        assert call(stack, "GET", "/collections/wiki", THROTTLED).status_code == 200
    limited = call(stack, "GET", "/collections/wiki", THROTTLED)
    assert limited.status_code == 429 and code(limited) == "overloaded"
    assert int(limited.headers["retry-after"]) >= 1
    after = call(stack, "POST", "/search", READER_2, json=query)
    assert after.status_code == 200 and "index" not in after.json()["degraded"]
