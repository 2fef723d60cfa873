"""The dsi service end to end over loopback: a real service process and a real Celery worker
(SQLite broker), a tiny corpus and a tiny model. Indexing runs as jobs with progress; search
answers the RetrieverClient contract the orchestrator uses for its ``dsi`` retriever."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from shared.clients import RetrieverClient
from shared.schemas import IndexSearchRequest
from tests.conftest import free_port, make_settings, spawn, stack_env, wait_ready

DOCS = [
    {
        "id": "lighthouse",
        "title": "Lighthouse",
        "text": "A lighthouse is a tower that emits light to guide ships.",
    },
    {
        "id": "volcano",
        "title": "Volcano",
        "text": "A volcano is a rupture in the crust where lava escapes.",
    },
    {
        "id": "glacier",
        "title": "Glacier",
        "text": "A glacier is a persistent body of dense moving ice.",
    },
    {"id": "desert", "title": "Desert", "text": "A desert is a barren landscape with little rain."},
    {
        "id": "comet",
        "title": "Comet",
        "text": "A comet is an icy body that releases gas near the Sun.",
    },
    {
        "id": "orchid",
        "title": "Orchid",
        "text": "Orchids are flowering plants with fragrant blooms.",
    },
]
OPTIONS = {
    "method": "naive",
    "docid": "atomic",
    "epochs": 30,
    "first_epochs": 60,
    "d_model": 32,
    "layers": 1,
}


def _wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed"):
            return status
        time.sleep(0.5)
    return status


def test_dsi_service_indexes_as_jobs_and_serves_the_retriever_contract(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = stack_env(data_dir, LODESTAR_DSI_PORT=str(port))
    service = spawn("dsi", ["-m", "services.dsi"], env, tmp_path)
    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu"], env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, service)
        with httpx.Client(base_url=url, timeout=60) as client:
            missing = client.post("/search", json={"collection": "tiny", "query": "ice", "k": 3})
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            bad_k = client.post("/search", json={"collection": "tiny", "query": "ice", "k": 0})
            assert bad_k.status_code == 422
            bad_method = client.post(
                "/collections/tiny/dsi/index",
                json={"documents": DOCS, "options": {"method": "retrain"}},
            )
            assert bad_method.status_code == 422

            accepted = client.post(
                "/collections/tiny/dsi/index", json={"documents": DOCS, "options": OPTIONS}
            )
            assert accepted.status_code == 202, accepted.text
            status = _wait_for_job(client, accepted.json()["job_id"])
            assert status["state"] == "succeeded", (status, worker.log.read_text()[-3000:])
            first_version = status["result"]["version"]
            assert status["result"]["documents"] == 6
            info = client.get("/collections/tiny/dsi").json()
            assert info["version"] == first_version and info["docid"] == "atomic"

        settings = make_settings(data_dir, dsi_url=url)

        async def search(query: str, k: int) -> Any:
            retriever = RetrieverClient("dsi", url, settings)
            try:
                request = IndexSearchRequest(
                    collection="tiny", query=query, k=k, retrievers=["dsi"]
                )
                return await retriever.search(request)
            finally:
                await retriever.aclose()

        response = asyncio.run(search("Glacier. A glacier is a persistent body of dense", 3))
        assert response.version == first_version
        hits = response.results["dsi"]
        assert len(hits) == 3 and hits[0].doc_id == "glacier"
        assert [h.sources["dsi"].rank for h in hits] == [1, 2, 3]
        assert {h.doc_id for h in hits} <= {d["id"] for d in DOCS}

        new_docs = [
            {
                "id": "coral",
                "title": "Coral",
                "text": "Coral reefs are ecosystems built by polyps.",
            },
            {"id": "bridge", "title": "Bridge", "text": "A suspension bridge hangs below cables."},
        ]
        with httpx.Client(base_url=url, timeout=60) as client:
            accepted = client.post(
                "/collections/tiny/dsi/index", json={"documents": new_docs, "options": OPTIONS}
            )
            status = _wait_for_job(client, accepted.json()["job_id"])
            assert status["state"] == "succeeded", (status, worker.log.read_text()[-3000:])
            assert status["result"]["new_documents"] == 2
        response = asyncio.run(search("Coral. Coral reefs are ecosystems", 8))
        assert response.version == status["result"]["version"] != first_version
        assert "coral" in {h.doc_id for h in response.results["dsi"]}
    finally:
        worker.stop()
        service.stop()
