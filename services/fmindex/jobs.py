"""The fmindex jobs: build a collection's FM-index, fine-tune the generator.

The Celery tasks in ``services.worker.tasks`` call these functions; ``python -m
services.fmindex.jobs`` runs the same code in the foreground::

    python -m services.fmindex.jobs build --dataset scifact --collection eval-scifact
    python -m services.fmindex.jobs train --dataset scifact --split train --max-minutes 25
    python -m services.fmindex.jobs train --dataset scifact --queue auto   # as a worker job

``train --queue auto|cpu|gpu`` sends the ``lodestar.fmindex_train`` job to a worker instead of
training here (``shared.jobs.send_job``) and prints its id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.fmindex.corpus import CollectionStore
from services.fmindex.training import (
    GENERATOR_FAMILY,
    PairConfig,
    TrainConfig,
    build_pairs,
    train_generator,
)
from shared.datasets import load_beir, load_collection_documents
from shared.models import LLM_ID, prepare_llm
from shared.schemas import Document
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

JobProgress = Callable[[int, int, str, dict[str, Any]], None]


def collections_root(settings: Settings) -> Path:
    return settings.data_dir / "fmindex"


def generator_root(settings: Settings) -> Path:
    return settings.resolved_models_dir / GENERATOR_FAMILY


def load_documents(dataset: str | None = None, jsonl: str | None = None) -> list[Document]:
    """Documents from a named dataset (``scifact``, ``wiki``, ...) or a JSONL file of
    ``{"id", "title", "text"}`` rows."""
    if jsonl:
        with Path(jsonl).open(encoding="utf-8") as handle:
            return [Document(**json.loads(line)) for line in handle if line.strip()]
    if not dataset:
        raise ValueError("give a dataset name or a JSONL file")
    return load_collection_documents(dataset)


def build_collection(
    settings: Settings,
    collection: str,
    documents: list[Document],
    progress: JobProgress | None = None,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model_dir = prepare_llm(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    store = CollectionStore(collections_root(settings))

    def step(done: int, total: int, stage: str) -> None:
        if progress:
            progress(done, total, stage, {})

    result = store.build(collection, documents, tokenizer, tokenizer_id=LLM_ID, progress=step)
    return {
        "collection": result.collection,
        "version": result.version,
        "documents": result.documents,
        "tokens": result.tokens,
        "index_bytes": result.index_bytes,
        "stream_bytes": result.stream_bytes,
        "index_to_stream": round(result.index_bytes / max(1, result.stream_bytes), 3),
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


def train(
    settings: Settings,
    dataset: str,
    split: str = "train",
    config: TrainConfig | None = None,
    pairs: PairConfig | None = None,
    progress: JobProgress | None = None,
) -> dict[str, Any]:
    """Fine-tune the generator on ``dataset``'s ``split`` (SEAL pairs) and publish it."""
    from transformers import AutoTokenizer

    from shared.datasets import DATASETS_DIR

    base = prepare_llm(settings)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_beir(DATASETS_DIR / dataset)
    if split not in data.qrels:
        raise ValueError(f"{dataset} has no split {split!r}")
    examples = build_pairs(tokenizer, data.corpus, data.queries, data.qrels[split], pairs)
    if progress:
        progress(0, (config or TrainConfig()).max_steps, "pairs built", {"examples": len(examples)})
    report = train_generator(base, generator_root(settings), examples, config, progress)
    return {
        "version": report.version,
        "steps": report.steps,
        "stopped_by": report.stopped_by,
        "examples": report.examples,
        "seconds": round(report.seconds, 1),
        "seconds_per_step": round(report.seconds_per_step, 3),
        "final_loss": report.loss_curve[-1][1] if report.loss_curve else None,
        "first_loss": report.loss_curve[0][1] if report.loss_curve else None,
    }


def main(argv: list[str] | None = None) -> None:
    from shared.jobs import TASK_FMINDEX_TRAIN, add_queue_argument, send_job_from_cli

    parser = argparse.ArgumentParser(prog="python -m services.fmindex.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build and publish a collection's FM-index")
    build_cmd.add_argument("--collection", required=True)
    build_cmd.add_argument("--dataset", help="dataset name (scifact, wiki, ...)")
    build_cmd.add_argument("--jsonl", help="JSONL of {id, title, text}")
    train_cmd = sub.add_parser("train", help="fine-tune and publish the n-gram generator")
    train_cmd.add_argument("--dataset", default="scifact")
    train_cmd.add_argument("--split", default="train")
    train_cmd.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    train_cmd.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes)
    train_cmd.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train_cmd.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    train_cmd.add_argument("--threads", type=int, default=TrainConfig.threads)
    add_queue_argument(train_cmd)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()

    def report(done: int, total: int, stage: str, info: dict[str, Any]) -> None:
        print(json.dumps({"done": done, "total": total, "stage": stage, **info}), flush=True)

    if args.command == "build":
        documents = load_documents(args.dataset, args.jsonl)
        result = build_collection(settings, args.collection, documents, report)
    else:
        fields: dict[str, Any] = {
            "max_steps": args.max_steps,
            "max_minutes": args.max_minutes,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "threads": args.threads,
        }
        if args.queue:
            job = {"dataset": args.dataset, "split": args.split, "config": fields}
            sys.exit(send_job_from_cli(settings, TASK_FMINDEX_TRAIN, job, args.queue))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = train(settings, args.dataset, args.split, TrainConfig(**fields), progress=report)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
