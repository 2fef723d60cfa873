"""HNSW insertion order and intrinsic dimensionality (Elliott and Clark, ICTIR 2024).

Builds the same HNSW graph over the same vectors under different insertion orders and measures
Recall@10 against exact kNN, as the paper does. Pieces:

- data (:func:`load_dataset`): the wiki and SciFact collections' stored MiniLM vectors (read from
  an :class:`~services.index.engine.IndexEngine` data directory, built there first if missing),
  synthetic sets of controlled intrinsic dimension, or any ``.npy`` matrix;
- pointwise LID and hubness from exact neighbours (:mod:`lodestar.experiments.lid`);
- orderings (:func:`make_orderings`): random (several seeds), ascending/descending LID, grouped
  and interleaved by category and by k-means cluster, hubs first/last, the stored row order;
- builders (:func:`build_index`): hnswlib, and faiss ``IndexHNSWFlat`` in two modes — one
  ``add`` call (faiss then re-orders the batch itself: highest level first, shuffled within a
  level) and point-by-point (the given order is the real insertion order);
- presets from vector-database defaults (:data:`PRESETS`) and an ef_search sweep;
- ranking shift on SciFact (:func:`run_ranking_shift`): nDCG@10 of PCA/truncated variants of
  MiniLM under exact search and each preset.

:func:`run_experiment` runs the suite and writes ``runs.json``; :mod:`.hnsw_order_report` turns
that into ``report.md`` and plots. CLI: ``lodestar experiment hnsw-order``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lodestar.evaluation.common import machine_info, write_json
from lodestar.experiments.lid import exact_knn, k_occurrence, lid_for_ks, mle_lid

Library = Literal["hnswlib", "faiss_seq", "faiss_batch"]
LIBRARIES: tuple[Library, ...] = ("hnswlib", "faiss_seq", "faiss_batch")
#: Recall@K is measured at this K (the paper's k = 10).
RECALL_K = 10
#: Neighbourhood sizes whose LID is reported; the orderings use DEFAULT_LID_K.
LID_KS: tuple[int, ...] = (10, 20, 50, 100)
DEFAULT_LID_K = 20
#: Hubness is the 10-occurrence: how often a point is among the others' 10 nearest.
HUB_K = 10
DEFAULT_EF_SWEEP: tuple[int, ...] = (10, 16, 20, 40, 64, 100, 128)
#: The build used for every ordering comparison: the M / efConstruction defaults of Qdrant,
#: Elasticsearch and Chroma (:data:`PRESETS`), inside the paper's "typical default" regime
#: (M 16, efConstruction about 100-128, a small ef_search).
MAIN_M = 16
MAIN_EF_CONSTRUCTION = 100
#: faiss's one-call ``add`` re-orders the batch itself, so only a few orderings are built with it:
#: enough to show whether the order given survives (random seeds give its spread).
FAISS_BATCH_ORDERINGS = ("random", "stored", "lid_asc", "lid_desc", "category_grouped")


@dataclass(frozen=True)
class Preset:
    """A vector database's HNSW defaults. ``ef_search`` is what a query gets when the caller
    sets nothing (for Elasticsearch: num_candidates = 1.5·k at k = 10)."""

    name: str
    m: int
    ef_construction: int
    ef_search: int
    source: str


#: Each database's defaults (M / efConstruction / ef_search) as its documentation gives them;
#: Marqo's is the tuned preset its blog recommends, not a default.
PRESETS: tuple[Preset, ...] = (
    Preset("hnswlib", 16, 200, 10, "hnswlib defaults: 16/200/10"),
    Preset("faiss", 32, 40, 16, "faiss IndexHNSWFlat: 32 (M is the caller's)/40/16"),
    Preset("pgvector", 16, 64, 40, "pgvector defaults: 16/64/40"),
    Preset("qdrant", 16, 100, 100, "Qdrant defaults: 16/100, ef = ef_construct when unset"),
    Preset("elasticsearch", 16, 100, 15, "Elasticsearch defaults: 16/100/1.5·k candidates"),
    Preset("chroma", 16, 100, 100, "Chroma 1.x defaults: 16/100/100 (older versions: ef 10)"),
    Preset("weaviate", 64, 128, 100, "Weaviate defaults: 64/128/dynamic (≥ 100)"),
    Preset("marqo", 16, 512, 2000, "Marqo blog's preset: 16/512/2000"),
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Vectors inserted into the index, query sets measured against them, optional labels."""

    name: str
    vectors: np.ndarray
    queries: dict[str, np.ndarray]
    categories: np.ndarray | None = None
    description: str = ""
    intrinsic_dim: int | None = None
    """The generating dimension m of a synthetic set (None for real data)."""


def _collection_vectors(
    data_dir: Path, name: str, load_documents: Callable[[], Sequence[Any]]
) -> tuple[np.ndarray, list[Any], list[Any]]:
    """A collection's stored passage vectors (copied out of the memmap), passages and documents.
    The collection is built with the platform's own engine first if the data directory lacks
    it, so the vectors are exactly those the index service serves."""
    from lodestar.evaluation.common import ensure_collection
    from services.index.engine import IndexEngine
    from shared.settings import get_settings

    settings = get_settings().model_copy(update={"data_dir": data_dir})
    engine = IndexEngine.from_settings(settings)
    ensure_collection(engine, name, load_documents, rebuild=False)
    snapshot = engine.snapshot(name)
    rows = np.flatnonzero(snapshot.live)
    vectors = np.ascontiguousarray(snapshot.exact.embeddings[rows], dtype=np.float32)
    passages = [snapshot.passages[int(row)] for row in rows]
    return vectors, passages, list(snapshot.documents)


