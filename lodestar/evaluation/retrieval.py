"""Retrieval evaluation: BEIR datasets through the same search code the services run.

A *system* (:data:`SYSTEMS`) is a name and a coroutine that answers one query against a
:class:`SearchBackend`. The backends are the two ways the product searches:

- :class:`InProcessBackend`: the index engine behind ``InProcessIndex`` and the orchestrator's
  ``SearchPipeline`` (fusion included), each query with its own throwaway ``Trace``;
- :class:`HttpBackend`: a running stack's orchestrator ``POST /search``.

Adding a system (an ANN backend, FM-index, DSI, a reranker) is one entry in :data:`SYSTEMS`:
``pipeline_system(...)`` when the orchestrator's ``/search`` serves it (new retriever or
``rerank`` name), or a :class:`RetrievalSystem` with its own ``search`` coroutine otherwise.

Every system retrieves :data:`DEPTH` (100) documents per query. The run handed to trec_eval
scores documents by their rank in the system's list (``DEPTH + 1 - rank``), not by the system's
own scores: fused RRF scores tie often, and trec_eval would break those ties by doc id, i.e.
evaluate an order the system never returned.
"""

from __future__ import annotations

import asyncio
import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lodestar.evaluation.common import (
    RESULTS_DIR,
    EvalUsageError,
    collection_name,
    ensure_collection,
    latency_summary,
    lookup,
    parse_names,
    print_and_save,
    resolve_run,
    result_tail,
    significance_block,
)
from shared.datasets import BeirDataset, load_scifact
from shared.settings import Settings

if TYPE_CHECKING:
    from services.orchestrator.search import SearchPipeline

#: Documents retrieved per query (Recall@100 needs 100).
DEPTH = 100
#: Metrics reported per system, in this order (names as ``shared.metrics.evaluate_run`` gives them).
METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
#: Metrics the pairwise significance tests are run on.
SIGNIFICANCE_METRICS = ("ndcg@10", "recall@100")
#: Doc ids kept per query in the JSON results (the metrics are kept for every query).
KEEP_TOP = 10


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalDataset:
    name: str
    description: str
    load: Callable[[], BeirDataset]
    default_split: str = "test"


DATASETS: dict[str, RetrievalDataset] = {
    "scifact": RetrievalDataset(
        "scifact", "BEIR SciFact: 5,183 abstracts, 300 test claims", load_scifact
    ),
}
"""BEIR-format datasets the retrieval evaluation knows, by name."""


# --------------------------------------------------------------------------------------------
# Backends and systems
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """One query's ranked documents (best first) and the stage timings the pipeline reported."""

    doc_ids: list[str]
    scores: list[float]
    timings_ms: dict[str, float] = field(default_factory=dict)


class SearchBackend(ABC):
    """Where first-stage retrieval (+ fusion, + reranking) runs: in-process or over HTTP.

    ``search`` is the keyword interface every caller uses, declared once here; a backend
    implements ``_search``."""

    name: str

    async def search(
        self,
        *,
        query: str,
        collection: str,
        k: int,
        retrievers: Sequence[str],
        rerank: str | None = None,
    ) -> SearchResult:
        return await self._search(query, collection, k, retrievers, rerank)

    @abstractmethod
    async def _search(
        self, query: str, collection: str, k: int, retrievers: Sequence[str], rerank: str | None
    ) -> SearchResult: ...

    async def aclose(self) -> None:
        return None


class InProcessBackend(SearchBackend):
    """The orchestrator's ``SearchPipeline`` over ``InProcessIndex`` (the index engine)."""

    name = "in-process"

    def __init__(self, settings: Settings) -> None:
        from services.index.engine import IndexEngine
        from services.orchestrator.pipeline import in_process_search

        # Configured exactly as the services configure them (ANN backend, candidates, token
        # budgets, rerank depth); the reranker's models load on first use only.
        self.settings = settings
        self.engine = IndexEngine.from_settings(settings)
        self.pipeline = in_process_search(settings, self.engine, rerank=True)
        self._fm_pipeline: SearchPipeline | None = None

    def with_fm(self) -> InProcessBackend:
        """This backend with the fmindex engine loaded here as the ``fm`` retriever (once: the
        generator loads on the first fm search)."""
        if self._fm_pipeline is None:
            from services.orchestrator.pipeline import in_process_search

            self._fm_pipeline = in_process_search(self.settings, self.engine, fm=True)
        clone = copy.copy(self)
        clone.pipeline = self._fm_pipeline
        return clone

    async def _search(
        self, query: str, collection: str, k: int, retrievers: Sequence[str], rerank: str | None
    ) -> SearchResult:
        from shared.store import Trace

        trace = Trace(kind="search", request={"query": query, "collection": collection, "k": k})
        outcome = await self.pipeline.run(
            trace, query=query, collection=collection, k=k, retrievers=retrievers, rerank=rerank
        )
        return SearchResult(
            doc_ids=[hit.doc_id for hit in outcome.hits],
            scores=[hit.score for hit in outcome.hits],
            timings_ms=dict(outcome.timings_ms),
        )


