"""``lodestar eval``: retrieval, rag, check, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lodestar.evaluation.common import DOCS_DIR, EXPECTED_PATH, RESULTS_DIR, EvalUsageError
from shared.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
USAGE_EXIT = 2


def _guarded(handler: Handler) -> Handler:
    """Bad input (unknown dataset or system, a malformed expected.yaml) -> message, exit 2."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return handler(args, settings)
        except EvalUsageError as exc:  # includes ExpectedFileError
            print(f"lodestar eval: error: {exc}", file=sys.stderr)
            return USAGE_EXIT

    return run


def cmd_retrieval(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.retrieval import run_retrieval_command

    run_retrieval_command(
        settings,
        args.dataset,
        args.systems,
        split=args.split,
        stack=args.stack,
        out_dir=args.out,
        rebuild=args.rebuild,
        limit=args.limit,
    )
    return 0


def cmd_rag(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.rag import run_rag_command

    run_rag_command(
        settings,
        args.dataset,
        args.methods,
        limit=args.limit,
        k=args.k,
        stack=args.stack,
        out_dir=args.out,
        rebuild=args.rebuild,
        generation_cache=args.generation_cache,
    )
    return 0


def cmd_decompose(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.decompose import run_decompose_command

    run_decompose_command(
        settings,
        dataset=args.dataset,
        limit=args.limit,
        settings_text=args.settings,
        rounds=args.rounds,
        k=args.k,
        out_dir=args.out,
        generation_cache=args.generation_cache,
        minutes=args.minutes,
        loop_minutes=args.loop_minutes,
    )
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.expected import (
        default_evaluator,
        format_check,
        load_expected,
        run_check,
        select_rows,
    )

    rows = select_rows(load_expected(args.expected), ci_only=args.ci)
    if not rows:
        raise EvalUsageError(f"no {'ci ' if args.ci else ''}rows in {args.expected}")
    out_dir = args.out or settings.data_dir / "eval" / "check"
    print(f"checking {len(rows)} rows of {args.expected}{' (ci only)' if args.ci else ''}")
    report = run_check(rows, default_evaluator(settings), out_dir=out_dir)
    print()
    print(format_check(report.outcomes))
    print(f"measured in {report.seconds:.0f} s; results in {out_dir}")
    return 0 if report.passed else 1


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.report import write_report

    path, others = write_report(args.results, args.out, image_dir=args.images)
    print(f"wrote {path}")
    if others:
        print(f"not evaluation results, left out: {', '.join(others)}")
    return 0


def _dataset_help(known: dict[str, Any]) -> str:
    return ", ".join(known)


def register(subparsers: Any) -> None:
    """Add the ``eval`` command group to the ``lodestar`` parser's subparsers."""
    from lodestar.evaluation import rag, retrieval

    group = subparsers.add_parser(
        "eval", help="measure retrievers and RAG methods on real data; check expected figures"
    ).add_subparsers(dest="eval_command", required=True)

    ret = group.add_parser(
        "retrieval",
        help="nDCG@10, Recall@10/100, MRR@10, latency and paired significance per system",
    )
    ret.add_argument(
        "--dataset", default="scifact", help=f"one of: {_dataset_help(retrieval.DATASETS)}"
    )
    ret.add_argument(
        "--systems",
        default="dense,bm25,rrf",
        help=f"comma-separated, from: {', '.join(retrieval.SYSTEMS)}",
    )
    ret.add_argument("--split", help="qrels split (default: test)")
    ret.add_argument(
        "--limit", type=int, help="only the first N queries (LLM re-rankers cost seconds each)"
    )
    ret.add_argument(
        "--stack", metavar="URL", help="a running orchestrator, e.g. http://127.0.0.1:8000"
    )
    ret.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS_DIR})")
    ret.add_argument("--rebuild", action="store_true", help="rebuild the cached collection")
    ret.set_defaults(handler=_guarded(cmd_retrieval))

    rg = group.add_parser(
        "rag", help="EM, F1, supporting-document recall, rounds, tokens and latency per method"
    )
    rg.add_argument("--dataset", required=True, help=f"one of: {_dataset_help(rag.DATASETS)}")
    rg.add_argument(
        "--methods", default="none,single", help=f"comma-separated, from: {', '.join(rag.METHODS)}"
    )
    rg.add_argument("--limit", type=int, help="only the first N questions")
    rg.add_argument("--k", type=int, default=rag.DEFAULT_K, help="passages given to the reader")
    rg.add_argument(
        "--stack", metavar="URL", help="a running orchestrator, e.g. http://127.0.0.1:8000"
    )
    rg.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS_DIR})")
    rg.add_argument("--rebuild", action="store_true", help="rebuild the cached collection")
    rg.add_argument(
        "--generation-cache",
        type=Path,
        help="JSONL of greedy generations to replay and extend (a rerun with more methods, "
        "e.g. sim-rag once the critic is trained, regenerates nothing it already has)",
    )
    rg.set_defaults(handler=_guarded(cmd_rag))

    dec = group.add_parser(
        "decompose",
        help="query decomposition: supporting-document recall per round for N sub-queries",
    )
    dec.add_argument("--dataset", default="hotpotqa-dev", help="a multi-hop dataset (HotpotQA)")
    dec.add_argument("--limit", type=int, default=40, help="the first N questions (at most 40)")
    dec.add_argument("--settings", default="1,2,3", help="sub-query settings N, comma-separated")
    dec.add_argument("--rounds", type=int, default=2, help="rounds of the loop (fixed policy)")
    dec.add_argument("--k", type=int, default=rag.DEFAULT_K, help="new documents per round")
    dec.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS_DIR})")
    dec.add_argument("--generation-cache", type=Path, help="JSONL of greedy generations to replay")
    dec.add_argument("--minutes", type=float, help="start no new question after this budget")
    dec.add_argument(
        "--loop-minutes", type=float, help="the loop's budget, counted from its first question"
    )
    dec.set_defaults(handler=_guarded(cmd_decompose))

    check = group.add_parser(
        "check", help="re-measure the expected figures; exit 1 when one drifts beyond tolerance"
    )
    check.add_argument("--ci", action="store_true", help="only the rows marked ci: true")
    check.add_argument("--expected", type=Path, default=EXPECTED_PATH, help="expected figures")
    check.add_argument(
        "--out",
        type=Path,
        help="where to write the measured results (default: <data_dir>/eval/check)",
    )
    check.set_defaults(handler=_guarded(cmd_check))

    report = group.add_parser("report", help="regenerate docs/results.md from the JSON results")
    report.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder")
    report.add_argument("--out", type=Path, default=DOCS_DIR / "results.md")
    report.add_argument(
        "--images", type=Path, help="where the plots go (default: <out folder>/img)"
    )
    report.set_defaults(handler=_guarded(cmd_report))