def _embed(texts: Sequence[str], data_dir: Path) -> np.ndarray:
    from shared.models import get_embedder
    from shared.settings import get_settings

    settings = get_settings().model_copy(update={"data_dir": data_dir})
    return get_embedder(settings).encode(list(texts))


def load_wiki(data_dir: Path, *, holdout: int = 500, seed: int = 12345) -> Dataset:
    """The bundled Wikipedia summaries (collection ``wiki``). ``holdout`` random passages are
    taken out of the inserted set and used as in-distribution queries; the FanOutQA dev
    questions (real questions about these articles) are the second query set."""
    from shared.datasets import load_collection_documents, load_fanoutqa_dev

    vectors, passages, documents = _collection_vectors(
        data_dir, "wiki", lambda: load_collection_documents("wiki")
    )
    category_of = {doc.id: str(doc.metadata.get("category", "")) for doc in documents}
    categories = np.array([category_of[p.doc_id] for p in passages])
    held = np.zeros(vectors.shape[0], dtype=bool)
    held[np.random.default_rng(seed).choice(vectors.shape[0], size=holdout, replace=False)] = True
    questions = [example.question for example in load_fanoutqa_dev()]
    return Dataset(
        name="wiki",
        vectors=vectors[~held],
        queries={"heldout": vectors[held], "fanoutqa": _embed(questions, data_dir)},
        categories=categories[~held],
        description=(
            f"{int((~held).sum())} Wikipedia summary passages (MiniLM, collection `wiki`), "
            f"{holdout} held out as queries, {len(questions)} FanOutQA dev questions"
        ),
    )


@dataclass
class SciFactData:
    """SciFact passage vectors plus what nDCG needs: passage → document map, test qrels."""

    dataset: Dataset
    passage_doc_ids: list[str]
    query_ids: list[str]
    test_query_ids: list[str]
    test_qrels: dict[str, dict[str, int]]


def load_scifact_vectors(data_dir: Path) -> SciFactData:
    """BEIR SciFact (collection ``eval-scifact``, as the evaluation harness builds it): every
    corpus passage is inserted; all 1,109 claims are real queries."""
    from lodestar.evaluation.common import collection_name
    from shared.datasets import load_scifact

    beir = load_scifact()
    vectors, passages, _ = _collection_vectors(
        data_dir, collection_name("scifact"), lambda: beir.corpus
    )
    query_ids = sorted(beir.queries)
    query_vectors = _embed([beir.queries[qid] for qid in query_ids], data_dir)
    test_qrels = beir.qrels["test"]
    dataset = Dataset(
        name="scifact",
        vectors=vectors,
        queries={"claims": query_vectors},
        description=(
            f"{vectors.shape[0]} SciFact passages (MiniLM, collection `eval-scifact`), "
            f"{len(query_ids)} claims as queries"
        ),
    )
    return SciFactData(
        dataset=dataset,
        passage_doc_ids=[p.doc_id for p in passages],
        query_ids=query_ids,
        test_query_ids=sorted(test_qrels),
        test_qrels=test_qrels,
    )


def synthetic_dataset(
    intrinsic_dim: int,
    *,
    n: int,
    n_queries: int,
    dim: int = 384,
    noise: float = 1e-3,
    seed: int = 0,
) -> Dataset:
    """Points in the span of the first m of ``dim`` random orthonormal vectors, plus noise.

    The basis comes from a QR factorisation of a Gaussian matrix (numerically stable
    Gram–Schmidt); coefficients are standard normal, so the data are an m-dimensional Gaussian
    embedded at ambient dimension ``dim``. ``noise`` is isotropic Gaussian noise of that standard
    deviation in all ``dim`` directions (its norm, noise·√dim, stays well below the neighbour
    distances for m ≥ 2 at these sizes). ``n_queries`` extra points from the same distribution
    are held out as queries.
    """
    if not 1 <= intrinsic_dim <= dim:
        raise ValueError(f"intrinsic dimension must be in [1, {dim}], got {intrinsic_dim}")
    rng = np.random.default_rng(seed * 1000 + intrinsic_dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, intrinsic_dim)))
    coefficients = rng.standard_normal((n + n_queries, intrinsic_dim))
    points = coefficients @ basis.T + noise * rng.standard_normal((n + n_queries, dim))
    points = points.astype(np.float32)
    return Dataset(
        name=f"synthetic-m{intrinsic_dim}",
        vectors=points[:n],
        queries={"heldout": points[n:]},
        description=f"{n} points, m = {intrinsic_dim} of d = {dim}, noise σ = {noise}",
        intrinsic_dim=intrinsic_dim,
    )


def npy_dataset(path: Path, *, holdout: int = 500, seed: int = 12345) -> Dataset:
    """Any (N, d) matrix in a ``.npy`` file; ``holdout`` random rows become the queries."""
    vectors = np.load(path).astype(np.float32)
    if vectors.ndim != 2 or vectors.shape[0] <= holdout + RECALL_K:
        raise ValueError(f"{path}: expected an (N, d) matrix with N > {holdout + RECALL_K}")
    held = np.zeros(vectors.shape[0], dtype=bool)
    held[np.random.default_rng(seed).choice(vectors.shape[0], size=holdout, replace=False)] = True
    return Dataset(
        name=path.stem,
        vectors=vectors[~held],
        queries={"heldout": vectors[held]},
        description=f"{int((~held).sum())} rows of {path.name}, {holdout} held out as queries",
    )