class HttpBackend(SearchBackend):
    """A running stack: the orchestrator's ``POST /search`` (same pipeline, plus HTTP and store)."""

    def __init__(self, base_url: str, settings: Settings, timeout_s: float = 60.0) -> None:
        import httpx

        self.name = base_url.rstrip("/")
        headers = (
            {"authorization": f"Bearer {settings.service_api_key}"}
            if settings.service_api_key
            else {}
        )
        self._http = httpx.AsyncClient(base_url=self.name, headers=headers, timeout=timeout_s)

    async def get(self, path: str) -> tuple[int, Any]:
        import httpx

        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise EvalUsageError(
                f"cannot reach the stack at {self.name} ({type(exc).__name__}); is it up?"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return response.status_code, body

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        import httpx

        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{self.name}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}{path}: HTTP {response.status_code}: {response.text}")
        return response.json()

    async def require_collection(self, name: str) -> dict[str, Any]:
        """The collection's info on the stack (version, manifest); a clear error when the stack
        lacks it."""
        status, body = await self.get(f"/collections/{name}")
        if status == 404:
            raise EvalUsageError(
                f"the stack at {self.name} has no collection {name!r}; build it where the stack's "
                f"index service reads its data dir: lodestar index build <dataset> --collection {name}"
            )
        if status != 200 or not isinstance(body, dict):
            raise EvalUsageError(f"{self.name}/collections/{name}: HTTP {status}: {body}")
        return body

    async def _search(
        self, query: str, collection: str, k: int, retrievers: Sequence[str], rerank: str | None
    ) -> SearchResult:
        body = await self.post(
            "/search",
            {
                "query": query,
                "collection": collection,
                "k": k,
                "retrievers": list(retrievers),
                "rerank": rerank,
            },
        )
        hits = body["hits"]
        return SearchResult(
            doc_ids=[hit["doc_id"] for hit in hits],
            scores=[float(hit["score"]) for hit in hits],
            timings_ms={k: float(v) for k, v in body.get("timings_ms", {}).items()},
        )

    async def aclose(self) -> None:
        await self._http.aclose()


SystemSearch = Callable[[SearchBackend, str, str, int], Awaitable[SearchResult]]
"""``(backend, query, collection, k) -> SearchResult``."""


@dataclass(frozen=True)
class RetrievalSystem:
    name: str
    description: str
    search: SystemSearch


def pipeline_system(
    name: str, description: str, retrievers: Sequence[str], rerank: str | None = None
) -> RetrievalSystem:
    """A system the orchestrator's search pipeline serves: these retrievers (fused with RRF when
    there are several), optionally re-ranked."""
    chosen = tuple(retrievers)

    async def search(backend: SearchBackend, query: str, collection: str, k: int) -> SearchResult:
        return await backend.search(
            query=query, collection=collection, k=k, retrievers=chosen, rerank=rerank
        )

    return RetrievalSystem(name, description, search)


SYSTEMS: dict[str, RetrievalSystem] = {
    "dense": pipeline_system(
        "dense",
        "all-MiniLM-L6-v2 via the collection's dense backend (exact below "
        "LODESTAR_INDEX_ANN_MIN_PASSAGES), max-passage",
        ["dense"],
    ),
    "bm25": pipeline_system(
        "bm25", "BM25 (bm25s, k1 0.9, b 0.4, English stemmer + stop words)", ["bm25"]
    ),
    "rrf": pipeline_system("rrf", "reciprocal-rank fusion of dense and bm25", ["dense", "bm25"]),
    **{
        f"rrf+{method}": pipeline_system(
            f"rrf+{method}",
            f"rrf, then the top LODESTAR_RERANK_DEPTH (20) re-ranked by {description}",
            ["dense", "bm25"],
            rerank=method,
        )
        for method, description in (
            ("icr", "ICR (SmolLM2 attention, N/A-calibrated)"),
            ("rankgpt", "RankGPT-style listwise generation (SmolLM2)"),
            ("cosine", "MiniLM bi-encoder cosine"),
        )
    },
}
"""Retrieval systems by name: each retriever alone, their fusion, and the fusion re-ranked;
SEAL (``fm``, alone and fused) is added below."""


