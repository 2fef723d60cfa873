"""Task definitions. Each task is idempotent: late acknowledgement means a task whose worker died
is delivered again, and running it twice must leave the same state as running it once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from celery import Task

from services.index.engine import IndexEngine
from shared.jobs import TASK_INDEX_DOCUMENTS, make_celery
from shared.schemas import Document
from shared.settings import get_settings

logger = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)


#: Rebuilds a collection's ANN index over every live row (see ``IndexEngine.merge``).
TASK_MERGE_COLLECTION = "lodestar.merge_collection"


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
    return {
        "collection": result.collection,
        "version": result.version,
        "documents": result.documents,
        "passages": result.passages,
        "upserted": result.upserted,
        "seconds": round(result.seconds, 3),
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
