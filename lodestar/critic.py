"""``lodestar critic practice|train|status``: SIM-RAG self-practice and critic training.

The same functions run as Celery jobs (``lodestar.critic_practice``, ``lodestar.critic_train``);
from the command line they run in this process with a progress bar, or, with ``--queue
auto|cpu|gpu``, are sent as that job to a worker (the job id is printed; ``GET /jobs/{id}`` or
``shared.jobs.job_status`` follows it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.jobs import add_queue_argument
from shared.settings import Settings


def _progress(description: str) -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(done: int, total: int, stage: str) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{description}: {stage}")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def cmd_practice(args: argparse.Namespace, settings: Settings) -> int:
    options: dict[str, Any] = {
        "max_turns": args.max_turns,
        "temperature": args.temperature,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "time_budget_s": None if args.minutes is None else args.minutes * 60,
    }
    if args.queue:
        from shared.jobs import TASK_CRITIC_PRACTICE, send_job_from_cli

        job = {"dataset": args.dataset, "offset": args.offset, "limit": args.limit, **options}
        return send_job_from_cli(settings, TASK_CRITIC_PRACTICE, job, args.queue)
    from services.critic.practice import run_self_practice

    _threads(args.threads)
    manifest = run_self_practice(
        settings,
        args.dataset,
        offset=args.offset,
        limit=args.limit,
        progress=_progress("practice"),
        **options,
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    fields: dict[str, Any] = {
        "label": args.label,
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "batch_size": args.batch_size,
    }
    if args.queue:
        from shared.jobs import TASK_CRITIC_TRAIN, send_job_from_cli

        job = {"all_practice": args.all_practice, **fields}
        return send_job_from_cli(settings, TASK_CRITIC_TRAIN, job, args.queue)
    from services.critic.practice import load_all_trajectories, load_current_trajectories
    from services.critic.training import TrainConfig, train_critic

    _threads(args.threads)
    config = TrainConfig(**fields)
    rows, practice = (
        load_all_trajectories(settings)
        if args.all_practice
        else load_current_trajectories(settings)
    )
    manifest = train_critic(
        settings, config, rows=rows, practice_manifest=practice, progress=_progress("critic")
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from services.critic.engine import critic_family
    from services.critic.practice import practice_family

    for name, family in (
        ("practice", practice_family(settings)),
        ("critic", critic_family(settings)),
    ):
        version = family.current_version()
        if version is None:
            print(f"{name}: none published")
            continue
        manifest = family.read_manifest()
        shown = {k: v for k, v in manifest.items() if k not in ("files",)}
        print(f"{name}: {version}\n{json.dumps(shown, indent=2)}")
    return 0


def register(sub: Any) -> None:
    critic = sub.add_parser("critic", help="SIM-RAG: self-practice data and the critic model")
    commands = critic.add_subparsers(dest="critic_command", required=True)
    practice = commands.add_parser("practice", help="generate labelled self-practice trajectories")
    practice.add_argument(
        "--dataset", default="nq-oracle", help="nq-oracle, hotpotqa-train, hotpotqa-dev"
    )
    practice.add_argument(
        "--offset", type=int, default=1000, help="first question (skip eval ones)"
    )
    practice.add_argument("--limit", type=int, default=150, help="training questions")
    practice.add_argument(
        "--max-turns", type=int, default=2, help="retrieval turns after the first"
    )
    practice.add_argument("--temperature", type=float, default=0.6)
    practice.add_argument("--k", type=int, default=2, help="documents per round")
    practice.add_argument("--max-new-tokens", type=int, default=48)
    practice.add_argument("--threads", type=int, default=2, help="torch threads (in-process)")
    practice.add_argument(
        "--minutes", type=float, help="stop starting new questions after this long; publish"
    )
    add_queue_argument(practice)
    practice.set_defaults(handler=cmd_practice)
    train = commands.add_parser("train", help="train and publish the critic on the trajectories")
    train.add_argument("--label", choices=["em", "acc"], default="em", help="labelling rule")
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--lr", type=float, default=5e-5)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument(
        "--all-practice",
        action="store_true",
        help="train on every published practice run (e.g. several run side by side), not the latest",
    )
    train.add_argument("--threads", type=int, default=2, help="torch threads (in-process)")
    add_queue_argument(train)
    train.set_defaults(handler=cmd_train)
    commands.add_parser("status", help="published practice data and critic").set_defaults(
        handler=cmd_status
    )
