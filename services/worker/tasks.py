"""Task definitions. Each task is idempotent: late acknowledgement means a task whose worker died
is delivered again, and running it twice must leave the same state as running it once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from celery import Task

from services.index.engine import IndexEngine
from shared.jobs import (
    TASK_CRITIC_PRACTICE,
    TASK_CRITIC_TRAIN,
    TASK_CROSS_ENCODER_TRAIN,
    TASK_DSI_INDEX_STEP,
    TASK_FMINDEX_BUILD,
    TASK_FMINDEX_TRAIN,
    TASK_INDEX_DOCUMENTS,
    TASK_MERGE_COLLECTION,
    TASK_OFFLINE_UPDATE,
    TASK_REWRITE_BATCH,
    make_celery,
)
from shared.schemas import Document
from shared.settings import get_settings

logger = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)


class PlacedTask(Task):  # type: ignore[misc]
    """A task that says where it runs: its queue, the worker's host and the torch device, in
    every progress update and in its result (``GET /jobs/{id}`` shows them as ``placement``)."""

    _device: str | None = None

    def placement(self) -> dict[str, Any]:
        if PlacedTask._device is None:
            from shared.models import resolve_device

            PlacedTask._device = resolve_device(settings.device)
        delivery = self.request.delivery_info or {}
        return {
            "queue": delivery.get("routing_key"),
            "host": self.request.hostname,
            "device": PlacedTask._device,
        }

    def progress(
        self, done: int, total: int, stage: str, info: dict[str, Any] | None = None
    ) -> None:
        meta = {"done": done, "total": total, "stage": stage, **(info or {})}
        self.update_state(state="PROGRESS", meta={**meta, "placement": self.placement()})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        return {**result, "placement": self.placement()} if isinstance(result, dict) else result


def _engine() -> IndexEngine:
    return IndexEngine.from_settings(settings)


@app.task(bind=True, base=PlacedTask, name=TASK_INDEX_DOCUMENTS)  # type: ignore[untyped-decorator]
def index_documents(self: PlacedTask, collection: str, batch_path: str) -> dict[str, Any]:
    """Upsert a staged batch (JSONL written by the orchestrator) into a collection."""
    path = Path(batch_path)
    if not path.exists():
        # Delivered again after a run that completed and cleaned up: nothing left to do.
        return {"collection": collection, "note": "batch already applied"}
    with path.open(encoding="utf-8") as handle:
        documents = [Document(**json.loads(line)) for line in handle if line.strip()]

    result = _engine().upsert(collection, documents, progress=self.progress)
    path.unlink(missing_ok=True)
    merge_job = None
    if result.merge_due:
        merge_job = merge_collection.apply_async(args=[collection], queue="cpu").id
    return {
        "collection": result.collection,
        "version": result.version,
        "documents": result.documents,
        "passages": result.passages,
        "upserted": result.upserted,
        "seconds": round(result.seconds, 3),
        "merge_job": merge_job,
    }


@app.task(bind=True, base=PlacedTask, name=TASK_MERGE_COLLECTION)  # type: ignore[untyped-decorator]
def merge_collection(
    self: PlacedTask, collection: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fold the fresh segment and tombstones into a rebuilt ANN index, optionally changing the
    collection's dense configuration (``AnnConfig`` fields, e.g. ``{"backend": "hnswlib"}``).
    Idempotent: merging a merged collection rebuilds the same index. Searches keep serving the
    previous version until the new one is published."""
    engine = _engine()
    chosen = None
    if config:
        chosen = engine.ann_config(collection).with_overrides(**config)
    else:
        manifest = engine.family(collection).read_manifest()
        indexed = int(manifest.get("ann", {}).get("indexed_rows", 0))
        if manifest.get("rows", 0) == indexed and not manifest.get("tombstones", 0):
            # Scheduled twice (two writes each found a merge due): the first one did the work.
            return {"collection": collection, "note": "nothing to merge"}

    result = engine.merge(collection, chosen, progress=self.progress)
    return {
        "collection": result.collection,
        "version": result.version,
        "documents": result.documents,
        "passages": result.passages,
        "dense_backend": engine.family(collection).read_manifest().get("dense_backend", "flat"),
        "seconds": round(result.seconds, 3),
    }


@app.task(bind=True, base=PlacedTask, name=TASK_CRITIC_PRACTICE)  # type: ignore[untyped-decorator]
def critic_practice(
    self: PlacedTask, dataset: str, offset: int, limit: int, **options: Any
) -> dict[str, Any]:
    """SIM-RAG self-practice over questions ``offset … offset+limit`` of ``dataset``; publishes a
    new trajectories version (a redelivered task publishes an equivalent one)."""
    from services.critic.practice import run_self_practice

    manifest = run_self_practice(
        settings, dataset, offset=offset, limit=limit, progress=self.progress, **options
    )
    return {k: v for k, v in manifest.items() if k != "files"}


