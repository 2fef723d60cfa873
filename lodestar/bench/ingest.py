"""``lodestar bench ingest``: ingestion throughput against raw encoding of the same passages.

The index service's ingest path (what the Celery ingest job and ``lodestar index build`` run:
``IndexEngine.upsert``) chunks documents, embeds the passages, writes the JSONL and fp32 files,
builds BM25 (and the ANN index when the collection is large enough) and publishes a version. The
target is that embedding dominates: ingest throughput within 80 % of sentence-transformers
encoding the very same passage texts with the same model and batch size.

Measured in one process, into a throw-away data directory: raw encoding, then ingestion, then
raw encoding again (the baseline is the mean of the two, so drift on a shared machine does not
favour either side); then the same documents ingested as several smaller writes into one
collection, which shows what each later write pays for the collection already there. Each path
reports wall time and this process's CPU time; on shared cores the CPU ratio is the steadier.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.index.engine import IndexEngine, chunk_document, embedding_text
from shared.settings import Settings

RESULTS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ingest_bench.json"


def cmd_bench_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.common import provenance, write_json
    from shared.datasets import load_collection_documents
    from shared.models import get_embedder

    documents = load_collection_documents(args.source)[: args.documents]
    if not documents:
        raise SystemExit(f"no documents in {args.source!r}")
    embedder = get_embedder(settings)
    texts = [
        embedding_text(p) for doc in documents for p in chunk_document(doc, settings.passage_words)
    ]
    embedder.encode(texts[:64])  # warm: the first call pays for lazy initialisation

    def timed(work: Callable[[], object]) -> tuple[float, float]:
        """Wall seconds and this process's CPU seconds: the CPU figure is what another job on
        the shared cores cannot inflate (it only slows the wall clock)."""
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        return time.perf_counter() - wall, time.process_time() - cpu

    with tempfile.TemporaryDirectory(prefix="lodestar-ingest-") as tmp:
        engine = IndexEngine(
            Path(tmp),
            lambda: embedder,
            settings.passage_words,
            max_candidates=settings.index_max_candidates,
            device=settings.device,
        )
        raw_before = timed(lambda: embedder.encode(texts))
        print(f"raw encoding: {len(texts) / raw_before[0]:.1f} passages/s", flush=True)
        one_job = timed(lambda: engine.upsert("bench-one", documents))
        print(f"one ingest job: {len(texts) / one_job[0]:.1f} passages/s", flush=True)
        raw_after = timed(lambda: embedder.encode(texts))
        writes: list[dict[str, Any]] = []

        def write_batches() -> None:
            for start in range(0, len(documents), args.batch):
                batch = documents[start : start + args.batch]
                result = engine.upsert("bench-batches", batch)
                writes.append(
                    {
                        "documents_before": start,
                        "documents": len(batch),
                        "passages": result.embedded_passages,
                        "seconds": round(result.seconds, 3),
                    }
                )

        batched = timed(write_batches)
    raw = ((raw_before[0] + raw_after[0]) / 2, (raw_before[1] + raw_after[1]) / 2)
    rows: list[dict[str, Any]] = []
    for path, (wall, cpu) in (
        ("raw sentence-transformers encode", raw),
        ("ingest, one job", one_job),
        (f"ingest, writes of {args.batch} documents", batched),
    ):
        rows.append(
            {
                "path": path,
                "seconds": round(wall, 2),
                "cpu_seconds": round(cpu, 2),
                "passages_per_s": round(len(texts) / wall, 1),
                "ratio": round(raw[0] / wall, 3),
                "cpu_ratio": round(raw[1] / cpu, 3),
            }
        )
    report = {
        "meta": {
            **provenance(),
            "source": args.source,
            "documents": len(documents),
            "passages": len(texts),
            "batch_size": embedder.batch_size,
            "raw_encode_s": [round(raw_before[0], 2), round(raw_after[0], 2)],
            "raw_encode_cpu_s": [round(raw_before[1], 2), round(raw_after[1], 2)],
        },
        "results": rows,
        "writes": writes,
    }
    write_json(Path(args.out), report)
    print(
        "| path | wall s | passages/s | ÷ raw (wall) | CPU s | ÷ raw (CPU) |\n"
        "|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['path']} | {row['seconds']} | {row['passages_per_s']} | {row['ratio']} | "
            f"{row['cpu_seconds']} | {row['cpu_ratio']} |"
        )
    print(f"wrote {args.out}")
    return 0


def register(bench: Any) -> None:
    """``lodestar bench ingest`` on the ``bench`` group."""
    ingest = bench.add_parser("ingest", help="ingest throughput vs raw embedding throughput")
    ingest.add_argument("--source", default="wiki", help="documents of this built-in collection")
    ingest.add_argument("--documents", type=int, default=1000)
    ingest.add_argument("--batch", type=int, default=250, help="documents per write (2nd run)")
    ingest.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    ingest.set_defaults(handler=cmd_bench_ingest)
