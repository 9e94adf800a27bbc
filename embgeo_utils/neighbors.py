"""Exact k-nearest neighbours and neighbourhood overlap (chapters 2, 3 and 4).

``knn`` is a chunked matrix-multiply search on the chosen device: query rows are
processed in blocks so that memory stays bounded even for a 262,144-token
vocabulary. Each block ranks all candidates with ``||r||^2 - 2 q.r`` (one
``addmm``), keeps the ``k`` best with ``torch.topk``, then recomputes those ``k``
distances directly from the differences, so that duplicate rows come out at
distance exactly 0 and the reported distances do not suffer from the
cancellation of the expanded formula. The point itself is excluded *by index*,
never by a zero distance, because quantized embedding tables hold duplicate rows.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Viswanathan et al. (2025). The Geometry of Tokens in Internal
    Representations of Large Language Models. arXiv:2501.10573.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .device import chunk_rows, get_device
from .errors import EmbgeoInputError
from .validation import as_matrix

__all__ = [
    "knn",
    "neighborhood_overlap",
    "neighborhood_overlap_batched",
    "shared_neighbor_counts",
    "check_k",
    "check_queries",
]

Metric = Literal["euclidean", "cosine"]



def check_k(k: int, n: int, exclude_self: bool) -> None:
    """Raise a clear error unless ``1 <= k <= n - 1`` (``n`` when self is kept) (chapters 1-4)."""
    limit = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise EmbgeoInputError(
            f"k must be an integer between 1 and {limit} for {n} points"
            f"{' (the point itself is excluded)' if exclude_self else ''}, got {k!r}; "
            "lower k or pass more points."
        )


def check_queries(
    queries: np.ndarray | torch.Tensor | Sequence[int], n: int, device: torch.device
) -> torch.Tensor:
    """``queries`` as a 1-D int64 tensor of row indices in ``[0, n)``, or a clear error."""
    if isinstance(queries, torch.Tensor):
        q = queries.detach().cpu()
        integer = not q.is_floating_point() and not q.is_complex() and q.dtype != torch.bool
    else:
        arr = np.asarray(queries)
        if arr.size == 0 and arr.dtype == np.float64:  # an empty list
            arr = arr.astype(np.int64)
        integer = np.issubdtype(arr.dtype, np.integer)
        q = torch.as_tensor(arr.astype(np.int64)) if integer else None
    if not integer:
        raise EmbgeoInputError(
            "queries must hold integer row indices of X (not booleans or floats); "
            "for a mask use np.flatnonzero(mask), and cast float indices with .astype(int)."
        )
    if q.ndim != 1:
        raise EmbgeoInputError(f"queries must be a 1-D array of row indices, got shape {tuple(q.shape)}.")
    q = q.to(torch.long)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= n):
        bad = q[(q < 0) | (q >= n)]
        raise EmbgeoInputError(
            f"queries must be row indices in [0, {n}) for {n} rows of X; got {bad.numel()} out of range "
            f"(e.g. {int(bad[0])}). Negative indices are not wrapped: pass row numbers of X."
        )
    return q.to(device)


def _unit_rows(data: torch.Tensor, name: str = "X") -> torch.Tensor:
    norms = data.norm(dim=1, keepdim=True)
    zero = int((norms == 0).sum())
    if zero:
        raise EmbgeoInputError(
            f"{name} holds {zero} zero vectors: cosine neighbours are undefined for them; drop those rows first."
        )
    return data / norms


@torch.no_grad()
def knn(
    X: np.ndarray | torch.Tensor,
    k: int,
    metric: Metric = "euclidean",
    exclude_self: bool = True,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    queries: np.ndarray | torch.Tensor | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of rows of ``X`` among all the rows of ``X``.

    Used by chapter 2 (LLE neighbourhoods, neighbour-set overlap) and chapter 3
    (local PCA intrinsic dimension; with ``queries``, the neighbours of a sample
    of a large vocabulary searched in the whole embedding table, since a
    sub-sampled cloud would have sparser, larger neighbourhoods).

    Args:
        X: ``(n, d)`` points (numpy array or torch tensor); computed in float32.
        k: neighbours per point (``1 <= k <= n - 1`` when excluding self).
        metric: ``"euclidean"`` distances or ``"cosine"`` distances ``1 - cos``.
        exclude_self: drop each point from its own list, by index (a duplicate
            row of the point is kept, at distance 0).
        device: where to compute (``"auto"``: GPU if present, see ``get_device``).
        chunk_size: query rows per block; the default keeps one block of the
            distance matrix under 256 MiB.
        queries: row indices of ``X`` whose neighbours are searched (1-D
            integers in ``[0, n)``, repeats allowed); candidates are still all
            ``n`` rows, and with ``exclude_self`` each query drops its own index.
            ``None`` (default) searches for every row. Row ``j`` of the result
            equals row ``queries[j]`` of the all-rows result.

    Returns:
        ``(distances, indices)``: float32 and int64 numpy arrays of shape
        ``(n, k)`` (``(len(queries), k)`` with ``queries``), sorted by
        increasing distance; indices are rows of ``X``.

    Raises:
        EmbgeoInputError: for NaN/inf, a non 2-D input, a bad ``k``, zero
            vectors with the cosine metric, or ``queries`` that are not 1-D
            integer row indices in ``[0, n)``.

    References:
        Lee et al. (2025), arXiv:2503.21073 (section on local geometry).
    """
    if metric not in ("euclidean", "cosine"):
        raise EmbgeoInputError(f"metric must be 'euclidean' or 'cosine', not {metric!r}.")
    dev = get_device(device)
    data = as_matrix(X, "X", device=dev)
    check_k(k, data.shape[0], exclude_self)
    query_rows = None if queries is None else check_queries(queries, data.shape[0], dev)
    if metric == "cosine":
        data = _unit_rows(data)
    out_d, out_i = _search(data, k, exclude_self, chunk_size, queries=query_rows)
    if metric == "euclidean":
        out_d.sqrt_()
    else:
        out_d.mul_(0.5)  # ||a - b||^2 / 2 = 1 - cos(a, b) for unit vectors
    return out_d.cpu().numpy(), out_i.cpu().numpy()