# --------------------------------------------------------------------------------------------
# Neighbourhood statistics and orderings
# --------------------------------------------------------------------------------------------


@dataclass
class Neighbourhood:
    """Exact neighbour statistics of the inserted set and the ground truth of each query set."""

    lid: dict[int, np.ndarray]
    k_occurrence: np.ndarray
    truth: dict[str, np.ndarray]
    query_lid: dict[str, np.ndarray]


def neighbourhood(
    dataset: Dataset, ks: Sequence[int] = LID_KS, progress: Callable[[int], None] | None = None
) -> Neighbourhood:
    """LID of every inserted point at each k (one exact search at max k, over the full set
    that is ordered, never a subsample), hubness, each query's exact top-10 and its LID."""
    k_max = min(max(ks), dataset.vectors.shape[0] - 1)
    usable = [k for k in ks if k <= k_max]
    distances, ids = exact_knn(dataset.vectors, None, k_max, progress=progress)
    truth: dict[str, np.ndarray] = {}
    query_lid: dict[str, np.ndarray] = {}
    lid_k = min(DEFAULT_LID_K, k_max)
    for name, queries in dataset.queries.items():
        query_distances, query_ids = exact_knn(dataset.vectors, queries, max(RECALL_K, lid_k))
        truth[name] = query_ids[:, :RECALL_K]
        query_lid[name] = mle_lid(query_distances[:, :lid_k])
    return Neighbourhood(
        lid=lid_for_ks(distances, usable),
        k_occurrence=k_occurrence(ids, dataset.vectors.shape[0], min(HUB_K, k_max)),
        truth=truth,
        query_lid=query_lid,
    )


@dataclass(frozen=True)
class Ordering:
    name: str
    seed: int
    """The seed of the random order (random orderings) or of the tie-breaking shuffle."""
    rows: np.ndarray = field(repr=False)


def _ranked(keys: np.ndarray, *, descending: bool, tiebreak: np.ndarray) -> np.ndarray:
    """Rows sorted by key; equal keys (and NaN, which go last) keep the random tie-break order."""
    values = np.asarray(keys, dtype=np.float64)[tiebreak]
    values = np.where(np.isnan(values), np.inf if not descending else -np.inf, values)
    order = np.argsort(-values if descending else values, kind="stable")
    return tiebreak[order]


