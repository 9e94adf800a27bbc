"""Chapter 5's permutation nulls (RSA, grouped RSA, SVCCA) against the direct kernels they replaced.

Each reference below is the straightforward batched kernel the package used before its null was rewritten
(a gather over the whole triangle for RSA, ranks recomputed per draw for the group null, one SVD per
``n_components`` for SVCCA), written here with public pieces only. The rewritten nulls must give the same null
values (to float32 rounding), the same observed statistics and exactly the same p-values, on inputs with tied
values, row counts that are not a multiple of any chunk, and ``max_rows`` subsampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from embgeo_utils.core.stats import from_null
from embgeo_utils.geometry import matching


def _draws(n_items: int, n_permutations: int, seed: int) -> torch.Tensor:
    """The permutations :func:`embgeo_utils.core.stats.permutation_test` draws for ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.argsort(torch.rand((n_permutations, n_items), generator=gen), dim=1)


def _null_test(statistic, n_items: int, n_permutations: int, seed: int, chunk: int):
    observed = float(statistic(torch.arange(n_items)[None, :])[0])
    perms = _draws(n_items, n_permutations, seed)
    null = torch.cat([statistic(perms[s : s + chunk]) for s in range(0, n_permutations, chunk)])
    return from_null(observed, null.double().numpy())


