"""Feature matching and decoder-geometry similarity (chapter 5) against numpy/scipy and planted structure."""

import numpy as np
import pytest
from scipy import stats as sps
from scipy.optimize import linear_sum_assignment

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import matching
from embgeo_utils.lm import alignment


def _sparse_latents(n, m, density, seed):
    g = np.random.default_rng(seed)
    return (g.random((n, m)) < density) * g.exponential(1.0, (n, m))


@pytest.mark.parametrize("density", [0.05, 0.5])
def test_activation_correlation_matches_numpy(density, device):
    za, zb = _sparse_latents(400, 30, density, 0), _sparse_latents(400, 20, density, 1)
    zb[:, 3] = za[:, 7] * 2 + 0.1  # a perfectly correlated pair
    zb[:, 5] = 1.5  # a constant latent: correlation 0, never NaN
    za[:, 0] = 0.0  # a dead latent
    ours = matching.activation_correlation(za.astype(np.float32), zb.astype(np.float32), device=device, chunk_size=64)
    ref = np.corrcoef(za.T, zb.T)[:30, 30:]
    ref = np.nan_to_num(ref, nan=0.0)
    assert ours.shape == (30, 20)
    assert np.allclose(ours, ref, atol=1e-5)
    assert ours[7, 3] == pytest.approx(1.0, abs=1e-6)
    assert not np.isnan(ours).any() and np.all(ours[:, 5] == 0) and np.all(ours[0] == 0)


def test_activation_correlation_refuses_mismatched_tokens(device):
    with pytest.raises(EmbgeoInputError, match="same tokens"):
        matching.activation_correlation(np.zeros((10, 3)), np.zeros((11, 3)), device=device)
    bad = np.ones((10, 3))
    bad[2, 1] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        matching.activation_correlation(bad, np.ones((10, 3)), device=device)


def test_match_features_max_and_hungarian_against_scipy():
    g = np.random.default_rng(3)
    for shape in [(6, 6), (8, 5), (5, 9)]:
        c = g.uniform(-1, 1, shape)
        h = matching.match_features(c, "hungarian")
        rows, cols = linear_sum_assignment(-c)
        assert c[h.a, h.b].sum() == pytest.approx(c[rows, cols].sum())
        assert len(set(h.a)) == len(h) and len(set(h.b)) == len(h)
        m = matching.match_features(c, "max")
        assert np.array_equal(m.b, np.arange(shape[1])) and np.array_equal(m.a, c.argmax(axis=0))
        assert np.allclose(m.corr, c.max(axis=0))
    with pytest.raises(EmbgeoInputError, match="method"):
        matching.match_features(c, "greedy")


def test_svcca_recovers_planted_canonical_correlations(device):
    g = np.random.default_rng(4)
    n = 6000
    z = g.normal(size=(n, 2))
    rho = np.array([0.9, 0.5])
    x = z @ g.normal(size=(2, 16))  # rank-2 side A
    y = (rho * z + np.sqrt(1 - rho**2) * g.normal(size=(n, 2))) @ g.normal(size=(2, 12))
    assert matching.svcca(x, y, n_components=2, device=device) == pytest.approx(rho.mean(), abs=0.02)
    assert matching.svcca(x, x @ g.normal(size=(16, 16)), n_components=2, device=device) == pytest.approx(1.0, abs=1e-6)


def test_rsa_matches_scipy(device):
    g = np.random.default_rng(5)
    x = g.normal(size=(60, 10))
    y = x @ g.normal(size=(10, 7)) + g.normal(size=(60, 7))
    tri = np.tril_indices(60, -1)
    ref = sps.spearmanr(np.corrcoef(x)[tri], np.corrcoef(y)[tri]).statistic
    assert matching.rsa(x, y, max_rows=None, device=device) == pytest.approx(ref, abs=1e-10)
    assert matching.rsa_test(x, y, None, 20, device=device).statistic == pytest.approx(ref, abs=1e-6)


def test_tests_find_planted_pairing_and_are_uniform_under_independence(device):
    g = np.random.default_rng(6)
    x = g.normal(size=(300, 20))
    y = x @ g.normal(size=(20, 24)) + 0.5 * g.normal(size=(300, 24))
    assert matching.svcca_test(x, y, 10, 200, device=device).p_value == pytest.approx(1 / 201)
    curve = matching.svcca_curve_test(x, y, [3, 10], 50, seed=2, device=device)
    for n, res in zip([3, 10], curve):
        one = matching.svcca_test(x, y, n, 50, seed=2, device=device)
        assert res.statistic == pytest.approx(one.statistic, abs=1e-12)
        assert np.allclose(np.sort(res.null), np.sort(one.null), atol=1e-12)
    assert matching.rsa_test(x, y, None, 200, device=device).p_value == pytest.approx(1 / 201)
    ps = [
        matching.svcca_test(g.normal(size=(80, 8)), g.normal(size=(80, 8)), 3, 99, seed=i, device=device).p_value
        for i in range(40)
    ]
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    ps = [
        matching.rsa_test(g.normal(size=(40, 8)), g.normal(size=(40, 8)), None, 99, seed=i, device=device).p_value
        for i in range(40)
    ]
    assert sps.kstest(ps, "uniform").pvalue > 0.01


