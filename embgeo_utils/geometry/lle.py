"""Locally linear reconstruction weights, their reconstruction error and its baselines (chapter 2).

Each point is written as an affine combination of its k nearest neighbours
(weights summing to 1, the first step of LLE: :func:`lle_weights`);
:func:`reconstruction_error` applies given neighbours and weights to any cloud of
the same items, which is how chapter 2 carries one model's local geometry into
another (:mod:`embgeo_utils.chapters.ch02_lle`). Baseline weightings:
:func:`uniform_weights` and :func:`random_neighbors`.

All local systems of a chunk are solved at once (one batched Gram product and
one ``torch.linalg.solve`` in float64 per chunk).

References:
    Roweis, S. T. and Saul, L. K. (2000). Nonlinear Dimensionality Reduction by
    Locally Linear Embedding. Science 290(5500), 2323-2326.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.device import chunk_budget, chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import as_matrix
from .neighbors import knn

__all__ = [
    "lle_weights",
    "random_neighbors",
    "reconstruction_error",
    "uniform_weights",
]


# Gathered neighbourhoods per chunk take an eighth of the budget: small chunks reuse cache and are faster.
_BUDGET_FRACTION = 8


# lle_weights: neighbourhoods gathered per step (about 1 MiB, within the core's cache) and systems per solve.
_GATHER_BYTES = 1 << 20


_SOLVE_ROWS = 1024


def _storage_dtype(X: np.ndarray | torch.Tensor) -> torch.dtype:
    """float64 inputs stay float64; everything else is stored as float32 and upcast per chunk."""
    return torch.float64 if getattr(X, "dtype", None) in (np.float64, torch.float64) else torch.float32


def _check_indices(indices: np.ndarray | torch.Tensor, n_rows: int, name: str = "indices") -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 2:
        raise EmbgeoInputError(f"{name} must be a 2-D (n, k) array of row indices, got shape {tuple(idx.shape)}.")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise EmbgeoInputError(f"{name} must hold integer row indices, got dtype {idx.dtype}.")
    if idx.shape[0] != n_rows:
        raise EmbgeoInputError(f"{name} has {idx.shape[0]} rows but the points have {n_rows}: pass one row per point.")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise EmbgeoInputError(
            f"{name} must lie in [0, {n_rows - 1}]; got values from {int(idx.min())} to {int(idx.max())}."
        )
    return idx.long()


@torch.no_grad()
def lle_weights(
    X: np.ndarray | torch.Tensor,
    k: int,
    reg: float = 1e-3,
    device: str | torch.device = "auto",
    indices: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chapter 2 (LLE): affine reconstruction weights of each point from its neighbours.

    For point ``x_i`` with neighbours ``N_i`` (rows ``x_j``, ``j`` in ``N_i``) the
    weights minimise ``||x_i - sum_j w_j x_j||^2`` subject to ``sum_j w_j = 1``.
    As in standard LLE (and scikit-learn's ``barycenter_weights``) the local Gram
    matrix ``G = (N_i - x_i)(N_i - x_i)^T`` is regularised as
    ``G + R I`` with ``R = reg * trace(G)`` (``R = reg`` when the trace is 0),
    ``G w = 1`` is solved and ``w`` is normalised to sum to 1.

    Args:
        X: ``(n, d)`` points (model A's embeddings of the tokens).
        k: neighbours per point; ignored when ``indices`` is given.
        reg: regularisation relative to the trace of the local Gram matrix.
        device: where to compute (``"auto"``: GPU if present).
        indices: optional ``(n, k)`` neighbour indices to use instead of the
            Euclidean k nearest neighbours of ``X`` (e.g. ``random_neighbors``
            for the null, or another model's neighbours).

    Returns:
        ``(indices, weights)``: int64 ``(n, k)`` and float64 ``(n, k)`` numpy
        arrays; each row of ``weights`` sums to 1.

    Raises:
        EmbgeoInputError: for NaN/inf, bad ``k``, bad ``indices`` or ``reg < 0``.

    References:
        Roweis & Saul (2000), Science 290, 2323-2326.
        Lee et al. (2025), arXiv:2503.21073.
    """
    if not reg >= 0:
        raise EmbgeoInputError(f"reg must be >= 0 (standard LLE uses 1e-3), got {reg!r}.")
    dev = get_device(device)
    data = as_matrix(X, "X", device=dev, dtype=_storage_dtype(X))
    n, d = data.shape
    if indices is None:
        _, idx_np = knn(data, k, metric="euclidean", exclude_self=True, device=dev)
        idx = torch.from_numpy(idx_np).to(dev)
    else:
        idx = _check_indices(indices, n).to(dev)
    kk = idx.shape[1]
    if kk < 1:
        raise EmbgeoInputError("indices must hold at least one neighbour per point.")
    weights = torch.empty((n, kk), dtype=torch.float64, device=dev)
    # Local Gram matrices are formed in small gathers that stay in cache (_GATHER_BYTES), and
    # solved in blocks of _SOLVE_ROWS systems (one batched LU per block).
    gather = chunk_rows(8 * kk * max(1, d), dev, budget_bytes=_GATHER_BYTES)
    gather = max(16, gather) if dev.type == "cpu" else chunk_rows(8 * kk * max(1, d), dev)
    block = max(gather, min(n, _SOLVE_ROWS))
    ones = torch.ones((1, kk, 1), dtype=torch.float64, device=dev)
    gram = torch.empty((block, kk, kk), dtype=torch.float64, device=dev)
    # Reused gather buffers: a fresh allocation per step would cost page faults on the CPU.
    raw_buf = torch.empty((gather * kk, d), dtype=data.dtype, device=dev)
    buf = raw_buf if data.dtype == torch.float64 else torch.empty((gather * kk, d), dtype=torch.float64, device=dev)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for sub in range(start, stop, gather):
            end = min(stop, sub + gather)
            rows = (end - sub) * kk
            torch.index_select(data, 0, idx[sub:end].reshape(-1), out=raw_buf[:rows])
            if buf is not raw_buf:
                buf[:rows].copy_(raw_buf[:rows])
            local = buf[:rows].view(end - sub, kk, d)
            local -= data[sub:end, None, :]
            torch.bmm(local, local.transpose(1, 2), out=gram[sub - start : end - start])
        g = gram[: stop - start]
        trace = g.diagonal(dim1=1, dim2=2).sum(dim=1)
        ridge = torch.where(trace > 0, reg * trace, torch.full_like(trace, reg))
        g.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        w = torch.linalg.solve(g, ones.expand(stop - start, kk, 1)).squeeze(2)
        weights[start:stop] = w / w.sum(dim=1, keepdim=True)
    return idx.cpu().numpy(), weights.cpu().numpy()


