"""The Celery application shared by the services (which enqueue) and the workers (which run).

The broker is Redis when ``LODESTAR_BROKER_URL`` is set; otherwise kombu's SQLAlchemy transport
over a SQLite file under the data directory, so a laptop needs no server and the same worker code
runs in both. Tasks are acknowledged late and re-queued if a worker dies, so a killed worker loses
no job; every task is written to be idempotent for that reason.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu import Queue  # type: ignore[attr-defined]

from shared.settings import Settings

QUEUES = ("cpu", "gpu")

#: Celery task names, shared by the enqueuing services and the worker that defines them.
TASK_INDEX_DOCUMENTS = "lodestar.index_documents"
#: One DSI++ continual-indexing step (``services.dsi``); on the ``cpu`` queue by default, or
#: ``gpu`` for a worker started with ``--queues gpu`` (torch then trains on CUDA).
TASK_DSI_INDEX_STEP = "lodestar.dsi_index_step"
#: Rebuilds a collection's ANN index over every live row (see ``IndexEngine.merge``).
TASK_MERGE_COLLECTION = "lodestar.merge_collection"
#: SIM-RAG self-practice: labelled reasoner trajectories for critic training.
TASK_CRITIC_PRACTICE = "lodestar.critic_practice"
#: Trains the SIM-RAG critic on the current trajectories and publishes it.
TASK_CRITIC_TRAIN = "lodestar.critic_train"
#: SEAL: builds and publishes a collection's FM-index (``services.fmindex``), cpu queue.
TASK_FMINDEX_BUILD = "lodestar.fmindex_build"
#: SEAL: fine-tunes and publishes the fmindex n-gram generator, cpu queue.
TASK_FMINDEX_TRAIN = "lodestar.fmindex_train"
#: CAR: rewrites a batch of training queries (``services.rewriter.jobs``), cached per pair.
TASK_REWRITE_BATCH = "lodestar.rewrite_batch"
#: NExT-Search offline update: fine-tune a component on exported feedback, publish iff better.
TASK_OFFLINE_UPDATE = "lodestar.offline_update"
#: CAR: trains the cross-encoder on SciFact train (original or rewritten queries) and publishes it.
TASK_CROSS_ENCODER_TRAIN = "lodestar.cross_encoder_train"

_STATES = {
    "PENDING": "queued",
    "RECEIVED": "queued",
    "STARTED": "running",
    "PROGRESS": "running",
    "RETRY": "queued",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REVOKED": "cancelled",
}


def broker_and_backend(settings: Settings) -> tuple[str, str]:
    if settings.broker_url:
        broker = settings.broker_url
        backend = settings.result_backend or (
            broker
            if broker.startswith(("redis://", "rediss://"))
            else f"db+sqlite:///{_sqlite_path(settings, 'results')}"
        )
        return broker, backend
    broker = f"sqla+sqlite:///{_sqlite_path(settings, 'broker')}"
    backend = settings.result_backend or f"db+sqlite:///{_sqlite_path(settings, 'results')}"
    return broker, backend


def _sqlite_path(settings: Settings, name: str) -> str:
    directory = (settings.data_dir / "jobs").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory / f"{name}.sqlite")


def make_celery(settings: Settings) -> Celery:
    broker, backend = broker_and_backend(settings)
    app = Celery("lodestar", broker=broker, backend=backend)
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="cpu",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def job_status(app: Celery, job_id: str) -> dict[str, Any]:
    result = AsyncResult(job_id, app=app)
    state = result.state
    info = result.info
    status: dict[str, Any] = {"job_id": job_id, "state": _STATES.get(state, state.lower())}
    if state == "PROGRESS" and isinstance(info, dict):
        status["progress"] = info
    elif state == "SUCCESS":
        status["result"] = info
        status["progress"] = {"done": 1, "total": 1, "stage": "done"}
    elif state == "FAILURE":
        status["error"] = str(info)
    return status
