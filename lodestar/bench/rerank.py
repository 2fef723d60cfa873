"""Re-ranking benchmark: first stage alone vs ICR, RankGPT-style and cosine on SciFact test.

``lodestar bench rerank --queries 15 --candidates 20`` (or ``python -m lodestar.bench.rerank``;
in-process, no services):

- first stage: BM25 top-``candidates`` from the evaluation collection ``eval-scifact`` (built by
  ``lodestar eval retrieval`` under ``LODESTAR_DATA_DIR``; built here if missing);
- every re-ranker orders the *same* candidates; nDCG@10 is computed on the re-ranked list with
  the harness's trec_eval semantics (``shared.metrics.evaluate_run``);
- cost per query: forward passes, prompt tokens, latency p50/p95; ICR's latency as a ratio of
  RankGPT-style's and of one plain forward pass over ICR's own prompt, all measured in the same
  run (this machine is shared and noisy: only ratios are comparable across runs);
- the long-input trade-off: ICR again with a smaller per-document token budget.

Writes ``benchmarks/results/rerank_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lodestar.bench.common import TableBenchmark
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rerank_bench.json"


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(array, 50)), 1),
        "p95": round(float(np.percentile(array, 95)), 1),
        "mean": round(float(array.mean()), 1),
    }


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    import torch

    from lodestar.evaluation.common import collection_name, ensure_collection, provenance
    from services.index.engine import IndexEngine, search_response
    from services.reranker.engine import RerankDocument, RerankerEngine
    from services.reranker.icr import document_text
    from shared.datasets import load_scifact
    from shared.metrics import evaluate_run
    from shared.models import get_embedder, get_generator

    torch.set_num_threads(args.threads)
    settings = settings or Settings()
    dataset = load_scifact()
    engine = IndexEngine.from_settings(settings)
    name = collection_name("scifact")
    version = ensure_collection(engine, name, lambda: dataset.corpus, rebuild=False)
    queries = list(dataset.split_queries("test").items())[: args.queries]
    qrels = {qid: dataset.qrels["test"][qid] for qid, _ in queries}

    reranker = RerankerEngine(
        lambda: get_generator(settings),
        lambda: get_embedder(settings),
        max_doc_tokens=args.doc_tokens,
        max_prompt_tokens=args.prompt_tokens,
    )
    icr = reranker.icr
    # Warm up every model once so the first query's latency is not a load time.
    warm = [RerankDocument("a", "", "warm up"), RerankDocument("b", "", "warm up two")]
    for method in ("icr", "rankgpt", "cosine"):
        reranker.rerank("warm", warm, method)

    systems = ["bm25", "icr", "rankgpt", "cosine", f"icr@{args.short_tokens}tok"]
    runs: dict[str, dict[str, dict[str, float]]] = {s: {} for s in systems}
    latency: dict[str, list[float]] = {s: [] for s in [*systems, "forward"]}
    passes: dict[str, list[int]] = {s: [] for s in systems}
    tokens: dict[str, list[int]] = {s: [] for s in systems}
    extra: dict[str, list[float]] = {"rankgpt_ids_generated": [], "icr_truncated_docs": []}
    started_all = time.perf_counter()
    for number, (qid, query) in enumerate(queries, start=1):
        snapshot, results, timings = engine.search(name, query, args.candidates, ["bm25"])
        hits = search_response(snapshot, results, timings).results["bm25"]
        documents = [RerankDocument(h.doc_id, h.title, h.text) for h in hits]
        n = len(documents)
        runs["bm25"][qid] = {d.doc_id: float(n - i) for i, d in enumerate(documents)}
        latency["bm25"].append(timings.get("bm25", 0.0))
        passes["bm25"].append(0)
        tokens["bm25"].append(0)
        for system in systems[1:]:
            method, options = system, {}
            if system.startswith("icr@"):
                method, options = "icr", {"max_doc_tokens": args.short_tokens}
            t0 = time.perf_counter()
            outcome = reranker.rerank(query, documents, method, options)
            latency[system].append((time.perf_counter() - t0) * 1000)
            order = outcome.ranking()
            runs[system][qid] = {documents[i].doc_id: float(n - r) for r, i in enumerate(order)}
            passes[system].append(outcome.forward_passes)
            tokens[system].append(outcome.prompt_tokens)
            if system == "rankgpt":
                extra["rankgpt_ids_generated"].append(outcome.details["ids_generated"])
            if system == "icr":
                extra["icr_truncated_docs"].append(outcome.details["truncated_documents"])
        prompt = icr.build(
            query, [document_text(d.title, d.text) for d in documents], reranker.icr_options()
        )
        latency["forward"].append(icr.forward_once(prompt.input_ids) * 1000)
        print(
            f"[{number}/{len(queries)}] {qid}: "
            + ", ".join(f"{s} {latency[s][-1]:.0f} ms" for s in [*systems[1:], "forward"]),
            flush=True,
        )

    metrics = {s: evaluate_run(runs[s], qrels) for s in systems}
    ratio_rankgpt = [a / b for a, b in zip(latency["icr"], latency["rankgpt"], strict=True)]
    ratio_forward = [a / b for a, b in zip(latency["icr"], latency["forward"], strict=True)]
    table: dict[str, dict[str, Any]] = {
        s: {
            "ndcg@10": round(metrics[s].mean["ndcg@10"], 4),
            "recall@10": round(metrics[s].mean["recall@10"], 4),
            "mrr@10": round(metrics[s].mean["mrr@10"], 4),
            "latency_ms": _percentiles(latency[s]),
            "forward_passes_per_query": round(statistics.mean(passes[s]), 1),
            "prompt_tokens_per_query": round(statistics.mean(tokens[s]), 1),
        }
        for s in systems
    }
    return {
        "kind": "rerank_bench",
        "dataset": "scifact",
        "split": "test",
        "collection": name,
        "collection_version": version,
        "first_stage": "bm25",
        "num_queries": len(queries),
        "query_ids": [qid for qid, _ in queries],
        "candidates": args.candidates,
        "doc_tokens": args.doc_tokens,
        "short_doc_tokens": args.short_tokens,
        "prompt_tokens_budget": args.prompt_tokens,
        "threads": args.threads,
        "llm": reranker.lm.model_dir.name if hasattr(reranker.lm, "model_dir") else "?",
        "icr_options": vars(reranker.icr_options()),
        "systems": table,
        "forward_pass_ms": _percentiles(latency["forward"]),
        "icr_over_rankgpt_latency": {
            "median_of_ratios": round(statistics.median(ratio_rankgpt), 3),
            "ratio_of_p50": round(
                table["icr"]["latency_ms"]["p50"] / table["rankgpt"]["latency_ms"]["p50"], 3
            ),
        },
        "icr_over_one_forward_pass": {
            "median_of_ratios": round(statistics.median(ratio_forward), 3),
            "target": 2.2,
        },
        "rankgpt_ids_generated_mean": round(statistics.mean(extra["rankgpt_ids_generated"]), 2),
        "icr_truncated_docs_mean": round(statistics.mean(extra["icr_truncated_docs"]), 2),
        "wall_s": round(time.perf_counter() - started_all, 1),
        **provenance(),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"SciFact test, first {result['num_queries']} queries, BM25 top-{result['candidates']} "
        f"candidates, {result['doc_tokens']} tokens/doc, {result['threads']} threads",
        "",
        "| system | nDCG@10 | Recall@10 | MRR@10 | latency p50 / p95 (ms) | forward passes / query "
        "| prompt tokens / query |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["systems"].items():
        lat = row["latency_ms"]
        lines.append(
            f"| {name} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | {row['mrr@10']:.4f} "
            f"| {lat['p50']:.0f} / {lat['p95']:.0f} | {row['forward_passes_per_query']} "
            f"| {row['prompt_tokens_per_query']} |"
        )
    fwd = result["forward_pass_ms"]
    lines += [
        "",
        f"One plain forward pass over ICR's prompt: p50 {fwd['p50']:.0f} ms.",
        f"ICR / one forward pass (median of per-query ratios): "
        f"{result['icr_over_one_forward_pass']['median_of_ratios']} (target <= 2.2).",
        f"ICR / RankGPT-style latency (median of per-query ratios): "
        f"{result['icr_over_rankgpt_latency']['median_of_ratios']}.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--doc-tokens", type=int, default=64, help="ICR/RankGPT tokens per doc")
    parser.add_argument("--short-tokens", type=int, default=32, help="truncation trade-off run")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


BENCHMARK = TableBenchmark(
    "rerank", "ICR vs RankGPT-style vs cosine on SciFact", __doc__, add_arguments, run, format_table
)
register = BENCHMARK.register

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
