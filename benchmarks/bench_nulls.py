"""Benchmark of chapter 5's permutation nulls: ``rsa_test`` and ``svcca_curve_test``.

Each null is timed against what a user would write (a plain loop that recomputes the statistic with
scipy/numpy for every re-pairing) and against the batched kernel the package used before (written out
below: the RSA triangle gathered through int64 indices per permutation; SVCCA's ``einsum`` and ``svdvals``
once per ``n_components``). Every side uses the same seeded permutations; the null values must agree and the
p-values must be equal before a row is written. Times are CPU seconds of this process (one torch thread, best
of ``--repeats``), which other jobs on the machine inflate less than wall time; the load average is printed.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_nulls.py [--rsa-rows 500 2000] [--permutations 200]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import _timing
import numpy as np
import torch
from scipy import stats as sps

from embgeo_utils.core.stats import from_null
from embgeo_utils.geometry import matching


def cpu_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best CPU time of ``repeats`` calls of ``fn`` and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def draws(n_items: int, n_permutations: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand((n_permutations, n_items), generator=gen), dim=1).numpy()


def decoder_like(n: int, width_a: int, width_b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired rows with shared low-dimensional structure (the shape of matched SAE decoder rows)."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(n, 64))
    x = z @ g.normal(size=(64, width_a)) + 2.0 * g.normal(size=(n, width_a))
    y = z @ g.normal(size=(64, width_b)) + 4.0 * g.normal(size=(n, width_b))
    return x.astype(np.float32), y.astype(np.float32)


def previous_rsa_test(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int):
    """The previous kernel: int64 indices over the triangle per permutation, one gather from B's ranks."""

    def ranks(z: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(z, dtype=torch.float64)
        u = t - t.mean(dim=1, keepdim=True)
        u = u / u.norm(dim=1, keepdim=True)
        c = u @ u.T
        rows, cols = torch.tril_indices(len(z), len(z), offset=-1)
        full = torch.zeros((len(z), len(z)), dtype=torch.float64)
        full[rows, cols] = torch.as_tensor(sps.rankdata(c[rows, cols].numpy()))
        return full + full.T, torch.stack([rows, cols])

    ra, tri = ranks(x)
    rb, _ = ranks(y)
    a = ra[tri[0], tri[1]]
    a = (a - a.mean()) / (a - a.mean()).norm()
    mb = float(rb[tri[0], tri[1]].mean())
    nb = float((rb[tri[0], tri[1]] - mb).norm())
    n = len(x)
    flat, a32 = (rb - mb).to(torch.float32).reshape(-1), a.to(torch.float32)
    step = max(1, min(64, (1 << 28) // (12 * tri.shape[1])))

    def statistic(p: np.ndarray) -> np.ndarray:
        pt = torch.as_tensor(p)
        return ((flat[pt[:, tri[0]] * n + pt[:, tri[1]]] @ a32).double() / nb).numpy()

    observed = float(statistic(np.arange(n)[None, :])[0])
    perms = draws(n, n_permutations, seed)
    null = np.concatenate([statistic(perms[s : s + step]) for s in range(0, n_permutations, step)])
    return from_null(observed, null)


def loop_rsa(x: np.ndarray, y: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """What a user writes: Spearman correlation of the two correlation triangles, per re-pairing."""
    tri = np.tril_indices(len(x), -1)
    cx = np.corrcoef(x.astype(np.float64))[tri]
    y64 = y.astype(np.float64)
    return np.array([sps.spearmanr(cx, np.corrcoef(y64[p])[tri]).statistic for p in perms])


def previous_svcca_curve(x: np.ndarray, y: np.ndarray, comps: list[int], n_permutations: int, seed: int):
    """The previous kernel: for each ``n``, ``einsum`` of ``Ux`` with the gathered ``Uy[p]``, then ``svdvals``."""
    ux = torch.linalg.svd(torch.as_tensor(x - x.mean(0), dtype=torch.float64), full_matrices=False)[0]
    uy = torch.linalg.svd(torch.as_tensor(y - y.mean(0), dtype=torch.float64), full_matrices=False)[0]
    perms = torch.as_tensor(draws(len(x), n_permutations, seed))
    out = []
    for n in comps:
        a, b = ux[:, :n], uy[:, :n]

        def stat(p: torch.Tensor, a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
            return torch.linalg.svdvals(torch.einsum("nk,bnl->bkl", a, b[p])).clamp(0, 1).mean(dim=1)

        observed = float(stat(torch.arange(len(x))[None, :])[0])
        null = torch.cat([stat(perms[s : s + 64]) for s in range(0, n_permutations, 64)]).numpy()
        out.append(from_null(observed, null))
    return out


def loop_svcca(x: np.ndarray, y: np.ndarray, comps: list[int], perms: np.ndarray) -> np.ndarray:
    """What a user writes: numpy SVDs of each side once, then per re-pairing and ``n`` one small SVD."""
    ua = np.linalg.svd(x.astype(np.float64) - x.mean(0), full_matrices=False)[0]
    ub = np.linalg.svd(y.astype(np.float64) - y.mean(0), full_matrices=False)[0]
    return np.array([[np.linalg.svd(ua[:, :n].T @ ub[p, :n], compute_uv=False).mean() for n in comps] for p in perms])


def bench_rsa(rec: _timing.Recorder, n: int, n_perms: int, loop_perms: int, repeats: int) -> None:
    x, y = decoder_like(n, 576, 960)
    print(f"\nRSA null, {n} rows, {n_perms} re-pairings")
    t_new, new = cpu_time(lambda: matching.rsa_test(x, y, None, n_perms, seed=0, device="cpu"), repeats)
    t_old, old = cpu_time(lambda: previous_rsa_test(x, y, n_perms, seed=0), repeats)
    perms = draws(n, n_perms, 0)[:loop_perms]
    t_loop, loop = cpu_time(lambda: loop_rsa(x, y, perms), 1)
    t_loop *= n_perms / loop_perms
    d_old = float(np.abs(new.null - old.null).max())
    d_loop = float(np.abs(new.null[:loop_perms] - loop).max())
    np.testing.assert_allclose(new.null, old.null, atol=1e-6)
    np.testing.assert_allclose(new.null[:loop_perms], loop, atol=1e-6)
    assert new.p_value == old.p_value, (new.p_value, old.p_value)
    agreement = (
        f"max |null difference| vs previous {d_old:.0e}, vs loop {d_loop:.0e}; "
        f"observed differs by {abs(new.statistic - old.statistic):.0e}; p-values equal ({new.p_value:.4g})"
    )
    label = f"rsa_test null, {n_perms} re-pairings (CPU time)"
    inp = f"{n} paired rows, 576 and 960 wide (synthetic)"
    rec.add(label, inp, t_new, f"loop of scipy spearmanr ({loop_perms} re-pairings, extrapolated)", t_loop, None,
            None, agreement)  # fmt: skip
    rec.add(label, inp, t_new, "previous kernel (int64 triangle gather)", t_old, None, None, agreement)


def bench_svcca(rec: _timing.Recorder, comps: list[int], n: int, n_perms: int, repeats: int) -> None:
    x, y = decoder_like(n, 576, 960, seed=1)
    print(f"\nSVCCA null, {n} rows, n_components {comps}, {n_perms} re-pairings")
    t_new, new = cpu_time(lambda: matching.svcca_curve_test(x, y, comps, n_perms, seed=0, device="cpu"), repeats)
    t_old, old = cpu_time(lambda: previous_svcca_curve(x, y, comps, n_perms, seed=0), repeats)
    t_loop, loop = cpu_time(lambda: loop_svcca(x, y, comps, draws(n, n_perms, 0)), repeats)
    d_old = max(float(np.abs(a.null - b.null).max()) for a, b in zip(new, old))
    d_loop = max(float(np.abs(a.null - loop[:, i]).max()) for i, a in enumerate(new))
    for a, b in zip(new, old):
        np.testing.assert_allclose(a.null, b.null, atol=1e-6)
        assert a.p_value == b.p_value, (a.p_value, b.p_value)
    assert d_loop < 1e-6, d_loop
    agreement = f"max |null difference| vs previous {d_old:.0e}, vs loop {d_loop:.0e}; p-values equal"
    label = f"svcca_curve_test null, n_components {comps}, {n_perms} re-pairings (CPU time)"
    inp = f"{n} paired rows, 576 and 960 wide (synthetic)"
    rec.add(label, inp, t_new, "loop of numpy SVDs", t_loop, None, None, agreement)
    rec.add(label, inp, t_new, "previous kernel (einsum + svdvals per n)", t_old, None, None, agreement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rsa-rows", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--svcca-rows", type=int, default=2000)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--loop-permutations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rec = _timing.Recorder(__file__)
    for n in args.rsa_rows:
        bench_rsa(rec, n, args.permutations, args.loop_permutations, args.repeats)
    for comps in ([5, 10, 20, 50, 100], [20]):
        bench_svcca(rec, comps, args.svcca_rows, args.permutations, args.repeats)
    rec.write()


if __name__ == "__main__":
    main()
