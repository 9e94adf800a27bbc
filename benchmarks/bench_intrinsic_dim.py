"""Benchmark: intrinsic-dimension estimators against their reference packages (chapters 3 and 4).

* ``local_pca_id`` vs scikit-dimension ``lPCA(ver="ratio", alphaRatio=0.9).fit_pw``
  (same neighbourhoods: ``include_self=False``, as skdim builds them);
* ``twonn`` vs DADApy ``Data(X).compute_id_2NN()``;
* ``gride_scaling`` vs DADApy ``Data(X).return_id_scaling_gride(range_max=256)``.

Each timing includes the neighbour search (best of 3 runs). The floor is the float32
matrix-multiply work of the distance search at the rate measured in this run. Needs ``dadapy`` and ``scikit-dimension``,
which are not project dependencies: run it from a separate environment, e.g.
``python3 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install dadapy scikit-dimension``
plus torch and this package on the path. Prints times and ratios; exits non-zero
if the estimates disagree.
"""

from __future__ import annotations

import warnings

import _timing
import numpy as np
import torch

from embgeo_utils.geometry import intrinsic_dim as idm


def main() -> None:
    import skdim
    from dadapy import Data

    warnings.filterwarnings("ignore")
    rec = _timing.Recorder(__file__)
    rng = np.random.default_rng(0)

    # Local PCA: 3000 points near an 8-dimensional subspace of R^128, k = 50.
    X = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 128)) + 0.05 * rng.standard_normal((3000, 128))
    idm.local_pca_id(X[:500], k=50, include_self=False, device="cpu")  # warm-up
    t_ours, ours = _timing.best_time(lambda: idm.local_pca_id(X, k=50, include_self=False, device="cpu"), 3)
    t_peer, peer = _timing.best_time(
        lambda: skdim.id.lPCA(ver="ratio", alphaRatio=0.9, verbose=False).fit_pw(X, n_neighbors=50).dimension_pw_
    )
    agree = float(np.mean(ours == peer))
    rate = _timing.gemm_rate(torch.float32, 1024, 128, 3000)
    flops = 2.0 * 3000 * 3000 * 128 + 2.0 * 3000 * 50 * 50 * 128
    rec.add(
        'local_pca_id(k=50, include_self=False) vs skdim lPCA(ver="ratio").fit_pw(n_neighbors=50)',
        "3000 x 128, rank 8 + noise (synthetic)",
        t_ours,
        "scikit-dimension 0.5.0",
        t_peer,
        f"float32 GEMM: k-NN products + neighbourhood Gram matrices at {rate / 1e9:.0f} GFLOP/s",
        flops / rate,
        f"{agree:.2%} identical per-point IDs",
    )
    assert agree >= 0.999, "local PCA IDs disagree with scikit-dimension"

    # TwoNN and GRIDE: 5000 points on a 6-sphere rotated into R^50.
    Y = rng.standard_normal((5000, 7))
    Y = (Y / np.linalg.norm(Y, axis=1, keepdims=True)) @ rng.standard_normal((7, 50))
    n, d = Y.shape
    rate = _timing.row_block_rate(n, d, 1024)
    floor = 2.0 * n * n * d / rate
    floor_what = f"float32 distance products 2 n^2 d at {rate / 1e9:.0f} GFLOP/s (same block shape, this run)"
    idm.twonn(Y[:1000], device="cpu")  # warm-up
    t_ours, ours_2nn = _timing.best_time(lambda: idm.twonn(Y, device="cpu"), 3)
    t_peer, peer_2nn = _timing.best_time(lambda: Data(coordinates=Y.copy(), verbose=False).compute_id_2NN()[0], 3)
    rel = abs(ours_2nn / peer_2nn - 1)
    rec.add(
        "twonn vs Data(X).compute_id_2NN()",
        "5000 x 50 (6-sphere, synthetic)",
        t_ours,
        "DADApy 0.3.4",
        t_peer,
        floor_what,
        floor,
        f"rel. diff {rel:.0e} (ours {ours_2nn:.10f})",
    )
    assert rel < 1e-8, "TwoNN disagrees with DADApy"

    t_ours, (_, ours_ids, _) = _timing.best_time(lambda: idm.gride_scaling(Y, max_scale=256, device="cpu"), 3)
    t_peer, (peer_ids, _, _) = _timing.best_time(
        lambda: Data(coordinates=Y.copy(), verbose=False).return_id_scaling_gride(range_max=256), 3
    )
    rel = float(np.max(np.abs(ours_ids / peer_ids - 1)))
    rec.add(
        "gride_scaling(max_scale=256) vs Data(X).return_id_scaling_gride(range_max=256)",
        "5000 x 50 (6-sphere, synthetic)",
        t_ours,
        "DADApy 0.3.4",
        t_peer,
        floor_what,
        floor,
        f"max rel. diff over 8 scales {rel:.0e}",
    )
    assert np.allclose(ours_ids, peer_ids, rtol=1e-8, atol=0), "GRIDE disagrees with DADApy"
    rec.write()


if __name__ == "__main__":
    main()