@torch.no_grad()
def reconstruction_error(
    Y: np.ndarray | torch.Tensor,
    indices: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Chapter 2 (LLE transfer): relative error of rebuilding each ``y_i`` from given neighbours and weights.

    ``e_i = ||y_i - sum_j w_ij y_{idx_ij}||^2 / ||y_i||^2``. With ``Y`` = model B's
    vectors and ``(indices, weights)`` from model A this measures how well A's
    local geometry transfers to B.

    Args:
        Y: ``(n, d)`` points (same rows, i.e. tokens, as the weights were made for).
        indices: ``(n, k)`` neighbour indices into the rows of ``Y``.
        weights: ``(n, k)`` weights.
        device: where to compute.

    Returns:
        float64 numpy array ``(n,)``.

    Raises:
        EmbgeoInputError: for NaN/inf, shape mismatches, or a zero row in ``Y``
            (relative error undefined: drop it first).

    References:
        Roweis & Saul (2000); Lee et al. (2025), arXiv:2503.21073.
    """
    dev = get_device(device)
    data = as_matrix(Y, "Y", device=dev, dtype=_storage_dtype(Y))
    n, d = data.shape
    idx = _check_indices(indices, n).to(dev)
    w = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    if tuple(w.shape) != tuple(idx.shape):
        raise EmbgeoInputError(f"weights shape {tuple(w.shape)} must equal indices shape {tuple(idx.shape)}.")
    if not bool(torch.isfinite(w).all()):
        raise EmbgeoInputError("weights hold NaN or infinite values; recompute them (e.g. with a larger reg).")
    w = w.to(device=dev, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64, device=dev)
    kk = idx.shape[1]
    step = chunk_rows(8 * max(1, kk) * max(1, d), dev, budget_bytes=chunk_budget(dev) // _BUDGET_FRACTION)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = data[start:stop].to(torch.float64)
        nbrs = data.index_select(0, idx[start:stop].reshape(-1)).view(stop - start, kk, d).to(torch.float64)
        recon = torch.bmm(w[start:stop, None, :], nbrs).squeeze(1)
        norm = (y * y).sum(dim=1)
        if bool((norm == 0).any()):
            raise EmbgeoInputError(
                "Y holds zero vectors: the relative reconstruction error is undefined; drop them first."
            )
        out[start:stop] = ((y - recon) ** 2).sum(dim=1) / norm
    return out.cpu().numpy()


def uniform_weights(indices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Chapter 2 (LLE baseline): weights ``1/k`` for every neighbour (the neighbourhood mean).

    Args:
        indices: ``(n, k)`` neighbour indices.

    Returns:
        float64 numpy array ``(n, k)`` filled with ``1/k``.
    """
    shape = tuple(np.shape(indices))
    if len(shape) != 2 or shape[1] < 1:
        raise EmbgeoInputError(f"indices must be a 2-D (n, k) array with k >= 1, got shape {shape}.")
    return np.full(shape, 1.0 / shape[1])


def random_neighbors(n: int, k: int, seed: int = 0, exclude_self: bool = True) -> np.ndarray:
    """Chapter 2 (LLE null): ``k`` distinct random neighbours for each of ``n`` points.

    Used to apply model A's weights to random neighbour sets ("A's weights on
    random neighbours"). Each row holds ``k`` distinct indices drawn uniformly
    without replacement, excluding the row's own index when ``exclude_self``.
    Deterministic for a given ``seed``.

    Returns:
        int64 numpy array ``(n, k)``.
    """
    limit = n - 1 if exclude_self else n
    if n < 2 or not 1 <= k <= limit:
        raise EmbgeoInputError(f"Need n >= 2 and 1 <= k <= {limit}; got n={n}, k={k}.")
    gen = torch.Generator().manual_seed(int(seed))
    if 4 * k <= limit:
        # Few neighbours out of many: draw with replacement, redraw rows with repeats.
        pick = torch.randint(0, limit, (n, k), generator=gen)
        while True:
            ordered = pick.sort(dim=1).values
            bad = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
            if not bool(bad.any()):
                break
            pick[bad] = torch.randint(0, limit, (int(bad.sum()), k), generator=gen)
    else:
        # k smallest of uniform keys = k distinct indices uniformly without replacement.
        step = chunk_rows(4 * limit, budget_bytes=chunk_budget() // 16)
        pick = torch.cat(
            [
                torch.topk(torch.rand((min(step, n - s), limit), generator=gen), k, dim=1, largest=False).indices
                for s in range(0, n, step)
            ]
        )
    if exclude_self:
        # Map 0..n-2 onto 0..n-1, skipping each row's own index.
        pick = pick + (pick >= torch.arange(n)[:, None]).long()
    return pick.numpy().astype(np.int64)
