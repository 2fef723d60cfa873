"""The Celery application shared by the services (which enqueue) and the workers (which run).

The broker is Redis when ``LODESTAR_BROKER_URL`` is set; otherwise kombu's SQLAlchemy transport
over a SQLite file under the data directory, so a laptop needs no server and the same worker code
runs in both. Tasks are acknowledged late and re-queued if a worker dies, so a killed worker loses
no job; every task is written to be idempotent for that reason.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args

from celery import Celery
from celery.result import AsyncResult
from kombu import Queue  # type: ignore[attr-defined]

from shared.errors import ErrorCode, LodestarError
from shared.settings import Settings

QUEUES = ("cpu", "gpu")
#: What a training job asks for: a queue by name, or ``auto`` (``gpu`` when a worker consumes
#: it, else ``cpu``; see ``route_queue``).
QueueChoice = Literal["auto", "cpu", "gpu"]
#: How long ``route_queue`` waits for the workers to say which queues they consume.
INSPECT_TIMEOUT_S = 1.0

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


def consuming_workers(app: Celery, queue: str, timeout_s: float = INSPECT_TIMEOUT_S) -> list[str]:
    """The workers that answer a broadcast within ``timeout_s`` and consume ``queue``. The
    SQLite broker has no broadcast: there, nobody answers (``[]``, without waiting)."""
    if str(app.conf.broker_url).startswith("sqla+"):
        return []
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception:  # a transport without remote control, or the broker unreachable
        return []
    return sorted(
        worker
        for worker, queues in replies.items()
        if any(q.get("name") == queue for q in queues or [])
    )


def route_queue(app: Celery, requested: str = "auto") -> str:
    """The queue a training job goes to. ``cpu``: cpu. ``auto``: ``gpu`` when a worker consumes
    it, else ``cpu``. ``gpu`` with no worker consuming it: a 503 that says so, instead of a job
    that would wait for a worker that never comes."""
    if requested not in ("auto", *QUEUES):
        raise LodestarError(
            ErrorCode.validation,
            f"unknown queue {requested!r}; known: auto, cpu, gpu",
            field="queue",
        )
    if requested == "cpu":
        return "cpu"
    if consuming_workers(app, "gpu"):
        return "gpu"
    if requested == "gpu":
        raise LodestarError(
            ErrorCode.unavailable,
            "no worker consumes the gpu queue (start one on a CUDA machine: "
            "python -m services.worker --queues gpu), or send the job with queue 'auto' or 'cpu'",
            field="queue",
        )
    return "cpu"


def send_job(
    app: Celery, task: str, kwargs: dict[str, Any], requested: str = "auto"
) -> tuple[str, str]:
    """Send ``task`` with ``kwargs`` to the queue ``route_queue`` picks for ``requested``;
    returns the job id and that queue. Raises ``route_queue``'s ``LodestarError`` (an unknown
    queue, or ``gpu`` with no worker consuming it) before anything is sent."""
    queue = route_queue(app, requested)
    job = app.send_task(task, kwargs=kwargs, queue=queue)
    return str(job.id), queue


def add_queue_argument(parser: argparse.ArgumentParser) -> None:
    """``--queue auto|cpu|gpu`` on a command that can also run its work in-process."""
    parser.add_argument(
        "--queue",
        choices=get_args(QueueChoice),
        help="send as a Celery job to this queue instead of running here "
        "(auto: gpu when a GPU worker consumes it, else cpu)",
    )


def send_job_from_cli(settings: Settings, task: str, kwargs: dict[str, Any], requested: str) -> int:
    """:func:`send_job` for a command line: prints where the job went, or why it was refused,
    and returns the exit status (0, or 2 when refused)."""
    try:
        job_id, queue = send_job(make_celery(settings), task, kwargs, requested)
    except LodestarError as exc:
        print(exc.message)
        return 2
    print(f"queued {task} as job {job_id} on queue {queue!r}")
    return 0


def job_status(app: Celery, job_id: str) -> dict[str, Any]:
    result = AsyncResult(job_id, app=app)
    state = result.state
    info = result.info
    status: dict[str, Any] = {"job_id": job_id, "state": _STATES.get(state, state.lower())}
    if state == "PROGRESS" and isinstance(info, dict):
        info = dict(info)
        if "placement" in info:
            status["placement"] = info.pop("placement")
        status["progress"] = info
    elif state == "SUCCESS":
        if isinstance(info, dict) and "placement" in info:
            info = dict(info)
            status["placement"] = info.pop("placement")
        status["result"] = info
        status["progress"] = {"done": 1, "total": 1, "stage": "done"}
    elif state == "FAILURE":
        status["error"] = str(info)
    return status
