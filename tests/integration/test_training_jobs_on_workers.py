"""The training jobs sent from the command line (``--queue``) and run by a real Celery worker
process on the ``cpu`` queue (Redis broker): SEAL's generator (``fmindex train``) and the SIM-RAG
critic (``critic train``, on practice trajectories published through the practice family), each
published as a new version; ``--queue gpu`` without a GPU worker is refused before sending."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from services.critic.engine import critic_family
from services.critic.practice import TRAJECTORIES_FILE, PracticeRow, practice_family
from services.fmindex.jobs import generator_root
from shared.artifacts import ArtifactFamily
from shared.jobs import TASK_CRITIC_TRAIN, TASK_FMINDEX_TRAIN, job_status, make_celery
from shared.models import LLM_DIRNAME
from shared.settings import Settings
from tests.conftest import MODELS_DIR, ROOT, spawn, stack_env
from tests.scripted import practice_turns

pytestmark = pytest.mark.slow

QUEUED = re.compile(r"queued (\S+) as job (\S+) on queue '(\w+)'")
FACTS = [
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Where is the Eiffel Tower?", "Paris"),
    ("Who formulated universal gravitation?", "Isaac Newton"),
    ("What do plants turn light into?", "sugar"),
    ("Which city hosts the Louvre?", "Paris"),
    ("Who wrote Hamlet?", "William Shakespeare"),
]


def practice_rows() -> list[PracticeRow]:
    """Per question a supported answer (accept) and an "unsure" one (reject)."""
    rows = []
    for i, (question, gold) in enumerate(FACTS):
        context = f"Query: {question}\nRetrieved Document [1]: The answer is {gold}."
        turns = [(gold, f"Document 1 says {gold}.", 1), ("unsure", "The documents do not say.", 0)]
        rows += practice_turns(f"q{i}", question, gold, context, f"d{i}", turns)
    return rows


def publish_practice(settings: Settings) -> str:
    """Trajectories published the way ``run_self_practice`` publishes them."""
    rows = practice_rows()
    family = practice_family(settings)
    manifest = {"kind": "critic-practice", "dataset": "tiny", "questions": len(FACTS)}
    with family.lock(), family.build(manifest) as scratch:
        lines = "".join(json.dumps(asdict(row)) + "\n" for row in rows)
        (scratch / TRAJECTORIES_FILE).write_text(lines, encoding="utf-8")
    version = family.current_version()
    assert version is not None
    return version


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def queued(done: subprocess.CompletedProcess[str], task: str) -> str:
    """The job id a ``--queue cpu`` command printed, after checking it went to ``cpu``."""
    assert done.returncode == 0, (done.stdout, done.stderr)
    match = QUEUED.search(done.stdout)
    assert match is not None, done.stdout
    assert match.group(1) == task and match.group(3) == "cpu", done.stdout
    return match.group(2)


def test_cli_training_jobs_run_on_a_cpu_worker_and_publish(redis_url: str, tmp_path: Path) -> None:
    data_dir, models_dir, logs = tmp_path / "data", tmp_path / "models", tmp_path / "logs"
    logs.mkdir()
    # A models directory of the test's own (the trained generator is published into it, never
    # into the shared one), holding the already converted base LLM.
    models_dir.mkdir()
    (models_dir / LLM_DIRNAME).symlink_to(MODELS_DIR / LLM_DIRNAME, target_is_directory=True)
    env = stack_env(
        data_dir,
        LODESTAR_MODELS_DIR=str(models_dir),
        LODESTAR_BROKER_URL=redis_url,
        OMP_NUM_THREADS="1",
    )
    settings = Settings(
        data_dir=data_dir, models_dir=models_dir, broker_url=redis_url, log_json=False
    )
    practice_version = publish_practice(settings)
    worker = spawn("worker", ["-m", "services.worker", "--queues", "cpu"], env, logs)
    celery = make_celery(settings)
    try:
        fm_job = queued(
            cli(
                [
                    "-m",
                    "services.fmindex.jobs",
                    "train",
                    "--dataset",
                    "scifact",
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "2",
                    "--max-minutes",
                    "2",
                    "--threads",
                    "1",
                    "--queue",
                    "cpu",
                ],
                env,
            ),
            TASK_FMINDEX_TRAIN,
        )
        critic_args = ["-m", "lodestar.cli", "critic", "train", "--label", "acc", "--epochs", "1"]
        critic_job = queued(
            cli([*critic_args, "--batch-size", "4", "--queue", "cpu"], env), TASK_CRITIC_TRAIN
        )
        # No worker consumes gpu: refused with the reason, and nothing is sent.
        refused = cli([*critic_args, "--queue", "gpu"], env)
        assert refused.returncode == 2 and "no worker consumes the gpu queue" in refused.stdout
        assert "queued" not in refused.stdout

        statuses: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 600
        for job in (fm_job, critic_job):
            status = job_status(celery, job)
            while status["state"] in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.5)
                status = job_status(celery, job)
            assert status["state"] == "succeeded", (status, worker.log.read_text()[-3000:])
            statuses[job] = status
    finally:
        worker.stop()

    fm = statuses[fm_job]
    assert fm["placement"]["queue"] == "cpu"
    assert fm["result"]["steps"] == 2
    generators = ArtifactFamily(generator_root(settings))
    assert generators.root.is_relative_to(tmp_path)
    assert generators.current_version() == fm["result"]["version"]
    assert generators.read_manifest()["config"]["max_steps"] == 2

    critic = statuses[critic_job]
    assert critic["placement"]["queue"] == "cpu"
    family = critic_family(settings)
    assert family.current_version() == critic["result"]["version"]
    manifest = family.read_manifest()
    assert manifest["practice_version"] == practice_version
    assert manifest["config"]["epochs"] == 1 and manifest["config"]["label"] == "acc"
    assert len(manifest["train_loss_per_epoch"]) == 1