def fm_system(name: str, description: str, retrievers: Sequence[str]) -> RetrievalSystem:
    """SEAL (``fm``), alone or fused: with a stack, the orchestrator's ``/search`` (which asks
    the fmindex service); in process, the same ``SearchPipeline`` with the fmindex engine loaded
    here as its ``fm`` retriever (``InProcessBackend.with_fm``). Needs the FM-index of the
    evaluation collection (``python -m services.fmindex.jobs build --dataset scifact
    --collection eval-scifact``). Slow: every query decodes with the LM (beam 15 by default)."""
    chosen = tuple(retrievers)

    async def search(backend: SearchBackend, query: str, collection: str, k: int) -> SearchResult:
        if isinstance(backend, InProcessBackend):
            backend = backend.with_fm()
        return await backend.search(query=query, collection=collection, k=k, retrievers=chosen)

    return RetrievalSystem(name, description, search)


SYSTEMS["fm"] = fm_system(
    "fm", "SEAL: SmolLM2 n-grams constrained by an FM-index, intersective scoring", ["fm"]
)
SYSTEMS["rrf-fm"] = fm_system("rrf-fm", "reciprocal-rank fusion of fm and bm25", ["fm", "bm25"])


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class SystemRun:
    name: str
    run: dict[str, dict[str, float]]
    """``{qid: {doc_id: DEPTH + 1 - rank}}`` (see the module docstring)."""
    ranked: dict[str, list[str]]
    latency_ms: dict[str, float]
    wall_s: float


async def _run_system(
    system: RetrievalSystem,
    backend: SearchBackend,
    queries: dict[str, str],
    collection: str,
    *,
    show_progress: bool,
) -> SystemRun:
    from tqdm import tqdm

    # One untimed query first: loads the embedder and the collection snapshot.
    first = next(iter(queries.values()))
    await system.search(backend, first, collection, DEPTH)
    run: dict[str, dict[str, float]] = {}
    ranked: dict[str, list[str]] = {}
    latency: dict[str, float] = {}
    started_all = time.perf_counter()
    for qid, text in tqdm(
        queries.items(), desc=f"{system.name}", unit="query", disable=not show_progress
    ):
        started = time.perf_counter()
        result = await system.search(backend, text, collection, DEPTH)
        latency[qid] = (time.perf_counter() - started) * 1000
        ranked[qid] = result.doc_ids
        run[qid] = {
            doc_id: float(DEPTH + 1 - rank) for rank, doc_id in enumerate(result.doc_ids, 1)
        }
    return SystemRun(system.name, run, ranked, latency, time.perf_counter() - started_all)


def result_path(out_dir: Path, dataset: str, split: str, limit: int | None = None) -> Path:
    suffix = f"-{limit}q" if limit is not None else ""
    return out_dir / f"retrieval-{dataset}-{split}{suffix}.json"


