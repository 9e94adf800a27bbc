"""Tests for the duplicate-aware neighbour distances (neighbors) and the estimators built on them (intrinsic_dim)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils import intrinsic_dim as idm
from embgeo_utils import neighbors as nb
from embgeo_utils.errors import EmbgeoInputError


def _cloud(n: int = 120, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)) @ rng.standard_normal((3, d)) + 0.01 * rng.standard_normal((n, d))


def _brute_sorted(X: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


def test_unique_rows_keeps_first_copies_in_order(device) -> None:
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], device=device)
    np.testing.assert_array_equal(nb.unique_rows(X).cpu().numpy(), [[1, 0], [2, 0], [3, 0]])
    distinct = torch.eye(3, device=device)
    assert nb.unique_rows(distinct) is distinct
    with pytest.raises(EmbgeoInputError, match="2-D"):
        nb.unique_rows(torch.ones(3, device=device))


def test_smallest_sorted_matches_a_full_sort(device) -> None:
    values = torch.as_tensor(np.random.default_rng(1).random((7, 30)), device=device)
    expected = torch.sort(values, dim=1).values[:, :5]
    torch.testing.assert_close(nb.smallest_sorted(values, 5).to(device), expected)
    with pytest.raises(EmbgeoInputError, match="k <= 30"):
        nb.smallest_sorted(values, 31)


def test_sorted_knn_distances_match_brute_force(device) -> None:
    X = _cloud()
    dist, dup = nb.sorted_knn_distances(torch.as_tensor(X, device=device), 8, chunk_size=17)
    assert not dup and dist.dtype == torch.float64
    np.testing.assert_allclose(dist.cpu().numpy(), _brute_sorted(X, 8), rtol=1e-9)
    _, dup = nb.sorted_knn_distances(torch.as_tensor(np.vstack([X, X[:2]]), device=device), 4)
    assert dup
    with pytest.raises(EmbgeoInputError, match="kmax"):
        nb.sorted_knn_distances(torch.as_tensor(X[:5], device=device), 5)


def test_deduplicated_knn_distances_equal_those_of_the_distinct_cloud(device) -> None:
    X = _cloud(seed=2)
    noisy = np.vstack([X, X[:10], X[:3]])
    dist, n = nb.deduplicated_knn_distances(torch.as_tensor(noisy, device=device), 6)
    ref, n_ref = nb.deduplicated_knn_distances(torch.as_tensor(X, device=device), 6)
    assert n == n_ref == len(X)
    np.testing.assert_allclose(dist.cpu().numpy(), ref.cpu().numpy(), rtol=1e-12)
    few = torch.as_tensor(np.repeat(X[:4], 5, axis=0), device=device)
    with pytest.raises(EmbgeoInputError, match="only 4 remain"):
        nb.deduplicated_knn_distances(few, 8, "GRIDE")
    shrunk, n_few = nb.deduplicated_knn_distances(few, 8, shrink=True)
    assert n_few == 4 and shrunk.shape == (4, 3)


def test_batched_distances_mask_duplicates(device) -> None:
    X = _cloud(n=80, seed=3)
    stack = np.stack([X, X.copy()])
    stack[1, 5] = stack[1, 9]
    stack[1, 11] = stack[1, 9]
    dist, valid = nb.batched_knn_distances(torch.as_tensor(stack, device=device), 4)
    valid = valid.cpu().numpy()
    assert valid[0].all() and valid[1].sum() == 78 and valid[1, 5] and not valid[1, 9] and not valid[1, 11]
    np.testing.assert_allclose(dist[0].cpu().numpy(), _brute_sorted(X, 4), rtol=1e-7)
    distinct = np.delete(stack[1], [9, 11], axis=0)  # row 5 is the first copy
    np.testing.assert_allclose(dist[1].cpu().numpy()[valid[1]], _brute_sorted(distinct, 4), rtol=1e-7)
    x = torch.as_tensor(stack, device=device, dtype=torch.float64)
    xc = x - x.mean(dim=1, keepdim=True)
    sq = (xc * xc).sum(dim=2)
    d2 = torch.cdist(xc, xc) ** 2
    group = nb.duplicate_groups(x, d2, sq).cpu().numpy()
    assert group[1, 5] == group[1, 11] == 5 and group[1, 9] == 5 and group[1, 0] == 0
    with pytest.raises(EmbgeoInputError, match="d2 of shape"):
        nb.duplicate_groups(x, d2[:, :3], sq)
    with pytest.raises(EmbgeoInputError, match="distinct points"):
        nb.knn_from_sq_distances(x[:, :4], d2[:, :4, :4].clone(), sq[:, :4], 4)


def test_estimates_from_distances_equal_the_estimators(device) -> None:
    X = _cloud(n=200, seed=4)
    data = torch.as_tensor(X, device=device, dtype=torch.float64)
    dist = nb.deduplicated_knn_distances(data, 8)[0][None]
    assert float(idm.twonn_from_distances(dist)[0]) == pytest.approx(idm.twonn(X, device=device), rel=1e-12)
    ml = float(idm.twonn_from_distances(dist, algorithm="ml")[0])
    assert ml == pytest.approx(idm.twonn(X, algorithm="ml", device=device), rel=1e-12)
    ids, err = idm.gride_from_distances(dist, None, [1, 2, 4], [2, 4, 8])
    s, ref_ids, ref_err = idm.gride_scaling(X, max_scale=8, device=device)
    np.testing.assert_array_equal(s, [2, 4, 8])
    np.testing.assert_allclose(ids[0].cpu().numpy(), ref_ids, rtol=1e-12)
    np.testing.assert_allclose(err[0].cpu().numpy(), ref_err, rtol=1e-12)
    assert float(ids[0, 1]) == pytest.approx(idm.gride(X, 2, 4, device=device), rel=1e-12)
    with pytest.raises(EmbgeoInputError, match="n1 < n2"):
        idm.gride_from_distances(dist, None, [2], [2])
    with pytest.raises(EmbgeoInputError, match=">= 16 neighbours"):
        idm.gride_from_distances(dist, None, [8], [16])
    with pytest.raises(EmbgeoInputError, match="valid must have shape"):
        idm.twonn_from_distances(dist, torch.ones(3, dtype=torch.bool))


def test_argument_checks() -> None:
    np.testing.assert_array_equal(idm.check_scales([2, 8]), [2, 8])
    assert idm.check_scales(4).dtype == np.int64
    with pytest.raises(EmbgeoInputError, match="even integers"):
        idm.check_scales([2.0])
    assert idm.check_twonn_args(0.1, "base") == "base"
    assert idm.check_twonn_args(0.0, "base") == "ml"
    with pytest.raises(EmbgeoInputError, match="'base' or 'ml'"):
        idm.check_twonn_args(0.1, "fit")
