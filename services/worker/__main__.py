"""``python -m services.worker --queues cpu``: run a Celery worker for the given queues."""

from __future__ import annotations

import argparse

from shared.jobs import QUEUES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queues", default="cpu", help=f"comma-separated, of {', '.join(QUEUES)}")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args()
    unknown = set(args.queues.split(",")) - set(QUEUES)
    if unknown:
        parser.error(f"unknown queue(s): {', '.join(sorted(unknown))}")

    from services.worker.tasks import app, settings
    from shared.models import resolve_device

    if "gpu" in args.queues.split(",") and resolve_device(settings.device) != "cuda":
        # Jobs routed to gpu will run here on the CPU; each job's placement says so.
        print("warning: consuming the gpu queue without a CUDA device: gpu jobs run on the CPU")

    app.worker_main(
        [
            "worker",
            "--queues",
            args.queues,
            "--concurrency",
            str(args.concurrency),
            "--loglevel",
            args.loglevel,
            "--hostname",
            f"lodestar-{args.queues.replace(',', '-')}@%h",
        ]
    )


if __name__ == "__main__":
    main()
