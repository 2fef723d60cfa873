"""``lodestar bench index``: ANN backends against exact brute force, measured in the same run.

Corpora (all normalised MiniLM-like 384-d vectors in an on-disk float32 memmap, as a collection
stores them):

- N = the wiki collection's stored vectors (10,033 real passages, read-only);
- larger N: those real vectors followed by synthetic ones (``--synthetic``):
  ``manifold`` (default): a point on the segment between a real vector and one of its 10 nearest
  real neighbours, plus isotropic Gaussian noise, normalised. It stays on the real vectors' local
  structure (clusters, and a local intrinsic dimensionality calibrated to the real one, see
  ``MANIFOLD_NOISE``); ``gaussian``: one Gaussian with the real mean and full covariance (the
  real PCA spectrum) — no cluster structure, every true neighbour as likely in any IVF list: the
  worst case for IVF, and a far higher LID than text embeddings have.

Queries are real: FanOutQA dev questions embedded with the same MiniLM. Ground truth is the exact
top-10 inner product over the whole memmap. For each backend the bench reports recall@10 of the
ANN scores alone and after exact re-scoring of K candidates (the engine's own
``TwoStageDenseSearcher``), single-query p50/p95, batched throughput, build time, the ANN's
in-memory and on-disk bytes, and speed-ups against brute force timed in the same process.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.index.ann import ANN_FILE, AnnConfig, ann_memory_bytes, build_ann
from services.index.engine import ExactDenseSearcher, SearchParams, TwoStageDenseSearcher
from shared.settings import Settings

DIM = 384
K_TRUTH = 10
RESULTS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "index_bench.json"
DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "index.md"
TABLE_BEGIN = "<!-- index-bench:begin -->"
TABLE_END = "<!-- index-bench:end -->"


def real_vectors(settings: Settings, collection: str) -> np.ndarray:
    """The collection's stored vectors, memory-mapped read-only."""
    from shared.artifacts import ArtifactFamily

    family = ArtifactFamily(settings.data_dir / "collections" / collection)
    path = family.current_path()
    if path is None:
        raise SystemExit(
            f"no collection {collection!r} under {settings.data_dir}: "
            f"LODESTAR_DATA_DIR=... lodestar index build {collection}"
        )
    rows = family.read_manifest()["passages"]
    return np.memmap(path / "embeddings.f32", dtype=np.float32, mode="r", shape=(rows, DIM))


def real_queries(settings: Settings, n: int) -> np.ndarray:
    from shared.datasets import load_fanoutqa_dev
    from shared.models import get_embedder

    questions = [example.question for example in load_fanoutqa_dev()[:n]]
    vectors: np.ndarray = get_embedder(settings).encode(questions).astype(np.float32)
    return vectors


SYNTHETIC_KINDS = ("manifold", "gaussian")
# Per-dimension std of the noise added to interpolated points. Calibrated on the wiki vectors so
# that the synthetic set's mean MLE LID at k = 20 matches the real vectors' (docs/index.md).
MANIFOLD_NOISE = 0.055
MANIFOLD_NEIGHBOURS = 10


def _gaussian_sampler(real: np.ndarray, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    sample = np.asarray(real, dtype=np.float64)
    mean = sample.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(sample, rowvar=False))
    scale = np.sqrt(np.clip(eigvals, 0.0, None))

    def draw(rows: int) -> np.ndarray:
        block: np.ndarray = (rng.standard_normal((rows, DIM)) * scale) @ eigvecs.T + mean
        return block

    return draw


def _manifold_sampler(
    real: np.ndarray, rng: np.random.Generator, noise: float
) -> Callable[[int], np.ndarray]:
    base = np.asarray(real, dtype=np.float32)
    neighbours = exact_topk(base, base, MANIFOLD_NEIGHBOURS + 1)[:, 1:]  # drop the point itself

    def draw(rows: int) -> np.ndarray:
        anchor = rng.integers(0, base.shape[0], rows)
        other = neighbours[anchor, rng.integers(0, MANIFOLD_NEIGHBOURS, rows)]
        mix = rng.random((rows, 1), dtype=np.float32)
        block: np.ndarray = (1 - mix) * base[anchor] + mix * base[other]
        block += rng.standard_normal((rows, DIM), dtype=np.float32) * noise
        return block

    return draw


