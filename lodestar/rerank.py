"""``lodestar rerank train|status``: the CAR cross-encoder the reranker serves.

``train`` runs the same function as the ``lodestar.cross_encoder_train`` Celery job, in this
process with progress bars (``--queue`` sends the job to a worker instead).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.jobs import add_queue_argument
from shared.settings import Settings


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from services.reranker.cross_encoder import CrossEncoderTrainConfig
    from services.reranker.training_data import CONDITIONS

    if args.condition not in CONDITIONS:
        print(f"unknown condition {args.condition!r}; known: {', '.join(CONDITIONS)}")
        return 2
    config = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "loss": args.loss,
        "max_length": args.max_length,
    }
    if args.queue:
        from shared.jobs import TASK_CROSS_ENCODER_TRAIN, send_job_from_cli

        job = {
            "condition": args.condition,
            "train_queries": args.train_queries,
            "synthetic": args.synthetic,
            "config": config,
        }
        return send_job_from_cli(settings, TASK_CROSS_ENCODER_TRAIN, job, args.queue)
    from lodestar.evaluation.common import progress_bar
    from services.worker.cross_encoder_job import train_and_publish

    manifest = train_and_publish(
        settings,
        condition=args.condition,
        train_queries=args.train_queries,
        synthetic=args.synthetic,
        config=CrossEncoderTrainConfig(**config),  # type: ignore[arg-type]
        progress=progress_bar("cross-encoder"),
    )
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from services.reranker.cross_encoder import cross_encoder_family

    family = cross_encoder_family(settings)
    if family.current_version() is None:
        print("cross-encoder: none published (lodestar rerank train, or lodestar experiment car)")
        return 0
    shown = {k: v for k, v in family.read_manifest().items() if k != "files"}
    print(json.dumps(shown, indent=2))
    return 0


def register(sub: Any) -> None:
    rerank = sub.add_parser("rerank", help="CAR: train and inspect the served cross-encoder")
    commands = rerank.add_subparsers(dest="rerank_command", required=True)
    train = commands.add_parser("train", help="train on SciFact train and publish")
    train.add_argument("--condition", default="car", help="original, car, query-only, ...")
    train.add_argument("--train-queries", type=int, default=250)
    train.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="InPars queries SmolLM2 writes for sampled documents (+synthetic conditions)",
    )
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--loss", choices=("pointwise", "listwise"), default="pointwise")
    train.add_argument("--max-length", type=int, default=160)
    add_queue_argument(train)
    train.set_defaults(handler=cmd_train)
    commands.add_parser("status", help="the published cross-encoder").set_defaults(
        handler=cmd_status
    )
