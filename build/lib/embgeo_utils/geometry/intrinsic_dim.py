"""Intrinsic-dimension estimators (chapters 3 and 4).

Three families, all running as batched torch code on the chosen device:

* ``local_pca_id``: per-point ID from PCA of each point's k-neighbourhood
  (chapter 3, per-token ID of the embedding table, after Lee et al. 2025).
* ``twonn``: the TwoNN estimator of Facco et al. (2017), with DADApy's default
  fit (a least-squares line through the origin on the empirical distribution of
  ``mu = r2 / r1``, the largest 10 % of ``mu`` discarded).
* ``gride`` / ``gride_scaling``: the maximum-likelihood GRIDE estimator of Denti
  et al. (2022) at one or several neighbour ranks, solved exactly as DADApy's
  ``return_id_scaling_gride`` does (same outlier filter, same bisection).

``twonn_batched`` and ``gride_batched`` evaluate many equal-sized clouds at once
(chapter 4: every layer of a prompt), sharing one distance computation.

Duplicate points. Identical rows (common in quantized embedding tables and in
hidden states of repeated tokens) give zero distances and infinite ratios. The
single-cloud functions delete duplicate rows first. The batched functions keep
the array shape and instead mask duplicates: each group of identical rows is
represented by its first row, the other copies contribute no ratio, and every
point's neighbour list skips the copies of itself and the non-first copies of
other groups. This is exactly the neighbour structure of the de-duplicated
cloud, so both routes give the same estimates (tested). The distance code
lives in :mod:`embgeo_utils.geometry.neighbors`; ``twonn_from_distances`` and
``gride_from_distances`` turn its sorted distances into estimates.

Single clouds (``twonn``, ``gride``, ``gride_scaling``) rank the candidates with
float32 matrix products and recompute only the distances at the ranks the
estimator reads exactly in float64
(:func:`~embgeo_utils.geometry.neighbors.exact_rank_distances`), so the estimates are
those of exact float64 distances.

References:
    E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), Estimating the intrinsic
    dimension of datasets by a minimal neighborhood information, Sci. Rep. 7, 12140.

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), The generalized ratios intrinsic
    dimension estimator, Sci. Rep. 12, 20005.

    A. Glielmo et al. (2022), DADApy: Distance-based analysis of data-manifolds in
    Python, Patterns 3(10). (Reference implementation matched here.)

    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared Global and Local
    Geometry of Language Model Embeddings, arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ..core.device import chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import as_matrix
from .neighbors import (
    DISTANCE_FLOOR,
    batched_knn_distances,
    check_queries,
    exact_rank_distances_deduplicated,
    knn,
    single_thread,
)

__all__ = [
    "check_scales",
    "check_twonn_args",
    "default_scales",
    "gride",
    "gride_batched",
    "gride_from_distances",
    "gride_scaling",
    "local_pca_id",
    "twonn",
    "twonn_batched",
    "twonn_from_distances",
]


ArrayLike = np.ndarray | torch.Tensor


_EPS64 = DISTANCE_FLOOR


# DADApy's search interval and precision for the GRIDE likelihood root.
_D_LOW, _D_HIGH, _D_TOL = 1e-3, 1e3, 1e-7


@torch.no_grad()
def local_pca_id(
    X: ArrayLike,
    k: int = 50,
    variance: float = 0.9,
    device: str | torch.device = "auto",
    indices: ArrayLike | None = None,
    include_self: bool = True,
    chunk_size: int | None = None,
    rows: np.ndarray | torch.Tensor | Sequence[int] | None = None,
) -> np.ndarray:
    """Per-point intrinsic dimension from PCA of each point's neighbourhood.

    Chapter 3 (per-token local ID). The neighbourhood of point ``i`` is the
    point itself plus its ``k`` nearest Euclidean neighbours (the point is
    excluded from its own neighbour list by index, so duplicate rows still count
    as neighbours), centred on their own mean. The ID is the fewest principal
    components whose eigenvalues sum to at least ``variance`` of the total
    variance of that neighbourhood. With ``include_self=False`` the
    neighbourhood is the ``k`` neighbours only, which is how scikit-dimension's
    ``lPCA(ver="ratio").fit_pw`` builds it; the two choices differ by one point.

    Eigenvalues come from the ``(m, m)`` Gram matrix of the centred
    neighbourhood (``m`` = its size) when ``m <= d``, else from the ``(d, d)``
    covariance; both have the same non-zero spectrum. The neighbourhoods are
    centred and their small matrices formed in float32 (the input precision);
    all small matrices of a chunk then share one batched
    ``torch.linalg.eigvalsh`` call in float64.

    Args:
        X: ``(n, d)`` points (numpy or torch).
        k: neighbours per point, ``1 <= k < n``.
        variance: fraction of variance to explain, in ``(0, 1]``.
        device: where to compute (``"auto"``: GPU if present).
        indices: optional precomputed ``(n, k')`` neighbour indices (rows of
            ``X``) sorted by distance, self excluded; ``(len(rows), k')`` when
            ``rows`` is given. The first ``k`` columns are used.
        include_self: add the point itself to its neighbourhood (default, our
            choice for the book).
        chunk_size: neighbourhoods per batch; default keeps a batch near 128 MiB.
        rows: row indices of ``X`` to evaluate (1-D integers in ``[0, n)``);
            their neighbours are still searched among all rows of ``X``
            (``neighbors.knn(..., queries=rows)``). Chapter 3 uses it to give
            an ID to a sample of a large vocabulary. ``None`` evaluates every row.

    Returns:
        ``(n,)`` int array of local IDs, ``(len(rows),)`` with ``rows`` (0 where
        a neighbourhood has no spread). Entry ``j`` equals entry ``rows[j]`` of
        the all-rows result.

    Raises:
        EmbgeoInputError: on NaN/inf, a bad shape, invalid ``k``/``variance``/``indices``,
            or ``rows`` that are not 1-D integer row indices in ``[0, n)``.

    References:
        A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), arXiv:2503.21073.
        K. Fukunaga, D. R. Olsen (1971), An algorithm for finding intrinsic
        dimensionality of data, IEEE Trans. Comput. C-20(2).
    """
    dev = get_device(device)
    data = as_matrix(X, "X", device=dev, dtype=torch.float32)
    n, d = data.shape
    if not 0.0 < variance <= 1.0:
        raise EmbgeoInputError(f"variance must be in (0, 1], got {variance}.")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise EmbgeoInputError(f"k must be an integer between 1 and {n - 1} for {n} points, got {k!r}.")
    own = torch.arange(n, device=dev) if rows is None else check_queries(rows, n, dev)
    n_out = own.shape[0]
    if indices is None:
        _, idx_np = knn(data, int(k), device=dev, queries=None if rows is None else own)
        idx = torch.as_tensor(idx_np, device=dev)
    else:
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.ndim != 2 or idx.shape[0] != n_out or idx.shape[1] < k:
            what = "every point" if rows is None else "each of the rows"
            raise EmbgeoInputError(
                f"indices must have shape ({n_out}, >= {k}) (neighbours of {what}), got {tuple(idx.shape)}."
            )
        idx = idx[:, :k].to(device=dev, dtype=torch.long)
        if bool(((idx < 0) | (idx >= n)).any()):
            raise EmbgeoInputError(f"indices must lie in [0, {n}); fix the neighbour table.")
    if include_self:
        idx = torch.cat([own[:, None], idx], dim=1)
    m = idx.shape[1]
    step = chunk_rows(4 * m * max(m, d) + 4 * m * d, dev, chunk_size)
    out = torch.empty(n_out, dtype=torch.long, device=dev)
    for start in range(0, n_out, step):
        block = data[idx[start : start + step]]  # (c, m, d) float32
        block = block - block.mean(dim=1, keepdim=True)
        if m <= d:
            small = block @ block.transpose(1, 2)
        else:
            small = block.transpose(1, 2) @ block
        if small.device.type == "cuda" and small.shape[-1] > 32:
            # cuSOLVER batches symmetric eigenproblems only up to 32 x 32; larger ones solve faster on the host
            eig = torch.linalg.eigvalsh(small.to("cpu", torch.float64)).to(dev)
        else:
            eig = torch.linalg.eigvalsh(small.to(torch.float64))
        eig = eig.flip(-1).clamp_(min=0.0)
        total = eig.sum(dim=1, keepdim=True)
        ratio = eig.cumsum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
        ids = (ratio < variance).sum(dim=1) + 1
        out[start : start + step] = torch.where(total[:, 0] > 0, ids, torch.zeros_like(ids))
    return out.cpu().numpy()


def check_scales(scales: Sequence[int] | np.ndarray | int) -> np.ndarray:
    """GRIDE ranks ``n2`` as an int64 array, or a clear error unless they are even integers >= 2 (chapters 3 and 4).

    Raises:
        EmbgeoInputError: on an empty list, non-integers, or odd or too small ranks.
    """
    arr = np.atleast_1d(np.asarray(scales))
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or bool((arr < 2).any()) or bool((arr % 2).any()):
        raise EmbgeoInputError(
            f"scales must be even integers >= 2 (the rank n2, with n1 = n2 / 2), got {list(np.ravel(scales))}."
        )
    return arr.astype(np.int64)


def default_scales(n_points: int, max_scale: int | None = None) -> np.ndarray:
    """GRIDE ranks ``n2 = 2, 4, 8, ...`` up to ``max_scale`` and to ``n_points - 1``.

    DADApy's ``return_id_scaling_gride(range_max=R)`` uses the same ranks with
    ``max_scale = R``. Chapter 4 uses ``max_scale = 256`` as Viswanathan et al.
    """
    top = n_points - 1 if max_scale is None else min(int(max_scale), n_points - 1)
    if top < 2:
        raise EmbgeoInputError(f"GRIDE needs at least 3 distinct points, got {n_points}: use a longer prompt.")
    return 2 ** np.arange(1, int(np.log2(top)) + 1, dtype=np.int64)


def _twonn_from_mu(mu: torch.Tensor, valid: torch.Tensor, discard_fraction: float, algorithm: str) -> torch.Tensor:
    """TwoNN estimates for ``(b, n)`` ratios, ignoring entries where ``valid`` is False."""
    n_valid = valid.sum(dim=1).to(torch.float64)
    log_mu = torch.where(valid, torch.log(mu), torch.full_like(mu, float("inf")))
    if algorithm == "ml":
        return (n_valid - 1.0) / torch.where(valid, log_mu, torch.zeros_like(log_mu)).sum(dim=1)
    keep = 1.0 - discard_fraction
    n_eff = torch.floor(n_valid * keep)
    x = torch.sort(log_mu, dim=1).values
    rank = torch.arange(1, mu.shape[1] + 1, device=mu.device, dtype=torch.float64)[None, :]
    used = rank <= n_eff[:, None]
    x = torch.where(used, x, torch.zeros_like(x))
    y = torch.where(used, -torch.log1p(-rank / n_valid[:, None]), torch.zeros_like(x))
    return (x * y).sum(dim=1) / (x * x).sum(dim=1)


def check_twonn_args(discard_fraction: float, algorithm: str) -> Literal["base", "ml"]:
    """Validate TwoNN's arguments and return the algorithm actually used (chapters 3 and 4).

    ``discard_fraction = 0`` turns ``"base"`` into ``"ml"``, as in DADApy.

    Raises:
        EmbgeoInputError: on a fraction outside ``[0, 1)`` or an unknown algorithm.
    """
    if not 0.0 <= discard_fraction < 1.0:
        raise EmbgeoInputError(f"discard_fraction must be in [0, 1), got {discard_fraction}.")
    if algorithm not in ("base", "ml"):
        raise EmbgeoInputError(f"algorithm must be 'base' or 'ml', got {algorithm!r}.")
    # As in DADApy: keeping every ratio makes the fit the maximum-likelihood estimate.
    return "ml" if np.isclose(discard_fraction, 0.0) or algorithm == "ml" else "base"


def twonn_from_distances(
    dist: torch.Tensor,
    valid: torch.Tensor | None = None,
    discard_fraction: float = 0.1,
    algorithm: Literal["base", "ml"] = "base",
) -> torch.Tensor:
    """TwoNN IDs of a stack of clouds from their sorted neighbour distances (chapters 3 and 4).

    The rule of :func:`twonn` applied to ``mu = dist[..., 1] / dist[..., 0]``
    of every cloud, leaving out the points where ``valid`` is False (non-first
    copies of duplicate rows, see :func:`embgeo_utils.geometry.neighbors.knn_from_sq_distances`).

    Args:
        dist: ``(b, n, k)`` sorted neighbour distances, ``k >= 2``, all positive.
        valid: ``(b, n)`` mask of the points that count (default: all).
        discard_fraction: fraction of the largest ratios left out of the fit.
        algorithm: ``"base"`` (linear fit) or ``"ml"`` (maximum likelihood).

    Returns:
        ``(b,)`` float64 tensor of IDs on ``dist``'s device.

    Raises:
        EmbgeoInputError: on a bad shape or bad arguments.
    """
    algorithm = check_twonn_args(discard_fraction, algorithm)
    if dist.ndim != 3 or dist.shape[2] < 2:
        raise EmbgeoInputError(f"dist must be (clouds, points, >= 2 neighbours), got shape {tuple(dist.shape)}.")
    if valid is None:
        valid = torch.ones(dist.shape[:2], dtype=torch.bool, device=dist.device)
    elif tuple(valid.shape) != tuple(dist.shape[:2]):
        raise EmbgeoInputError(f"valid must have shape {tuple(dist.shape[:2])}, got {tuple(valid.shape)}.")
    return _twonn_from_mu(dist[:, :, 1] / dist[:, :, 0], valid, discard_fraction, algorithm)


@torch.no_grad()
def twonn(
    X: ArrayLike,
    discard_fraction: float = 0.1,
    algorithm: Literal["base", "ml"] = "base",
    device: str | torch.device = "auto",
) -> float:
    """TwoNN intrinsic dimension of a point cloud (chapters 3 and 4).

    Duplicate rows are removed first. With ``mu_i = r_{i,2} / r_{i,1}`` the
    ratio of the second to the first neighbour distance and ``N`` distinct
    points, ``algorithm="base"`` (DADApy's default) sorts ``log mu``, keeps the
    smallest ``floor(N * (1 - discard_fraction))`` and fits the line
    ``-log(1 - i/N) = d * log mu_(i)`` through the origin by least squares;
    ``algorithm="ml"`` (or ``discard_fraction=0``) uses the maximum-likelihood
    value ``(N - 1) / sum_i log mu_i`` over all points. This reproduces
    ``dadapy.Data(X).compute_id_2NN(algorithm, mu_fraction=1 - discard_fraction)``.

    Args:
        X: ``(n, d)`` points.
        discard_fraction: fraction of the largest ``mu`` left out of the fit.
        algorithm: ``"base"`` (linear fit) or ``"ml"`` (maximum likelihood).
        device: where to compute.

    Returns:
        The estimated intrinsic dimension.

    Raises:
        EmbgeoInputError: on NaN/inf, a bad shape, bad arguments or fewer than 3 distinct points.

    References:
        E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), Sci. Rep. 7, 12140.
    """
    algorithm = check_twonn_args(discard_fraction, algorithm)
    data = as_matrix(X, "X", device=get_device(device), dtype=torch.float64)
    dist, _, _ = exact_rank_distances_deduplicated(data, [1, 2], "TwoNN")
    mu = (dist[:, 1] / dist[:, 0])[None, :]
    with single_thread():
        return float(_twonn_from_mu(mu, torch.ones_like(mu, dtype=torch.bool), discard_fraction, algorithm)[0])


@torch.no_grad()
def twonn_batched(
    stack: ArrayLike,
    discard_fraction: float = 0.1,
    algorithm: Literal["base", "ml"] = "base",
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """TwoNN for a stack of equal-sized clouds ``(b, n, d)`` (chapter 4); same rule as :func:`twonn`.

    Duplicates are masked per cloud (see the module docstring), which gives the
    same values as :func:`twonn` on each cloud.

    Returns:
        ``(b,)`` float array.
    """
    algorithm = check_twonn_args(discard_fraction, algorithm)
    x = _as_stack(stack, get_device(device))
    dist, valid = batched_knn_distances(x, 2, dtype=dtype, what="TwoNN")
    return _twonn_from_mu(dist[:, :, 1] / dist[:, :, 0], valid, discard_fraction, algorithm).cpu().numpy()


def _gride_root(log_mu: torch.Tensor, count: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Root of the GRIDE likelihood equation, reported as DADApy's bisection reports it.

    ``g(d) = sum_i (a / (1 - mu_i^-d) + c) log mu_i - (N - 1) / d`` (minus the
    derivative of the log-likelihood, increasing in ``d``) is solved by Newton
    steps in ``log d`` kept inside a shrinking bracket. DADApy then halves ``[1e-3, 1e3]``
    until it is narrower than ``1e-7``, keeping the half that holds the sign
    change; replaying those halvings with the known root returns the same
    number without evaluating ``g`` 34 more times.
    """
    n_minus_1 = count - 1.0
    lo = torch.full_like(count, _D_LOW)
    hi = torch.full_like(count, _D_HIGH)
    d = (n_minus_1 / (c[:, :, 0] * log_mu.sum(dim=2))).nan_to_num_(_D_HIGH).clamp_(_D_LOW, _D_HIGH)

    def g_and_slope(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.mul(log_mu, -d[:, :, None]).exp_()
        one_m = torch.sub(1.0, e).clamp_(min=2 * _D_TOL)
        g = (a / one_m + c).mul_(log_mu).sum(dim=2) - n_minus_1 / d
        slope = (e / one_m.square_()).mul_(log_mu.square()).mul_(-a).sum(dim=2) + n_minus_1 / d**2
        return g, slope

    for _ in range(200):
        g, slope = g_and_slope(d)
        hi = torch.where(g > 0, d, hi)
        lo = torch.where(g > 0, lo, d)
        step = d * torch.exp(-g / (slope * d))  # Newton step in log d
        step = torch.where((step >= lo) & (step <= hi), step, (lo * hi).sqrt())
        done = bool(((step - d).abs() <= 1e-12 * d).all())
        d = step
        if done:
            break

    sign_hi, _ = g_and_slope(torch.full_like(count, _D_HIGH))
    lo = torch.full_like(count, _D_LOW)
    hi = torch.full_like(count, _D_HIGH)
    width = _D_HIGH - _D_LOW
    while width > _D_TOL:  # the same halvings as DADApy's loop
        mid = (lo + hi) / 2.0
        same_side = torch.where(sign_hi > 0, mid > d, torch.ones_like(mid, dtype=torch.bool))
        hi = torch.where(same_side, mid, hi)
        lo = torch.where(same_side, lo, mid)
        width /= 2.0
    return (lo + hi) / 2.0


def _gride_from_mu(
    mu: torch.Tensor, valid: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRIDE maximum-likelihood ID and its error for ``(b, s, n)`` ratios ``mu = r_n2 / r_n1``.

    Follows DADApy 0.3.4: ratios equal to 1 are nudged up by ``10 eps``; ratios
    at or above ``q50 + 20 (q95 - q50)`` are dropped as outliers; the root of the
    derivative of the log-likelihood is bracketed in ``[1e-3, 1e3]`` and bisected
    to ``1e-7`` (see :func:`_gride_root`); the error is the inverse square root of the Fisher information.
    """
    mu = torch.where(mu == 1.0, mu + 10 * _EPS64, mu).contiguous()
    valid = valid[:, None, :].expand_as(mu)
    q95, q50 = torch.nanquantile(
        torch.where(valid, mu, torch.full_like(mu, float("nan"))),
        torch.tensor([0.95, 0.5], dtype=mu.dtype, device=mu.device),
        dim=2,
    )
    keep = valid & (mu < (20.0 * (q95 - q50) + q50)[:, :, None])
    count = keep.sum(dim=2).to(mu.dtype)
    log_mu = torch.where(keep, torch.log(mu), torch.zeros_like(mu))
    a = (1.0 + n1 - n2).to(mu.dtype)[None, :, None]
    c = (n2 - 1.0).to(mu.dtype)[None, :, None]

    ids = _gride_root(log_mu, count, a, c)

    one_m = (-torch.expm1(-ids[:, :, None] * log_mu)).clamp_(min=5 * _EPS64)
    term = (log_mu / one_m) ** 2 * torch.exp(-ids[:, :, None] * log_mu)
    fisher = count / ids**2 + (-a * torch.where(keep, term, torch.zeros_like(term))).sum(dim=2)
    return ids, fisher.rsqrt()


def gride_from_distances(
    dist: torch.Tensor,
    valid: torch.Tensor | None,
    n1s: np.ndarray | Sequence[int],
    n2s: np.ndarray | Sequence[int],
    ranks: np.ndarray | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRIDE IDs of a stack of clouds at several rank pairs, from sorted neighbour distances (chapters 3 and 4).

    The likelihood of :func:`gride` for every cloud and every pair
    ``(n1s[j], n2s[j])``, solved for all at once, leaving out the points where
    ``valid`` is False.

    Args:
        dist: ``(b, n, k)`` sorted neighbour distances with ``k >= max(n2s)``, all positive.
        valid: ``(b, n)`` mask of the points that count (``None``: all).
        n1s: inner ranks, ``1 <= n1 < n2``.
        n2s: outer ranks, same length as ``n1s``.
        ranks: the neighbour ranks that the columns of ``dist`` hold (default
            ``1, 2, ..., k``); every ``n1`` and ``n2`` must be among them.

    Returns:
        ``(ids, errors)``: two ``(b, len(n2s))`` float64 tensors on ``dist``'s
        device, the IDs and their Fisher-information standard errors.

    Raises:
        EmbgeoInputError: on bad ranks or shapes.
    """
    n1s, n2s = np.atleast_1d(np.asarray(n1s, dtype=np.int64)), np.atleast_1d(np.asarray(n2s, dtype=np.int64))
    if n1s.shape != n2s.shape or n1s.size == 0 or bool((n1s < 1).any()) or bool((n2s <= n1s).any()):
        raise EmbgeoInputError(f"GRIDE needs rank pairs 1 <= n1 < n2, got n1={n1s.tolist()}, n2={n2s.tolist()}.")
    if ranks is None:
        if dist.ndim != 3 or dist.shape[2] < int(n2s.max()):
            raise EmbgeoInputError(
                f"dist must be (clouds, points, >= {int(n2s.max())} neighbours), got shape {tuple(dist.shape)}."
            )
        col1, col2 = n1s - 1, n2s - 1
    else:
        held = [int(r) for r in np.asarray(ranks).ravel()]
        if dist.ndim != 3 or dist.shape[2] != len(held) or not set(n1s.tolist()) | set(n2s.tolist()) <= set(held):
            raise EmbgeoInputError(
                f"dist must be (clouds, points, {len(held)}) with columns at ranks {held} covering "
                f"n1={n1s.tolist()} and n2={n2s.tolist()}, got shape {tuple(dist.shape)}."
            )
        col1 = np.array([held.index(int(r)) for r in n1s])
        col2 = np.array([held.index(int(r)) for r in n2s])
    if valid is None:
        valid = torch.ones(dist.shape[:2], dtype=torch.bool, device=dist.device)
    dev = dist.device
    mu = dist[:, :, torch.as_tensor(col2, device=dev)] / dist[:, :, torch.as_tensor(col1, device=dev)]
    return _gride_from_mu(
        mu.transpose(1, 2),
        valid,
        torch.as_tensor(n1s, device=dev, dtype=torch.float64),
        torch.as_tensor(n2s, device=dev, dtype=torch.float64),
    )


@torch.no_grad()
def gride(
    X: ArrayLike,
    n1: int = 1,
    n2: int = 2,
    device: str | torch.device = "auto",
    return_error: bool = False,
) -> float | tuple[float, float]:
    """GRIDE maximum-likelihood intrinsic dimension at one pair of neighbour ranks.

    Chapter 4 (and the global estimates of chapter 3). Duplicate rows are
    removed first. With ``mu_i = r_{i,n2} / r_{i,n1}`` the ID maximises
    ``sum_i log f(mu_i)``, where
    ``f(mu) = d (mu^d - 1)^(n2-n1-1) / (B(n2-n1, n1) mu^((n2-1) d + 1))``.
    The log-likelihood is concave in ``d``; its derivative is bisected on
    ``[1e-3, 1e3]`` exactly as in DADApy, after DADApy's outlier filter (ratios
    at or above ``q50 + 20 (q95 - q50)`` are dropped).

    Args:
        X: ``(n, d)`` points.
        n1: rank of the inner neighbour (``>= 1``).
        n2: rank of the outer neighbour (``> n1``); needs ``n2 + 1`` distinct points.
        device: where to compute.
        return_error: also return the Fisher-information standard error.

    Returns:
        The ID, or ``(id, error)`` when ``return_error`` is True.

    Raises:
        EmbgeoInputError: on NaN/inf, a bad shape, bad ranks, or too few distinct points.

    References:
        F. Denti, D. Doimo, A. Laio, A. Mira (2022), Sci. Rep. 12, 20005.
    """
    if not (isinstance(n1, (int, np.integer)) and isinstance(n2, (int, np.integer)) and 1 <= n1 < n2):
        raise EmbgeoInputError(f"GRIDE needs integer ranks 1 <= n1 < n2, got n1={n1!r}, n2={n2!r}.")
    data = as_matrix(X, "X", device=get_device(device), dtype=torch.float64)
    dist = exact_rank_distances_deduplicated(data, [int(n1), int(n2)], "GRIDE")[0][None]
    valid = torch.ones(dist.shape[:2], dtype=torch.bool, device=dist.device)
    with single_thread():  # the Newton steps are many small ops
        ids, err = gride_from_distances(dist, valid, np.array([n1]), np.array([n2]), ranks=[int(n1), int(n2)])
    return (float(ids[0, 0]), float(err[0, 0])) if return_error else float(ids[0, 0])


@torch.no_grad()
def gride_scaling(
    X: ArrayLike,
    max_scale: int | None = None,
    device: str | torch.device = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GRIDE IDs at neighbour ranks ``n2 = 2, 4, 8, ...`` with ``n1 = n2 / 2`` (chapters 3 and 4).

    Equivalent to DADApy's ``Data(X).return_id_scaling_gride(range_max=max_scale)``
    on the de-duplicated cloud (DADApy returns mean distances as its scales;
    here the scales are the ranks ``n2``).

    Args:
        X: ``(n, d)`` points.
        max_scale: largest ``n2`` (default: as large as the distinct points allow).
        device: where to compute.

    Returns:
        ``(scales, ids, errors)``: the ranks ``n2``, the IDs and their
        Fisher-information standard errors.

    Raises:
        EmbgeoInputError: on NaN/inf, a bad shape, or too few distinct points.

    References:
        F. Denti, D. Doimo, A. Laio, A. Mira (2022), Sci. Rep. 12, 20005.
    """
    data = as_matrix(X, "X", device=get_device(device), dtype=torch.float64)
    scales = default_scales(data.shape[0], max_scale)
    ranks = sorted({1} | {int(r) for r in scales})
    dist, n_distinct, ranks = exact_rank_distances_deduplicated(data, ranks, "GRIDE", shrink=True)
    scales = default_scales(n_distinct, max_scale)
    dist = dist[None]
    valid = torch.ones(dist.shape[:2], dtype=torch.bool, device=dist.device)
    with single_thread():  # the Newton steps are many small ops
        ids, err = gride_from_distances(dist, valid, scales // 2, scales, ranks=ranks)
    return scales, ids[0].cpu().numpy(), err[0].cpu().numpy()


def _as_stack(stack: ArrayLike, dev: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(stack) if not isinstance(stack, torch.Tensor) else stack)
    if tensor.ndim != 3:
        raise EmbgeoInputError(f"stack must be 3-D (clouds x points x features), got shape {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise EmbgeoInputError("stack holds NaN or infinite values; drop or fix those points first.")
    return tensor.to(dev)


@torch.no_grad()
def gride_batched(
    stack: ArrayLike,
    scales: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    return_error: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """GRIDE at several ranks for a stack of equal-sized clouds (chapter 4).

    One batched distance computation and one sort serve every cloud and scale;
    the likelihood is solved for all clouds and scales at once. Duplicate rows
    are masked per cloud (see the module docstring), giving the same values as
    :func:`gride` on each de-duplicated cloud.

    Args:
        stack: ``(b, n, d)`` clouds, e.g. all layers of one prompt.
        scales: even ranks ``n2`` (``n1 = n2 / 2``); default ``2, 4, ...`` up to ``n - 1``.
        device: where to compute.
        dtype: precision of the Gram matrix; float32 is faster but distances
            then carry relative errors of order 1e-6 for typical clouds.
        return_error: also return the Fisher-information standard errors.

    Returns:
        ``(b, n_scales)`` IDs (and errors when ``return_error``).

    Raises:
        EmbgeoInputError: on NaN/inf, a bad shape, bad scales, or a cloud with
            fewer than ``max(scales) + 1`` distinct points.
    """
    x = _as_stack(stack, get_device(device))
    scales = default_scales(x.shape[1]) if scales is None else check_scales(scales)
    dist, valid = batched_knn_distances(x, int(scales.max()), dtype=dtype)
    ids_t, err_t = gride_from_distances(dist, valid, scales // 2, scales)
    ids, err = ids_t.cpu().numpy(), err_t.cpu().numpy()
    return (ids, err) if return_error else ids
