"""The ``lodestar`` command line: run the local stack, prepare models, build collections."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from lodestar.bench import register as register_bench
from lodestar.critic import register as register_critic
from lodestar.evaluation.cli import register as register_eval
from lodestar.experiments import register as register_experiments
from lodestar.keys import register as register_keys
from lodestar.rerank import register as register_rerank
from lodestar.workers import register as register_workers
from shared.settings import Settings, get_settings, hash_api_key

Handler = Callable[[argparse.Namespace, Settings], int]


def _progress_bar(description: str) -> Callable[[int, int, str], None]:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(done: int, total: int, stage: str) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{description}: {stage}", unit="passage")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_models_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from shared.models import get_embedder, prepare_llm

    started = time.perf_counter()
    path = prepare_llm(settings, force=args.force)
    embedder = get_embedder(settings)
    embedder.encode(["check"])
    # The query path's ONNX export (shared/onnx_encoder.py), checked against its manifest.
    backend = embedder.query_backend
    print(
        f"models ready in {time.perf_counter() - started:.1f} s: LLM at {path}; embedder loaded; "
        f"query encoder {backend}"
    )
    return 0


def cmd_index_build(args: argparse.Namespace, settings: Settings) -> int:
    from services.index.engine import IndexEngine
    from shared.datasets import load_collection_documents

    engine = IndexEngine.from_settings(settings)
    name = args.name if args.collection is None else args.collection
    if engine.exists(name) and not args.force:
        print(
            f"collection {name!r} exists (version {engine.family(name).current_version()}); --force rebuilds"
        )
        return 0
    documents = load_collection_documents(args.name)
    if args.limit:
        documents = documents[: args.limit]
    print(f"indexing {len(documents)} documents of {args.name!r} into collection {name!r}")
    result = engine.upsert(name, documents, progress=_progress_bar(name))
    print(
        f"collection {name!r}: {result.documents} documents, {result.passages} passages, "
        f"version {result.version}, {result.seconds:.1f} s"
    )
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar import stack

    started = time.perf_counter()
    if not args.no_build:
        cmd_models_prepare(argparse.Namespace(force=False), settings)
        cmd_index_build(
            argparse.Namespace(name="wiki", collection=None, limit=None, force=False), settings
        )
    env = dict(os.environ)
    env.setdefault("LODESTAR_DATA_DIR", str(settings.data_dir.resolve()))
    for spec in stack.STACK:
        pid = stack.start(settings, spec, env)
        print(f"started {spec.name} (pid {pid})")
    pending = stack.wait_ready(settings, stack.STACK, timeout_s=args.timeout)
    if pending:
        print(
            f"not ready after {args.timeout:.0f} s: {', '.join(pending)} (logs in {settings.data_dir / 'logs'})"
        )
        return 1
    print(f"\nLodestar is ready after {time.perf_counter() - started:.1f} s:")
    for spec in stack.STACK:
        if spec.port_service:
            print(f"  {spec.name:<13} {stack.service_url(settings, spec.port_service)}")
    url = stack.service_url(settings, "orchestrator")
    print(
        f"\nTry:\n  curl -s {url}/search -H 'content-type: application/json' "
        '-d \'{"query": "Who painted the Mona Lisa?", "k": 5}\''
    )
    print(f"  API docs: {url}/docs    stop with: lodestar down")
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar import stack

    for spec in reversed(stack.STACK):
        print(f"{spec.name}: {'stopped' if stack.stop(settings, spec) else 'not running'}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar import stack

    for spec in stack.STACK:
        pid = stack.running_pid(settings, spec)
        ready = ""
        if spec.port_service and pid is not None:
            ready = (
                "ready"
                if stack.is_ready(stack.service_url(settings, spec.port_service))
                else "not ready"
            )
        print(f"{spec.name:<13} {'pid ' + str(pid) if pid else 'stopped':<12} {ready}")
    return 0


def cmd_hash_key(args: argparse.Namespace, settings: Settings) -> int:
    print(hash_api_key(args.key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lodestar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="prepare models and the wiki collection, start every service")
    up.add_argument("--no-build", action="store_true", help="skip model conversion and index build")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    up.set_defaults(handler=cmd_up)
    sub.add_parser("down", help="stop what `lodestar up` started").set_defaults(handler=cmd_down)
    sub.add_parser("status", help="which services run and are ready").set_defaults(
        handler=cmd_status
    )

    models = sub.add_parser("models", help="model weights").add_subparsers(
        dest="models_command", required=True
    )
    prepare = models.add_parser("prepare", help="convert the LLM from GGUF once; load the embedder")
    prepare.add_argument("--force", action="store_true")
    prepare.set_defaults(handler=cmd_models_prepare)

    index = sub.add_parser("index", help="collections").add_subparsers(
        dest="index_command", required=True
    )
    build = index.add_parser("build", help="index a bundled dataset into a collection")
    build.add_argument("name", help="wiki, scifact, hotpotqa-dev, hotpotqa-train, nq-oracle")
    build.add_argument("--collection", help="collection name (default: the dataset name)")
    build.add_argument("--limit", type=int, help="only the first N documents")
    build.add_argument("--force", action="store_true", help="rebuild even if the collection exists")
    build.set_defaults(handler=cmd_index_build)

    key = sub.add_parser(
        "hash-key", help="print the SHA-256 digest to put in LODESTAR_API_KEY_HASHES"
    )
    key.add_argument("key")
    key.set_defaults(handler=cmd_hash_key)
    register_eval(sub)
    register_bench(sub)
    register_experiments(sub)
    register_critic(sub)
    register_rerank(sub)
    register_workers(sub)
    register_keys(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args, get_settings())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
