"""The cross-encoder training job through a real Celery worker (Redis broker): SciFact train
pairs, hybrid hard negatives, CAR rewrites by SmolLM2, training with progress, atomic publish."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.reranker.cross_encoder import CurrentCrossEncoder, TextDoc
from shared.jobs import TASK_CROSS_ENCODER_TRAIN, job_status, make_celery
from tests.conftest import REDIS_URL, make_settings, spawn, stack_env

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_training_job_rewrites_trains_and_publishes_with_progress(tmp_path: Path) -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    env = stack_env(
        data_dir,
        LODESTAR_BROKER_URL=REDIS_URL,
        LODESTAR_REWRITER_MAX_NEW_TOKENS="12",
        LODESTAR_REWRITER_CONTEXT_TOKENS="64",
        OMP_NUM_THREADS="1",
    )
    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu"], env, logs)
    settings = make_settings(data_dir, broker_url=REDIS_URL)
    celery = make_celery(settings)
    try:
        job = celery.send_task(
            TASK_CROSS_ENCODER_TRAIN,
            kwargs={
                "condition": "car",
                "train_queries": 3,
                "corpus_limit": 60,
                "config": {"steps": 4, "batch_size": 2, "max_length": 64},
            },
            queue="cpu",
        )
        stages: set[str] = set()
        deadline = time.monotonic() + 900
        status = job_status(celery, job.id)
        while status["state"] in ("queued", "running") and time.monotonic() < deadline:
            if status["state"] == "running" and "progress" in status:
                stages.add(str(status["progress"]["stage"]))
            time.sleep(0.5)
            status = job_status(celery, job.id)
        assert status["state"] == "succeeded", (status, worker.log.read_text()[-3000:])
    finally:
        worker.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
    result = status["result"]
    assert result["condition"] == "car" and result["sources"] == {"car": 3}
    assert result["collection"] == "train-scifact-60"
    assert result["config"]["steps"] == 4 and len(result["train_loss"]) == 4
    assert stages & {"train", "mine"}, stages  # progress was reported while it ran
    # Served from the family the reranker reads, with the job's version.
    model = CurrentCrossEncoder(settings).get()
    assert model.version == result["version"]
    scores = model.score("a claim", [TextDoc("a", "", "text"), TextDoc("b", "", "other")])
    assert len(scores) == 2
    cache = data_dir / "rewriter" / "cache"
    assert any(cache.glob("context__*.jsonl"))  # the rewrites were made and cached
