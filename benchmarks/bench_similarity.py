"""Benchmark of the chapter 1 permutation test (``embgeo_utils.geometry.similarity``).

Cosine-matrix correlation with a row-permutation null on n shared tokens: the
fast null (both cosine matrices computed once, the second re-indexed per
permutation) against recomputing ``cosine_matrix_correlation`` for each
permuted ``Y``. Timed per permutation; the null values must agree.

Run: ``python benchmarks/bench_similarity.py [--rows N] [--perms P]``.
"""

from __future__ import annotations

import argparse
import time

import _timing
import numpy as np
import torch

from embgeo_utils.geometry.similarity import cosine_matrix_correlation, permutation_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--perms", type=int, default=10, help="permutations timed for each method")
    args = parser.parse_args()
    rec = _timing.Recorder(__file__)
    rng = np.random.default_rng(0)
    n = args.rows
    X = rng.normal(size=(n, 576)).astype(np.float32) + 0.2  # synthetic, shapes of chapter 1 (SmolLM2 vs Gemma-3)
    Y = (X @ rng.normal(size=(576, 640)) + 20 * rng.normal(size=(n, 640))).astype(np.float32)
    print(f"synthetic related clouds {n} x 576 and {n} x 640, {args.perms} permutations each")
    start = time.perf_counter()
    fast = permutation_test("cosine_corr", X, Y, n=args.perms, seed=0, device="cpu")
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = permutation_test(
        lambda A, B: cosine_matrix_correlation(A, B, device="cpu"), X, Y, n=args.perms, seed=0, device="cpu"
    )
    t_slow = time.perf_counter() - start
    print(f"{'':>26} {'s / permutation':>16}")
    print(f"{'fast null (ours)':>26} {t_fast / (args.perms + 1):>16.3f}")
    print(f"{'recompute per permutation':>26} {t_slow / (args.perms + 1):>16.3f}")
    print(f"{'ratio':>26} {t_slow / t_fast:>15.1f}x")
    err = float(np.abs(fast.null - slow.null).max())
    print(f"agreement: observed r {fast.statistic:.4f} vs {slow.statistic:.4f}, max |null difference| {err:.1e}")
    np.testing.assert_allclose(fast.null, slow.null, atol=1e-5)
    assert abs(fast.statistic - slow.statistic) < 1e-5
    print("agreement check passed")
    # Floor: the two n x n cosine matrices (float32 products) once, plus one pass over both per permutation.
    rate = _timing.gemm_rate(torch.float32, n, 576, n)
    bw = _timing.bandwidth()
    floor = 2.0 * n * n * (576 + 640) / rate + (args.perms + 1) * 2 * 4.0 * n * n / bw
    rec.add(
        f"permutation_test('cosine_corr'), {args.perms} permutations",
        f"synthetic related clouds {n} x 576 and {n} x 640",
        t_fast,
        "recomputing cosine_matrix_correlation per permutation",
        t_slow,
        f"two cosine Gram products at {rate / 1e9:.0f} GFLOP/s + one read of both matrices per permutation "
        f"at {bw / 1e9:.0f} GB/s",
        floor,
        f"null values equal to {err:.0e}",
    )
    rec.write()


if __name__ == "__main__":
    main()
