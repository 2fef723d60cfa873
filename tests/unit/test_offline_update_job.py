"""The worker's offline-update job records a refusal as the API answers it: code and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from services.worker.offline_update import run_offline_update_job
from shared.store import Store, database_url, offline_updates
from tests.conftest import make_settings


def test_too_little_feedback_is_recorded_as_a_conflict_on_min_examples(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(RuntimeError, match="min_examples=8"):
        run_offline_update_job(settings, "job-1", since=0.0)
    store = Store(database_url(settings.database_url, settings.data_dir))
    try:
        with store.engine.connect() as conn:
            row = conn.execute(select(offline_updates)).mappings().one()
    finally:
        store.close()
    assert row["job_id"] == "job-1" and row["outcome"] == "failed"
    assert row["result"]["code"] == "conflict" and row["result"]["field"] == "min_examples"
    assert "0 positive relevance labels" in row["result"]["error"]
