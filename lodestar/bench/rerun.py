"""``lodestar bench rerun``: what a rerun costs beside the ``/search`` it reruns (docs/feedback.md).

The index service and the orchestrator are started as ``lodestar up`` starts them (on bench
ports, traces in a throw-away SQLite store). For each NQ-open dev question, one after another
and interleaved so drift on a shared machine touches every kind alike:

1. ``POST /search`` (dense + BM25, RRF, k 10) — the baseline;
2. a rerun from ``fusion`` with no feedback (the parent's ranked lists fused again);
3. feedback stored on the trace (pin the 6th hit, remove the 1st, the 2nd judged relevant), then
   a rerun from ``fusion`` that applies it (pins and removals; no retrieval call);
4. a rerun from ``retrieve`` that applies it (Rocchio on the dense query vector and RM3 terms
   for BM25: retrieval runs again).

Client-side latency p50/p95 per kind, and each rerun's p50 over ``/search``'s p50 in the same
run (the target docs/feedback.md measures against: a ``/search`` rerun within 2x of a
``/search``). Writes ``benchmarks/results/rerun_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from lodestar.bench.common import write_results
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "rerun_bench.json"
KINDS = ("search", "rerun_fusion", "rerun_fusion_feedback", "rerun_retrieve_feedback")
#: A rerun's p50 may be at most this many times the /search p50 (the platform's target).
TARGET_RATIO = 2.0


def _one_query(http: Any, query: str, collection: str, k: int) -> dict[str, float]:
    """The four calls for ``query``; milliseconds per kind."""

    def timed(path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        response = http.post(path, json=body)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        return elapsed, dict(response.json())

    ms: dict[str, float] = {}
    ms["search"], parent = timed("/search", {"query": query, "collection": collection, "k": k})
    trace_id = parent["trace_id"]
    hits = [h["doc_id"] for h in parent["hits"]]
    rerun = f"/traces/{trace_id}/rerun"
    ms["rerun_fusion"], _ = timed(rerun, {"from_stage": "fusion"})
    feedback = (("pin", 5, "fusion"), ("remove", 0, "fusion"), ("relevant", 1, "retrieve"))
    for action, rank, stage in feedback:
        if rank < len(hits):
            http.post(
                "/feedback",
                json={
                    "trace_id": trace_id,
                    "stage": stage,
                    "target_type": "doc",
                    "target_id": hits[rank],
                    "action": action,
                },
            ).raise_for_status()
    applied = {"apply_feedback": True}
    ms["rerun_fusion_feedback"], _ = timed(rerun, {"from_stage": "fusion", **applied})
    ms["rerun_retrieve_feedback"], _ = timed(rerun, {"from_stage": "retrieve", **applied})
    return ms


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import httpx

    from lodestar.bench.search import _percentiles, nq_queries, start_lodestar
    from lodestar.evaluation.common import provenance

    queries = nq_queries(args.queries + args.warmup)
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="lodestar-bench-rerun-") as tmp:
        processes = start_lodestar(settings, Path(tmp), args.port_base, {})
        try:
            url = f"http://127.0.0.1:{args.port_base}"
            with httpx.Client(base_url=url, timeout=120) as http:
                for index, query in enumerate(queries):
                    ms = _one_query(http, query, args.collection, args.k)
                    if index >= args.warmup:
                        for kind, value in ms.items():
                            samples[kind].append(value)
        finally:
            for process in reversed(processes):
                process.stop()
    latency = {kind: _percentiles(values) for kind, values in samples.items()}
    base = latency["search"]["p50"]
    ratios = {kind: round(latency[kind]["p50"] / base, 3) for kind in KINDS if kind != "search"}
    return {
        "meta": {
            **provenance(),
            "collection": args.collection,
            "queries": args.queries,
            "warmup_queries": args.warmup,
            "query_source": "NQ-open dev questions",
            "k": args.k,
            "target_ratio": TARGET_RATIO,
        },
        "latency_ms": latency,
        "p50_over_search_p50": ratios,
        "met": all(r <= TARGET_RATIO for r in ratios.values()),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = ["| call | p50 ms | p95 ms | p50 ÷ /search p50 |", "|---|---:|---:|---:|"]
    for kind in KINDS:
        row = result["latency_ms"][kind]
        ratio = result["p50_over_search_p50"].get(kind, 1.0)
        lines.append(f"| {kind} | {row['p50']} | {row['p95']} | {ratio} |")
    return "\n".join(lines)


def command(args: argparse.Namespace, settings: Settings) -> int:
    result = run(args, settings)
    write_results(
        Path(args.out),
        result,
        format_table(result),
        f"target (every rerun p50 <= {TARGET_RATIO}x /search p50): {result['met']}",
    )
    return 0


def register(group: Any) -> None:
    """``lodestar bench rerun`` on the ``bench`` group."""
    parser = group.add_parser("rerun", help="rerun latency beside the /search it reruns")
    parser.add_argument("--collection", default="wiki")
    parser.add_argument("--queries", type=int, default=60, help="NQ-open dev questions measured")
    parser.add_argument("--warmup", type=int, default=5, help="questions run first, not measured")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port-base", type=int, default=18300)
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    parser.set_defaults(handler=command)
