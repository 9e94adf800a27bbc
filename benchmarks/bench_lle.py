"""Benchmark of ``embgeo_utils.lle.lle_weights`` (chapter 2).

Batched LLE weights (one Gram ``bmm`` and one ``torch.linalg.solve`` in float64
per chunk) against scikit-learn's ``barycenter_weights`` (a Python loop of
small solves) on the same neighbours and ``reg = 1e-3``. Neighbours are
computed once with ``knn`` and passed to both, so only the weight solve is timed.
Target: at least 10x.

Run: ``python benchmarks/bench_lle.py [--rows N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from sklearn.manifold._locally_linear import barycenter_weights

from embgeo_utils.lle import lle_weights
from embgeo_utils.neighbors import knn


def load_table(rows: int) -> tuple[np.ndarray, str]:
    try:
        from embgeo_utils.models import input_embeddings

        table = input_embeddings("smollm2-135m").numpy()
        source = "SmolLM2-135M input embeddings (real)"
    except Exception as exc:
        table = np.random.default_rng(0).normal(size=(49_152, 576)).astype(np.float32)
        source = f"SYNTHETIC seeded Gaussian matrix (could not load SmolLM2: {type(exc).__name__})"
    # A fixed random subset of tokens, as chapter 2 uses; float64 so both sides solve the same systems.
    pick = np.sort(np.random.default_rng(0).choice(len(table), size=min(rows, len(table)), replace=False))
    return table[pick].astype(np.float64), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args()
    X, source = load_table(args.rows)
    n, d = X.shape
    print(f"data: {source}, {n} x {d} (float64), reg = 1e-3")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    print(f"\n{'k':>4} {'ours s':>8} {'sklearn s':>10} {'speed-up':>9} {'max |dw|':>10}")
    for k in args.ks:
        _, idx = knn(X, k, device="cpu")
        lle_weights(X[:500], k, device="cpu", indices=idx[:500] % 500)  # warm-up
        start = time.perf_counter()
        _, ours = lle_weights(X, k, reg=1e-3, device="cpu", indices=idx)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        ref = barycenter_weights(X, X, idx, reg=1e-3)
        t_sk = time.perf_counter() - start
        err = float(np.abs(ours - ref).max())
        print(f"{k:>4} {t_ours:>8.2f} {t_sk:>10.2f} {t_sk / t_ours:>8.1f}x {err:>10.1e}")
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    print("agreement check passed (weights equal to sklearn's within 1e-6 relative)")


if __name__ == "__main__":
    main()