def _grouped(labels: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Group by group: groups in sorted label order, rows inside a group in tie-break order."""
    shuffled = labels[tiebreak]
    return tiebreak[np.argsort(shuffled, kind="stable")]


def _interleaved(labels: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Round robin over groups: one row of each group in turn (a group that runs out drops
    out), rows inside a group in tie-break order. Consecutive insertions differ in group."""
    grouped = _grouped(labels, tiebreak)
    sorted_labels = labels[grouped]
    # Position of each row inside its group, then sort by (position, group).
    starts = np.r_[0, np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1]
    sizes = np.diff(np.r_[starts, grouped.shape[0]])
    within = np.arange(grouped.shape[0]) - np.repeat(starts, sizes)
    group_index = np.repeat(np.arange(starts.shape[0]), sizes)
    return grouped[np.lexsort((group_index, within))]


def kmeans_labels(vectors: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of every row (faiss, 20 iterations), for sets without categories and as
    a data-driven counterpart of categories."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n_clusters = max(1, min(n_clusters, x.shape[0] // 39 or 1))
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=20, seed=seed, verbose=False)
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return np.asarray(labels[:, 0], dtype=np.int64)


def make_orderings(
    dataset: Dataset,
    stats: Neighbourhood,
    *,
    seeds: Sequence[int],
    n_clusters: int,
    lid_k: int = DEFAULT_LID_K,
    include: Sequence[str] | None = None,
) -> list[Ordering]:
    """Every ordering of the inserted rows. Random orders use each seed; the others break ties
    (and order rows inside a group) with the seed-0 random order, so they are deterministic."""
    n = dataset.vectors.shape[0]
    tiebreak = np.random.default_rng(0).permutation(n)
    lid = stats.lid[min(lid_k, max(stats.lid))]
    orderings = [
        Ordering("random", seed, np.random.default_rng(seed).permutation(n)) for seed in seeds
    ]
    orderings += [
        Ordering("stored", 0, np.arange(n)),
        Ordering("lid_asc", 0, _ranked(lid, descending=False, tiebreak=tiebreak)),
        Ordering("lid_desc", 0, _ranked(lid, descending=True, tiebreak=tiebreak)),
        Ordering("hubs_first", 0, _ranked(stats.k_occurrence, descending=True, tiebreak=tiebreak)),
        Ordering("hubs_last", 0, _ranked(stats.k_occurrence, descending=False, tiebreak=tiebreak)),
    ]
    if dataset.categories is not None:
        labels = np.unique(dataset.categories, return_inverse=True)[1]
        orderings += [
            Ordering("category_grouped", 0, _grouped(labels, tiebreak)),
            Ordering("category_interleaved", 0, _interleaved(labels, tiebreak)),
        ]
    if n_clusters > 1:
        clusters = kmeans_labels(dataset.vectors, n_clusters)
        orderings += [
            Ordering("cluster_grouped", 0, _grouped(clusters, tiebreak)),
            Ordering("cluster_interleaved", 0, _interleaved(clusters, tiebreak)),
        ]
    if include is not None:
        wanted = set(include)
        orderings = [o for o in orderings if o.name in wanted]
    for ordering in orderings:
        if not np.array_equal(np.sort(ordering.rows), np.arange(n)):
            raise AssertionError(f"ordering {ordering.name} is not a permutation")
    return orderings


# --------------------------------------------------------------------------------------------
# Index builds and searches
# --------------------------------------------------------------------------------------------


def _faiss() -> Any:
    """faiss, untyped: its bundled stubs lag the SWIG API."""
    import faiss

    faiss.omp_set_num_threads(1)  # deterministic builds: one thread inserts in the given order
    return faiss


def faiss_point_levels(n: int, m: int, seed: int) -> np.ndarray:
    """One HNSW level per point, drawn as faiss draws them (P(level ≥ l) = M^-l, i.e.
    mL = 1/ln M, faiss's ``set_default_probas``) but from our own seeded generator and tied to
    the point, not to its insertion position. With these preset, changing the order changes
    nothing else."""
    uniform = 1.0 - np.random.default_rng(seed).random(n)  # (0, 1]
    return np.floor(-np.log(uniform) / math.log(m)).astype(np.int32)


class BuiltIndex:
    """One built graph, searchable at any ef. Ids returned are rows of the dataset."""

    def __init__(self, library: Library, index: Any, position_rows: np.ndarray | None) -> None:
        self.library = library
        self.index = index
        # faiss numbers points by insertion position; map them back to dataset rows.
        self.position_rows = position_rows

    def search(self, queries: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, float, float]:
        """Row ids (Q, k), mean seconds per query, mean distance computations per query (faiss
        only: its hnsw_stats counter; NaN for hnswlib, which does not expose one)."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        if self.library == "hnswlib":
            self.index.set_ef(ef)
            started = time.perf_counter()
            labels, _ = self.index.knn_query(x, k=k, num_threads=1)
            seconds = time.perf_counter() - started
            return labels.astype(np.int64), seconds / len(x), float("nan")
        faiss = _faiss()
        faiss.cvar.hnsw_stats.reset()
        params = faiss.SearchParametersHNSW(efSearch=ef)
        started = time.perf_counter()
        _, positions = self.index.search(x, k, params=params)
        seconds = time.perf_counter() - started
        distance_count = float(faiss.cvar.hnsw_stats.ndis) / len(x)
        assert self.position_rows is not None
        rows = np.where(positions >= 0, self.position_rows[np.maximum(positions, 0)], -1)
        return rows, seconds / len(x), distance_count


def build_index(
    library: Library,
    vectors: np.ndarray,
    rows: np.ndarray,
    *,
    m: int,
    ef_construction: int,
    level_seed: int,
) -> BuiltIndex:
    """Insert ``vectors[rows]`` in that order into a fresh L2 graph, single-threaded.

    L2 throughout: on the normalised real vectors it ranks exactly as inner product (the
    platform's metric), and on synthetic sets it keeps the intrinsic dimension m (normalising
    would put the points on an (m−1)-sphere).

    - ``hnswlib``: ``random_seed=level_seed``; hnswlib draws a level per *insertion*, so the
      level sequence is fixed by position (the paper's control: fix random_seed).
    - ``faiss_seq``: levels preset per *point* (:func:`faiss_point_levels`), then one ``add``
      per point, so the order is really the insertion order and nothing else changes.
    - ``faiss_batch``: the same preset levels and one ``add`` of the whole ordered matrix — what
      a faiss user gets: faiss inserts highest level first and shuffles within a level with a
      fixed generator ("to get rid of dataset order bias"), so the order given reaches the graph
      only through that shuffle.
    """
    x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    n, dim = x.shape
    if library == "hnswlib":
        import hnswlib

        graph = hnswlib.Index(space="l2", dim=dim)
        graph.init_index(
            max_elements=n, M=m, ef_construction=ef_construction, random_seed=level_seed
        )
        graph.add_items(x, rows.astype(np.int64), num_threads=1)
        return BuiltIndex(library, graph, None)
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_L2)
    index.hnsw.efConstruction = ef_construction
    top_level = faiss.vector_to_array(index.hnsw.assign_probas).shape[0] - 1
    levels = np.minimum(faiss_point_levels(vectors.shape[0], m, level_seed), top_level)[rows]
    if library == "faiss_batch":
        # faiss takes preset levels when hnsw.levels already holds one entry (level + 1) per
        # vector being added.
        faiss.copy_array_to_vector((levels + 1).astype(np.int32), index.hnsw.levels)
        index.add(x)
    else:
        for position in range(n):
            index.hnsw.levels.push_back(int(levels[position]) + 1)
            index.add(x[position : position + 1])
    return BuiltIndex(library, index, np.asarray(rows, dtype=np.int64))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-query |ANN_k ∩ KNN_k| / k."""
    k = truth.shape[1]
    return np.array(
        [len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]
    )


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One build under one ordering, searched at every ef."""

    experiment: str
    dataset: str
    library: str
    ordering: str
    order_seed: int
    level_seed: int
    m: int
    ef_construction: int
    build_s: float
    preset: str | None = None
    variant: str | None = None
    intrinsic_dim: int | None = None
    #: {query_set: {ef: {"recall": mean, "query_ms": ..., "distances": ...}}}
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: {query_set: {ef: spearman rho between query LID and per-query recall}}
    lid_recall_spearman: dict[str, dict[str, float]] = field(default_factory=dict)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    mask = ~(np.isnan(a) | np.isnan(b))
    if mask.sum() < 3 or np.ptp(a[mask]) == 0 or np.ptp(b[mask]) == 0:
        return float("nan")
    return float(stats.spearmanr(a[mask], b[mask]).statistic)


def measure(
    built: BuiltIndex, dataset: Dataset, stats: Neighbourhood, ef_values: Sequence[int]
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """Recall@10 (mean), time and distance computations per query at each ef, and the Spearman
    correlation of query LID with per-query recall."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    correlations: dict[str, dict[str, float]] = {}
    for name, queries in dataset.queries.items():
        results[name], correlations[name] = {}, {}
        for ef in ef_values:
            found, seconds, distances = built.search(queries, RECALL_K, ef)
            per_query = recall_at_k(found, stats.truth[name])
            results[name][str(ef)] = {
                "recall": float(per_query.mean()),
                "query_ms": seconds * 1000.0,
                "distances": distances,
            }
            correlations[name][str(ef)] = spearman(stats.query_lid[name], per_query)
    return results, correlations


def lid_summary(dataset: Dataset, stats: Neighbourhood) -> dict[str, Any]:
    """Mean/median/quartiles of LID at each k and the rank agreement of the k's orderings."""
    per_k: dict[str, dict[str, float]] = {}
    for k, values in stats.lid.items():
        finite = values[np.isfinite(values)]
        per_k[str(k)] = {
            "mean": float(finite.mean()),
            "median": float(np.median(finite)),
            "p25": float(np.percentile(finite, 25)),
            "p75": float(np.percentile(finite, 75)),
            "undefined": int((~np.isfinite(values)).sum()),
            "spearman_vs_k20": spearman(values, stats.lid[min(DEFAULT_LID_K, max(stats.lid))]),
        }
    return {
        "dataset": dataset.name,
        "description": dataset.description,
        "n": int(dataset.vectors.shape[0]),
        "dim": int(dataset.vectors.shape[1]),
        "intrinsic_dim": dataset.intrinsic_dim,
        "queries": {name: int(q.shape[0]) for name, q in dataset.queries.items()},
        "lid": per_k,
        "query_lid_median": {
            name: float(np.nanmedian(values)) for name, values in stats.query_lid.items()
        },
        "lid_histogram_k20": np.histogram(
            np.clip(stats.lid[min(DEFAULT_LID_K, max(stats.lid))], 0, 60), bins=30, range=(0, 60)
        )[0].tolist(),
        "k_occurrence_max": int(stats.k_occurrence.max()),
    }


@dataclass
class ExperimentConfig:
    data: list[str]
    out: Path
    data_dir: Path
    libraries: list[Library] = field(default_factory=lambda: list(LIBRARIES))
    seeds: int = 5
    ef_search: list[int] = field(default_factory=lambda: list(DEFAULT_EF_SWEEP))
    synthetic_dims: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128])
    synthetic_n: int = 5000
    synthetic_queries: int = 300
    synthetic_noise: float = 1e-3
    synthetic_seeds: int = 3
    synthetic_libraries: list[Library] = field(default_factory=lambda: ["hnswlib", "faiss_seq"])
    clusters: int = 12
    level_seeds: int = 4
    """Extra hnswlib builds of the stored order with level seeds 2..n+1: the spread that level
    assignment alone causes, beside the spread of the random orders."""
    presets: list[str] = field(default_factory=lambda: [p.name for p in PRESETS])
    preset_data: list[str] = field(default_factory=lambda: ["scifact"])
    preset_seeds: int = 3
    ranking: bool = True
    ranking_variants: list[str] = field(
        default_factory=lambda: ["full", "pca128", "pca64", "pca32", "trunc192", "trunc96"]
    )
    limit: int | None = None
    """Keep only the first N inserted vectors and 100 queries per set (smoke runs, tests)."""
    resume: bool = False
    """Keep the datasets an earlier run into the same ``out`` finished; run only the rest."""
    main_m: int = MAIN_M
    main_ef_construction: int = MAIN_EF_CONSTRUCTION