@app.task(bind=True, base=PlacedTask, name=TASK_CRITIC_TRAIN)  # type: ignore[untyped-decorator]
def critic_train(self: PlacedTask, all_practice: bool = False, **config: Any) -> dict[str, Any]:
    """Train the critic on the current trajectories (``all_practice``: every published practice
    run) and publish it atomically; the critic service serves it from its next request."""
    from services.critic.practice import load_all_trajectories, load_current_trajectories
    from services.critic.training import TrainConfig, train_critic

    load = load_all_trajectories if all_practice else load_current_trajectories
    rows, practice = load(settings)
    manifest = train_critic(
        settings,
        TrainConfig(**config),
        rows=rows,
        practice_manifest=practice,
        progress=self.progress,
    )
    return {k: v for k, v in manifest.items() if k != "files"}


@app.task(bind=True, base=PlacedTask, name=TASK_DSI_INDEX_STEP)  # type: ignore[untyped-decorator]
def dsi_index_step(
    self: PlacedTask, collection: str, batch_path: str, options: dict[str, Any]
) -> dict[str, Any]:
    """One DSI++ continual step over a batch staged by the dsi service. Idempotent: a redelivered
    job resumes from its last epoch checkpoint, and documents already indexed are skipped."""
    from dataclasses import asdict

    from services.dsi.engine import DsiEngine, StepOptions

    path = Path(batch_path)
    if not path.exists():
        return {"collection": collection, "note": "batch already applied"}
    payload = json.loads(path.read_text(encoding="utf-8"))
    documents = [Document(**row) for row in payload["documents"]]
    queries = [(str(doc_id), str(query)) for doc_id, query in payload["queries"]]

    result = DsiEngine.from_settings(settings).index_step(
        collection,
        documents,
        queries,
        StepOptions(**options),
        job_id=str(self.request.id),
        progress=self.progress,
    )
    path.unlink(missing_ok=True)
    return asdict(result)


@app.task(bind=True, base=PlacedTask, name=TASK_FMINDEX_BUILD)  # type: ignore[untyped-decorator]
def fmindex_build(
    self: PlacedTask, collection: str, dataset: str | None = None, jsonl: str | None = None
) -> dict[str, Any]:
    """Build and publish a collection's FM-index (``services.fmindex``). Idempotent: a redelivered
    build publishes an identical new version; searches serve the old one until then."""
    from services.fmindex.jobs import build_collection, load_documents

    return build_collection(settings, collection, load_documents(dataset, jsonl), self.progress)


@app.task(bind=True, base=PlacedTask, name=TASK_FMINDEX_TRAIN)  # type: ignore[untyped-decorator]
def fmindex_train(
    self: PlacedTask,
    dataset: str = "scifact",
    split: str = "train",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the SEAL generator on ``dataset``'s ``split`` and publish it (a redelivered job
    trains again from the base model and publishes a newer version)."""
    from services.fmindex.jobs import train
    from services.fmindex.training import TrainConfig

    return train(settings, dataset, split, TrainConfig(**(config or {})), progress=self.progress)


@app.task(bind=True, base=PlacedTask, name=TASK_REWRITE_BATCH)  # type: ignore[untyped-decorator]
def rewrite_batch(self: PlacedTask, **job: Any) -> dict[str, Any]:
    """CAR: rewrite a dataset split or a staged batch of training pairs (``services.rewriter``).
    Idempotent: every rewrite is cached on disk, so a redelivered job generates nothing again."""
    from services.rewriter.jobs import run_rewrite_job

    return run_rewrite_job(settings, str(self.request.id), progress=self.progress, **job)


@app.task(bind=True, base=PlacedTask, name=TASK_OFFLINE_UPDATE)  # type: ignore[untyped-decorator]
def offline_update(self: PlacedTask, **params: Any) -> dict[str, Any]:
    """NExT-Search offline update (``services.worker.offline_update``): fine-tune on exported
    feedback, publish only if better on held-out queries. A redelivered job trains again and
    decides again against whatever is serving by then (publishing twice is harmless)."""
    from services.worker.offline_update import run_offline_update_job

    return run_offline_update_job(settings, str(self.request.id), progress=self.progress, **params)


@app.task(bind=True, base=PlacedTask, name=TASK_CROSS_ENCODER_TRAIN)  # type: ignore[untyped-decorator]
def cross_encoder_train(
    self: PlacedTask,
    condition: str = "car",
    train_queries: int = 250,
    config: dict[str, Any] | None = None,
    corpus_limit: int | None = None,
    synthetic: int = 0,
) -> dict[str, Any]:
    """Train the CAR cross-encoder (one condition of ``lodestar experiment car``) and publish it;
    the reranker serves it from its next request. Idempotent: rewrites are cached, and a
    redelivered job publishes an equivalent newer version."""
    from services.reranker.cross_encoder import CrossEncoderTrainConfig
    from services.worker.cross_encoder_job import train_and_publish

    return train_and_publish(
        settings,
        condition=condition,
        train_queries=train_queries,
        config=CrossEncoderTrainConfig(**(config or {})),
        corpus_limit=corpus_limit,
        synthetic=synthetic,
        progress=self.progress,
    )
