"""The index benchmark's synthetic corpora: what the 100k / 1M rows are made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lodestar.bench.index import DIM, corpus_file, mean_lid


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """Normalised points near 20 random directions in DIM dimensions, varying in 8 of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    basis = rng.standard_normal((8, DIM))
    points = centres[rng.integers(0, 20, n)] * 3 + rng.standard_normal((n, 8)) @ basis
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


@pytest.mark.parametrize("synthetic", ["manifold", "gaussian"])
def test_corpus_keeps_the_real_rows_and_adds_normalised_ones(
    tmp_path: Path, synthetic: str
) -> None:
    real = _clustered(500)
    vectors = corpus_file(real, 3000, tmp_path, synthetic=synthetic)
    assert vectors.shape == (3000, DIM)
    np.testing.assert_array_equal(vectors[:500], real)
    np.testing.assert_allclose(np.linalg.norm(vectors[500:], axis=1), 1.0, atol=1e-5)
    again = corpus_file(real, 3000, tmp_path / "again", synthetic=synthetic)
    np.testing.assert_array_equal(vectors, again)  # seeded: the same corpus every run


def test_manifold_rows_stay_near_the_real_data_and_the_gaussian_does_not(
    tmp_path: Path,
) -> None:
    real = _clustered(1000)
    # The default noise is calibrated on MiniLM vectors; this toy set is far tighter.
    manifold = np.asarray(corpus_file(real, 3000, tmp_path, synthetic="manifold", noise=0.01))[
        1000:
    ]
    gaussian = np.asarray(corpus_file(real, 3000, tmp_path, synthetic="gaussian"))[1000:]
    nearest_manifold = (manifold @ real.T).max(axis=1)
    nearest_gaussian = (gaussian @ real.T).max(axis=1)
    assert np.median(nearest_manifold) > 0.9
    assert np.median(nearest_gaussian) < np.median(nearest_manifold) - 0.2
    # The manifold set keeps the low intrinsic dimensionality; the Gaussian fills the span.
    lid_real = mean_lid(real, sample=200)
    assert mean_lid(np.concatenate([real, manifold]), sample=200) < 2 * lid_real
    assert mean_lid(np.concatenate([real, gaussian]), sample=200) > 2 * lid_real
    # The noise is the calibration knob: more noise, higher local dimensionality.
    noisier = np.asarray(corpus_file(real, 3000, tmp_path, synthetic="manifold", noise=0.05))
    assert mean_lid(noisier, sample=200) > mean_lid(np.concatenate([real, manifold]), sample=200)


def test_mean_lid_estimates_the_dimension_of_a_sphere_in_a_subspace() -> None:
    # Unit vectors in an m-dimensional subspace form an (m - 1)-sphere: LID m - 1.
    rng = np.random.default_rng(1)
    for m in (3, 5, 9):
        points = rng.standard_normal((4000, m)) @ np.linalg.qr(rng.standard_normal((DIM, m)))[0].T
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        assert abs(mean_lid(points.astype(np.float32), sample=300) - (m - 1)) < 0.25 * (m - 1)


def test_unknown_synthetic_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--synthetic"):
        corpus_file(_clustered(50), 100, tmp_path, synthetic="uniform")
