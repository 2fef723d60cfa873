"""The batch rewrite job, run by the ``lodestar.rewrite_batch`` Celery task.

Input is a named dataset split (``scifact``/``train``) or pairs the service staged as JSONL under
``<data_dir>/rewriter/incoming/`` (the task takes a file *name* and refuses anything else, so a
caller can never point a worker at an arbitrary path). Records go to
``<data_dir>/rewriter/batches/<job id>.jsonl`` (written aside, then renamed). The job is idempotent:
the rewrite cache makes a redelivery cost no generation, and the output is rewritten identically.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.rewriter.engine import (
    PairDocument,
    Progress,
    RewritePair,
    RewriterEngine,
    dataset_pairs,
)
from shared.errors import ErrorCode, LodestarError
from shared.settings import Settings

_STAGED_NAME = re.compile(r"^[0-9a-f]{32}\.jsonl$")
_engines: dict[Path, RewriterEngine] = {}
_engines_lock = threading.Lock()


def incoming_dir(settings: Settings) -> Path:
    return settings.data_dir / "rewriter" / "incoming"


def batches_dir(settings: Settings) -> Path:
    return settings.data_dir / "rewriter" / "batches"


def engine_for(settings: Settings) -> RewriterEngine:
    """One engine per process and data directory (the model loads once per worker)."""
    key = settings.data_dir.resolve()
    with _engines_lock:
        if key not in _engines:
            _engines[key] = RewriterEngine.from_settings(settings)
        return _engines[key]


def read_staged(settings: Settings, name: str) -> list[RewritePair]:
    if not _STAGED_NAME.match(name):
        raise LodestarError(ErrorCode.validation, f"not a staged batch name: {name!r}")
    path = incoming_dir(settings) / name
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                document = PairDocument(row["doc_id"], row.get("title", ""), row.get("text", ""))
                pairs.append(RewritePair(str(row["qid"]), str(row["query"]), document))
    return pairs


def rewrite_job(
    settings: Settings,
    job_id: str,
    *,
    mode: str = "context",
    dataset: str | None = None,
    split: str = "train",
    offset: int = 0,
    limit: int | None = None,
    staged: str | None = None,
    forbidden_doc_ids: Sequence[str] = (),
    progress: Progress | None = None,
    engine: RewriterEngine | None = None,
) -> dict[str, Any]:
    engine = engine or engine_for(settings)
    forbidden = set(forbidden_doc_ids)
    dropped = 0
    output = batches_dir(settings) / f"{job_id}.jsonl"
    if staged is not None:
        if not _STAGED_NAME.match(staged):
            raise LodestarError(ErrorCode.validation, f"not a staged batch name: {staged!r}")
        if not (incoming_dir(settings) / staged).exists() and output.exists():
            # Redelivered after a run that finished and removed its input: nothing left to do.
            return _summary(output, mode, generated=0, dropped=0, note="batch already done")
        pairs = read_staged(settings, staged)
    elif dataset is not None:
        selected = dataset_pairs(dataset, split)
        pairs, dropped = selected.pairs, selected.dropped
        forbidden |= selected.forbidden_doc_ids
    else:
        raise LodestarError(ErrorCode.validation, "give a dataset split or a staged batch")
    pairs = pairs[offset : None if limit is None else offset + limit]
    before = engine.llm_calls
    records = engine.rewrite_batch(pairs, mode, forbidden_doc_ids=forbidden, progress=progress)
    generated = engine.llm_calls - before
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.rename(output)
    if staged is not None:
        (incoming_dir(settings) / staged).unlink(missing_ok=True)
    return _summary(output, mode, generated=generated, dropped=dropped)


def run_rewrite_job(settings: Settings, job_id: str, **job: Any) -> dict[str, Any]:
    """The Celery task's body: :func:`rewrite_job`, with a refused batch (a leaked test document,
    a bad name) failing the job as a plain ``ValueError`` that every result backend can store."""
    try:
        return rewrite_job(settings, job_id, **job)
    except LodestarError as exc:
        raise ValueError(f"{exc.code.value}: {exc.message}") from None


def _summary(
    output: Path, mode: str, *, generated: int, dropped: int, note: str | None = None
) -> dict[str, Any]:
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    summary: dict[str, Any] = {
        "mode": mode,
        "records": len(records),
        "generated": generated,
        "cached": len(records) - generated,
        "fell_back": sum(bool(r["fell_back"]) for r in records),
        "dropped_test_pairs": dropped,
        "prompt_version": records[0]["prompt_version"] if records else None,
        "model": records[0]["model"] if records else None,
        "output": str(output),
    }
    if note:
        summary["note"] = note
    return summary