def _limited(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None:
        return dataset
    return Dataset(
        name=dataset.name,
        vectors=dataset.vectors[:limit],
        queries={name: q[:100] for name, q in dataset.queries.items()},
        categories=None if dataset.categories is None else dataset.categories[:limit],
        description=f"{dataset.description} (limited to the first {limit} vectors, 100 queries)",
        intrinsic_dim=dataset.intrinsic_dim,
    )


class Progress:
    """One tqdm bar per stage; quiet when ``enabled`` is False (tests)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, total: int, description: str, unit: str = "build") -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit=unit, disable=not self.enabled, leave=True)


def _order_runs(
    config: ExperimentConfig,
    dataset: Dataset,
    stats: Neighbourhood,
    orderings: Sequence[Ordering],
    libraries: Sequence[Library],
    progress: Progress,
    *,
    experiment: str,
    m: int,
    ef_construction: int,
    preset: str | None = None,
    level_seeds: Sequence[int] = (0,),
    ef_values: Sequence[int] | None = None,
) -> Iterator[RunRecord]:
    ef_values = config.ef_search if ef_values is None else ef_values
    jobs = [(lib, o, s) for lib in libraries for o in orderings for s in level_seeds]
    with progress.bar(len(jobs), f"{dataset.name} {experiment} M{m} efC{ef_construction}") as bar:
        for library, ordering, level_seed in jobs:
            started = time.perf_counter()
            built = build_index(
                library,
                dataset.vectors,
                ordering.rows,
                m=m,
                ef_construction=ef_construction,
                level_seed=level_seed,
            )
            build_s = time.perf_counter() - started
            results, correlations = measure(built, dataset, stats, ef_values)
            bar.update(1)
            yield RunRecord(
                experiment=experiment,
                dataset=dataset.name,
                library=library,
                ordering=ordering.name,
                order_seed=ordering.seed,
                level_seed=level_seed,
                m=m,
                ef_construction=ef_construction,
                build_s=build_s,
                preset=preset,
                intrinsic_dim=dataset.intrinsic_dim,
                results=results,
                lid_recall_spearman=correlations,
            )


def run_experiment(config: ExperimentConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the suite, writing ``runs.json`` after every dataset so a stopped run keeps what it
    measured. Returns the payload (also what the report reads)."""
    import hnswlib

    config.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(show_progress)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "hnswlib": getattr(hnswlib, "__version__", "0.8.0"),
            "faiss": _faiss().__version__,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "presets": [asdict(p) for p in PRESETS],
        "datasets": [],
        "runs": [],
        "ranking": None,
        "completed": [],
        "sessions": [],
    }
    previous = config.out / "runs.json"
    if config.resume and previous.exists():
        # Keep what a stopped or staged run finished; a dataset it left half done is redone.
        kept = json.loads(previous.read_text(encoding="utf-8"))
        done = set(kept.get("completed", []))
        payload["started"] = kept["started"]
        payload["sessions"] = kept.get("sessions", [])
        payload["completed"] = sorted(done)
        payload["datasets"] = [d for d in kept["datasets"] if d["dataset"] in done]
        payload["runs"] = [r for r in kept["runs"] if r["dataset"] in done]
        payload["ranking"] = kept.get("ranking")
    payload["sessions"].append(
        {"started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info()}
    )

    def save() -> None:
        payload["sessions"][-1]["seconds"] = time.perf_counter() - started
        payload["seconds"] = sum(session.get("seconds", 0.0) for session in payload["sessions"])
        write_json(config.out / "runs.json", payload)

    def order_suite(
        dataset: Dataset,
        libraries: Sequence[Library],
        seeds: int,
        include: Sequence[str] | None,
        *,
        presets: bool,
        level_spread: bool,
    ) -> None:
        dataset = _limited(dataset, config.limit)
        if dataset.name in payload["completed"]:
            return
        # A dataset that gets the preset builds is also searched at every preset's own
        # ef_search (Elasticsearch's 15, Marqo's 2000), on the main build too.
        ef_values = sorted(
            set(config.ef_search)
            | ({p.ef_search for p in PRESETS if p.name in config.presets} if presets else set())
        )
        with progress.bar(
            dataset.vectors.shape[0], f"{dataset.name} exact kNN + LID", "row"
        ) as bar:
            stats = neighbourhood(dataset, progress=bar.update)
        payload["datasets"].append(lid_summary(dataset, stats))
        orderings = make_orderings(
            dataset, stats, seeds=range(seeds), n_clusters=config.clusters, include=include
        )
        for library in libraries:
            subset = [
                o for o in orderings if library != "faiss_batch" or o.name in FAISS_BATCH_ORDERINGS
            ]
            for record in _order_runs(
                config,
                dataset,
                stats,
                subset,
                [library],
                progress,
                experiment="order",
                m=config.main_m,
                ef_construction=config.main_ef_construction,
                ef_values=ef_values,
            ):
                payload["runs"].append(asdict(record))
            save()
        if level_spread and config.level_seeds > 0 and "hnswlib" in libraries:
            stored = [o for o in orderings if o.name == "stored"]
            for record in _order_runs(
                config,
                dataset,
                stats,
                stored,
                ["hnswlib"],
                progress,
                experiment="level_seed",
                m=config.main_m,
                ef_construction=config.main_ef_construction,
                # Seeds from 2: hnswlib's std::minstd_rand0 treats seed 0 as 1, so seed 1 would
                # repeat the main build's levels exactly.
                level_seeds=range(2, config.level_seeds + 2),
                ef_values=ef_values,
            ):
                payload["runs"].append(asdict(record))
        save()
        if presets:
            preset_orderings = [
                o
                for o in orderings
                if (o.name == "random" and o.seed < config.preset_seeds)
                or o.name in ("lid_asc", "lid_desc")
            ]
            builds = sorted(
                {(p.m, p.ef_construction) for p in PRESETS if p.name in config.presets}
                - {(config.main_m, config.main_ef_construction)}
            )
            for m, ef_construction in builds:
                names = ",".join(
                    p.name for p in PRESETS if (p.m, p.ef_construction) == (m, ef_construction)
                )
                for record in _order_runs(
                    config,
                    dataset,
                    stats,
                    preset_orderings,
                    ["hnswlib"],
                    progress,
                    experiment="preset",
                    m=m,
                    ef_construction=ef_construction,
                    preset=names,
                    ef_values=ef_values,
                ):
                    payload["runs"].append(asdict(record))
                save()
        payload["completed"].append(dataset.name)
        save()

    def real_data_suite(dataset: Dataset, name: str) -> None:
        """Measured (not synthetic) data: every library, ordering and seed, the level spread,
        and the presets when ``preset_data`` names it."""
        order_suite(
            dataset,
            config.libraries,
            config.seeds,
            None,
            presets=name in config.preset_data,
            level_spread=True,
        )

    scifact: SciFactData | None = None
    for name in config.data:
        if name == "wiki" and "wiki" in payload["completed"]:
            continue
        if name == "wiki":
            real_data_suite(load_wiki(config.data_dir), name)
        elif name == "scifact":
            if "scifact" in payload["completed"] and payload["ranking"] is not None:
                continue
            scifact = load_scifact_vectors(config.data_dir)
            real_data_suite(scifact.dataset, name)
        elif name == "synthetic":
            for m in config.synthetic_dims:
                synthetic = synthetic_dataset(
                    m,
                    n=config.synthetic_n,
                    n_queries=config.synthetic_queries,
                    noise=config.synthetic_noise,
                )
                order_suite(
                    synthetic,
                    config.synthetic_libraries,
                    config.synthetic_seeds,
                    ["random", "lid_asc", "lid_desc", "hubs_first"],
                    presets=False,
                    level_spread=False,
                )
        elif name.endswith(".npy"):
            real_data_suite(npy_dataset(Path(name)), name)
        else:
            raise ValueError(
                f"unknown data {name!r}: wiki, scifact, synthetic or a path to a .npy file"
            )
    if config.ranking and scifact is not None and payload["ranking"] is None:
        payload["ranking"] = run_ranking_shift(scifact, config, progress)
    save()
    return payload


# --------------------------------------------------------------------------------------------
# Ranking shift (SciFact nDCG@10 of embedding variants, exact against HNSW)
# --------------------------------------------------------------------------------------------


def embedding_variant(
    name: str, corpus: np.ndarray, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A cheaper version of the MiniLM vectors, re-normalised (cosine as L2):

    - ``full``: the 384-d vectors;
    - ``pcaD``: projection onto the corpus's top D principal axes (fitted on the corpus, the
      usual offline dimension reduction);
    - ``truncD``: the first D coordinates (what Matryoshka-style truncation does; MiniLM was not
      trained for it, so it is the crude variant).
    """
    if name == "full":
        reduced_corpus, reduced_queries = corpus, queries
    elif name.startswith("pca"):
        dim = int(name[3:])
        mean = corpus.mean(axis=0)
        _, _, axes = np.linalg.svd(corpus - mean, full_matrices=False)
        reduced_corpus = (corpus - mean) @ axes[:dim].T
        reduced_queries = (queries - mean) @ axes[:dim].T
    elif name.startswith("trunc"):
        dim = int(name[5:])
        reduced_corpus, reduced_queries = corpus[:, :dim], queries[:, :dim]
    else:
        raise ValueError(f"unknown embedding variant {name!r}")

    def normalised(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)

    return normalised(reduced_corpus), normalised(reduced_queries)


#: Passages retrieved per query, then aggregated to documents by their best passage. Kept at
#: k = 10 so that a preset's small ef_search is really what the search runs with (hnswlib and
#: faiss search with max(ef, k)); SciFact has 5,183 abstracts in ~5.2k passages, so 10
#: passages are ~10 documents.
RANKING_PASSAGES = 10


def _document_run(
    passage_rows: np.ndarray,
    passage_scores: np.ndarray,
    passage_doc_ids: Sequence[str],
    query_ids: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Max-passage document scores (the engine's rule), top 10 documents per query."""
    run: dict[str, dict[str, float]] = {}
    for qid, rows, scores in zip(query_ids, passage_rows, passage_scores, strict=True):
        best: dict[str, float] = {}
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
            if row < 0:
                continue
            doc = passage_doc_ids[row]
            if doc not in best or score > best[doc]:
                best[doc] = score
        run[qid] = dict(sorted(best.items(), key=lambda item: -item[1])[:10])
    return run


def run_ranking_shift(
    data: SciFactData, config: ExperimentConfig, progress: Progress
) -> dict[str, Any]:
    """nDCG@10 on SciFact test of each embedding variant under exact search and under hnswlib
    built and searched with each preset (random insertion order, seed 0, level seed 0)."""
    from shared.metrics import evaluate_run

    dataset = data.dataset
    test_rows = np.array([data.query_ids.index(qid) for qid in data.test_query_ids])
    query_vectors = dataset.queries["claims"][test_rows]
    presets = [p for p in PRESETS if p.name in config.presets]
    build_keys = sorted({(p.m, p.ef_construction) for p in presets})
    order = np.random.default_rng(0).permutation(dataset.vectors.shape[0])
    ndcg: dict[str, dict[str, float]] = {}
    recall: dict[str, dict[str, float]] = {}
    jobs = len(config.ranking_variants) * len(build_keys)
    with progress.bar(jobs, "scifact ranking shift") as bar:
        for variant in config.ranking_variants:
            corpus, queries = embedding_variant(variant, dataset.vectors, query_vectors)
            distances, rows = exact_knn(corpus, queries, RANKING_PASSAGES)
            # On unit vectors ‖q − x‖² = 2 − 2 q·x: report cosine-equivalent scores.
            exact_run = _document_run(
                rows, 1.0 - distances**2 / 2.0, data.passage_doc_ids, data.test_query_ids
            )
            ndcg[variant] = {"exact": evaluate_run(exact_run, data.test_qrels).mean["ndcg@10"]}
            recall[variant] = {}
            for m, ef_construction in build_keys:
                built = build_index(
                    "hnswlib", corpus, order, m=m, ef_construction=ef_construction, level_seed=0
                )
                for preset in presets:
                    if (preset.m, preset.ef_construction) != (m, ef_construction):
                        continue
                    found, _, _ = built.search(queries, RANKING_PASSAGES, preset.ef_search)
                    found_sq = ((queries[:, None, :] - corpus[np.maximum(found, 0)]) ** 2).sum(
                        axis=2
                    )
                    scores = np.where(found >= 0, 1.0 - found_sq / 2.0, -np.inf)
                    run = _document_run(found, scores, data.passage_doc_ids, data.test_query_ids)
                    ndcg[variant][preset.name] = evaluate_run(run, data.test_qrels).mean["ndcg@10"]
                    recall[variant][preset.name] = float(
                        recall_at_k(found[:, :RECALL_K], rows[:, :RECALL_K]).mean()
                    )
                bar.update(1)
    columns = ["exact", *(p.name for p in presets)]
    ranks: dict[str, dict[str, int]] = {}
    for column in columns:
        best_first = sorted(ndcg, key=lambda variant: -ndcg[variant][column])
        ranks[column] = {variant: rank for rank, variant in enumerate(best_first, start=1)}
    return {
        "variants": config.ranking_variants,
        "queries": len(data.test_query_ids),
        "ndcg@10": ndcg,
        "recall@10_vs_exact": recall,
        "rank": ranks,
        "max_rank_shift": {
            column: max(abs(ranks[column][v] - ranks["exact"][v]) for v in ndcg)
            for column in columns
        },
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_hnsw_order(args: argparse.Namespace, settings: Any) -> int:
    from lodestar.experiments.hnsw_order_report import write_report

    out = Path(args.out)
    if args.report_only:
        payload = json.loads((out / "runs.json").read_text(encoding="utf-8"))
    else:
        libraries: list[Library] = []
        for name in _str_list(args.libraries):
            if name not in LIBRARIES:
                raise SystemExit(f"unknown library {name!r}; choose from {', '.join(LIBRARIES)}")
            libraries.append(name)  # type: ignore[arg-type]
        config = ExperimentConfig(
            data=_str_list(args.data),
            out=out,
            data_dir=Path(args.data_dir) if args.data_dir else Path(settings.data_dir),
            libraries=libraries,
            seeds=args.seeds,
            ef_search=_int_list(args.ef_search),
            synthetic_dims=_int_list(args.synthetic_dims),
            synthetic_n=args.synthetic_n,
            synthetic_noise=args.synthetic_noise,
            synthetic_seeds=args.synthetic_seeds,
            level_seeds=args.level_seeds,
            presets=_str_list(args.presets),
            preset_data=_str_list(args.preset_data),
            preset_seeds=args.preset_seeds,
            ranking=not args.no_ranking,
            limit=args.limit,
            resume=args.resume,
        )
        payload = run_experiment(config)
    report = write_report(payload, out)
    print(f"wrote {out / 'runs.json'} and {report}")
    return 0


def register(experiment_sub: Any) -> None:
    """Add ``hnsw-order`` to the ``lodestar experiment`` group."""
    parser = experiment_sub.add_parser(
        "hnsw-order",
        help="HNSW recall under insertion orders, intrinsic dimension and DB presets (Elliott & Clark 2024)",
    )
    parser.add_argument(
        "--data",
        default="wiki,scifact,synthetic",
        help="comma list: wiki, scifact, synthetic, or .npy paths",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/hnsw-order",
        help="output folder (runs.json, report.md, PNGs)",
    )
    parser.add_argument(
        "--data-dir",
        help="Lodestar data dir holding (or to hold) the wiki / eval-scifact collections; default LODESTAR_DATA_DIR",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help="hnswlib, faiss_seq (point-by-point), faiss_batch (one add call)",
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="random insertion orders per real dataset"
    )
    parser.add_argument(
        "--ef-search",
        default=",".join(map(str, DEFAULT_EF_SWEEP)),
        help="ef_search values measured on every build",
    )
    parser.add_argument(
        "--synthetic-dims", default="2,4,8,16,32,64,128", help="intrinsic dimensions m"
    )
    parser.add_argument("--synthetic-n", type=int, default=5000, help="points per synthetic set")
    parser.add_argument("--synthetic-noise", type=float, default=1e-3, help="isotropic noise σ")
    parser.add_argument(
        "--synthetic-seeds", type=int, default=3, help="random orders per synthetic set"
    )
    parser.add_argument(
        "--level-seeds",
        type=int,
        default=4,
        help="extra hnswlib level seeds (stored order) for the level-only spread",
    )
    parser.add_argument(
        "--presets", default=",".join(p.name for p in PRESETS), help="vector-DB presets"
    )
    parser.add_argument(
        "--preset-data", default="scifact", help="datasets that get the preset builds"
    )
    parser.add_argument(
        "--preset-seeds", type=int, default=3, help="random orders per preset build"
    )
    parser.add_argument(
        "--no-ranking", action="store_true", help="skip the SciFact ranking-shift study"
    )
    parser.add_argument("--limit", type=int, help="first N vectors only (smoke runs)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the datasets finished by an earlier run into --out; run the rest",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md and plots from runs.json"
    )
    parser.set_defaults(handler=cmd_hnsw_order)