async def evaluate_retrieval_async(
    settings: Settings,
    dataset: str,
    systems: Sequence[str],
    *,
    split: str | None = None,
    stack: str | None = None,
    rebuild: bool = False,
    show_progress: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run ``systems`` over ``dataset``'s ``split`` (its first ``limit`` queries: the expensive
    re-rankers) and return the results document (JSON-able)."""
    spec, chosen = resolve_run(dataset, DATASETS, systems, SYSTEMS, "system", limit)
    split = split or spec.default_split
    data = spec.load()
    if split not in data.qrels:
        raise EvalUsageError(
            f"{dataset} has no split {split!r}; known: {', '.join(sorted(data.qrels))}"
        )
    queries = data.split_queries(split)
    if limit is not None:
        queries = dict(list(queries.items())[:limit])
    qrels = {qid: data.qrels[split][qid] for qid in queries if qid in data.qrels[split]}
    collection = collection_name(dataset)
    started = time.perf_counter()
    backend: SearchBackend = HttpBackend(stack, settings) if stack else InProcessBackend(settings)
    try:
        if isinstance(backend, HttpBackend):
            info = await backend.require_collection(collection)
            version = str(info.get("version", ""))
            dense_backend = info.get("manifest", {}).get("dense_backend", "flat")
        else:
            assert isinstance(backend, InProcessBackend)
            version = ensure_collection(
                backend.engine, collection, lambda: data.corpus, rebuild=rebuild
            )
            dense_backend = backend.engine.snapshot(collection).manifest.get(
                "dense_backend", "flat"
            )
        runs = [
            await _run_system(system, backend, queries, collection, show_progress=show_progress)
            for system in chosen
        ]
    finally:
        await backend.aclose()

    from shared.metrics import evaluate_run

    per_system: dict[str, Any] = {}
    per_query: dict[str, dict[str, dict[str, Any]]] = {}
    for system, system_run in zip(chosen, runs, strict=True):
        evaluation = evaluate_run(
            system_run.run,
            qrels,
            ndcg_cutoffs=(10,),
            recall_cutoffs=(10, 100),
            mrr_cutoffs=(10,),
        )
        per_system[system.name] = {
            "description": system.description,
            "metrics": {m: round(evaluation.mean[m], 4) for m in METRICS},
            "latency_ms": latency_summary(list(system_run.latency_ms.values())),
            "queries_per_s": round(len(queries) / system_run.wall_s, 2),
            "missing_queries": len(evaluation.missing_queries),
        }
        per_query[system.name] = {
            qid: {
                **{m: round(evaluation.per_query[qid][m], 4) for m in METRICS},
                "latency_ms": round(system_run.latency_ms.get(qid, float("nan")), 2),
                "top": system_run.ranked.get(qid, [])[:KEEP_TOP],
            }
            for qid in sorted(evaluation.per_query)
        }
    return {
        "kind": "retrieval",
        "dataset": dataset,
        "split": split,
        "num_queries": len(qrels),
        "depth": DEPTH,
        "limit": limit,
        "collection": collection,
        "collection_version": version,
        "dense_backend": dense_backend,
        "backend": backend.name,
        **result_tail(
            started, ("systems", per_system), ("per_query", per_query), SIGNIFICANCE_METRICS
        ),
    }


def evaluate_retrieval(
    settings: Settings, dataset: str, systems: Sequence[str], **kwargs: Any
) -> dict[str, Any]:
    return asyncio.run(evaluate_retrieval_async(settings, dataset, systems, **kwargs))


def format_retrieval(result: dict[str, Any]) -> str:
    """The summary table and the significance table, as printed by ``lodestar eval retrieval``."""
    lines = [
        f"{result['dataset']} {result['split']}: {result['num_queries']} queries, depth "
        f"{result['depth']}, collection {result['collection']} ({result['backend']}), "
        f"{result['wall_s']} s",
        f"{'system':<10} {'nDCG@10':>8} {'R@10':>7} {'R@100':>7} {'MRR@10':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8}",
    ]
    for name, row in result["systems"].items():
        m, lat = row["metrics"], row["latency_ms"]
        lines.append(
            f"{name:<10} {m['ndcg@10']:>8.4f} {m['recall@10']:>7.4f} {m['recall@100']:>7.4f} "
            f"{m['mrr@10']:>7.4f} {lat['p50']:>8.1f} {lat['p95']:>8.1f}"
        )
    lines += significance_block(result["significance"])
    return "\n".join(lines)


def run_retrieval_command(
    settings: Settings,
    dataset: str,
    systems_text: str,
    *,
    split: str | None,
    stack: str | None,
    out_dir: Path | None,
    rebuild: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """``lodestar eval retrieval``: evaluate, print, save JSON under ``out_dir``."""
    lookup(dataset, DATASETS, "dataset")
    systems = parse_names(systems_text, SYSTEMS, "system")
    result = evaluate_retrieval(
        settings, dataset, systems, split=split, stack=stack, rebuild=rebuild, limit=limit
    )
    path = result_path(out_dir or RESULTS_DIR, dataset, result["split"], limit)
    print_and_save(format_retrieval(result), path, result, "query")
    return result
