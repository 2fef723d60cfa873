"""The Celery path without any server: the SQLite broker used by the embedded default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

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
