"""Tests for the duplicate-aware neighbour distances (neighbors) and the estimators built on them (intrinsic_dim)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import intrinsic_dim as idm
from embgeo_utils.geometry import neighbors as nb


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


# ----------------------------------------------------------------------------------------
# Float32 ranking with exact float64 order statistics


def _hard_cloud(n: int = 300, d: int = 40, seed: int = 3) -> np.ndarray:
    """A low-dimensional cloud on a large offset, with an outlier of huge norm, duplicates and exact ties."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d)) + 0.05 * rng.standard_normal((n, d)) + 30.0
    X[0] *= 50.0  # a token of huge norm, like an attention sink
    X[5] = X[9]  # duplicates
    X[17] = X[9]
    # Exact ties: 20 and 21 mirror each other around 22 along one axis, so 22 is equidistant from both.
    X[20], X[21] = X[22].copy(), X[22].copy()
    X[20, 0] += 0.5
    X[21, 0] -= 0.5
    return X.astype(np.float32)


def _exact_reference(X: np.ndarray, ranks: list[int], top: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances at ranks and the ``top`` nearest (ties by index) in float64 from differences."""
    X64 = X.astype(np.float64)
    e = ((X64[:, None, :] - X64[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(e, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(X)), e.shape), e), axis=1)
    values = np.take_along_axis(e, order, axis=1)
    return values[:, [r - 1 for r in ranks]], order[:, :top]


def _float32_keys(X: np.ndarray, mask: np.ndarray | None = None):
    x = torch.as_tensor(X)
    n, d = x.shape
    centred = x.double() - x.double().mean(dim=0)
    xc = centred.float()
    sq64 = (centred * centred).sum(dim=1)
    gamma = nb.float32_error_factor(d)
    shift = 2.1 * gamma * sq64 + 1e-30
    score = torch.addmm(sq64.float()[None, :], xc, xc.T, alpha=-2.0)
    score.add_((sq64 + shift).float()[:, None]).clamp_(min=0.0)
    score.fill_diagonal_(float("inf"))
    if mask is not None:
        score[torch.as_tensor(mask)] = float("inf")
    bits = nb.key_bits(n)
    keys = nb.sort_keys(score, bits)
    points = x.double()
    return points, (points * points).sum(dim=1), keys, bits, sq64, shift, gamma


def test_exact_order_statistics_equal_float64_reference() -> None:
    X = _hard_cloud()
    ranks = [1, 2, 3, 4, 8, 16, 32, 64, 128, 256]
    points, norms, keys, bits, sq64, shift, gamma = _float32_keys(X)
    d2, nearest, ok = nb.exact_order_statistics(points, norms, keys, bits, sq64, shift, gamma, ranks, top=4)
    ref_d2, ref_top = _exact_reference(X, ranks, 4)
    assert bool(ok.all())
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(nearest.numpy(), ref_top)
    # Duplicates come out at exactly 0 and, tied, in index order; the mirrored pair is tied for point 22.
    assert d2[5, 0] == 0 and d2[9, 0] == 0
    assert nearest[9, :2].tolist() == [5, 17]
    assert ref_d2[22, 0] == ref_d2[22, 1] and nearest[22, :2].tolist() == [20, 21]


def test_float32_ranking_alone_would_not_be_exact() -> None:
    """The planted effect: the float32 values differ from the exact ones beyond the tolerance the test demands."""
    X = _hard_cloud()
    ranks = [2, 64, 256]
    points, norms, keys, bits, sq64, shift, gamma = _float32_keys(X)
    approx = (keys[:, [r - 1 for r in ranks]] & ~((1 << bits) - 1)).view(torch.float32).double() - shift[:, None]
    ref_d2, _ = _exact_reference(X, ranks, 1)
    positive = ref_d2 > 0
    assert float(np.max(np.abs(approx.numpy() - ref_d2)[positive] / ref_d2[positive])) > 1e-9


def test_exact_rank_distances_chunking_and_duplicates(device) -> None:
    X = _hard_cloud(n=250)
    ranks = [1, 2, 4, 8, 16, 32, 64, 128]
    ref, _ = _exact_reference(X, ranks, 1)
    data = torch.as_tensor(X, device=device)
    one, dup = nb.exact_rank_distances(data, ranks)
    many, _ = nb.exact_rank_distances(data, ranks, chunk_size=7)
    assert dup
    np.testing.assert_array_equal(one.cpu().numpy(), many.cpu().numpy())
    np.testing.assert_allclose(one.cpu().numpy(), ref, rtol=1e-12, atol=0)
    # Without duplicates nothing is flagged; the deduplicated route equals the distinct cloud's distances.
    distinct = np.unique(X, axis=0)
    _, dup = nb.exact_rank_distances(torch.as_tensor(distinct[:200], device=device), [1, 2])
    assert not dup
    dist, n_distinct, kept = nb.exact_rank_distances_deduplicated(data, ranks)
    assert n_distinct == len(distinct) and kept == ranks
    first_copies = nb.unique_rows(torch.as_tensor(X)).numpy()
    expected = np.sqrt(_exact_reference(first_copies, ranks, 1)[0])
    np.testing.assert_allclose(dist.cpu().numpy(), expected, rtol=1e-12)
    with pytest.raises(EmbgeoInputError, match="ranks must lie"):
        nb.exact_rank_distances(data, [0, 2])


def test_exact_rank_distances_reach_past_the_listed_candidates() -> None:
    """Many exact ties at the wanted rank: the band is wider than the pre-selected keys and is resolved in full."""
    rng = np.random.default_rng(0)
    # Points on a circle in a random plane plus its centre: the centre is equidistant from all of them.
    angles = rng.uniform(0, 2 * np.pi, 400)
    basis = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    X = np.vstack([np.zeros((1, 20)), np.c_[np.cos(angles), np.sin(angles)] @ basis.T]).astype(np.float32)
    ranks = [1, 2, 64, 128]
    d2, _ = nb.exact_rank_distances(torch.as_tensor(X), ranks)
    ref, _ = _exact_reference(X, ranks, 1)
    np.testing.assert_allclose(d2.numpy(), ref, rtol=1e-12, atol=0)


def test_gride_from_distances_at_listed_ranks(device) -> None:
    """Distances given only at the ranks GRIDE reads give the estimates of the full sorted table."""
    X = torch.as_tensor(_cloud(n=200, d=5), device=device)
    full, _ = nb.sorted_knn_distances(X, 16)
    ranks = [1, 2, 4, 8, 16]
    ids, err = idm.gride_from_distances(full[None], None, [1, 2, 4, 8], [2, 4, 8, 16])
    part_ids, part_err = idm.gride_from_distances(
        full[None][:, :, [r - 1 for r in ranks]], None, [1, 2, 4, 8], [2, 4, 8, 16], ranks=ranks
    )
    torch.testing.assert_close(part_ids, ids, rtol=0, atol=0)
    torch.testing.assert_close(part_err, err, rtol=0, atol=0)
    with pytest.raises(EmbgeoInputError, match="covering"):
        idm.gride_from_distances(full[None][:, :, :3], None, [1], [4], ranks=[1, 2, 3])


def test_exact_rank_distances_out_of_float32_range(device) -> None:
    """Clouds far beyond float32's range are ranked after an exact power-of-two rescaling."""
    X = _hard_cloud(n=120).astype(np.float64)
    ranks = [1, 2, 8, 32]
    ref, _ = _exact_reference(X, ranks, 1)
    for factor in (1e-30, 1e30):
        d2, _ = nb.exact_rank_distances(torch.as_tensor(X * factor, device=device), ranks)
        np.testing.assert_allclose(d2.cpu().numpy(), ref * factor**2, rtol=1e-12)


def test_single_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with nb.single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), nb.single_thread():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
