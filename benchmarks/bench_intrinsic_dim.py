"""Benchmark: intrinsic-dimension estimators against their reference packages (chapters 3 and 4).

* ``local_pca_id`` vs scikit-dimension ``lPCA(ver="ratio", alphaRatio=0.9).fit_pw``
  (same neighbourhoods: ``include_self=False``, as skdim builds them);
* ``twonn`` vs DADApy ``Data(X).compute_id_2NN()``;
* ``gride_scaling`` vs DADApy ``Data(X).return_id_scaling_gride(range_max=256)``.

Each timing includes the neighbour search. Needs ``dadapy`` and ``scikit-dimension``,
which are not project dependencies: run it from a separate environment, e.g.
``python3 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install dadapy scikit-dimension``
plus torch and this package on the path. Prints times and ratios; exits non-zero
if the estimates disagree.
"""

from __future__ import annotations

import warnings

import _timing
import numpy as np

from embgeo_utils import intrinsic_dim as idm


def best_time(fn, repeats: int = 3) -> tuple[float, object]:
    return _timing.best_time(fn, repeats)


def report(name: str, ours: float, peer: float) -> None:
    print(f"{name:<34} ours {ours:8.3f} s   peer {peer:8.3f} s   speed-up {peer / ours:6.1f}x")


def main() -> None:
    import skdim
    from dadapy import Data

    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)

    # Local PCA: 3000 points near an 8-dimensional subspace of R^128, k = 50.
    X = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 128)) + 0.05 * rng.standard_normal((3000, 128))
    t_ours, ours = best_time(lambda: idm.local_pca_id(X, k=50, include_self=False, device="cpu"))
    t_peer, peer = best_time(
        lambda: skdim.id.lPCA(ver="ratio", alphaRatio=0.9, verbose=False).fit_pw(X, n_neighbors=50).dimension_pw_,
        repeats=1,
    )
    agree = float(np.mean(ours == peer))
    report("local_pca_id vs skdim lPCA.fit_pw", t_ours, t_peer)
    print(f"    identical per-point IDs: {agree:.4%}  (mean ID {ours.mean():.2f})")
    assert agree >= 0.999, "local PCA IDs disagree with scikit-dimension"

    # TwoNN and GRIDE: 5000 points on a 6-sphere rotated into R^50.
    Y = rng.standard_normal((5000, 7))
    Y = (Y / np.linalg.norm(Y, axis=1, keepdims=True)) @ rng.standard_normal((7, 50))
    t_ours, ours_2nn = best_time(lambda: idm.twonn(Y, device="cpu"))
    t_peer, peer_2nn = best_time(lambda: Data(coordinates=Y.copy(), verbose=False).compute_id_2NN()[0])
    report("twonn vs DADApy compute_id_2NN", t_ours, t_peer)
    print(f"    ours {ours_2nn:.10f}  DADApy {peer_2nn:.10f}")
    assert abs(ours_2nn / peer_2nn - 1) < 1e-8, "TwoNN disagrees with DADApy"

    t_ours, (_, ours_ids, _) = best_time(lambda: idm.gride_scaling(Y, max_scale=256, device="cpu"))
    t_peer, (peer_ids, _, _) = best_time(
        lambda: Data(coordinates=Y.copy(), verbose=False).return_id_scaling_gride(range_max=256)
    )
    report("gride_scaling vs DADApy (range 256)", t_ours, t_peer)
    print(
        f"    max |ours - DADApy| over 8 scales: {np.max(np.abs(ours_ids - peer_ids)):.2e}  ids {np.round(ours_ids, 3)}"
    )
    assert np.allclose(ours_ids, peer_ids, rtol=1e-8, atol=0), "GRIDE disagrees with DADApy"


if __name__ == "__main__":
    main()