def corpus_file(
    real: np.ndarray,
    n: int,
    work_dir: Path,
    *,
    synthetic: str = "manifold",
    noise: float = MANIFOLD_NOISE,
    seed: int = 0,
) -> np.ndarray:
    """``n`` rows: the real vectors, then synthetic ones of the given kind (module docstring)."""
    if synthetic not in SYNTHETIC_KINDS:
        raise SystemExit(f"--synthetic must be one of {', '.join(SYNTHETIC_KINDS)}")
    tag = "gaussian" if synthetic == "gaussian" else f"manifold{noise:g}"
    path = work_dir / f"vectors-{n}-{real.shape[0]}-{tag}-{seed}.f32"
    if path.exists() and path.stat().st_size == n * DIM * 4:
        return np.memmap(path, dtype=np.float32, mode="r", shape=(n, DIM))
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(n, DIM))
    m = min(n, real.shape[0])
    out[:m] = real[:m]
    if n > m:
        rng = np.random.default_rng(seed)
        draw = (
            _gaussian_sampler(real, rng)
            if synthetic == "gaussian"
            else _manifold_sampler(real, rng, noise)
        )
        for start in range(m, n, 100_000):
            block = draw(min(100_000, n - start))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start : start + block.shape[0]] = block.astype(np.float32)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, DIM))


def mean_lid(vectors: np.ndarray, *, sample: int = 500, k: int = 20, seed: int = 0) -> float:
    """Mean MLE local intrinsic dimensionality at ``k`` of a row sample, neighbours from all rows
    (found by inner product, which ranks like distance because the rows are unit vectors)."""
    from lodestar.experiments.lid import mle_lid

    # Not lid.exact_knn: it holds the base in float64 (3 GB at 1M); this streams the memmap.
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(vectors.shape[0], size=min(sample, vectors.shape[0]), replace=False))
    points = np.asarray(vectors[rows])
    ids = exact_topk(vectors, points, k + 1)
    distances = np.empty((points.shape[0], k))
    for i, (point, row_ids) in enumerate(zip(points, ids, strict=True)):
        others = np.sort(row_ids[row_ids != rows[i]][:k])
        distances[i] = np.sort(np.linalg.norm(np.asarray(vectors[others]) - point, axis=1))
    return float(np.nanmean(mle_lid(distances)))