def test_align_positions_by_character_spans():
    a = [(0, 3), (3, 4), (4, 9), (9, 9)]
    b = [(0, 3), (3, 6), (6, 9), (4, 9)]
    assert alignment.align_positions(a, b).tolist() == [[0, 0], [2, 3]]
    assert alignment.align_positions(a, a).tolist() == [[0, 0], [1, 1], [2, 2]]  # empty spans are never paired


def _split_dictionaries(planted: bool, seed: int = 0, n_a: int = 150, d_a: int = 32, d_b: int = 48):
    """A's decoder rows, and B's split copies of them: heavy-tailed groups of B latents share one A partner.

    B's latents of one group resemble each other (group cosine about 0.1). Unrelated: the groups' common directions
    are random; planted: they are a linear image of A's rows, so the two geometries agree.
    """
    g = np.random.default_rng(seed)
    x = g.normal(size=(n_a, d_a))
    sizes = np.minimum(1 + g.zipf(1.8, size=n_a), 25)  # heavy-tailed group sizes
    groups = np.repeat(np.arange(n_a), sizes)
    centres = x @ g.normal(size=(d_a, d_b)) if planted else g.normal(size=(n_a, d_b))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = g.normal(size=(groups.size, d_b))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    share = 0.9 if planted else np.sqrt(0.1)
    y = share * centres[groups] + np.sqrt(1 - share**2) * noise
    return x, groups, y


def test_many_to_one_pairs_fool_a_shuffled_b_null_but_not_the_group_null(device):
    x, groups, y = _split_dictionaries(planted=False)
    assert np.bincount(groups).max() > 10  # heavy-tailed: some A latents have many partners
    naive = matching.rsa_test(x[groups], y, None, 200, seed=0, device=device)
    assert naive.p_value < 0.01  # the trap: no shared geometry, yet "significant"
    group = matching.rsa_group_test(x, groups, y, None, 200, seed=0, device=device)
    assert group.statistic == pytest.approx(naive.statistic, abs=1e-6)
    assert group.p_value > 0.05
    pairs = matching.FeaturePairs(
        groups, np.arange(groups.size), np.random.default_rng(1).uniform(0.2, 0.9, groups.size), "max"
    )
    one = matching.one_per_a(pairs)
    assert len(one) == len(np.unique(groups)) and len(set(one.a)) == len(one)
    assert matching.rsa_test(x[one.a], y[one.b], None, 200, seed=0, device=device).p_value > 0.05


def test_planted_shared_geometry_is_found_by_every_view(device):
    x, groups, y = _split_dictionaries(planted=True)
    assert matching.rsa_group_test(x, groups, y, None, 200, seed=0, device=device).p_value == pytest.approx(1 / 201)
    pairs = matching.FeaturePairs(groups, np.arange(groups.size), np.ones(groups.size), "max")
    one = matching.one_per_a(pairs)
    assert matching.rsa_test(x[one.a], y[one.b], None, 200, seed=0, device=device).p_value == pytest.approx(1 / 201)


def test_one_per_a_keeps_the_best_partner_and_group_sizes_count_them():
    pairs = matching.FeaturePairs(
        np.array([3, 1, 3, 3, 2]), np.array([0, 1, 2, 3, 4]), np.array([0.2, 0.5, 0.7, 0.7, 0.1]), "max"
    )
    one = matching.one_per_a(pairs)
    assert list(one.a) == [1, 3, 2] and list(one.b) == [1, 2, 4]  # ties go to the lower B index
    sizes = matching.group_sizes(pairs)
    assert sizes["distinct A"] == 3 and sizes["distinct B"] == 5 and sizes["largest group"] == 3
    assert sizes["pairs sharing an A latent"] == 3 and sizes["groups of size"] == {1: 2, 3: 1}


def test_group_null_ranks_ties_like_scipy(device):
    import torch

    values = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.1, 0.9]], dtype=torch.float64)
    ours = matching._average_ranks(values).numpy()
    for row, ref in zip(ours, values.numpy()):
        assert np.allclose(row, sps.rankdata(ref))


def test_hungarian_pairs_on_candidates_equal_the_dense_assignment():
    g = np.random.default_rng(8)
    for shape in [(30, 40), (40, 25)]:
        c = np.clip(g.normal(0, 0.3, shape), -1, 1)
        rows_ok = g.random(shape[0]) > 0.2
        cols_ok = g.random(shape[1]) > 0.2
        ours = matching.hungarian_pairs(c, rows_ok, cols_ok, min_corr=0.1)
        dense = np.where(rows_ok[:, None] & cols_ok[None, :] & (c > 0.1), c, 0.1)
        r, q = linear_sum_assignment(-dense)
        keep = dense[r, q] > 0.1
        assert c[ours.a, ours.b].sum() == pytest.approx(dense[r[keep], q[keep]].sum())
        assert len(set(ours.a)) == len(ours) == len(set(ours.b)) and np.all(ours.corr > 0.1)
        assert rows_ok[ours.a].all() and cols_ok[ours.b].all()
    assert len(matching.hungarian_pairs(np.zeros((3, 3)))) == 0
