"""SEAL fmindex benchmark: the FM-index's build, size and primitive latencies, SEAL's query
latency split into decoding and index work, and retrieval quality against BM25 and dense.

``lodestar bench fmindex`` (or ``python -m lodestar.bench.fmindex``; in-process, no services):

- **build**: tokenise SciFact's 5,183 abstracts with SmolLM2's tokenizer, suffix array, BWT as a
  wavelet matrix, sampled SA; publish as a new version of ``eval-scifact`` under
  ``<data_dir>/fmindex``; size of every FM-index part against the uint16 token stream;
- **primitives**: ``count`` of 10-token n-grams drawn from the corpus, continuations of prefixes
  of 1–9 tokens, ``locate`` per occurrence, and, as the baseline measured in the same run, a
  naive numpy scan of the token stream for the same n-grams (the "toy to avoid");
- **queries**: SEAL at beam 5 and beam 15 on ``--queries`` SciFact test claims, timings split
  into model decoding, index work inside decoding (continuations), key weighting and scoring;
- **quality** (``--eval-queries N``): fm at ``--eval-beam`` vs BM25 and dense on the same first
  N test queries, nDCG@10 and Recall@100 with the harness's trec_eval semantics.

This machine is shared (2 cores, many jobs): absolute latencies are upper bounds under load;
ratios against the baseline of the same run are what compare.
Writes ``benchmarks/results/fmindex_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lodestar.bench.common import TableBenchmark
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fmindex_bench.json"
COLLECTION = "eval-scifact"


def _summary(values_s: Sequence[float], unit: float = 1e6) -> dict[str, float]:
    array = np.asarray(values_s, dtype=float) * unit
    return {
        "p50": round(float(np.percentile(array, 50)), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "mean": round(float(array.mean()), 2),
    }


def _naive_count(stream: np.ndarray, ngram: np.ndarray) -> int:
    """The baseline: scan the stream for the first token, then compare the rest."""
    candidates = np.nonzero(stream[: stream.shape[0] - len(ngram) + 1] == ngram[0])[0]
    for offset in range(1, len(ngram)):
        candidates = candidates[stream[candidates + offset] == ngram[offset]]
    return int(candidates.shape[0])


def bench_build(settings: Settings) -> dict[str, Any]:
    from services.fmindex.jobs import build_collection, collections_root
    from shared.datasets import load_scifact

    result = build_collection(settings, COLLECTION, load_scifact().corpus)
    version_dir = collections_root(settings) / COLLECTION / "versions" / result["version"]
    sizes = json.loads((version_dir / "sizes.json").read_text())
    stream = sizes["stream_bytes"]
    return {
        **result,
        "fm_parts_bytes": sizes["fm_bytes"],
        "fm_over_stream": round(sizes["index_bytes"] / stream, 3),
        "fm_plus_stored_tokens_over_stream": round(
            (sizes["index_bytes"] + sizes["tokens_file_bytes"]) / stream, 3
        ),
    }


def bench_primitives(settings: Settings, samples: int, seed: int = 0) -> dict[str, Any]:
    from services.fmindex.corpus import CollectionStore
    from services.fmindex.jobs import collections_root

    collection = CollectionStore(collections_root(settings)).load(COLLECTION)
    fm = collection.fm
    stream = np.asarray(collection.tokens, dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.shape[0] - 10, size=samples)
    ngrams = [stream[s : s + 10] for s in starts]
    # Compile the kernels and page the maps in before anything is timed.
    fm.count(ngrams[0])
    fm.continuations_in(*fm.range(ngrams[0][:1]))
    fm.locate(ngrams[0][:2], limit=10)
    count_s, naive_s = [], []
    for ngram in ngrams:
        t0 = time.perf_counter()
        count = fm.count(ngram)
        count_s.append(time.perf_counter() - t0)
        assert count >= 1
    for ngram in ngrams[: max(1, samples // 10)]:
        t0 = time.perf_counter()
        naive = _naive_count(stream, ngram)
        naive_s.append(time.perf_counter() - t0)
        assert naive == fm.count(ngram)
    continuation_s, widths = [], []
    for i, ngram in enumerate(ngrams):
        prefix = ngram[: 1 + i % 9]
        lo, hi = fm.range(prefix)
        t0 = time.perf_counter()
        tokens, _ = fm.continuations_in(lo, hi)
        continuation_s.append(time.perf_counter() - t0)
        widths.append(int(tokens.shape[0]))
    locate_s, located = [], 0
    for ngram in ngrams[: max(1, samples // 10)]:
        prefix = ngram[:2]
        t0 = time.perf_counter()
        positions = fm.locate(prefix, limit=1500)
        locate_s.append(time.perf_counter() - t0)
        located += int(positions.shape[0])
    count_summary = _summary(count_s)
    naive_summary = _summary(naive_s)
    return {
        "samples": samples,
        "count_10gram_us": count_summary,
        "naive_scan_10gram_us": naive_summary,
        "naive_over_fm_count": round(naive_summary["p50"] / max(1e-9, count_summary["p50"]), 1),
        "continuations_us": _summary(continuation_s),
        "continuations_mean_width": round(float(np.mean(widths)), 1),
        "locate_us_per_occurrence": round(sum(locate_s) * 1e6 / max(1, located), 2),
    }


def bench_queries(
    settings: Settings, queries: int, beams: Sequence[int], threads: int, generator: str
) -> dict[str, Any]:
    from services.fmindex.engine import FmEngine, FmSettings
    from shared.datasets import load_scifact

    engine = FmEngine.from_settings(settings, FmSettings(threads=threads, generator=generator))
    texts = list(load_scifact().split_queries("test").values())[:queries]
    engine.search(COLLECTION, texts[0], 10, replace(engine.default_options(), beam=2, length=2))
    out: dict[str, Any] = {"generator": engine.generator_name, "queries": len(texts)}
    for beam in beams:
        options = replace(engine.default_options(), beam=beam)
        rows: dict[str, list[float]] = {}
        for text in texts:
            outcome = engine.search(COLLECTION, text, 100, options)
            for name, value in outcome.timings_ms.items():
                rows.setdefault(name, []).append(value)
        out[f"beam{beam}"] = {
            name: _summary(values, unit=1.0)
            if name != "forward_passes"
            else round(float(np.mean(values)), 1)
            for name, values in rows.items()
        }
    return out


def bench_quality(
    settings: Settings, queries: int, beam: int, threads: int, generator: str, titles: bool
) -> dict[str, Any]:
    """fm vs BM25 vs dense on the same first ``queries`` SciFact test queries."""
    from lodestar.evaluation.common import ensure_collection
    from lodestar.evaluation.retrieval import DEPTH, InProcessBackend
    from services.fmindex.engine import FmEngine, FmSettings
    from shared.datasets import load_scifact
    from shared.metrics import evaluate_run

    data = load_scifact()
    chosen = dict(list(data.split_queries("test").items())[:queries])
    qrels = {qid: data.qrels["test"][qid] for qid in chosen}
    backend = InProcessBackend(settings)
    ensure_collection(backend.engine, COLLECTION, lambda: data.corpus, rebuild=False)
    engine = FmEngine.from_settings(
        settings, FmSettings(threads=threads, beam=beam, generator=generator, decode_titles=titles)
    )
    runs: dict[str, dict[str, dict[str, float]]] = {}
    latency: dict[str, list[float]] = {}

    async def baseline(name: str) -> None:
        run: dict[str, dict[str, float]] = {}
        for qid, text in chosen.items():
            t0 = time.perf_counter()
            result = await backend.search(
                query=text, collection=COLLECTION, k=DEPTH, retrievers=[name]
            )
            latency.setdefault(name, []).append(time.perf_counter() - t0)
            run[qid] = {d: float(DEPTH + 1 - r) for r, d in enumerate(result.doc_ids, 1)}
        runs[name] = run

    for name in ("bm25", "dense"):
        asyncio.run(baseline(name))
    run = {}
    for qid, text in chosen.items():
        t0 = time.perf_counter()
        outcome = engine.search(COLLECTION, text, DEPTH)
        latency.setdefault("fm", []).append(time.perf_counter() - t0)
        run[qid] = {h.doc_id: float(DEPTH + 1 - r) for r, h in enumerate(outcome.hits, 1)}
    runs["fm"] = run
    out: dict[str, Any] = {
        "queries": len(chosen),
        "beam": beam,
        "decode_titles": titles,
        "generator": engine.generator_name,
    }
    for name, system_run in runs.items():
        evaluation = evaluate_run(system_run, qrels, ndcg_cutoffs=(10,), recall_cutoffs=(10, 100))
        out[name] = {
            "ndcg@10": round(evaluation.mean["ndcg@10"], 4),
            "recall@100": round(evaluation.mean["recall@100"], 4),
            "latency_ms": _summary(latency[name], unit=1000.0),
        }
    return out


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    import torch

    from lodestar.evaluation.common import provenance

    torch.set_num_threads(args.threads)
    settings = settings or Settings()
    result: dict[str, Any] = {
        "kind": "fmindex-bench",
        **provenance(),
        "load_note": (
            "measured on a shared 2-core machine under heavy concurrent load; absolute latencies are "
            "upper bounds, ratios within this run compare"
        ),
    }
    if not args.skip_build:
        result["build"] = bench_build(settings)
    result["primitives"] = bench_primitives(settings, args.samples)
    if args.queries:
        result["queries"] = bench_queries(
            settings, args.queries, args.beams, args.threads, args.generator
        )
    if args.eval_queries:
        result["quality"] = bench_quality(
            settings,
            args.eval_queries,
            args.eval_beam,
            args.threads,
            args.generator,
            not args.eval_no_titles,
        )
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    if "build" in result:
        b = result["build"]
        lines += [
            f"| corpus | {b['documents']} docs, {b['tokens']:,} tokens |",
            f"| build s (tokenise / index / total) | {b['seconds']['tokenise']} / {b['seconds']['index']} / {b['seconds']['total']} |",
            f"| FM-index / uint16 token stream | {b['fm_over_stream']}× |",
            f"| FM-index + stored tokens / stream | {b['fm_plus_stored_tokens_over_stream']}× |",
        ]
    p = result["primitives"]
    lines += [
        f"| count(10-gram) µs p50 / p95 | {p['count_10gram_us']['p50']} / {p['count_10gram_us']['p95']} |",
        f"| naive scan µs p50 (baseline) | {p['naive_scan_10gram_us']['p50']} ({p['naive_over_fm_count']}× slower) |",
        f"| continuations µs p50 / p95 | {p['continuations_us']['p50']} / {p['continuations_us']['p95']} |",
        f"| locate µs per occurrence | {p['locate_us_per_occurrence']} |",
    ]
    for key, row in result.get("queries", {}).items():
        if not key.startswith("beam"):
            continue
        lines.append(
            f"| {key} query ms p50 (decode / decode-index / keys / scoring / total) | "
            f"{row['decode_ms']['p50']} / {row['decode_index_ms']['p50']} / {row['keys_ms']['p50']} / "
            f"{row['scoring_ms']['p50']} / {row['total_ms']['p50']} |"
        )
    if "quality" in result:
        q = result["quality"]
        for name in ("fm", "bm25", "dense"):
            lines.append(
                f"| {name} on {q['queries']} test queries: nDCG@10 / R@100 | "
                f"{q[name]['ndcg@10']} / {q[name]['recall@100']} |"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=2000, help="n-grams for the primitives")
    parser.add_argument("--queries", type=int, default=5, help="queries per beam size")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 15])
    parser.add_argument("--eval-queries", type=int, default=0, help="0 skips the quality run")
    parser.add_argument("--eval-beam", type=int, default=5)
    parser.add_argument("--eval-no-titles", action="store_true", help="body n-grams only")
    parser.add_argument(
        "--generator", default="auto", help="auto (tuned if published), base, or a model dir"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-build", action="store_true", help="reuse the published index")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


BENCHMARK = TableBenchmark(
    "fmindex",
    "SEAL FM-index: build, primitives, query latency",
    __doc__,
    add_arguments,
    run,
    format_table,
)
register = BENCHMARK.register

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