def _pick(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def _rank_matrix_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x - x.mean(dim=1, keepdim=True)
    u = xc / xc.norm(dim=1, keepdim=True)
    corr = u @ u.T
    n = x.shape[0]
    rows, cols = torch.tril_indices(n, n, offset=-1)
    full = torch.zeros((n, n), dtype=torch.float64)
    full[rows, cols] = torch.as_tensor(rankdata(corr[rows, cols].numpy()))
    return full + full.T, torch.stack([rows, cols])


def rsa_test_ref(x: np.ndarray, y: np.ndarray, max_rows: int | None, n_permutations: int, seed: int):
    """The previous RSA null: int64 triangle indices per permutation, one gather from B's flattened ranks."""
    pick = _pick(len(x), max_rows, seed)
    xt, yt = torch.as_tensor(x[pick], dtype=torch.float64), torch.as_tensor(y[pick], dtype=torch.float64)
    ra, tri = _rank_matrix_ref(xt)
    rb, _ = _rank_matrix_ref(yt)
    a = ra[tri[0], tri[1]]
    a = a - a.mean()
    a = a / a.norm()
    mb = float(rb[tri[0], tri[1]].mean())
    nb = float((rb[tri[0], tri[1]] - mb).norm())
    n = rb.shape[0]
    flat = (rb - mb).to(torch.float32).reshape(-1)
    a32 = a.to(torch.float32)

    def statistic(p: torch.Tensor) -> torch.Tensor:
        return (flat[p[:, tri[0]] * n + p[:, tri[1]]] @ a32).double() / nb

    return _null_test(statistic, n, n_permutations, seed, 16)


def _average_ranks_ref(values: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.stack([rankdata(v) for v in values.numpy()]))


def rsa_group_test_ref(x: np.ndarray, groups: np.ndarray, y: np.ndarray, max_rows, n_permutations: int, seed: int):
    """The previous group null: the A side's values re-ranked (ties averaged) for every draw."""
    g = np.asarray(groups, dtype=np.int64)
    pick = _pick(g.size, max_rows, seed)
    g, yt = g[pick], torch.as_tensor(y[pick], dtype=torch.float64)
    used, local = np.unique(g, return_inverse=True)
    xu = torch.as_tensor(x[used], dtype=torch.float64)
    xc = xu - xu.mean(dim=1, keepdim=True)
    unit = xc / xc.norm(dim=1, keepdim=True)
    ca = (unit @ unit.T).clamp(-1, 1).reshape(-1)
    rb, tri = _rank_matrix_ref(yt)
    b = rb[tri[0], tri[1]]
    b = (b - b.mean()) / (b - b.mean()).norm()
    gi, gj = torch.as_tensor(local)[tri[0]], torch.as_tensor(local)[tri[1]]
    u = used.size

    def statistic(p: torch.Tensor) -> torch.Tensor:
        pi, pj = p[:, gi], p[:, gj]
        ranks = _average_ranks_ref(torch.where(pi == pj, 1.0, ca[pi * u + pj]))
        ranks = ranks - ranks.mean(dim=1, keepdim=True)
        return (ranks @ b) / ranks.norm(dim=1)

    return _null_test(statistic, u, n_permutations, seed, 16)


def svcca_curve_ref(x: np.ndarray, y: np.ndarray, n_components, n_permutations: int, seed: int):
    """The previous SVCCA null: for each ``n``, ``Ux^T Uy[p]`` by einsum and its singular values."""

    def left(z: np.ndarray) -> tuple[torch.Tensor, int]:
        zt = torch.as_tensor(z, dtype=torch.float64)
        u, s, _ = torch.linalg.svd(zt - zt.mean(dim=0, keepdim=True), full_matrices=False)
        return u, int((s > s[0] * 1e-10).sum())

    (ux_all, rx), (uy_all, ry) = left(x), left(y)
    out = []
    for n in n_components:
        ux, uy = ux_all[:, : min(n, rx)], uy_all[:, : min(n, ry)]

        def statistic(p: torch.Tensor, ux: torch.Tensor = ux, uy: torch.Tensor = uy) -> torch.Tensor:
            return torch.linalg.svdvals(torch.einsum("nk,bnl->bkl", ux, uy[p])).clamp(0, 1).mean(dim=1)

        out.append(_null_test(statistic, len(x), n_permutations, seed, 64))
    return out


def _tied_rows(n: int, width: int, seed: int, repeats: int = 3) -> np.ndarray:
    """Rows on a coarse grid, some repeated: their correlations tie, inside and across rows."""
    g = np.random.default_rng(seed)
    rows = np.round(g.normal(size=(n, width)))
    rows[: n // 4] = rows[np.arange(n // 4) % repeats + n // 4]  # repeated rows
    rows[rows.std(axis=1) == 0, 0] += 1.0  # no constant row
    return rows


def _assert_same_test(new, ref, atol: float = 1e-6) -> None:
    assert new.n_permutations == ref.n_permutations
    np.testing.assert_allclose(new.null, ref.null, rtol=0, atol=atol)
    assert new.statistic == pytest.approx(ref.statistic, abs=atol)
    assert new.p_value == ref.p_value


@pytest.mark.parametrize(
    ("n", "max_rows", "n_permutations", "seed"),
    [(37, None, 150, 0), (90, 61, 201, 3), (300, 170, 70, 5)],
)
def test_rsa_null_equals_the_previous_kernel(n, max_rows, n_permutations, seed):
    g = np.random.default_rng(seed)
    x = _tied_rows(n, 6, seed)
    y = x @ g.normal(size=(6, 5)) + 2.0 * _tied_rows(n, 5, seed + 1)
    new = matching.rsa_test(x, y, max_rows, n_permutations, seed, device="cpu")
    _assert_same_test(new, rsa_test_ref(x, y, max_rows, n_permutations, seed))


def test_rsa_null_values_are_rsa_of_the_re_paired_rows():
    g = np.random.default_rng(7)
    x = g.normal(size=(150, 8))
    y = x @ g.normal(size=(8, 6)) + g.normal(size=(150, 6))  # continuous: no ties for rounding to break
    new = matching.rsa_test(x, y, 130, 40, seed=4, device="cpu")
    pick = _pick(150, 130, 4)
    xs, ys = x[pick], y[pick]
    assert new.statistic == pytest.approx(matching.rsa(xs, ys, None, device="cpu"), abs=1e-6)
    direct = [matching.rsa(xs, ys[p], None, device="cpu") for p in _draws(130, 40, 4)[:6].numpy()]
    np.testing.assert_allclose(new.null[:6], direct, rtol=0, atol=1e-6)


def test_rsa_null_counts_the_identity_as_the_observed_value():
    g = np.random.default_rng(11)
    x, y = g.normal(size=(5, 4)), g.normal(size=(5, 4))
    new = matching.rsa_test(x, y, None, 300, seed=2, device="cpu")
    identity = (_draws(5, 300, 2) == torch.arange(5)).all(dim=1).numpy()
    assert identity.sum() > 0  # 5! = 120 orders: the identity is drawn a few times
    assert np.all(new.null[identity] == new.statistic)
    assert new.p_value == rsa_test_ref(x, y, None, 300, 2).p_value


@pytest.mark.parametrize(
    ("n", "width_x", "width_y", "components", "n_permutations"),
    [(130, 12, 30, (3, 10, 20), 150), (97, 40, 9, (5, 20, 8), 70), (60, 6, 6, (4, 6, 10), 65)],
)
def test_svcca_curve_null_equals_the_previous_kernel(n, width_x, width_y, components, n_permutations):
    g = np.random.default_rng(n)
    x = g.normal(size=(n, width_x))
    x[:, -1] = x[:, 0]  # rank below the width on the A side: n_components above it are capped
    y = x[:, :1] @ g.normal(size=(1, width_y)) + g.normal(size=(n, width_y))
    new = matching.svcca_curve_test(x, y, components, n_permutations, seed=9, device="cpu")
    for got, ref in zip(new, svcca_curve_ref(x, y, components, n_permutations, 9)):
        _assert_same_test(got, ref, atol=1e-10)
    one = matching.svcca_test(x, y, components[1], n_permutations, seed=9, device="cpu")
    _assert_same_test(one, new[1], atol=1e-12)
