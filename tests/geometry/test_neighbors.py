"""Tests for embgeo_utils.geometry.neighbors (chapters 2, 3 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry.neighbors import knn, neighborhood_overlap, neighborhood_overlap_batched


def _brute(X: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        U = X / np.linalg.norm(X, axis=1, keepdims=True)
        D = 1.0 - U @ U.T
    else:
        D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    idx = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [None, 17])
def test_knn_matches_brute_force(device, metric: str, chunk_size: int | None) -> None:
    X = np.random.default_rng(0).normal(size=(300, 12))
    dist, idx = knn(X, 8, metric=metric, device=device, chunk_size=chunk_size)
    ref_d, ref_i = _brute(X, 8, metric)
    assert dist.shape == idx.shape == (300, 8)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_knn_accepts_torch_and_keeps_self_when_asked(device) -> None:
    X = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    dist, idx = knn(X, 3, exclude_self=False, device=device)
    np.testing.assert_array_equal(idx[:, 0], np.arange(50))
    assert np.all(dist[:, 0] == 0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_duplicate_rows_excluded_by_index_and_found_at_zero(device, metric: str) -> None:
    X = np.random.default_rng(2).normal(size=(100, 6)).astype(np.float32) * 30
    X = np.vstack([X, X[:10]])  # rows 100..109 duplicate rows 0..9
    dist, idx = knn(X, 2, metric=metric, device=device)
    own = np.arange(len(X))
    assert not np.any(idx == own[:, None])
    twin = np.r_[np.arange(100, 110), np.arange(0, 10)]
    rows = np.r_[np.arange(0, 10), np.arange(100, 110)]
    np.testing.assert_array_equal(idx[rows, 0], twin)
    assert np.all(dist[rows, 0] == 0.0)
    assert np.all(dist[rows, 1] > 0)


def test_overlap_identical_clouds_is_one(device) -> None:
    X = np.random.default_rng(3).normal(size=(200, 5))
    assert neighborhood_overlap(X, X, k=4, device=device) == 1.0
    # Rotation and scaling preserve Euclidean neighbourhoods.
    Q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(5, 5)))
    assert neighborhood_overlap(X, 3 * X @ Q, k=4, device=device) == 1.0


def test_overlap_independent_clouds_near_chance(device) -> None:
    rng = np.random.default_rng(5)
    n, k = 1000, 10
    values = [
        neighborhood_overlap(rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), k, device=device) for _ in range(3)
    ]
    expected = k / (n - 1)
    # Each point shares ~Binomial(k, k/(n-1)) neighbours; the mean over n points has sd ~ sqrt(expected / (k n)).
    sd = np.sqrt(expected / (k * n))
    assert abs(np.mean(values) - expected) < 5 * sd / np.sqrt(3) + 1e-3


def test_batched_overlap_equals_loop(device) -> None:
    rng = np.random.default_rng(6)
    X = rng.normal(size=(5, 120, 16))
    Y = X + 0.5 * rng.normal(size=(5, 120, 16))
    for k in (1, 4):
        batched = neighborhood_overlap_batched(X, Y, k, device=device)
        loop = np.array([neighborhood_overlap(X[b], Y[b], k, device=device) for b in range(5)])
        assert batched.shape == (5,)
        np.testing.assert_allclose(batched, loop)
    assert np.all(neighborhood_overlap_batched(torch.as_tensor(X), torch.as_tensor(X), 2, device=device) == 1.0)


def test_errors(device) -> None:
    X = np.random.default_rng(7).normal(size=(10, 3))
    bad = X.copy()
    bad[2, 1] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        knn(bad, 2, device=device)
    with pytest.raises(EmbgeoInputError, match="k must"):
        knn(X, 10, device=device)
    with pytest.raises(EmbgeoInputError, match="k must"):
        knn(X, 0, device=device)
    with pytest.raises(EmbgeoInputError, match="metric"):
        knn(X, 2, metric="manhattan", device=device)
    zero = X.copy()
    zero[0] = 0
    with pytest.raises(EmbgeoInputError, match="zero vectors"):
        knn(zero, 2, metric="cosine", device=device)
    with pytest.raises(EmbgeoInputError, match="same points"):
        neighborhood_overlap(X, X[:9], 2, device=device)
    with pytest.raises(EmbgeoInputError, match="3-D"):
        neighborhood_overlap_batched(X, X, 2, device=device)
    with pytest.raises(EmbgeoInputError, match="same batch"):
        neighborhood_overlap_batched(X[None], X[None, :9], 2, device=device)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_knn_queries_equal_full_search_restricted(device, metric: str, chunk_size: int | None) -> None:
    rng = np.random.default_rng(8)
    X = rng.normal(size=(200, 7)).astype(np.float32)
    X[150] = X[20]  # duplicate rows: each keeps the other, at distance 0, and drops itself by index
    X[151] = X[20]
    full_d, full_i = knn(X, 6, metric=metric, device=device)
    queries = np.array([20, 150, 151, 0, 199, 20, 77])  # unsorted, with a repeat
    dist, idx = knn(X, 6, metric=metric, device=device, chunk_size=chunk_size, queries=queries)
    assert dist.shape == idx.shape == (len(queries), 6)
    np.testing.assert_array_equal(idx, full_i[queries])
    np.testing.assert_allclose(dist, full_d[queries], atol=1e-6)
    assert not np.any(idx == queries[:, None])
    for q, twins in ((20, {150, 151}), (150, {20, 151}), (151, {20, 150})):
        row = int(np.flatnonzero(queries == q)[0])
        assert set(idx[row, :2].tolist()) == twins and np.all(dist[row, :2] == 0.0)
    # Torch and list inputs, and keeping self.
    d2, i2 = knn(torch.as_tensor(X), 6, metric=metric, device=device, queries=torch.as_tensor(queries))
    np.testing.assert_array_equal(i2, idx)
    _, i3 = knn(X, 3, metric=metric, exclude_self=False, device=device, queries=[5, 9])
    np.testing.assert_array_equal(i3[:, 0], [5, 9])
    empty_d, empty_i = knn(X, 3, device=device, queries=np.array([], dtype=np.int64))
    assert empty_d.shape == empty_i.shape == (0, 3)


def test_knn_query_errors(device) -> None:
    X = np.random.default_rng(9).normal(size=(10, 3))
    with pytest.raises(EmbgeoInputError, match=r"in \[0, 10\)"):
        knn(X, 2, device=device, queries=[0, 10])
    with pytest.raises(EmbgeoInputError, match="not wrapped"):
        knn(X, 2, device=device, queries=np.array([-1]))
    with pytest.raises(EmbgeoInputError, match="integer"):
        knn(X, 2, device=device, queries=np.array([0.0, 2.0]))
    with pytest.raises(EmbgeoInputError, match="integer"):
        knn(X, 2, device=device, queries=np.ones(10, dtype=bool))
    with pytest.raises(EmbgeoInputError, match="integer"):
        knn(X, 2, device=device, queries=torch.tensor([1.0]))
    with pytest.raises(EmbgeoInputError, match="1-D"):
        knn(X, 2, device=device, queries=np.zeros((2, 2), dtype=int))
