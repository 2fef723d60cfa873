"""The LID estimator, exact neighbours and orderings of the HNSW insertion-order experiment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lodestar.experiments.hnsw_order import (
    Dataset,
    faiss_point_levels,
    make_orderings,
    neighbourhood,
    recall_at_k,
    synthetic_dataset,
)
from lodestar.experiments.lid import exact_knn, k_occurrence, lid_for_ks, mle_lid


def _subspace_points(n: int, m: int, ambient: int, seed: int) -> np.ndarray:
    """Gaussian points on a random m-dimensional linear subspace of R^ambient (no noise)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((ambient, m)))
    return (rng.standard_normal((n, m)) @ basis.T).astype(np.float32)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_lid_of_a_linear_subspace_is_near_its_dimension(m: int) -> None:
    points = _subspace_points(3000, m, 64, seed=m)
    distances, _ = exact_knn(points, None, 20)
    estimate = float(np.median(mle_lid(distances)))
    # The MLE is consistent; at k = 20 on 3,000 points it lands within ~20% of m.
    assert 0.8 * m <= estimate <= 1.25 * m, estimate


def test_lid_grows_with_intrinsic_dimension_at_fixed_ambient_dimension() -> None:
    medians = []
    for m in (2, 8, 32):
        data = synthetic_dataset(m, n=1500, n_queries=10, dim=96, noise=0.0)
        distances, _ = exact_knn(data.vectors, None, 20)
        medians.append(float(np.median(mle_lid(distances))))
    assert medians[0] < medians[1] < medians[2]


def test_exact_knn_matches_brute_force_and_leaves_each_point_out() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    distances, ids = exact_knn(base, queries, 5, block_rows=3)
    full = np.linalg.norm(queries[:, None, :].astype(np.float64) - base[None], axis=2)
    assert np.array_equal(ids, np.argsort(full, axis=1)[:, :5])
    assert np.allclose(distances, np.sort(full, axis=1)[:, :5], atol=1e-9)
    self_distances, self_ids = exact_knn(base, None, 4, block_rows=64)
    assert not np.any(self_ids == np.arange(200)[:, None])
    assert np.all(self_distances > 0)
    assert np.all(np.diff(self_distances, axis=1) >= 0)


def test_duplicates_are_guarded_not_infinite() -> None:
    # One duplicate at distance 0: left out of the average, the estimate stays finite.
    one_duplicate = np.array([[0.0, 1.0, 2.0, 4.0]])
    expected = -1.0 / ((math.log(1 / 4) + math.log(2 / 4) + 0.0) / 3)
    assert mle_lid(one_duplicate)[0] == pytest.approx(expected)
    # All neighbours identical or at one distance: undefined, reported as NaN.
    assert np.isnan(mle_lid(np.zeros((1, 5))))[0]
    assert np.isnan(mle_lid(np.ones((1, 5))))[0]


def test_mle_formula_on_hand_computed_distances() -> None:
    radii = np.array([[1.0, 2.0, 3.0, 4.0]])
    mean_log = (math.log(1 / 4) + math.log(2 / 4) + math.log(3 / 4) + 0.0) / 4
    assert mle_lid(radii)[0] == pytest.approx(-1.0 / mean_log)
    by_k = lid_for_ks(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), [2, 4])
    assert by_k[4][0] == pytest.approx(-1.0 / mean_log)
    assert by_k[2][0] == pytest.approx(-1.0 / (math.log(1 / 2) / 2))
    with pytest.raises(ValueError):
        lid_for_ks(radii, [10])


def test_k_occurrence_counts_appearances_in_neighbour_lists() -> None:
    ids = np.array([[1, 2], [0, 2], [0, 1], [2, 0]])
    assert k_occurrence(ids, 4, 1).tolist() == [2, 1, 1, 0]
    assert k_occurrence(ids, 4, 2).tolist() == [3, 2, 3, 0]


def test_orderings_are_permutations_with_the_promised_structure() -> None:
    data = synthetic_dataset(8, n=600, n_queries=20, dim=32)
    data.categories = np.array(["b", "a", "c"] * 200)
    stats = neighbourhood(data, ks=(10, 20))
    orderings = {
        (o.name, o.seed): o.rows for o in make_orderings(data, stats, seeds=range(3), n_clusters=4)
    }
    lid = stats.lid[20]
    assert np.all(np.diff(lid[orderings[("lid_asc", 0)]]) >= 0)
    assert np.all(np.diff(lid[orderings[("lid_desc", 0)]]) <= 0)
    assert np.all(np.diff(stats.k_occurrence[orderings[("hubs_first", 0)]]) <= 0)
    grouped = data.categories[orderings[("category_grouped", 0)]]
    assert grouped.tolist() == ["a"] * 200 + ["b"] * 200 + ["c"] * 200
    interleaved = data.categories[orderings[("category_interleaved", 0)]]
    assert interleaved[:6].tolist() == ["a", "b", "c", "a", "b", "c"]
    assert not np.array_equal(orderings[("random", 0)], orderings[("random", 1)])
    assert np.array_equal(orderings[("stored", 0)], np.arange(600))
    assert {name for name, _ in orderings} >= {"cluster_grouped", "cluster_interleaved"}


def test_interleaving_unequal_groups_drops_exhausted_groups() -> None:
    data = Dataset(
        "toy",
        np.random.default_rng(1).standard_normal((60, 8)).astype(np.float32),
        {},
        categories=np.array(["x"] * 10 + ["y"] * 50),
    )
    stats = neighbourhood(data, ks=(10,))
    rows = next(
        o.rows
        for o in make_orderings(data, stats, seeds=[0], n_clusters=1)
        if o.name == "category_interleaved"
    )
    labels = data.categories[rows].tolist()  # type: ignore[index]
    assert labels[:20] == ["x", "y"] * 10
    assert labels[20:] == ["y"] * 40


def test_point_levels_follow_the_hnsw_distribution_and_the_seed() -> None:
    levels = faiss_point_levels(200_000, 16, seed=3)
    # P(level >= 1) = 1/M, P(level >= 2) = 1/M².
    assert (levels >= 1).mean() == pytest.approx(1 / 16, rel=0.05)
    assert (levels >= 2).mean() == pytest.approx(1 / 256, rel=0.2)
    assert np.array_equal(levels, faiss_point_levels(200_000, 16, seed=3))
    assert not np.array_equal(levels, faiss_point_levels(200_000, 16, seed=4))


def test_recall_at_k_is_overlap_over_k() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [-1, -1, -1, -1]])
    assert recall_at_k(found, truth).tolist() == [0.75, 0.0]
