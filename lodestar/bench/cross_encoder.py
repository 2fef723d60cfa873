"""``lodestar bench cross-encoder``: re-ranking 50 candidates with the cross-encoder on one core.

Variants, each timed on the same SciFact claims and their BM25 top 50 in the same run: fp32 at
several input lengths, and int8 dynamic quantisation of the linear layers (``torch.ao``) at the
serving length. Quality is held to the fp32 model by the overlap of the two top-10s and by
nDCG@10 on the same claims. The model is the published one (``lodestar rerank status``), else the
untrained MiniLM body (latency does not depend on the weights; the quality columns then mean
nothing, and the JSON says so). The baseline is the fp32 model at the serving length.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings, get_settings

DEFAULT_OUT = Path("benchmarks/results/cross_encoder_latency.json")
CANDIDATES = 50


def _quantised(trained: Any) -> Any:
    import torch

    from services.reranker.cross_encoder import TrainedCrossEncoder

    model = copy.deepcopy(trained.model)
    model.model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        model.model, {torch.nn.Linear}, dtype=torch.qint8
    )
    return TrainedCrossEncoder(model, trained.max_length, version=trained.version)


def run(settings: Settings, queries: int, lengths: list[int], out: Path) -> dict[str, Any]:
    import bm25s
    import Stemmer
    import torch

    from lodestar.evaluation.common import provenance, write_json
    from services.reranker.cross_encoder import (
        CrossEncoderNotTrained,
        CurrentCrossEncoder,
        TextDoc,
        TrainedCrossEncoder,
        load_cross_encoder,
    )
    from shared.datasets import load_scifact
    from shared.metrics import evaluate_run

    torch.set_num_threads(1)
    try:
        base = CurrentCrossEncoder(settings).get()
        trained = True
    except CrossEncoderNotTrained:
        base = load_cross_encoder()
        trained = False
    dataset = load_scifact()
    qrels = dict(sorted(dataset.qrels["test"].items())[:queries])
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(
        bm25s.tokenize(
            [f"{d.title} {d.text}" for d in dataset.corpus],
            stopwords="en",
            stemmer=stemmer,
            show_progress=False,
        ),
        show_progress=False,
    )
    candidates: dict[str, list[TextDoc]] = {}
    for qid in qrels:
        tokens = bm25s.tokenize(
            dataset.queries[qid], stopwords="en", stemmer=stemmer, show_progress=False
        )
        found, _ = retriever.retrieve(tokens, k=CANDIDATES, show_progress=False)
        top = [dataset.corpus[int(i)] for i in found[0]]
        candidates[qid] = [TextDoc(d.id, d.title, d.text) for d in top]

    variants: dict[str, TrainedCrossEncoder] = {}
    for length in lengths:
        variant = TrainedCrossEncoder(base.model, length, version=base.version)
        variants[f"fp32@{length}"] = variant
    variants[f"int8@{base.max_length}"] = _quantised(base)
    rows: dict[str, Any] = {}
    rankings: dict[str, dict[str, list[str]]] = {}
    for name, model in variants.items():
        model.score("warm up", candidates[next(iter(qrels))][:4])
        timings: list[float] = []
        rankings[name] = {}
        for qid, docs in candidates.items():
            started = time.perf_counter()
            scores = model.score(dataset.queries[qid], docs, batch_size=CANDIDATES)
            timings.append((time.perf_counter() - started) * 1000)
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            rankings[name][qid] = [docs[i].doc_id for i in order]
        run_scores = {
            qid: {d: float(len(r) - i) for i, d in enumerate(r)}
            for qid, r in rankings[name].items()
        }
        rows[name] = {
            "p50_ms": round(statistics.median(timings), 1),
            "mean_ms": round(statistics.fmean(timings), 1),
            "ndcg@10": round(evaluate_run(run_scores, qrels).mean["ndcg@10"], 4),
        }
    baseline = f"fp32@{base.max_length}"
    for name, row in rows.items():
        row["speedup_vs_fp32_serving"] = round(rows[baseline]["p50_ms"] / row["p50_ms"], 2)
        overlaps = [
            len(set(rankings[name][q][:10]) & set(rankings[baseline][q][:10])) / 10 for q in qrels
        ]
        row["top10_overlap_with_fp32_serving"] = round(statistics.fmean(overlaps), 3)
    result = {
        "benchmark": "cross-encoder latency, 50 candidates, one thread",
        "model": base.model_id,
        "trained": trained,
        "serving_max_length": base.max_length,
        "queries": len(qrels),
        "target_p50_ms": 120,
        "variants": rows,
        "provenance": provenance(),
    }
    write_json(out, result)
    return result


def command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    result = run(settings, args.queries, lengths, Path(args.out))
    print(
        f"{'variant':<12} {'p50 ms':>8} {'mean ms':>8} {'nDCG@10':>8} {'speedup':>8} {'top10':>6}"
    )
    for name, row in result["variants"].items():
        print(
            f"{name:<12} {row['p50_ms']:>8} {row['mean_ms']:>8} {row['ndcg@10']:>8} "
            f"{row['speedup_vs_fp32_serving']:>8} {row['top10_overlap_with_fp32_serving']:>6}"
        )
    print(f"model {result['model']} (trained: {result['trained']}); wrote {args.out}")
    return 0


def register(group: Any) -> None:
    parser = group.add_parser(
        "cross-encoder", help="cross-encoder re-ranking latency (50 candidates, one thread)"
    )
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--lengths", default="96,128,160,256", help="fp32 input lengths to time")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.set_defaults(handler=command)
