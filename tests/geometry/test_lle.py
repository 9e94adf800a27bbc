"""Tests for embgeo_utils.geometry.lle (chapter 2)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold._locally_linear import barycenter_weights

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import lle
from embgeo_utils.geometry.lle import lle_weights, random_neighbors, reconstruction_error, uniform_weights


def _plane(n: int = 300, d: int = 10, seed: int = 0) -> np.ndarray:
    """Points on a 2-D affine plane in d dimensions: each is an affine combination of any 3 others."""
    rng = np.random.default_rng(seed)
    coords = rng.normal(size=(n, 2))
    basis = rng.normal(size=(2, d))
    return coords @ basis + rng.normal(size=d)


def test_weights_sum_to_one(device) -> None:
    X = np.random.default_rng(1).normal(size=(200, 8))
    idx, w = lle_weights(X, 6, device=device)
    assert idx.shape == w.shape == (200, 6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert not np.any(idx == np.arange(200)[:, None])


def test_exact_on_affine_data(device) -> None:
    X = _plane()
    idx, w = lle_weights(X, 5, reg=1e-9, device=device)
    err = reconstruction_error(X, idx, w, device=device)
    assert err.shape == (300,)
    assert err.max() < 1e-10


def test_matches_sklearn_barycenter_weights(device) -> None:
    X = np.random.default_rng(2).normal(size=(250, 12))
    idx, w = lle_weights(X, 9, reg=1e-3, device=device)
    ref = barycenter_weights(X, X, idx, reg=1e-3)
    np.testing.assert_allclose(w, ref, rtol=1e-7, atol=1e-9)
    # Float32 input: same answer to float32 precision.
    _, w32 = lle_weights(X.astype(np.float32), 9, reg=1e-3, device=device, indices=idx)
    np.testing.assert_allclose(w32, ref, atol=1e-4)


def test_given_indices_are_used(device) -> None:
    X = np.random.default_rng(3).normal(size=(100, 5))
    rand = random_neighbors(100, 7, seed=3)
    idx, w = lle_weights(X, 3, device=device, indices=rand)
    np.testing.assert_array_equal(idx, rand)
    np.testing.assert_allclose(w, barycenter_weights(X, X, rand, reg=1e-3), rtol=1e-7, atol=1e-9)


def test_zero_trace_uses_plain_reg(device) -> None:
    X = np.zeros((6, 3))
    X[3:] = 1.0  # every point has identical neighbours at distance 0
    idx = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    _, w = lle_weights(X, 2, device=device, indices=idx)
    np.testing.assert_allclose(w, barycenter_weights(X, X, idx, reg=1e-3))
    np.testing.assert_allclose(w, 0.5)


def test_transfer_errors_order(device) -> None:
    """Own weights beat uniform weights, which beat random neighbours, on curved data."""
    rng = np.random.default_rng(4)
    t = rng.uniform(0, 3 * np.pi, size=400)
    h = rng.uniform(-1, 1, size=400)
    X = np.c_[t * np.cos(t), h * 5, t * np.sin(t)] @ rng.normal(size=(3, 8)) + 20.0
    Y = X @ np.linalg.qr(rng.normal(size=(8, 8)))[0]  # a rotated copy: same local geometry
    idx, w = lle_weights(X, 8, device=device)
    own = reconstruction_error(Y, idx, w, device=device).mean()
    uni = reconstruction_error(Y, idx, uniform_weights(idx), device=device).mean()
    null = reconstruction_error(Y, random_neighbors(400, 8, seed=0), w, device=device).mean()
    assert own < uni < null
    np.testing.assert_allclose(
        reconstruction_error(X, idx, w, device=device),
        reconstruction_error(Y, idx, w, device=device),
        rtol=1e-6,
        atol=1e-12,
    )


def test_random_neighbors() -> None:
    r = random_neighbors(500, 20, seed=1)
    assert r.shape == (500, 20) and r.dtype == np.int64
    assert all(len(set(row)) == 20 for row in r)
    assert not np.any(r == np.arange(500)[:, None])
    assert r.min() >= 0 and r.max() < 500
    np.testing.assert_array_equal(r, random_neighbors(500, 20, seed=1))
    dense = random_neighbors(8, 7, seed=2)  # every other point
    np.testing.assert_array_equal(np.sort(dense, axis=1), [[j for j in range(8) if j != i] for i in range(8)])
    assert random_neighbors(5, 5, seed=0, exclude_self=False).shape == (5, 5)


def test_errors(device) -> None:
    X = np.random.default_rng(5).normal(size=(20, 4))
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(EmbgeoInputError, match="NaN"):
        lle_weights(bad, 3, device=device)
    with pytest.raises(EmbgeoInputError, match="k must"):
        lle_weights(X, 20, device=device)
    with pytest.raises(EmbgeoInputError, match="reg"):
        lle_weights(X, 3, reg=-1.0, device=device)
    with pytest.raises(EmbgeoInputError, match="rows"):
        lle_weights(X, 3, device=device, indices=np.zeros((19, 3), dtype=int))
    with pytest.raises(EmbgeoInputError, match="lie in"):
        lle_weights(X, 3, device=device, indices=np.full((20, 3), 20))
    idx, w = lle_weights(X, 3, device=device)
    with pytest.raises(EmbgeoInputError, match="shape"):
        reconstruction_error(X, idx, w[:, :2], device=device)
    Z = X.copy()
    Z[4] = 0
    with pytest.raises(EmbgeoInputError, match="zero vectors"):
        reconstruction_error(Z, idx, w, device=device)
    with pytest.raises(EmbgeoInputError):
        random_neighbors(5, 5, seed=0)


def test_gather_steps_and_solve_blocks_do_not_change_the_weights(device, monkeypatch) -> None:
    """Many small gathers and solve blocks (and the float32 copy path) give the weights of one step."""

    X = np.random.default_rng(5).normal(size=(250, 12))
    idx, whole = lle_weights(X, 7, reg=1e-3, device=device)
    _, whole32 = lle_weights(X.astype(np.float32), 7, reg=1e-3, device=device, indices=idx)
    monkeypatch.setattr(lle, "_GATHER_BYTES", 1)  # 16 rows per gather on the CPU
    monkeypatch.setattr(lle, "_SOLVE_ROWS", 40)
    _, steps = lle_weights(X, 7, reg=1e-3, device=device, indices=idx)
    _, steps32 = lle_weights(X.astype(np.float32), 7, reg=1e-3, device=device, indices=idx)
    np.testing.assert_allclose(steps, whole, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(steps32, whole32, rtol=1e-12, atol=1e-14)
