"""Tests for embgeo_utils.geometry.intrinsic_dim (chapters 3 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import intrinsic_dim as idm
from embgeo_utils.geometry.neighbors import knn


def _subspace(n: int, d: int, ambient: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((ambient, d)))
    return rng.standard_normal((n, d)) @ basis.T + rng.standard_normal(ambient)


def _sphere(n: int, d: int, seed: int) -> np.ndarray:
    """Uniform points on the unit sphere S^d in R^(d+1)."""
    x = np.random.default_rng(seed).standard_normal((n, d + 1))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cube(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d))


# ---------------------------------------------------------------------------- local PCA


@pytest.mark.parametrize("d", [1, 3, 7])
def test_local_pca_exact_on_linear_subspace(device, d: int) -> None:
    X = _subspace(400, d, 20, seed=d)
    # On a noiseless d-dimensional subspace every neighbourhood has exactly d non-zero
    # eigenvalues, so any threshold short of 1 that the d-th component reaches gives d.
    ids = idm.local_pca_id(X, k=30, variance=0.999999, device=device)
    assert ids.dtype.kind == "i" and ids.shape == (400,)
    assert np.all(ids == d)
    # With the default 90 % rule the weakest directions may be left out, never added.
    ids90 = idm.local_pca_id(X, k=30, device=device)
    assert np.all((ids90 >= 1) & (ids90 <= d))


def test_local_pca_small_k_on_curved_manifold(device) -> None:
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    X = np.hstack([_sphere(3000, 2, seed=3), np.zeros((3000, 7))]) @ rotation  # S^2 inside R^10
    small = idm.local_pca_id(X, k=10, device=device)
    assert np.median(small) == 2
    assert abs(small.mean() - 2.0) < 0.2
    large = idm.local_pca_id(X[:1000], k=500, device=device)  # half the sphere: curvature adds a 3rd direction
    assert large.mean() > 2.5


def test_local_pca_matches_scikit_dimension_known_values(device) -> None:
    # Values from scikit-dimension 0.5.0:
    # skdim.id.lPCA(ver="ratio", alphaRatio=0.9, verbose=False).fit_pw(Y, n_neighbors=20).dimension_pw_
    # skdim's neighbourhood is the 20 neighbours without the point, hence include_self=False.
    rng = np.random.default_rng(7)
    Y = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 20)) + 0.05 * rng.standard_normal((300, 20))
    ids = idm.local_pca_id(Y, k=20, include_self=False, device=device)
    assert ids[:12].tolist() == [4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    assert int(ids.sum()) == 1460


def test_local_pca_precomputed_indices_and_torch_input(device) -> None:

    X = _subspace(300, 4, 12, seed=1) + 0.01 * np.random.default_rng(1).standard_normal((300, 12))
    _, idx = knn(X, 15, device=device)
    a = idm.local_pca_id(X, k=15, device=device)
    b = idm.local_pca_id(torch.as_tensor(X), k=15, indices=idx, device=device, chunk_size=7)
    np.testing.assert_array_equal(a, b)


def test_local_pca_rows_equal_full_result_restricted(device) -> None:

    rng = np.random.default_rng(3)
    X = (_subspace(400, 3, 20, seed=3) + 0.01 * rng.standard_normal((400, 20))).astype(np.float32)
    X[7] = X[3]  # a duplicate row stays a neighbour of its twin
    full = idm.local_pca_id(X, k=20, device=device)
    rows = np.array([399, 3, 7, 0, 3, 250])  # unsorted, with a repeat
    sub = idm.local_pca_id(X, k=20, device=device, rows=rows)
    np.testing.assert_array_equal(sub, full[rows])
    assert np.all(sub <= 3)
    np.testing.assert_array_equal(
        idm.local_pca_id(X, k=20, device=device, rows=rows, include_self=False),
        idm.local_pca_id(X, k=20, device=device, include_self=False)[rows],
    )
    _, idx = knn(X, 25, device=device, queries=rows)
    np.testing.assert_array_equal(idm.local_pca_id(X, k=20, device=device, rows=rows, indices=idx, chunk_size=2), sub)
    with pytest.raises(EmbgeoInputError, match="indices must have shape"):
        idm.local_pca_id(X, k=20, device=device, rows=rows, indices=idx[:3])
    with pytest.raises(EmbgeoInputError, match="row indices"):
        idm.local_pca_id(X, k=20, device=device, rows=[400])
    with pytest.raises(EmbgeoInputError, match="integer"):
        idm.local_pca_id(X, k=20, device=device, rows=np.array([1.5]))


def test_local_pca_errors(device) -> None:
    X = _cube(50, 3, seed=0)
    with pytest.raises(EmbgeoInputError, match="k must"):
        idm.local_pca_id(X, k=50, device=device)
    with pytest.raises(EmbgeoInputError, match="variance"):
        idm.local_pca_id(X, k=5, variance=1.5, device=device)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        idm.local_pca_id(bad, k=5, device=device)
    with pytest.raises(EmbgeoInputError, match="indices"):
        idm.local_pca_id(X, k=5, indices=np.zeros((50, 2), dtype=int), device=device)


# ---------------------------------------------------------------------------- TwoNN and GRIDE


@pytest.mark.parametrize(
    ("sampler", "d", "tolerance"),
    [
        (_cube, 2, 0.10),
        (_cube, 5, 0.10),
        # Uniform cubes in 10-D are underestimated by both estimators (about 13 % at
        # n = 4000): a larger share of points sits near a face. Spheres have no boundary.
        (_cube, 10, 0.16),
        (_sphere, 2, 0.10),
        (_sphere, 5, 0.10),
        (_sphere, 10, 0.10),
    ],
)
def test_twonn_and_gride_recover_dimension(device, sampler, d: int, tolerance: float) -> None:
    X = sampler(4000, d, 0)
    assert idm.twonn(X, device=device) == pytest.approx(d, rel=tolerance)
    assert idm.gride(X, device=device) == pytest.approx(d, rel=tolerance)


def test_known_values_from_dadapy(device) -> None:
    # DADApy 0.3.4 on this cloud (float64):
    #   Data(coordinates=X).compute_id_2NN()[0]                   -> 3.9246765284054415
    #   Data(coordinates=X).return_id_scaling_gride(range_max=32) -> ids and errors below
    rng = np.random.default_rng(2024)
    X = rng.standard_normal((600, 4)) @ rng.standard_normal((4, 12))
    assert idm.twonn(X, device=device) == pytest.approx(3.9246765284054415, rel=1e-9)
    scales, ids, errs = idm.gride_scaling(X, max_scale=32, device=device)
    np.testing.assert_array_equal(scales, [2, 4, 8, 16, 32])
    np.testing.assert_allclose(
        ids,
        [3.916486929028964, 4.23098481833734, 3.837862078352452, 3.817588894198445, 3.7555579251089073],
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        errs,
        [0.15988990934001393, 0.124484779380781, 0.08006045405376104, 0.056271301141950746, 0.039135071277622516],
        rtol=1e-6,
    )
    value, error = idm.gride(X, 4, 8, device=device, return_error=True)
    assert (value, error) == pytest.approx((3.837862078352452, 0.08006045405376104), rel=1e-6)


def test_twonn_ml_variant_and_no_discard(device) -> None:
    X = _sphere(1500, 3, seed=4)
    ml = idm.twonn(X, algorithm="ml", device=device)
    assert idm.twonn(X, discard_fraction=0.0, device=device) == pytest.approx(ml, rel=1e-12)
    # The ML estimate equals GRIDE at n1 = 1, n2 = 2 up to GRIDE's outlier filter and bisection.
    assert ml == pytest.approx(3.0, rel=0.1)


def test_duplicates_match_deduplicated_cloud(device) -> None:
    rng = np.random.default_rng(5)
    X = _sphere(800, 4, seed=5)
    copies = X[rng.choice(800, 120)]
    noisy = rng.permutation(np.vstack([X, copies, copies[:30]]))
    for f in (lambda A: idm.twonn(A, device=device), lambda A: idm.gride(A, 2, 4, device=device)):
        value = f(noisy)
        assert np.isfinite(value)
        assert value == pytest.approx(f(X), rel=1e-9)
    s_dup, ids_dup, err_dup = idm.gride_scaling(noisy, max_scale=64, device=device)
    s, ids, err = idm.gride_scaling(X, max_scale=64, device=device)
    np.testing.assert_allclose(ids_dup, ids, rtol=1e-9)
    assert np.isfinite(err_dup).all()


def test_batched_equals_single_cloud_loop(device) -> None:
    rng = np.random.default_rng(6)
    stack = np.stack([_subspace(300, d, 16, seed=d) for d in (2, 3, 5, 8)])
    stack[1, 10] = stack[1, 20]  # one duplicated pair
    stack[2, 0:5] = stack[2, 5]  # a group of six identical rows
    stack[3] += 1e-3 * rng.standard_normal(stack[3].shape)
    scales = [2, 4, 8, 16, 32, 64]
    ids, errs = idm.gride_batched(stack, scales, device=device, return_error=True)
    two = idm.twonn_batched(torch.as_tensor(stack), device=device)
    for b, cloud in enumerate(stack):
        s, single_ids, single_errs = idm.gride_scaling(cloud, max_scale=64, device=device)
        np.testing.assert_array_equal(s, scales)
        np.testing.assert_allclose(ids[b], single_ids, rtol=1e-9)
        np.testing.assert_allclose(errs[b], single_errs, rtol=1e-6)
        assert two[b] == pytest.approx(idm.twonn(cloud, device=device), rel=1e-9)
    fast = idm.gride_batched(stack.astype(np.float32), scales, device=device, dtype=torch.float32)
    np.testing.assert_allclose(fast, ids, rtol=1e-3)


def test_too_few_distinct_points(device) -> None:
    X = np.repeat(_cube(5, 3, seed=0), 10, axis=0)  # 50 rows, 5 distinct
    with pytest.raises(EmbgeoInputError, match="at least 9 distinct points.*only 5"):
        idm.gride(X, 4, 8, device=device)
    with pytest.raises(EmbgeoInputError, match="only 5 remain"):
        idm.gride_batched(X[None], [8], device=device)
    with pytest.raises(EmbgeoInputError, match="at least 3 distinct"):
        idm.twonn(np.repeat(_cube(2, 3, seed=0), 4, axis=0), device=device)
    assert np.isfinite(idm.gride(X, 1, 2, device=device))


def test_argument_errors(device) -> None:
    X = _cube(100, 3, seed=0)
    with pytest.raises(EmbgeoInputError, match="n1 < n2"):
        idm.gride(X, 4, 4, device=device)
    with pytest.raises(EmbgeoInputError, match="even integers"):
        idm.gride_batched(X[None], [3], device=device)
    with pytest.raises(EmbgeoInputError, match="3-D"):
        idm.gride_batched(X, [2], device=device)
    with pytest.raises(EmbgeoInputError, match="discard_fraction"):
        idm.twonn(X, discard_fraction=1.0, device=device)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(EmbgeoInputError, match="NaN or infinite"):
        idm.twonn(bad, device=device)
    with pytest.raises(EmbgeoInputError, match="NaN or infinite"):
        idm.twonn_batched(bad[None], device=device)
    np.testing.assert_array_equal(idm.default_scales(1000, 256), [2, 4, 8, 16, 32, 64, 128, 256])
    np.testing.assert_array_equal(idm.default_scales(100), [2, 4, 8, 16, 32, 64])


# ---------------------------------------------------------------------------- peers (optional)


def test_agrees_with_dadapy(device) -> None:
    dadapy = pytest.importorskip("dadapy")
    X = _sphere(1200, 6, seed=11) @ np.random.default_rng(11).standard_normal((7, 30))
    data = dadapy.Data(coordinates=X.copy(), verbose=False)
    assert idm.twonn(X, device=device) == pytest.approx(data.compute_id_2NN()[0], rel=1e-8)
    ref_ids, ref_errs, _ = dadapy.Data(coordinates=X.copy(), verbose=False).return_id_scaling_gride(range_max=128)
    _, ids, errs = idm.gride_scaling(X, max_scale=128, device=device)
    np.testing.assert_allclose(ids, ref_ids, rtol=1e-9)
    np.testing.assert_allclose(errs, ref_errs, rtol=1e-6)


def test_agrees_with_scikit_dimension(device) -> None:
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(12)
    X = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 25)) + 0.1 * rng.standard_normal((400, 25))
    ref = skdim.id.lPCA(ver="ratio", alphaRatio=0.9, verbose=False).fit_pw(X, n_neighbors=30).dimension_pw_
    ours = idm.local_pca_id(X, k=30, include_self=False, device=device)
    np.testing.assert_array_equal(ours, ref)
