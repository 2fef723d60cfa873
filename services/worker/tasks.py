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


def _engine() -> IndexEngine:
    return IndexEngine.from_settings(settings)


@app.task(bind=True, name=TASK_INDEX_DOCUMENTS)  # type: ignore[untyped-decorator]
def index_documents(self: Task, collection: str, batch_path: str) -> dict[str, Any]:
    """Upsert a staged batch (JSONL written by the orchestrator) into a collection."""
    path = Path(batch_path)
    if not path.exists():
        # Delivered again after a run that completed and cleaned up: nothing left to do.
        return {"collection": collection, "note": "batch already applied"}
    with path.open(encoding="utf-8") as handle:
        documents = [Document(**json.loads(line)) for line in handle if line.strip()]

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    result = _engine().upsert(collection, documents, progress=progress)
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


@app.task(bind=True, name=TASK_MERGE_COLLECTION)  # type: ignore[untyped-decorator]
def merge_collection(
    self: Task, collection: str, config: dict[str, Any] | None = None
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

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    result = engine.merge(collection, chosen, progress=progress)
    return {
        "collection": result.collection,
        "version": result.version,
        "documents": result.documents,
        "passages": result.passages,
        "dense_backend": engine.family(collection).read_manifest().get("dense_backend", "flat"),
        "seconds": round(result.seconds, 3),
    }


@app.task(bind=True, name=TASK_CRITIC_PRACTICE)  # type: ignore[untyped-decorator]
def critic_practice(
    self: Task, dataset: str, offset: int, limit: int, **options: Any
) -> dict[str, Any]:
    """SIM-RAG self-practice over questions ``offset … offset+limit`` of ``dataset``; publishes a
    new trajectories version (a redelivered task publishes an equivalent one)."""
    from services.critic.practice import run_self_practice

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    manifest = run_self_practice(
        settings, dataset, offset=offset, limit=limit, progress=progress, **options
    )
    return {k: v for k, v in manifest.items() if k != "files"}


@app.task(bind=True, name=TASK_CRITIC_TRAIN)  # type: ignore[untyped-decorator]
def critic_train(self: Task, all_practice: bool = False, **config: Any) -> dict[str, Any]:
    """Train the critic on the current trajectories (``all_practice``: every published practice
    run) and publish it atomically; the critic service serves it from its next request."""
    from services.critic.practice import load_all_trajectories, load_current_trajectories
    from services.critic.training import TrainConfig, train_critic

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    load = load_all_trajectories if all_practice else load_current_trajectories
    rows, practice = load(settings)
    manifest = train_critic(
        settings, TrainConfig(**config), rows=rows, practice_manifest=practice, progress=progress
    )
    return {k: v for k, v in manifest.items() if k != "files"}


@app.task(bind=True, name=TASK_DSI_INDEX_STEP)  # type: ignore[untyped-decorator]
def dsi_index_step(
    self: Task, collection: str, batch_path: str, options: dict[str, Any]
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

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    result = DsiEngine.from_settings(settings).index_step(
        collection,
        documents,
        queries,
        StepOptions(**options),
        job_id=str(self.request.id),
        progress=progress,
    )
    path.unlink(missing_ok=True)
    return asdict(result)


@app.task(bind=True, name=TASK_FMINDEX_BUILD)  # type: ignore[untyped-decorator]
def fmindex_build(
    self: Task, collection: str, dataset: str | None = None, jsonl: str | None = None
) -> dict[str, Any]:
    """Build and publish a collection's FM-index (``services.fmindex``). Idempotent: a redelivered
    build publishes an identical new version; searches serve the old one until then."""
    from services.fmindex.jobs import build_collection, load_documents

    def progress(done: int, total: int, stage: str, info: dict[str, Any]) -> None:
        meta = {"done": done, "total": total, "stage": stage, **info}
        self.update_state(state="PROGRESS", meta=meta)

    return build_collection(settings, collection, load_documents(dataset, jsonl), progress)


@app.task(bind=True, name=TASK_FMINDEX_TRAIN)  # type: ignore[untyped-decorator]
def fmindex_train(
    self: Task, dataset: str = "scifact", split: str = "train", config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fine-tune the SEAL generator on ``dataset``'s ``split`` and publish it (a redelivered job
    trains again from the base model and publishes a newer version)."""
    from services.fmindex.jobs import train
    from services.fmindex.training import TrainConfig

    def progress(done: int, total: int, stage: str, info: dict[str, Any]) -> None:
        meta = {"done": done, "total": total, "stage": stage, **info}
        self.update_state(state="PROGRESS", meta=meta)

    return train(settings, dataset, split, TrainConfig(**(config or {})), progress=progress)


@app.task(bind=True, name=TASK_REWRITE_BATCH)  # type: ignore[untyped-decorator]
def rewrite_batch(self: Task, **job: Any) -> dict[str, Any]:
    """CAR: rewrite a dataset split or a staged batch of training pairs (``services.rewriter``).
    Idempotent: every rewrite is cached on disk, so a redelivered job generates nothing again."""
    from services.rewriter.jobs import run_rewrite_job

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    return run_rewrite_job(settings, str(self.request.id), progress=progress, **job)


@app.task(bind=True, name=TASK_OFFLINE_UPDATE)  # type: ignore[untyped-decorator]
def offline_update(self: Task, **params: Any) -> dict[str, Any]:
    """NExT-Search offline update (``services.worker.offline_update``): fine-tune on exported
    feedback, publish only if better on held-out queries. A redelivered job trains again and
    decides again against whatever is serving by then (publishing twice is harmless)."""
    from services.worker.offline_update import run_offline_update_job

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    return run_offline_update_job(settings, str(self.request.id), progress=progress, **params)


@app.task(bind=True, name=TASK_CROSS_ENCODER_TRAIN)  # type: ignore[untyped-decorator]
def cross_encoder_train(
    self: Task,
    condition: str = "car",
    train_queries: int = 250,
    config: dict[str, Any] | None = None,
    corpus_limit: int | None = None,
) -> dict[str, Any]:
    """Train the CAR cross-encoder (one condition of ``lodestar experiment car``) and publish it;
    the reranker serves it from its next request. Idempotent: rewrites are cached, and a
    redelivered job publishes an equivalent newer version."""
    from services.reranker.cross_encoder import CrossEncoderTrainConfig
    from services.worker.cross_encoder_job import train_and_publish

    def progress(done: int, total: int, stage: str) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})

    return train_and_publish(
        settings,
        condition=condition,
        train_queries=train_queries,
        config=CrossEncoderTrainConfig(**(config or {})),
        corpus_limit=corpus_limit,
        progress=progress,
    )
