"""The Celery path without any server: the SQLite broker used by the embedded default."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from shared.artifacts import ArtifactFamily
from shared.jobs import TASK_INDEX_DOCUMENTS, job_status, make_celery
from tests.conftest import make_settings, spawn, stack_env

pytestmark = pytest.mark.slow


def test_sqlite_broker_runs_an_index_job_with_no_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir)
    assert settings.broker_url is None
    app = make_celery(settings)
    assert app.conf.broker_url.startswith("sqla+sqlite:///")
    batch = data_dir / "incoming" / "batch.jsonl"
    batch.parent.mkdir(parents=True)
    docs = [
        {"id": f"d{i}", "title": f"Doc {i}", "text": f"Document {i} mentions lighthouse {i}."}
        for i in range(3)
    ]
    batch.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    result = app.send_task(TASK_INDEX_DOCUMENTS, args=["lights", str(batch)], queue="cpu")
    assert job_status(app, result.id)["state"] == "queued"

    worker = spawn(
        "worker", ["-m", "services.worker", "--queues", "cpu"], stack_env(data_dir), tmp_path
    )
    try:
        deadline = time.monotonic() + 180
        status = job_status(app, result.id)
        while status["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
            status = job_status(app, result.id)
    finally:
        worker.stop()
    assert status["state"] == "succeeded", (status, worker.log.read_text()[-2000:])
    assert status["result"]["documents"] == 3
    assert not batch.exists(), "an applied batch is cleaned up"
    assert (data_dir / "collections" / "lights" / "CURRENT").exists()


def _wait(app: Any, job_id: str, worker: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    status = job_status(app, job_id)
    while status["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = job_status(app, job_id)
    assert status["state"] == "succeeded", (status, worker.log.read_text()[-2000:])
    return status


def test_an_upsert_that_outgrows_the_index_schedules_a_merge(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # An HNSW collection from 2 passages on, merged once unindexed rows pass 20% of indexed ones.
    env = stack_env(
        data_dir,
        LODESTAR_INDEX_ANN_BACKEND="hnswlib",
        LODESTAR_INDEX_ANN_MIN_PASSAGES="2",
        LODESTAR_INDEX_MERGE_FRACTION="0.2",
    )
    app = make_celery(make_settings(data_dir))
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True)

    def batch(name: str, ids: range) -> str:
        path = incoming / f"{name}.jsonl"
        rows = [
            {"id": f"d{i}", "title": f"Doc {i}", "text": f"Lighthouse {i} on cape {i}."}
            for i in ids
        ]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return str(path)

    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu"], env, tmp_path)
    try:
        first = app.send_task(
            TASK_INDEX_DOCUMENTS, args=["capes", batch("a", range(4))], queue="cpu"
        )
        assert _wait(app, first.id, worker)["result"]["merge_job"] is None  # built, all indexed
        second = app.send_task(
            TASK_INDEX_DOCUMENTS, args=["capes", batch("b", range(4, 6))], queue="cpu"
        )
        merge_job = _wait(app, second.id, worker)["result"]["merge_job"]
        assert merge_job, "2 fresh rows beside 4 indexed ones should schedule a merge"
        merged = _wait(app, merge_job, worker)["result"]
    finally:
        worker.stop()
    assert merged["documents"] == 6 and merged["dense_backend"].startswith("hnswlib")
    family = ArtifactFamily(data_dir / "collections" / "capes")
    manifest = family.read_manifest()
    assert manifest["ann"]["indexed_rows"] == manifest["rows"] == 6
    # The second batch was one record segment beside the base; the merge compacted it.
    appended = family.read_manifest(sorted(p.name for p in family.versions_dir.iterdir())[0])
    assert appended["records"] == [{"name": "w00001", "rows": 2, "documents": 2}]
    assert manifest["records"] == [] and "records/segments.json" not in manifest["files"]


async def test_the_orchestrator_queues_a_merge_when_a_write_reports_one_due(tmp_path: Path) -> None:
    from services.orchestrator.api import schedule_merge_if_due
    from shared.schemas import WriteResponse
    from shared.store import Store, database_url

    settings = make_settings(tmp_path / "data")
    app, store = make_celery(settings), Store(database_url(None, settings.data_dir))
    write = WriteResponse(
        collection="capes",
        version="v2",
        documents=6,
        passages=6,
        upserted=2,
        deleted=0,
        seconds=0.1,
    )
    assert (await schedule_merge_if_due(write, store, app)).merge_job is None
    due = await schedule_merge_if_due(write.model_copy(update={"merge_due": True}), store, app)
    assert due.merge_job is not None
    assert store.get_job(due.merge_job)["params"] == {"collection": "capes"}
    assert job_status(app, due.merge_job)["state"] == "queued"
    store.close()


@pytest.mark.redis
def test_training_jobs_route_to_a_registered_gpu_worker_and_say_where_they_ran(
    tmp_path: Path, redis_url: str
) -> None:
    from shared.errors import ErrorCode, LodestarError
    from shared.jobs import consuming_workers, route_queue

    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, broker_url=redis_url)
    app = make_celery(settings)
    # No worker consumes gpu: auto falls back to cpu, and asking for gpu says why it cannot.
    assert route_queue(app, "auto") == "cpu" and route_queue(app, "cpu") == "cpu"
    with pytest.raises(LodestarError) as refused:
        route_queue(app, "gpu")
    assert refused.value.code is ErrorCode.unavailable and "gpu queue" in refused.value.message
    with pytest.raises(LodestarError):
        route_queue(app, "tpu")

    env = stack_env(data_dir, LODESTAR_BROKER_URL=redis_url)
    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu,gpu"], env, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not consuming_workers(app, "gpu") and time.monotonic() < deadline:
            assert worker.popen.poll() is None, worker.log.read_text()[-2000:]
            time.sleep(1)
        (name,) = consuming_workers(app, "gpu")
        assert name.startswith("lodestar-cpu-gpu@")
        queue = route_queue(app, "auto")
        assert queue == "gpu" and route_queue(app, "gpu") == "gpu"
        batch = data_dir / "incoming" / "batch.jsonl"
        batch.parent.mkdir(parents=True)
        batch.write_text(json.dumps({"id": "d1", "title": "Cape", "text": "A cape."}) + "\n")
        job = app.send_task(TASK_INDEX_DOCUMENTS, args=["capes", str(batch)], queue=queue)
        status = _wait(app, job.id, worker)
    finally:
        worker.stop()
    # The job says where it ran; this machine has no CUDA, so a gpu-queue job ran on the CPU.
    assert status["placement"] == {"queue": "gpu", "host": name, "device": "cpu"}
    assert "placement" not in status["result"] and status["result"]["documents"] == 1
    assert "gpu jobs run on the CPU" in worker.log.read_text()
