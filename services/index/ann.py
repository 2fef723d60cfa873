"""Approximate nearest-neighbour backends over a collection's passage vectors (CompactDS stage 1).

Every backend maps a query to candidate *row ids* of ``embeddings.f32``; the engine then re-scores
those rows exactly from the memory-mapped full-precision vectors (stage 2). The ANN scores are
never used for the final ranking, so a PQ code's quantisation error can cost recall (a true
neighbour missing from the K candidates) but never distort a returned score.

Backends (all inner product on normalised vectors):

- ``flat``: no ANN index; the engine searches every row exactly (the baseline);
- ``ivfpq``: faiss ``IVF{nlist},PQ{m}x{bits}``; in RAM only N·(m + 8) bytes of codes and ids;
- ``faiss_hnsw``: faiss ``IndexHNSWFlat`` (its graph holds a full fp32 copy of the vectors);
- ``hnswlib``: hnswlib ``space='ip'`` (ditto).

faiss's and hnswlib's *search* defaults (nprobe 1, efSearch 16, ef 10) give low recall, so every
search passes nprobe / ef explicitly. Indexes are immutable once built: incremental rows live in
the engine's exact "fresh segment" until a merge rebuilds the index, so no index is ever inserted
into while it is searched (hnswlib is not safe for that).
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from shared.errors import invalid

logger = logging.getLogger(__name__)

Backend = Literal["flat", "ivfpq", "faiss_hnsw", "hnswlib"]
BACKENDS: tuple[Backend, ...] = ("flat", "ivfpq", "faiss_hnsw", "hnswlib")
#: The ANN index file inside a version directory.
ANN_FILE = "ann.index"
#: Rows read from the memmap per block while training/adding (bounds build memory).
BLOCK_ROWS = 65536


@dataclass(frozen=True)
class AnnConfig:
    """A collection's dense-search configuration, recorded in every version's manifest."""

    backend: Backend = "ivfpq"
    candidates: int = 1000
    """K: passage rows the ANN hands to exact re-scoring (CompactDS: 1000 ≫ k)."""
    min_passages: int = 20000
    """Below this many passages the collection stays flat: exact search is then a few ms."""
    nlist: int | None = None
    """IVF lists; None means 4·√N, capped at N/39 (faiss wants ≥ 39 training points per list)."""
    pq_m: int = 48
    """PQ sub-quantizers; must divide the dimension (384 = 48·8 = 96·4)."""
    pq_bits: int = 8
    nprobe: int = 256
    """IVF lists visited (the settings' default says how it was chosen)."""
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 128
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnnConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validated()

    def with_overrides(self, **overrides: Any) -> AnnConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self, dim: int = 384) -> AnnConfig:
        if self.backend not in BACKENDS:
            raise invalid(
                f"unknown ANN backend {self.backend!r}; available: {', '.join(BACKENDS)}",
                field="backend",
            )
        positive = ("candidates", "pq_bits", "nprobe", "hnsw_m", "ef_construction", "ef_search")
        for name in positive:
            if getattr(self, name) < 1:
                raise invalid(f"{name} must be >= 1", field=name)
        if self.min_passages < 0 or (self.nlist is not None and self.nlist < 1):
            raise invalid("min_passages must be >= 0 and nlist >= 1", field="nlist")
        if self.pq_m < 1 or dim % self.pq_m:
            raise invalid(f"pq_m must divide the dimension {dim}", field="pq_m")
        return self

    def resolved_nlist(self, n: int) -> int:
        if self.nlist is not None:
            return max(1, min(self.nlist, n // 39 or 1))
        return max(1, min(round(4 * math.sqrt(n)), n // 39 or 1))

    @classmethod
    def from_settings(cls, settings: Any) -> AnnConfig:
        """The default configuration of new collections (``LODESTAR_INDEX_*``)."""
        return cls(
            backend=settings.index_ann_backend,
            candidates=settings.index_candidates,
            min_passages=settings.index_ann_min_passages,
            nprobe=settings.index_nprobe,
            ef_search=settings.index_ef_search,
        ).validated()

    def label(self) -> str:
        return "flat" if self.backend == "flat" else f"{self.backend}+exact"


class AnnIndex(Protocol):
    backend: str
    ntotal: int

    def search(
        self, queries: np.ndarray, n: int, *, nprobe: int | None, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ANN scores and row ids (``-1`` where fewer than n were found), each (len(queries), n)."""
        ...

    def save(self, path: Path) -> None: ...


def _faiss() -> Any:
    """faiss, untyped: its bundled stubs lag the SWIG API (``SearchParametersHNSW`` etc.)."""
    import faiss

    return faiss


def _blocks(vectors: np.ndarray) -> Any:
    for start in range(0, vectors.shape[0], BLOCK_ROWS):
        yield start, np.ascontiguousarray(vectors[start : start + BLOCK_ROWS], dtype=np.float32)


def gpu_count(device: str) -> int:
    """GPUs faiss may use under ``LODESTAR_DEVICE`` (0 with faiss-cpu or device=cpu)."""
    if device == "cpu":
        return 0
    faiss = _faiss()

    count = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and count == 0:
        logger.warning("LODESTAR_DEVICE=cuda but faiss sees no GPU; ANN search runs on the CPU")
    return count


class FaissAnn:
    """A faiss IVF-PQ or HNSW-Flat index. Per-request nprobe/efSearch go through
    ``SearchParameters`` so concurrent searches never mutate shared index state."""

    def __init__(self, backend: str, index: Any, config: AnnConfig, device: str = "cpu") -> None:
        faiss = _faiss()

        self.backend = backend
        self.config = config
        self.cpu_index = index
        self.ntotal = int(index.ntotal)
        self.nlist = int(faiss.extract_index_ivf(index).nlist) if backend == "ivfpq" else 0
        self.index = index
        self.on_gpu = False
        self._gpu_lock = threading.Lock()
        # GPU path (UNTESTED here: no GPU in the development machine). faiss has no GPU HNSW.
        if backend == "ivfpq" and gpu_count(device) > 0:
            self.index = faiss.index_cpu_to_all_gpus(index)
            self.on_gpu = True

    def search(
        self, queries: np.ndarray, n: int, *, nprobe: int | None, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()

        x = np.ascontiguousarray(queries, dtype=np.float32)
        n = min(n, self.ntotal)
        if self.backend == "ivfpq":
            probe = min(nprobe or self.config.nprobe, self.nlist)
            if self.on_gpu:
                # GPU replicas take nprobe as index state, so set-and-search under a lock.
                with self._gpu_lock:
                    faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", probe)
                    scores, ids = self.index.search(x, n)
            else:
                params = faiss.SearchParametersIVF(nprobe=probe)
                scores, ids = self.index.search(x, n, params=params)
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.config.ef_search, n))
            scores, ids = self.index.search(x, n, params=params)
        return scores, ids

    def save(self, path: Path) -> None:
        faiss = _faiss()

        faiss.write_index(self.cpu_index, str(path))

    def memory_bytes(self) -> int:
        """Serialised size, a close proxy of the resident size of a faiss index."""
        faiss = _faiss()

        return int(faiss.serialize_index(self.cpu_index).nbytes)


class HnswlibAnn:
    """hnswlib's HNSW. ``set_ef`` is index-global, so setting ef and querying run under one lock
    (hnswlib searches of one index are serialised; faiss's are not)."""

    backend = "hnswlib"

    def __init__(self, index: Any, config: AnnConfig) -> None:
        self.index = index
        self.config = config
        self.ntotal = int(index.get_current_count())
        self._lock = threading.Lock()
        self.index.set_ef(config.ef_search)

    def search(
        self, queries: np.ndarray, n: int, *, nprobe: int | None, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(queries, dtype=np.float32)
        n = min(n, self.ntotal)
        # hnswlib searches with max(ef, n), so ef only matters when above the candidate count.
        with self._lock:
            self.index.set_ef(ef_search or self.config.ef_search)
            labels, distances = self.index.knn_query(x, k=n, num_threads=1)
        return (1.0 - distances).astype(np.float32), labels.astype(np.int64)

    def save(self, path: Path) -> None:
        self.index.save_index(str(path))


def build_ann(config: AnnConfig, vectors: np.ndarray, device: str = "cpu") -> AnnIndex:
    """Build the configured index over every row of ``vectors`` (a memmap is read in blocks)."""
    faiss = _faiss()

    n, dim = vectors.shape
    rng = np.random.default_rng(config.seed)
    if config.backend == "ivfpq":
        nlist = config.resolved_nlist(n)
        # Train on a sorted random sample (sequential reads): 40 points per list (faiss warns
        # below 39), at least 10k for the PQ codebooks.
        size = min(n, max(40 * nlist, 10_000))
        # A PQ codebook of 2^bits centroids needs that many training points (tiny collections).
        bits = min(config.pq_bits, max(1, int(math.log2(size))))
        # "np": no polysemous training (index_factory's default for IVF-PQ, minutes of simulated
        # annealing for a Hamming pre-filter the exact re-scoring stage makes pointless).
        index = faiss.index_factory(
            dim, f"IVF{nlist},PQ{config.pq_m}x{bits}np", faiss.METRIC_INNER_PRODUCT
        )
        sample = np.sort(rng.choice(n, size=size, replace=False))
        train = np.ascontiguousarray(vectors[sample], dtype=np.float32)
        if gpu_count(device) > 0:  # UNTESTED: train the coarse quantizer on the GPU
            clustering = faiss.Clustering(dim, nlist)
            clustering.seed = config.seed
            gpu_quantizer = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
            clustering.train(train, gpu_quantizer)
            faiss.extract_index_ivf(index).quantizer.add(
                faiss.vector_to_array(clustering.centroids).reshape(nlist, dim)
            )
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = config.seed
        ivf.cp.niter = 15
        # 64 points per PQ centroid (16k per sub-quantizer) trains the codebooks in seconds; the
        # codes only pick candidates, exact re-scoring decides the ranking.
        faiss.downcast_index(index).pq.cp.max_points_per_centroid = 64
        index.train(train)
        for _, block in _blocks(vectors):
            index.add(block)
        return FaissAnn("ivfpq", index, config, device)
    if config.backend == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        for _, block in _blocks(vectors):
            index.add(block)
        return FaissAnn("faiss_hnsw", index, config, device)
    if config.backend == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(
            max_elements=max(n, 1),
            ef_construction=config.ef_construction,
            M=config.hnsw_m,
            random_seed=config.seed,
        )
        for start, block in _blocks(vectors):
            index.add_items(block, np.arange(start, start + block.shape[0]))
        return HnswlibAnn(index, config)
    raise invalid(f"backend {config.backend!r} has no ANN index", field="backend")


def load_ann(config: AnnConfig, path: Path, dim: int, device: str = "cpu") -> AnnIndex:
    """The index at ``path``, shared while any snapshot holds it: an index file is immutable
    and hard-linked into every later version until a merge, so a write's new version reuses
    the loaded one instead of reading it again."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, config, dim, device)
    with _LOADED_LOCK:
        cached = _LOADED.get(key)
    if cached is not None:
        return cached
    loaded = _read_ann(config, path, dim, device)
    with _LOADED_LOCK:
        return _LOADED.setdefault(key, loaded)


_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], AnnIndex] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def _read_ann(config: AnnConfig, path: Path, dim: int, device: str) -> AnnIndex:
    if config.backend == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.load_index(str(path))
        return HnswlibAnn(index, config)
    faiss = _faiss()

    return FaissAnn(config.backend, faiss.read_index(str(path)), config, device)


def ann_memory_bytes(index: AnnIndex, path: Path | None = None) -> int:
    """Bytes the index holds in RAM (faiss: its serialised size; hnswlib: its file size)."""
    if isinstance(index, FaissAnn):
        return index.memory_bytes()
    if path is not None and path.exists():
        return int(path.stat().st_size)
    return 0


__all__ = [
    "ANN_FILE",
    "BACKENDS",
    "AnnConfig",
    "AnnIndex",
    "Backend",
    "FaissAnn",
    "HnswlibAnn",
    "ann_memory_bytes",
    "build_ann",
    "gpu_count",
    "load_ann",
]