@torch.no_grad()
def _search(
    data: torch.Tensor,
    k: int,
    exclude_self: bool = True,
    chunk_size: int | None = None,
    start_row: int = 0,
    stop_row: int | None = None,
    queries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances and indices of the k nearest rows of ``data`` for some query rows.

    The queries are rows ``start_row:stop_row`` of ``data``, or, when ``queries``
    (validated int64 row indices on ``data``'s device) is given, entries
    ``start_row:stop_row`` of ``queries``.
    """
    dev = data.device
    n = data.shape[0]
    stop_row = (n if queries is None else queries.shape[0]) if stop_row is None else stop_row
    sq = (data * data).sum(dim=1)
    step = chunk_rows(4 * n, dev, chunk_size, max_rows=8192)
    # Rows per pass of the exact refinement: a (rows, k, d) gather under the budget.
    refine_step = chunk_rows(4 * k * max(1, data.shape[1]), dev)
    out_d = torch.empty((stop_row - start_row, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((stop_row - start_row, k), dtype=torch.long, device=dev)
    for start in range(start_row, stop_row, step):
        stop = min(stop_row, start + step)
        if queries is None:
            block = data[start:stop]
            own = torch.arange(start, stop, device=dev)
        else:
            own = queries[start:stop]
            block = data[own]
        # ||r||^2 - 2 q.r ranks candidates like ||q - r||^2 (the ||q||^2 term is constant per row).
        score = torch.addmm(sq[None, :], block, data.T, alpha=-2.0)
        if exclude_self:
            score[torch.arange(stop - start, device=dev), own] = float("inf")
        _, index = torch.topk(score, k, dim=1, largest=False, sorted=False)
        del score
        for sub in range(0, stop - start, refine_step):
            end = min(stop - start, sub + refine_step)
            idx = index[sub:end]
            diff = data[idx] - block[sub:end, None, :]
            d2, order = torch.sort((diff * diff).sum(dim=2), dim=1, stable=True)
            out_d[start - start_row + sub : start - start_row + end] = d2
            out_i[start - start_row + sub : start - start_row + end] = idx.gather(1, order)
    return out_d, out_i


def shared_neighbor_counts(
    ix: np.ndarray | torch.Tensor, iy: np.ndarray | torch.Tensor, chunk_size: int | None = None
) -> np.ndarray:
    """Number of indices that row ``i`` of ``ix`` and row ``i`` of ``iy`` have in common.

    Chapters 2 and 4 use it for neighbour-set overlap. Works on ``(n, k)`` index
    arrays or on stacks ``(..., n, k)``; rows are assumed to hold distinct indices.

    Returns:
        int64 numpy array with the shape of ``ix`` minus its last axis.
    """
    a = torch.as_tensor(ix)
    b = torch.as_tensor(iy).to(a.device)
    if a.shape[:-1] != b.shape[:-1]:
        raise EmbgeoInputError(f"Index arrays must cover the same points: shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    lead = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    out = torch.empty(a.shape[0], dtype=torch.long, device=a.device)
    step = chunk_rows(a.shape[1] * b.shape[1], a.device, chunk_size, budget_bytes=1 << 20)
    for start in range(0, a.shape[0], step):
        stop = min(a.shape[0], start + step)
        out[start:stop] = (a[start:stop, :, None] == b[start:stop, None, :]).any(dim=2).sum(dim=1)
    return out.reshape(lead).cpu().numpy()


def neighborhood_overlap(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    k: int = 1,
    device: str | torch.device = "auto",
) -> float:
    """Mean fraction of shared k-nearest neighbours of the same points in two spaces.

    chi_k = mean_i |N_k^X(i) & N_k^Y(i)| / k with Euclidean distances and the
    point itself excluded. Chapter 4 compares consecutive layers with it;
    chapter 2 compares the neighbour sets of two models on shared tokens. For
    independent clouds its expectation is ``k / (n - 1)``.

    Args:
        X: ``(n, d1)`` points in the first space.
        Y: ``(n, d2)`` the same points, row for row, in the second space.
        k: neighbours per point.
        device: where to compute.

    Returns:
        chi_k in ``[0, 1]`` as a Python float.

    References:
        Viswanathan et al. (2025), arXiv:2501.10573.
    """
    nx = as_matrix(X, "X").shape[0]
    ny = as_matrix(Y, "Y").shape[0]
    if nx != ny:
        raise EmbgeoInputError(f"X and Y must hold the same points, row for row: {nx} rows != {ny} rows.")
    _, ix = knn(X, k, device=device)
    _, iy = knn(Y, k, device=device)
    return float(shared_neighbor_counts(ix, iy).mean() / k)


def _as_stack(X: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if tensor.ndim != 3:
        raise EmbgeoInputError(
            f"{name} must be a 3-D stack [batch, n, d] (for example layers x tokens x width), "
            f"got shape {tuple(tensor.shape)}."
        )
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise EmbgeoInputError(f"{name} holds NaN or infinite values; drop or fix them first.")
    return tensor


@torch.no_grad()
def _batched_knn_indices(stack: torch.Tensor, k: int, dev: torch.device) -> torch.Tensor:
    """Indices ``[batch, n, k]`` of the k nearest other points within each item of a stack."""
    b, n, _ = stack.shape
    per_item = 4 * n * n
    step = chunk_rows(per_item, dev)
    out = torch.empty((b, n, k), dtype=torch.long, device=dev)
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    for start in range(0, b, step):
        stop = min(b, start + step)
        x = stack[start:stop].to(device=dev, dtype=torch.float32)
        sq = (x * x).sum(dim=2)
        score = torch.baddbmm(sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
        score.masked_fill_(eye, float("inf"))
        out[start:stop] = torch.topk(score, k, dim=2, largest=False, sorted=False).indices
    return out


def neighborhood_overlap_batched(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    k: int = 1,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """chi_k for each item of two stacks of point clouds, computed with batched torch.

    Chapter 4 (layerwise token geometry): item ``b`` of ``X`` and ``Y`` holds the
    same ``n`` tokens, e.g. ``X = hidden[:-1]`` and ``Y = hidden[1:]`` for
    consecutive layers. Distances come from one ``baddbmm`` per group of items
    (memory bounded to about 256 MiB per group), neighbours from a batched
    ``topk``; Euclidean, the point itself excluded by index.

    Args:
        X: ``[batch, n, d1]`` stack.
        Y: ``[batch, n, d2]`` stack with the same batch and n.
        k: neighbours per point.
        device: where to compute.

    Returns:
        numpy float64 array ``[batch]`` of chi_k values.

    References:
        Viswanathan et al. (2025), arXiv:2501.10573.
    """
    dev = get_device(device)
    xs = _as_stack(X, "X")
    ys = _as_stack(Y, "Y")
    if xs.shape[:2] != ys.shape[:2]:
        raise EmbgeoInputError(
            f"X and Y must have the same batch size and points per item: {tuple(xs.shape[:2])} != {tuple(ys.shape[:2])}."
        )
    n = xs.shape[1]
    if n < 2:
        raise EmbgeoInputError(f"Each item needs at least 2 points, got {n}.")
    check_k(k, n, exclude_self=True)
    ix = _batched_knn_indices(xs, k, dev)
    iy = _batched_knn_indices(ys, k, dev)
    return shared_neighbor_counts(ix, iy).astype(np.float64).mean(axis=1) / k