def _blocks(vectors: np.ndarray, rows: int = 131_072) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, vectors.shape[0], rows):
        yield start, np.asarray(vectors[start : start + rows])


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row ids per query, streamed over the memmap (never all scores at once)."""
    best_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((queries.shape[0], k), dtype=np.int64)
    for start, block in _blocks(vectors):
        scores = queries @ block.T
        ids = np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, axis=1)


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(f[:K_TRUTH].tolist()) & set(t.tolist())) / K_TRUTH
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def latencies(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    search(queries[0])  # warm
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
    }


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def configs_for(
    n: int,
    hnsw_max: int,
    candidates: int,
    backends: list[str],
    nprobes: list[int],
    pq_ms: tuple[int, ...] = (48,),
    nlist: int | None = None,
) -> list[tuple[AnnConfig, list[SearchParams]]]:
    """The backends and search settings measured at size n."""
    out: list[tuple[AnnConfig, list[SearchParams]]] = []
    if "ivfpq" in backends:
        for pq_m in pq_ms:
            config = AnnConfig(
                backend="ivfpq", candidates=candidates, pq_m=pq_m, nlist=nlist, nprobe=nprobes[0]
            )
            out.append((config, [SearchParams(nprobe=p) for p in nprobes]))
    for backend in ("faiss_hnsw", "hnswlib"):
        if backend in backends and n <= hnsw_max:
            config = AnnConfig(
                backend=backend,  # type: ignore[arg-type]
                candidates=candidates,
                hnsw_m=16,
                ef_construction=100,
                ef_search=128,
            )
            out.append((config, [SearchParams(candidates=100, ef_search=128), SearchParams()]))
    return out


def bench_size(
    vectors: np.ndarray,
    queries: np.ndarray,
    work_dir: Path,
    *,
    hnsw_max: int,
    candidates: int,
    backends: list[str],
    nprobes: list[int],
    latency_queries: int,
    log: Callable[[str], None],
    pq_ms: tuple[int, ...] = (48,),
    nlist: int | None = None,
    corpus: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    n = vectors.shape[0]
    rows_all = np.arange(n)
    live = np.ones(n, dtype=bool)
    truth = exact_topk(vectors, queries, K_TRUTH)
    flat = ExactDenseSearcher(vectors, rows_all)
    lat_q = queries[:latency_queries]
    flat_lat = latencies(lambda q: flat.search(q, K_TRUTH), lat_q)
    started = time.perf_counter()
    exact_topk(vectors, queries, K_TRUTH)
    flat_qps = queries.shape[0] / (time.perf_counter() - started)
    fp32_bytes = n * DIM * 4
    base = {"n": n, "queries": int(queries.shape[0]), **(corpus or {})}
    results = [
        {
            **base,
            "backend": "flat (brute force)",
            "params": "numpy sgemv over the memmap",
            "build_s": 0.0,
            "recall_ann": 1.0,
            "recall_exact": 1.0,
            **flat_lat,
            "qps_batch": round(flat_qps, 1),
            "ann_memory_bytes": 0,
            "ann_disk_bytes": 0,
            "vectors_disk_bytes": fp32_bytes,
            "speedup_p50": 1.0,
            "speedup_qps": 1.0,
        }
    ]
    log(f"N={n}: flat p50 {flat_lat['p50_ms']} ms, {flat_qps:.0f} q/s batched")
    measured = configs_for(n, hnsw_max, candidates, backends, nprobes, pq_ms, nlist)
    for config, settings_list in measured:
        gc.collect()
        rss_before = rss_mb()
        started = time.perf_counter()
        index = build_ann(config, vectors)
        build_s = time.perf_counter() - started
        path = work_dir / f"{config.backend}-{n}.{ANN_FILE}"
        index.save(path)
        memory = ann_memory_bytes(index, path)
        searcher = TwoStageDenseSearcher(index, config, vectors, live, n, rows_all)
        log(f"N={n}: built {config.backend} in {build_s:.1f} s ({memory / 1e6:.1f} MB)")
        for params in settings_list:
            k_cand = params.candidates or config.candidates
            _, ann_ids = index.search(
                queries, K_TRUTH, nprobe=params.nprobe, ef_search=params.ef_search
            )
            two_stage = [
                np.array([h.doc_index for h in searcher.search(q, K_TRUTH, params)])
                for q in queries
            ]

            def one(q: np.ndarray, p: SearchParams = params, s: Any = searcher) -> Any:
                return s.search(q, K_TRUTH, p)

            lat = latencies(one, lat_q)
            started = time.perf_counter()
            _, cand = index.search(
                queries, k_cand, nprobe=params.nprobe, ef_search=params.ef_search
            )
            for q, ids in zip(queries, cand, strict=True):  # exact stage per query
                rows = np.unique(ids[ids >= 0])
                np.asarray(vectors[rows]) @ q
            qps = queries.shape[0] / (time.perf_counter() - started)
            knobs = (
                f"nlist {config.resolved_nlist(n)}, M {config.pq_m}x8, nprobe {params.nprobe}"
                if config.backend == "ivfpq"
                else f"M {config.hnsw_m}, efC {config.ef_construction}, "
                f"ef {max(params.ef_search or config.ef_search, k_cand)}"
            )
            row = {
                **base,
                "backend": config.backend,
                "params": f"{knobs}, K {k_cand}",
                "config": config.to_dict(),
                "search": {
                    "candidates": k_cand,
                    "nprobe": params.nprobe,
                    "ef_search": params.ef_search,
                },
                "build_s": round(build_s, 2),
                "recall_ann": round(recall(ann_ids, truth), 4),
                "recall_exact": round(recall(two_stage, truth), 4),
                **lat,
                "qps_batch": round(qps, 1),
                "ann_memory_bytes": memory,
                "ann_memory_fraction_of_fp32": round(memory / fp32_bytes, 4),
                "ann_disk_bytes": path.stat().st_size,
                "vectors_disk_bytes": fp32_bytes,
                "rss_growth_mb": round(rss_mb() - rss_before, 1),
                "speedup_p50": round(flat_lat["p50_ms"] / lat["p50_ms"], 2),
                "speedup_qps": round(qps / flat_qps, 2),
            }
            results.append(row)
            log(
                f"N={n} {config.backend} {row['params']}: recall ann {row['recall_ann']} "
                f"exact {row['recall_exact']}, p50 {lat['p50_ms']} ms (x{row['speedup_p50']})"
            )
        path.unlink(missing_ok=True)
        del searcher, index
    return results


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N (corpus, mean LID@20) | backend | params | build s | recall@10 ANN | recall@10 ANN+exact | p50 ms | "
        "p95 ms | batch q/s | ANN RAM MB (÷fp32) | speed-up p50 | speed-up q/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        fraction = r.get("ann_memory_fraction_of_fp32")
        ram = f"{r['ann_memory_bytes'] / 1e6:.1f} ({fraction:.3f})" if fraction is not None else "-"
        corpus = f" ({r['synthetic']}, LID {r['lid20']})" if "lid20" in r else ""
        lines.append(
            f"| {r['n']:,}{corpus} | {r['backend']} | {r['params']} | {r['build_s']} | {r['recall_ann']} | "
            f"{r['recall_exact']} | {r['p50_ms']} | {r['p95_ms']} | {r['qps_batch']} | {ram} | "
            f"{r['speedup_p50']}× | {r['speedup_qps']}× |"
        )
    return head + "\n".join(lines) + "\n"


def write_docs(table: str, meta: dict[str, Any]) -> None:
    block = (
        f"{TABLE_BEGIN}\n_Measured {meta['date']} on {meta['machine']} "
        f"(load average at start {meta['load_avg_at_start']}); {meta['queries']} FanOutQA "
        f"queries, single-query latency over {meta['latency_queries']}._\n\n{table}{TABLE_END}"
    )
    text = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else ""
    if TABLE_BEGIN in text and TABLE_END in text:
        before, rest = text.split(TABLE_BEGIN, 1)
        after = rest.split(TABLE_END, 1)[1]
        text = before + block + after
    else:
        text = text + "\n## Measured\n\n" + block + "\n"
    DOCS_PATH.write_text(text, encoding="utf-8")


def cmd_bench_index(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.common import provenance, write_json

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work_dir = Path(args.work_dir)
    real = real_vectors(settings, args.collection)
    queries = real_queries(settings, args.queries)
    sizes = [real.shape[0] if s <= real.shape[0] else s for s in sizes]

    def log(message: str) -> None:
        print(message, flush=True)

    meta = {
        **provenance(),
        "queries": args.queries,
        "latency_queries": args.latency_queries,
        "synthetic": args.synthetic,
        "noise": args.noise if args.synthetic == "manifold" else None,
        "real_rows": int(real.shape[0]),
    }
    rows: list[dict[str, Any]] = []
    for n in sizes:
        vectors = corpus_file(real, n, work_dir, synthetic=args.synthetic, noise=args.noise)
        corpus = {
            "synthetic": args.synthetic if n > real.shape[0] else "real",
            "lid20": round(mean_lid(vectors), 2),
        }
        log(f"N={n}: {corpus['synthetic']} corpus, mean LID@20 {corpus['lid20']}")
        rows += bench_size(
            vectors,
            queries,
            work_dir,
            hnsw_max=args.hnsw_max,
            candidates=args.candidates,
            backends=args.backends.split(","),
            nprobes=[int(p) for p in args.nprobe.split(",")],
            latency_queries=args.latency_queries,
            log=log,
            pq_ms=tuple(int(m) for m in args.pq_m.split(",")),
            nlist=args.nlist,
            corpus=corpus,
        )
        # Written after every size, so a long run that is stopped keeps what it measured.
        write_json(Path(args.out), {"meta": meta, "results": rows})
    table = markdown(rows)
    print(table)
    if not args.no_docs:
        write_docs(table, meta)
    print(f"wrote {args.out}" + ("" if args.no_docs else f" and {DOCS_PATH}"))
    return 0


def register(bench: Any) -> None:
    """``lodestar bench index`` on the ``bench`` group."""
    index = bench.add_parser("index", help="ANN backends vs exact brute force")
    index.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N")
    index.add_argument("--collection", default="wiki", help="real vectors come from here")
    index.add_argument("--queries", type=int, default=200, help="FanOutQA questions")
    index.add_argument("--latency-queries", type=int, default=100)
    index.add_argument("--candidates", type=int, default=1000, help="K re-scored exactly")
    index.add_argument(
        "--hnsw-max", type=int, default=100_000, help="skip HNSW builds above this N (2 cores)"
    )
    index.add_argument("--work-dir", default="var/bench", help="synthetic vectors and indexes")
    index.add_argument("--backends", default="ivfpq,faiss_hnsw,hnswlib")
    index.add_argument("--nprobe", default="16,64,256", help="IVF-PQ nprobe values swept")
    index.add_argument("--pq-m", default="48", help="IVF-PQ sub-quantizer counts swept")
    index.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4·√N)")
    index.add_argument(
        "--synthetic",
        default="manifold",
        choices=SYNTHETIC_KINDS,
        help="how rows beyond the real vectors are made (module docstring)",
    )
    index.add_argument(
        "--noise", type=float, default=MANIFOLD_NOISE, help="manifold: per-dimension noise std"
    )
    index.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    index.add_argument("--no-docs", action="store_true", help="do not rewrite docs/index.md")
    index.set_defaults(handler=cmd_bench_index)
