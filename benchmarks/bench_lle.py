"""Benchmark of ``embgeo_utils.geometry.lle.lle_weights`` (chapter 2).

Batched LLE weights (one Gram ``bmm`` and one ``torch.linalg.solve`` in float64
per chunk) against scikit-learn's ``barycenter_weights`` (a Python loop of
small solves) on the same neighbours and ``reg = 1e-3``. Neighbours are
computed once with ``knn`` and passed to both, so only the weight solve is timed.
Floor: the larger of the local Gram products (2 n k^2 d flops at the float64
matrix-multiply rate) and reading each neighbour row once (8 n k d bytes at the copy
bandwidth), both measured in this run.

Run: ``python benchmarks/bench_lle.py [--rows N]``.
"""

from __future__ import annotations

import argparse

import _timing
import numpy as np
import sklearn
import torch
from sklearn.manifold._locally_linear import barycenter_weights

from embgeo_utils.geometry.lle import lle_weights
from embgeo_utils.geometry.neighbors import knn
from embgeo_utils.lm.models import input_embeddings


def load_table(rows: int) -> tuple[np.ndarray, str]:
    try:
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
    rec = _timing.Recorder(__file__)
    X, source = load_table(args.rows)
    n, d = X.shape
    print(f"data: {source}, {n} x {d} (float64), reg = 1e-3")
    rate = _timing.gemm_rate(torch.float64)
    bw = _timing.bandwidth()
    print(f"float64 GEMM rate {rate / 1e9:.0f} GFLOP/s, copy bandwidth {bw / 1e9:.1f} GB/s (this run)")
    for k in args.ks:
        _, idx = knn(X, k, device="cpu")
        lle_weights(X[:500], k, device="cpu", indices=idx[:500] % 500)  # warm-up
        t_ours, (_, ours) = _timing.best_time(
            lambda k=k, idx=idx: lle_weights(X, k, reg=1e-3, device="cpu", indices=idx), 3
        )
        t_sk, ref = _timing.best_time(lambda idx=idx: barycenter_weights(X, X, idx, reg=1e-3))
        err = float(np.abs(ours - ref).max())
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
        t_flops = 2.0 * n * k * k * d / rate  # the local Gram matrices
        t_bytes = 8.0 * n * k * d / bw  # reading every neighbour row once
        bound = "flops" if t_flops >= t_bytes else "memory"
        rec.add(
            f"lle_weights(k={k}) vs sklearn barycenter_weights",
            f"{source}, {n} x {d} float64, reg 1e-3, same neighbours",
            t_ours,
            f"scikit-learn {sklearn.__version__}",
            t_sk,
            f"max(2 n k^2 d at {rate / 1e9:.0f} GFLOP/s f64 = {t_flops:.3f} s, "
            f"8 n k d bytes at {bw / 1e9:.1f} GB/s = {t_bytes:.3f} s): {bound}",
            max(t_flops, t_bytes),
            f"max |dw| {err:.0e}",
        )
    print("agreement check passed (weights equal to sklearn's within 1e-6 relative)")
    rec.write()


if __name__ == "__main__":
    main()
