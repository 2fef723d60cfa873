"""Exact nearest neighbours and pointwise local intrinsic dimensionality (LID).

The MLE estimator of Levina and Bickel (2004) in the form Amsaleg et al. (2015) use:
for a point with k nearest-neighbour distances r_1 ≤ … ≤ r_k (itself excluded),

    LID = − [ (1/k) Σ_{i=1..k} ln(r_i / r_k) ]^{-1}

Neighbours are exact (blocked brute force), never taken from an ANN index: an ANN's misses would
bias the distances, and the experiment measures exactly those misses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Query rows per block of the brute-force search: a (block × N) float64 distance matrix
#: (1024 × 10k = 80 MB) bounds memory whatever N is.
KNN_BLOCK_ROWS = 1024


def exact_knn(
    base: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    *,
    block_rows: int = KNN_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and row ids of the k nearest rows of ``base``, ascending.

    ``queries=None`` searches ``base`` against itself and leaves each row out of its own list
    (by row id, not by distance: an exact duplicate stays a neighbour at distance 0, which the
    LID estimator then guards against). Distances are computed in float64 from
    ‖q‖² + ‖x‖² − 2 q·x, so near-duplicates do not cancel to garbage in float32.
    ``progress`` is called with the number of query rows finished in each block.
    """
    points = np.asarray(base, dtype=np.float64)
    self_search = queries is None
    asked = points if queries is None else np.asarray(queries, dtype=np.float64)
    n = points.shape[0]
    limit = n - 1 if self_search else n
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, {limit}] for {n} base rows, got {k}")
    base_sq = np.einsum("ij,ij->i", points, points)
    distances = np.empty((asked.shape[0], k), dtype=np.float64)
    ids = np.empty((asked.shape[0], k), dtype=np.int64)
    for start in range(0, asked.shape[0], block_rows):
        block = asked[start : start + block_rows]
        squared = base_sq[None, :] - 2.0 * (block @ points.T)
        squared += np.einsum("ij,ij->i", block, block)[:, None]
        np.maximum(squared, 0.0, out=squared)
        rows = np.arange(block.shape[0])
        if self_search:
            squared[rows, start + rows] = np.inf
        nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
        nearest_sq = np.take_along_axis(squared, nearest, axis=1)
        # Sort by (distance, id) so ties resolve the same way in every run.
        rank = np.lexsort((nearest, nearest_sq), axis=1)
        ids[start : start + block.shape[0]] = np.take_along_axis(nearest, rank, axis=1)
        distances[start : start + block.shape[0]] = np.sqrt(
            np.take_along_axis(nearest_sq, rank, axis=1)
        )
        if progress is not None:
            progress(block.shape[0])
    return distances, ids


def mle_lid(distances: np.ndarray) -> np.ndarray:
    """Pointwise MLE LID from each row's ascending neighbour distances (n, k), self excluded.

    Guard against duplicates: a zero distance has an infinite log ratio, so zero distances are
    left out of the average (the estimate then rests on the remaining neighbours). A row whose
    k-th distance is 0 (k exact duplicates), or whose neighbours are all equidistant, has no
    defined estimate and gets NaN; callers decide how to place such rows.
    """
    radii = np.asarray(distances, dtype=np.float64)
    if radii.ndim != 2 or radii.shape[1] < 2:
        raise ValueError("distances must be (n, k) with k >= 2")
    outer = radii[:, -1:]
    positive = radii > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratios = np.where(positive, np.log(np.where(positive, radii, 1.0) / outer), 0.0)
    used = positive.sum(axis=1)
    mean_log = log_ratios.sum(axis=1) / np.maximum(used, 1)
    with np.errstate(divide="ignore"):
        return np.where((outer[:, 0] > 0) & (mean_log < 0), -1.0 / mean_log, np.nan)


def lid_for_ks(distances: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """LID at several neighbourhood sizes from one exact search with k = max(ks): the first
    k columns of a sorted k_max list are exactly the k nearest, so no search is repeated."""
    width = distances.shape[1]
    for k in ks:
        if not 2 <= k <= width:
            raise ValueError(f"k={k} needs 2 <= k <= {width} neighbour columns")
    return {k: mle_lid(distances[:, :k]) for k in ks}


def k_occurrence(neighbour_ids: np.ndarray, n: int, k: int) -> np.ndarray:
    """How often each row appears in the other rows' k-NN lists (hubness, N_k)."""
    return np.bincount(neighbour_ids[:, :k].ravel(), minlength=n)
