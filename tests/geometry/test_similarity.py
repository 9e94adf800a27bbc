"""Tests for embgeo_utils.geometry.similarity (chapter 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.core.stats import PermutationResult
from embgeo_utils.geometry import similarity
from embgeo_utils.geometry.similarity import (
    cka,
    cosine_matrix_correlation,
    measure,
    measures,
    mutual_knn,
    permutation_test,
    spearman_cosine,
)


def _related(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 24)) + 0.3
    Y = X @ rng.normal(size=(24, 16)) + 2.0 * rng.normal(size=(n, 16))
    return X, Y


def _rotation(d: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]


def _naive_cosine_corr(X: np.ndarray, Y: np.ndarray, center: bool = False) -> float:
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    A = X / np.linalg.norm(X, axis=1, keepdims=True)
    B = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    iu = np.triu_indices(len(X), 1)
    return float(np.corrcoef((A @ A.T)[iu], (B @ B.T)[iu])[0, 1])


def _naive_cka(X: np.ndarray, Y: np.ndarray) -> float:
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))


@pytest.mark.parametrize("center", [False, True])
def test_cosine_corr_matches_naive_and_chunks(device, center: bool) -> None:
    X, Y = _related()
    ref = _naive_cosine_corr(X, Y, center)
    assert cosine_matrix_correlation(X, Y, center=center, device=device) == pytest.approx(ref, abs=1e-6)
    assert cosine_matrix_correlation(X, Y, center=center, device=device, chunk_size=23) == pytest.approx(ref, abs=1e-6)


def test_cosine_corr_invariances(device) -> None:
    X, Y = _related()
    base = cosine_matrix_correlation(X, Y, device=device)
    assert cosine_matrix_correlation(X @ _rotation(24, 1), Y, device=device) == pytest.approx(base, abs=1e-6)
    assert cosine_matrix_correlation(X, 7.0 * Y @ _rotation(16, 2), device=device) == pytest.approx(base, abs=1e-6)
    assert cosine_matrix_correlation(X, X @ _rotation(24, 3), device=device) == pytest.approx(1.0, abs=1e-6)
    assert cosine_matrix_correlation(torch.as_tensor(X), torch.as_tensor(X), device=device) == pytest.approx(
        1.0, abs=1e-6
    )


def test_cosine_corr_independent_near_zero(device) -> None:
    rng = np.random.default_rng(4)
    r = cosine_matrix_correlation(rng.normal(size=(400, 20)), rng.normal(size=(400, 30)), device=device)
    assert abs(r) < 0.03


def test_cka_known_values_and_invariances(device) -> None:
    X, Y = _related(200)
    assert cka(X, X, device=device) == pytest.approx(1.0, abs=1e-12)
    ref = _naive_cka(X, Y)
    assert cka(X, Y, device=device) == pytest.approx(ref, abs=1e-10)
    assert cka(X @ _rotation(24, 5), 3.5 * Y @ _rotation(16, 6), device=device) == pytest.approx(ref, abs=1e-10)
    assert cka(X + 10.0, Y, device=device) == pytest.approx(ref, abs=1e-10)  # centred


def test_spearman_matches_scipy_and_subsamples(device) -> None:
    from scipy.stats import spearmanr

    X, Y = _related(150)
    A = X / np.linalg.norm(X, axis=1, keepdims=True)
    B = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    iu = np.triu_indices(150, 1)
    ref = spearmanr((A @ A.T)[iu], (B @ B.T)[iu])[0]
    assert spearman_cosine(X, Y, device=device) == pytest.approx(ref, abs=1e-6)
    sub = spearman_cosine(X, Y, max_pairs=5000, seed=1, device=device)
    assert sub == spearman_cosine(X, Y, max_pairs=5000, seed=1, device=device)
    assert sub == pytest.approx(ref, abs=0.05)


def test_mutual_knn(device) -> None:
    X, Y = _related(300)
    assert mutual_knn(X, 2.0 * X @ _rotation(24, 7), k=10, device=device) == pytest.approx(1.0)
    rng = np.random.default_rng(8)
    chance = mutual_knn(rng.normal(size=(600, 10)), rng.normal(size=(600, 10)), k=10, device=device)
    assert chance < 0.05
    assert mutual_knn(X, Y, k=10, device=device) > 5 * 10 / 299


def test_measure_registry(device) -> None:
    X, Y = _related(100)
    assert set(measures()) == {"cosine_corr", "cosine_corr_centered", "cka", "mutual_knn", "spearman"}
    assert measure("cosine_corr_centered", X, Y, device=device) == pytest.approx(
        cosine_matrix_correlation(X, Y, center=True, device=device)
    )
    assert measure("mutual_knn", X, Y, k=5, device=device) == mutual_knn(X, Y, k=5, device=device)
    with pytest.raises(EmbgeoInputError, match="Unknown"):
        measure("rsa", X, Y)


@pytest.mark.parametrize("name", ["cosine_corr", "cosine_corr_centered", "cka"])
def test_fast_null_equals_generic(device, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    X, Y = _related(120)
    fast = permutation_test(name, X, Y, n=30, seed=3, device=device)
    slow = permutation_test(lambda A, B: measure(name, A, B, device=device), X, Y, n=30, seed=3, device=device)
    assert fast.statistic == pytest.approx(slow.statistic, abs=1e-6)
    np.testing.assert_allclose(fast.null, slow.null, atol=1e-6)
    if name != "cka":  # the large-n path (Frobenius identity) gives the same null
        monkeypatch.setattr(similarity, "_FULL_MATRIX_ROWS", 10)
        big = permutation_test(name, X, Y, n=30, seed=3, device=device)
        np.testing.assert_allclose(big.null, slow.null, atol=1e-6)
        assert big.statistic == pytest.approx(slow.statistic, abs=1e-6)


def test_permutation_test_related_and_unrelated(device) -> None:
    X, Y = _related(200)
    res = permutation_test("cosine_corr", X, Y, n=200, seed=0, device=device)
    assert isinstance(res, PermutationResult)
    assert res.n_permutations == 200 and res.null.shape == (200,)
    assert res.p_value == pytest.approx(1 / 201)
    assert res.z > 10
    rng = np.random.default_rng(9)
    pvals = [
        permutation_test(
            "cosine_corr", rng.normal(size=(80, 6)), rng.normal(size=(80, 6)), n=200, seed=s, device=device
        ).p_value
        for s in range(5)
    ]
    assert min(pvals) > 0.01
    res = permutation_test(cka, X, Y, n=20, seed=0, device=device)
    assert res.p_value == pytest.approx(1 / 21)
    res = permutation_test("spearman", torch.as_tensor(X), torch.as_tensor(Y), n=5, seed=0, device=device)
    assert res.p_value == pytest.approx(1 / 6)


def test_errors(device) -> None:
    X, Y = _related(50)
    bad = X.copy()
    bad[3, 3] = np.nan
    for fn in (cosine_matrix_correlation, cka, mutual_knn, spearman_cosine):
        with pytest.raises(EmbgeoInputError, match="NaN"):
            fn(bad, Y, device=device)
        with pytest.raises(EmbgeoInputError, match="same items"):
            fn(X, Y[:49], device=device)
    zero = X.copy()
    zero[0] = 0
    with pytest.raises(EmbgeoInputError, match="zero vectors"):
        cosine_matrix_correlation(zero, Y, device=device)
    with pytest.raises(EmbgeoInputError, match="at least 3"):
        cosine_matrix_correlation(X[:2], Y[:2], device=device)
    with pytest.raises(EmbgeoInputError, match="k must"):
        mutual_knn(X, Y, k=50, device=device)
    with pytest.raises(EmbgeoInputError, match="same items"):
        permutation_test("cka", X, Y[:10], device=device)
    with pytest.raises(EmbgeoInputError, match="positive"):
        permutation_test("cka", X, Y, n=0, device=device)


def test_layer_map(device) -> None:
    rng = np.random.default_rng(3)
    ha = rng.normal(size=(80, 3, 12))
    hb = np.concatenate([ha[:, :2] @ _rotation(12, 4), rng.normal(size=(80, 1, 12))], axis=1)
    lm = similarity.layer_map(ha, hb, device=device)
    assert list(lm.columns) == ["layer A", "layer B", "r"] and len(lm) == 9
    r = lm.set_index(["layer A", "layer B"])["r"]
    assert r[(0, 0)] == pytest.approx(1.0, abs=1e-6) and r[(1, 1)] == pytest.approx(1.0, abs=1e-6)
    assert abs(r[(2, 2)]) < 0.1
    with pytest.raises(EmbgeoInputError, match="same tokens"):
        similarity.layer_map(ha, hb[:50], device=device)


def test_layer_map_equals_the_pairwise_statistic_in_any_chunking(device) -> None:
    rng = np.random.default_rng(5)
    ha = rng.normal(size=(60, 4, 10)) + 0.5
    hb = np.concatenate([ha[:, :3] @ rng.normal(size=(10, 7)), rng.normal(size=(60, 2, 7))], axis=1)
    lm = similarity.layer_map(ha, hb, device=device).set_index(["layer A", "layer B"])["r"]
    for p in range(4):
        for q in range(5):
            ref = cosine_matrix_correlation(ha[:, p], hb[:, q], center=True, device=device)
            assert lm[(p, q)] == pytest.approx(ref, abs=1e-6)
    ua = similarity._layer_units(torch.as_tensor(ha), "a", True, torch.device("cpu"))
    ub = similarity._layer_units(torch.as_tensor(hb), "b", True, torch.device("cpu"))
    np.testing.assert_allclose(
        similarity._cosine_correlations(ua, ub, chunk_size=7), similarity._cosine_correlations(ua, ub), atol=1e-9
    )
    bad = ha.copy()
    bad[3, 2] = np.nan
    with pytest.raises(EmbgeoInputError):
        similarity.layer_map(bad, hb, device=device)
