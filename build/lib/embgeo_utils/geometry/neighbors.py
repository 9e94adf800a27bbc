"""Exact k-nearest neighbours, neighbourhood overlap and duplicate-aware neighbour distances (chapters 2-4).

``knn`` is a chunked matrix-multiply search on the chosen device: query rows are
processed in blocks so that memory stays bounded even for a 262,144-token
vocabulary. Each block ranks all candidates with ``||r||^2 - 2 q.r`` (one
``addmm``), keeps the ``k`` best with ``torch.topk``, then recomputes those ``k``
distances directly from the differences, so that duplicate rows come out at
distance exactly 0 and the reported distances do not suffer from the
cancellation of the expanded formula. The point itself is excluded *by index*,
never by a zero distance, because quantized embedding tables hold duplicate rows.

The intrinsic-dimension estimators (chapters 3 and 4) need sorted neighbour
*distances* of clouds whose duplicate rows are removed or masked:
``deduplicated_knn_distances`` for one cloud, ``batched_knn_distances`` and
``knn_from_sq_distances`` for a stack of clouds (every layer of a prompt).
``exact_order_statistics`` and ``exact_rank_distances`` give the same distances
at chosen ranks from a float32 ranking: rigorous bounds on the float32 error
leave a few candidates per rank, and only those are recomputed in float64.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Viswanathan et al. (2025). The Geometry of Tokens in Internal
    Representations of Large Language Models. arXiv:2501.10573.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from ..core.device import chunk_budget, chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import as_matrix

__all__ = [
    "DISTANCE_FLOOR",
    "batched_knn_distances",
    "check_k",
    "check_queries",
    "deduplicated_knn_distances",
    "duplicate_groups",
    "exact_order_statistics",
    "exact_rank_distances",
    "exact_rank_distances_deduplicated",
    "float32_error_factor",
    "key_bits",
    "knn",
    "knn_from_sq_distances",
    "neighborhood_overlap",
    "neighborhood_overlap_batched",
    "shared_neighbor_counts",
    "single_thread",
    "smallest_sorted",
    "sort_keys",
    "sorted_knn_distances",
    "unique_rows",
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


def check_queries(queries: np.ndarray | torch.Tensor | Sequence[int], n: int, device: torch.device) -> torch.Tensor:
    """``queries`` as a 1-D int64 tensor of row indices in ``[0, n)``, or a clear error."""
    q: torch.Tensor
    if isinstance(queries, torch.Tensor):
        q = queries.detach().cpu()
        integer = not q.is_floating_point() and not q.is_complex() and q.dtype != torch.bool
    else:
        arr = np.asarray(queries)
        if arr.size == 0 and arr.dtype == np.float64:  # an empty list
            arr = arr.astype(np.int64)
        integer = np.issubdtype(arr.dtype, np.integer)
        q = torch.as_tensor(arr.astype(np.int64)) if integer else torch.empty(0)
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
        raise EmbgeoInputError(
            f"Index arrays must cover the same points: shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    lead = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    out = torch.empty(a.shape[0], dtype=torch.long, device=a.device)
    budget = 1 << 20 if a.device.type == "cpu" else chunk_budget(a.device) // 8
    step = chunk_rows(a.shape[1] * b.shape[1], a.device, chunk_size, budget_bytes=budget)
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


#: Smallest distance reported: a zero distance would make a ratio ``r2 / r1`` infinite.
DISTANCE_FLOOR = float(np.finfo(np.float64).eps)


def _too_few(n_distinct: int, needed_rank: int, what: str) -> EmbgeoInputError:
    return EmbgeoInputError(
        f"{what} at neighbour rank {needed_rank} needs at least {needed_rank + 1} distinct points, "
        f"but only {n_distinct} remain after removing duplicates: use a longer prompt or smaller scales."
    )


def unique_rows(data: torch.Tensor) -> torch.Tensor:
    """Rows of ``data`` with exact duplicates removed (chapters 3 and 4).

    Args:
        data: ``(n, d)`` tensor.

    Returns:
        The first occurrence of every distinct row, in the original order
        (``data`` itself when every row is distinct).
    """
    if data.ndim != 2 or data.shape[0] == 0:
        raise EmbgeoInputError(
            f"data must be a non-empty 2-D (points x features) tensor, got shape {tuple(data.shape)}."
        )
    _, inverse = torch.unique(data, dim=0, return_inverse=True)
    n = data.shape[0]
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=data.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=data.device), reduce="amin")
    if first.numel() == n:
        return data
    return data[torch.sort(first).values]


def smallest_sorted(d2: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest entries of each row of a 2-D tensor, ascending (chapters 3 and 4).

    On the CPU numpy's partial selection is used (faster than ``torch.topk``); on
    other devices ``torch.topk``. The values are the same either way.
    """
    if d2.ndim != 2 or not 1 <= k <= d2.shape[1]:
        raise EmbgeoInputError(f"smallest_sorted needs a 2-D tensor and 1 <= k <= {d2.shape[-1]}, got k={k!r}.")
    if d2.device.type == "cpu":
        part = np.partition(d2.numpy(), k - 1, axis=1)[:, :k]
        part.sort(axis=1)
        return torch.from_numpy(part)
    return torch.topk(d2, k, dim=1, largest=False, sorted=True).values


def sorted_knn_distances(data: torch.Tensor, kmax: int, chunk_size: int | None = None) -> tuple[torch.Tensor, bool]:
    """Sorted Euclidean distances to the ``kmax`` nearest neighbours of every point (chapters 3 and 4).

    The point itself is excluded by index. Distances come from the centred Gram
    matrix in the precision of ``data`` (the estimators pass float64), in chunks
    of rows; they are floored at :data:`DISTANCE_FLOOR`.

    Args:
        data: ``(n, d)`` points, ``n >= kmax + 1``.
        kmax: neighbours per point.
        chunk_size: query rows per chunk (default: within the device's chunk budget).

    Returns:
        ``(dist, has_duplicates)``: ``(n, kmax)`` float64 distances, and whether
        the cloud holds identical rows (near-zero distances confirmed by exact
        comparison); then :func:`deduplicated_knn_distances` gives the distances
        of the cloud without them.
    """
    n = data.shape[0]
    if data.ndim != 2 or not 1 <= kmax <= n - 1:
        raise EmbgeoInputError(
            f"sorted_knn_distances needs (n, d) points and 1 <= kmax <= n - 1; got shape {tuple(data.shape)}, "
            f"kmax={kmax!r}."
        )
    centred = data - data.mean(dim=0, keepdim=True)
    sq = (centred * centred).sum(dim=1)
    tol = 2e-5 * float(sq.max()) + 1e-30
    step = chunk_rows(8 * n, data.device, chunk_size, max_rows=n)
    out = torch.empty((n, kmax), dtype=torch.float64, device=data.device)
    has_duplicates = False
    for start in range(0, n, step):
        stop = min(n, start + step)
        d2 = torch.addmm(sq[None, :], centred[start:stop], centred.T, alpha=-2.0).add_(sq[start:stop, None])
        rows = torch.arange(stop - start, device=data.device)
        d2[rows, rows + start] = float("inf")
        if not has_duplicates:
            ci, cj = (d2 <= tol).nonzero().unbind(1)
            has_duplicates = bool((data[ci + start] == data[cj]).all(dim=1).any()) if ci.numel() else False
        out[start:stop] = smallest_sorted(d2, kmax)
    return out.clamp_(min=0.0).sqrt_().clamp_(min=DISTANCE_FLOOR), has_duplicates


def deduplicated_knn_distances(
    data: torch.Tensor, kmax: int, what: str = "the estimator", shrink: bool = False
) -> tuple[torch.Tensor, int]:
    """Sorted neighbour distances of a cloud with its identical rows removed (chapters 3 and 4).

    Args:
        data: ``(n, d)`` points (float64 for the estimators).
        kmax: neighbours per point.
        what: name of the caller, used in the error message.
        shrink: lower ``kmax`` to what the distinct points allow (at least 2)
            instead of raising.

    Returns:
        ``(dist, n_distinct)``: ``(n_distinct, kmax')`` float64 distances of the
        de-duplicated cloud and its number of points.

    Raises:
        EmbgeoInputError: if fewer than ``kmax + 1`` distinct points remain.
    """
    if data.ndim != 2:
        raise EmbgeoInputError(f"data must be 2-D (points x features), got shape {tuple(data.shape)}.")
    dist = None
    if data.shape[0] >= kmax + 1:
        dist, has_duplicates = sorted_knn_distances(data, kmax)
        if not has_duplicates:
            return dist, data.shape[0]
    data = unique_rows(data)
    if shrink and data.shape[0] >= 3:
        kmax = min(kmax, data.shape[0] - 1)
    if data.shape[0] < kmax + 1:
        raise _too_few(data.shape[0], kmax, what)
    return sorted_knn_distances(data, kmax)[0], data.shape[0]


def _sort_rows(values: torch.Tensor) -> torch.Tensor:
    """Sort along the last axis (numpy's SIMD sort on the CPU is several times faster than torch's)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=-1))
    return torch.sort(values, dim=-1).values


def duplicate_groups(stack: torch.Tensor, d2: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """For every point of every cloud, the index of the first identical row in its cloud (chapter 4).

    Candidate pairs are those whose squared distance in ``d2`` is within
    rounding error of zero (relative to the largest centred squared norm in
    ``sq``); each candidate is confirmed by exact comparison of the rows of
    ``stack``.

    Args:
        stack: ``(b, n, d)`` clouds, as given (the exact comparison uses them).
        d2: ``(b, n, n)`` squared distances (not modified).
        sq: ``(b, n)`` squared norms of the centred points.

    Returns:
        ``(b, n)`` int64 tensor: entry ``i`` is ``i`` when row ``i`` is the first
        (or only) copy of its value.
    """
    b, n, _ = stack.shape
    if d2.shape != (b, n, n) or sq.shape != (b, n):
        raise EmbgeoInputError(
            f"duplicate_groups needs d2 of shape {(b, n, n)} and sq of shape {(b, n)}, "
            f"got {tuple(d2.shape)} and {tuple(sq.shape)}."
        )
    tol = 2e-5 * sq.max(dim=1).values + 1e-30
    close = d2 <= tol[:, None, None]
    close.diagonal(dim1=1, dim2=2).fill_(False)
    group = torch.arange(n, device=stack.device).repeat(b, 1)
    cand = close.nonzero()
    if cand.numel():
        cb, ci, cj = cand.unbind(1)
        same = (stack[cb, ci] == stack[cb, cj]).all(dim=1)
        cb, ci, cj = cb[same], ci[same], cj[same]
        group.view(-1).scatter_reduce_(0, cb * n + ci, cj, reduce="amin")
    return group


def knn_from_sq_distances(
    stack: torch.Tensor, d2: torch.Tensor, sq: torch.Tensor, kmax: int, what: str = "the estimator"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted neighbour distances of a stack of clouds from their squared distances, duplicates masked (chapter 4).

    ``d2`` is modified in place: its diagonal, the copies of each point and the
    non-first copies of every group of identical rows are set to infinity.

    Args:
        stack: ``(b, n, d)`` clouds (for the exact duplicate comparison).
        d2: ``(b, n, n)`` squared distances, e.g. from one Gram matrix per cloud.
        sq: ``(b, n)`` squared norms of the centred points (sets the duplicate tolerance).
        kmax: neighbours per point.
        what: name of the caller, used in the error message.

    Returns:
        ``(dist, valid)``: ``(b, n, kmax)`` float64 distances floored at
        :data:`DISTANCE_FLOOR`, and a ``(b, n)`` mask that is False for
        non-first copies of duplicate rows (their distances are meaningless).

    Raises:
        EmbgeoInputError: if a cloud has fewer than ``kmax + 1`` distinct points.
    """
    n = d2.shape[1]
    group = duplicate_groups(stack, d2, sq)
    arange = torch.arange(n, device=d2.device)
    valid = group == arange
    n_distinct = valid.sum(dim=1)
    if int(n_distinct.min()) < kmax + 1:
        raise _too_few(int(n_distinct.min()), kmax, what)
    d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    if not bool(valid.all()):
        same = group[:, :, None] == group[:, None, :]
        d2.masked_fill_(same | ~valid[:, None, :], float("inf"))
    dist = _sort_rows(d2)[:, :, :kmax].to(torch.float64)
    return dist.clamp_(min=0.0).sqrt_().clamp_(min=DISTANCE_FLOOR), valid


def batched_knn_distances(
    stack: torch.Tensor, kmax: int, dtype: torch.dtype = torch.float64, what: str = "GRIDE"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted neighbour distances of every point of every cloud in a stack, duplicates masked (chapter 4).

    One batched Gram matrix per call; see :func:`knn_from_sq_distances` for the
    masking.

    Args:
        stack: ``(b, n, d)`` clouds.
        kmax: largest neighbour rank needed.
        dtype: precision of the Gram matrix (float64 by default).
        what: name of the caller, used in the error message.

    Returns:
        ``(dist, valid)``: ``(b, n, kmax)`` float64 distances and a ``(b, n)``
        mask that is False for non-first copies of duplicate rows.
    """
    if stack.ndim != 3:
        raise EmbgeoInputError(f"stack must be 3-D (clouds x points x features), got shape {tuple(stack.shape)}.")
    x = stack.to(dtype)
    x = x - x.mean(dim=1, keepdim=True)
    sq = (x * x).sum(dim=2)
    d2 = torch.bmm(x, x.transpose(1, 2)).mul_(-2.0).add_(sq[:, :, None]).add_(sq[:, None, :])
    return knn_from_sq_distances(stack, d2, sq, kmax, what)


_U32 = 2.0**-24


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the thread count (chapters 3 and 4).

    For bookkeeping made of many small ops (band searches, gathers, GRIDE's Newton
    steps): on a CPU shared with other jobs, torch's OpenMP threads wait on each
    other at every op (a 65k-element op took 8 ms with two threads on a loaded
    2-core machine, 0.05 ms with one), while splitting such small ops gains little
    on an idle one. Matrix products and whole-matrix passes stay outside.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def float32_error_factor(d: int) -> float:
    """``g`` with ``|f - e| <= g (|x_i|^2 + |x_j|^2) + u e`` for float32 squared distances (chapters 3 and 4).

    ``f = |x_j|^2 - 2 x_i.x_j + |x_i|^2`` computed in float32 from the centred
    points rounded to float32 (dimension ``d``), ``e`` the exact squared distance
    of the unrounded points. The product errs by at most
    ``gamma_d |x_i| |x_j| <= gamma_d (|x_i|^2 + |x_j|^2) / 2`` with
    ``gamma_d = d u / (1 - d u)`` in any summation order (``u`` the unit roundoff:
    ``2^-24``, or ``2^-11`` when torch may run float32 products in TF32 or bfloat16,
    i.e. ``torch.get_float32_matmul_precision() != "highest"``); the rounding of
    the points and of the three additions adds at most ``10 u (|x_i|^2 + |x_j|^2) + u e``.
    A worst case, independent of the BLAS kernel.
    """
    u = _U32 if torch.get_float32_matmul_precision() == "highest" else 2.0**-11
    du = int(d) * u
    if du >= 0.5:
        raise EmbgeoInputError(f"float32 ranking needs fewer than {int(0.5 / u)} features, got {d}.")
    return du / (1.0 - du) + 10.0 * u


def key_bits(n_columns: int) -> int:
    """Low bits of an int32 sort key that hold the column index (chapters 3 and 4)."""
    return max(1, int(n_columns - 1).bit_length())


def sort_keys(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Sorted int32 keys of non-negative float32 ``values`` (rows x columns), column in the low ``bits``.

    ``values`` is overwritten (it becomes the unsorted keys); on the CPU the keys
    are sorted in place with numpy's SIMD sort and returned as the same storage.
    """
    if values.dtype != torch.float32 or values.ndim != 2:
        raise EmbgeoInputError(f"sort_keys needs a 2-D float32 tensor, got {values.dtype} {tuple(values.shape)}.")
    mask = (1 << bits) - 1
    keys = values.view(torch.int32)
    keys.bitwise_and_(~mask)
    keys.bitwise_or_(torch.arange(values.shape[1], dtype=torch.int32, device=values.device))
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=1)
        return keys
    return torch.sort(keys, dim=1).values


def _decode(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """The truncated float32 values of int32 keys, as float64."""
    return (keys & ~((1 << bits) - 1)).view(torch.float32).to(torch.float64)


def _key_floor(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Int32 thresholds: a key below it has a (truncated) value below ``values``."""
    v = values.clamp(min=0.0).mul(1.0 - 1e-6).to(torch.float32)
    return v.view(torch.int32) & ~((1 << bits) - 1)


def _key_ceil(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Int32 thresholds: a key at or above it has a (truncated) value above ``values``."""
    v = values.clamp(min=0.0).mul(1.0 + 1e-6).to(torch.float32)
    return (v.view(torch.int32) | ((1 << bits) - 1)) + 1


def _exact_sq(points: torch.Tensor, norms: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``|p_rows - p_cols|^2`` in float64 for pairs of rows of the float64 ``points`` (``norms = |p|^2``).

    The distinct pairs form one sparse matrix whose dot products come from one
    ``torch.sparse.sampled_addmm`` (no gathered copies); ``|p_i|^2 + |p_j|^2 - 2 p_i.p_j``
    then errs by at most ``(d + 2) 2^-53 (|p_i|^2 + |p_j|^2)``. Pairs closer than
    ``1e-3 (|p_i|^2 + |p_j|^2)`` are recomputed from coordinate differences (identical
    rows give exactly 0), so every result is within ``1e3 (d + 2) 2^-53`` (6e-11 at
    ``d = 576``) of the exact value, relative; in practice about 1e-15.
    """
    n = points.shape[0]
    if rows.numel() == 0:
        return torch.empty(0, dtype=torch.float64, device=points.device)
    pair, inverse = torch.unique(rows * n + cols, return_inverse=True)
    pr, pc = pair // n, pair % n
    crow = torch.zeros(n + 1, dtype=torch.long, device=points.device)
    crow[1:] = torch.cumsum(torch.bincount(pr, minlength=n), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        sampled = torch.sparse_csr_tensor(
            crow,
            pc,
            torch.zeros(pair.numel(), dtype=torch.float64, device=points.device),
            size=(n, n),
            check_invariants=False,  # rows and sorted columns by construction
        )
    dots = torch.sparse.sampled_addmm(sampled, points, points.T).values()
    scale = norms[pr] + norms[pc]
    e = (scale - 2.0 * dots).clamp_(min=0.0)
    close = (e < 1e-3 * scale).nonzero()[:, 0]
    if close.numel():
        diff = points[pc[close]] - points[pr[close]]
        e[close] = (diff * diff).sum(dim=1)
    return e[inverse]


@torch.no_grad()
@single_thread()  # many small ops: one thread (see single_thread)
def exact_order_statistics(
    points: torch.Tensor,
    norms: torch.Tensor,
    keys: torch.Tensor,
    bits: int,
    sq: torch.Tensor,
    shift: torch.Tensor,
    gamma: float,
    ranks: Sequence[int],
    top: int = 0,
    query: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact squared distances at given neighbour ranks, and exact nearest-neighbour sets (chapters 3 and 4).

    Row ``r`` of ``keys`` holds the sorted keys (:func:`sort_keys`) of the float32
    squared distances ``f`` from query point ``r`` to its candidates, offset by
    ``shift[r]`` (``f + shift >= 0``); masked candidates are ``+inf``. With
    ``e`` the exact squared distance and ``a = sqrt(sq[r])``, every candidate
    with ``f <= t`` satisfies ``|e - f| <= gamma (a^2 + (a + sqrt(t))^2) + u t``
    (``|x_j| <= a + sqrt(e)``; see :func:`float32_error_factor`; the constants
    here keep a margin), so each wanted
    rank has a band of candidates that could hold it: those below the band are
    certainly nearer, those above certainly farther. Only the band is
    recomputed in float64 (to within 6e-11 relative, see ``_exact_sq``) and the rank is read from it.
    The ``top`` nearest are found the same way from the band of rank ``top``;
    exact ties are broken by the lower candidate index.

    Args:
        points: ``(n, d)`` float64 coordinates (the exact distances come from them).
        norms: ``(n,)`` their squared norms.
        keys: ``(rows, m)`` sorted int32 keys; a key's low ``bits`` are a column.
        bits: index bits of the keys.
        sq: ``(rows,)`` squared norms of the centred query points (float64).
        shift: ``(rows,)`` offset added to ``f`` before encoding.
        gamma: :func:`float32_error_factor` of the float32 product.
        ranks: 1-based ranks wanted, each at most ``m``.
        top: size of the exact nearest-neighbour sets wanted (0: none).
        query: ``(rows,)`` row of ``points`` of each query (default: ``arange(rows)``).
        base: ``(rows,)`` row of ``points`` of column 0 (default: ``(row // m) * m``,
            i.e. ``rows = clouds x m`` queries of ``m``-point clouds stored
            consecutively in ``points``, keys holding all ``m`` columns).
        rest: ``(rows,)`` int32 key below which every candidate of the row is
            in ``keys`` (when a row lists only its nearest candidates); a band
            that may reach beyond it marks the row as not resolved.

    Returns:
        ``(d2, nearest, ok)``: ``(rows, len(ranks))`` exact squared distances,
        ``(rows, top)`` int64 columns of the nearest candidates, nearest first,
        and a ``(rows,)`` mask of the rows resolved (all, without ``rest``).
    """
    dev = keys.device
    n_rows, m = keys.shape
    ranks_t = torch.as_tensor(list(ranks), dtype=torch.long, device=dev)
    if ranks_t.numel() and (int(ranks_t.min()) < 1 or int(ranks_t.max()) > m):
        raise EmbgeoInputError(f"ranks must lie in [1, {m}], got {list(ranks)}.")
    if not 0 <= top <= m:
        raise EmbgeoInputError(f"top must lie in [0, {m}], got {top}.")
    positions = torch.cat([ranks_t - 1, torch.tensor([top - 1] if top else [], dtype=torch.long, device=dev)])
    n_pos = positions.numel()
    row_ids = torch.arange(n_rows, device=dev)
    query = row_ids if query is None else query
    base = (row_ids // m) * m if base is None else base
    # Band of every wanted position: [lo, hi) in sorted order.
    f_p = _decode(keys[:, positions], bits)  # (rows, n_pos)
    sq64 = sq.to(torch.float64)[:, None]
    a = sq64.sqrt()
    s = shift.to(torch.float64)[:, None]
    # |e - f| <= gamma (|x_i|^2 + |x_j|^2) + u e, with |x_j| <= (1.025) (|x_i| + sqrt(e)) for the
    # candidates up to tau; the shift and the truncated key bits (rho) come on top.
    rho = 1.01 * 2.0 ** (bits - 23)
    tau = 2.0 * f_p + 16.0 * gamma * sq64 + s
    half = 1.05 * gamma * (sq64 + (a + tau.sqrt()).square()) + 0.1 * gamma * tau + rho * (f_p + s) + s
    lo = torch.searchsorted(keys, _key_floor(f_p - 2.0 * half, bits), right=False)
    upper = _key_ceil(f_p + 2.0 * half, bits)
    hi = torch.searchsorted(keys, upper, right=False)
    ok = torch.ones(n_rows, dtype=torch.bool, device=dev) if rest is None else (upper <= rest[:, None]).all(dim=1)
    if top:
        lo[:, -1] = 0
    lo = torch.minimum(lo, positions[None, :])
    hi = torch.maximum(hi, positions[None, :] + 1).clamp_(max=m)
    # Ragged list of band members, segment by segment (row-major over (row, position)).
    seg_lo, seg_len = lo.reshape(-1), (hi - lo).reshape(-1)
    seg_row = row_ids.repeat_interleave(n_pos)
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    total = int(seg_len.sum())
    member_seg = torch.repeat_interleave(torch.arange(seg_len.numel(), device=dev), seg_len, output_size=total)
    member_pos = seg_lo[member_seg] + torch.arange(total, device=dev) - seg_start[member_seg]
    member_row = seg_row[member_seg]
    col = (keys[member_row, member_pos] & ((1 << bits) - 1)).to(torch.long)
    target = col + base[member_row]
    e = _exact_sq(points, norms, query[member_row], target)
    # Sort members by (segment, exact distance, column).
    # Rank bands: sort members by (band, exact value) with one sort of band + position in the
    # band. Every member's exact value lies in [low, low + span] of its band and the fraction
    # keeps 2^-36 of the span (the span is about 1e-3 of the distance), so the value read at
    # each rank is exact to about 1e-14 of it.
    n_rank = ranks_t.numel()
    low = (f_p - 3.0 * half).reshape(-1)[member_seg]
    span = (6.0 * half + rho * f_p).reshape(-1)[member_seg]
    frac = ((e - low) / span).clamp_(0.0, 1.0 - 2.0**-36)
    order = torch.sort(member_seg.to(torch.float64) + frac, stable=True).indices
    pick = seg_start.view(n_rows, n_pos)[:, :n_rank] + (ranks_t - 1)[None, :] - lo[:, :n_rank]
    d2 = e[order][pick]
    if not top:
        return d2, torch.empty((n_rows, 0), dtype=torch.long, device=dev), ok
    # Nearest set: the band of rank ``top`` from position 0, sorted by (row, exact value, column).
    in_top = ((member_seg % n_pos) == n_pos - 1).nonzero()[:, 0]
    t_row, t_e, t_col = member_row[in_top], e[in_top], col[in_top]
    order = torch.sort(t_col, stable=True).indices
    order = order[torch.sort(t_e[order], stable=True).indices]
    order = order[torch.sort(t_row[order], stable=True).indices]
    first = torch.cumsum(seg_len.view(n_rows, n_pos)[:, -1], 0)[:, None] - seg_len.view(n_rows, n_pos)[:, -1:]
    return d2, t_col[order][first + torch.arange(top, device=dev)[None, :]], ok


def _smallest_keys(keys: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted keys of each row below a per-row threshold that leaves at least ``m`` of them.

    The threshold is read from a strided sample of the row's keys (sorted) with a
    margin; rows that still come out short are sorted in full. Returns the
    ``(rows, M)`` sorted keys (padded with the largest int32) and the ``(rows,)``
    threshold: every key of the row below it is listed.
    """
    n_rows, n = keys.shape
    big = torch.iinfo(torch.int32).max
    if m + 8 < n and m <= 32:  # few neighbours: a partial selection is cheaper
        best = torch.topk(keys, m + 8, dim=1, largest=False, sorted=True).values
        return best[:, :-1].contiguous(), best[:, -1].contiguous()
    stride = max(1, n // 1024)
    sample = keys[:, ::stride].contiguous()
    s = sample.shape[1]
    if sample.device.type == "cpu":
        sample.numpy().sort(axis=1)
    else:
        sample = torch.sort(sample, dim=1).values
    q = min(s - 1, int(np.ceil(1.5 * m * s / n)) + 8)
    theta = sample[:, q].clone()
    if q == s - 1:
        theta.fill_(big)
    below = keys < theta[:, None]
    counts = torch.count_nonzero(below, dim=1)
    short = (counts < m).nonzero()[:, 0]
    if short.numel():  # rare: take the whole row
        theta[short] = big
        below[short] = True
        counts[short] = n
    width = int(counts.max())
    r, c = below.nonzero().unbind(1)  # row-major: each row's members are contiguous
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(r.numel(), device=keys.device) - start[r]
    out = torch.full((n_rows, width), big, dtype=torch.int32, device=keys.device)
    out[r, pos] = keys[r, c]
    if out.device.type == "cpu":
        out.numpy().sort(axis=1)
    else:
        out = torch.sort(out, dim=1).values
    return out, theta


@torch.no_grad()
def exact_rank_distances(
    data: torch.Tensor, ranks: Sequence[int], chunk_size: int | None = None
) -> tuple[torch.Tensor, bool]:
    """Exact squared distances of every point to its neighbours at the given ranks (chapters 3 and 4).

    Candidates are ranked by a float32 matrix product in chunks of query rows;
    the decisive distances are recomputed exactly in float64
    (:func:`exact_order_statistics`). The point itself is excluded by index.

    Args:
        data: ``(n, d)`` points.
        ranks: 1-based neighbour ranks, each at most ``n - 1``.
        chunk_size: query rows per chunk (default: a float32 block of about 8 MiB).

    Returns:
        ``(d2, has_duplicates)``: ``(n, len(ranks))`` float64 squared distances,
        and whether the cloud holds identical rows (then the distances count
        them; :func:`exact_rank_distances_deduplicated` removes them).
    """
    n, dim = data.shape
    wanted = [int(r) for r in ranks]
    if not wanted or min(wanted) < 1 or max(wanted) > n - 1:
        raise EmbgeoInputError(f"ranks must lie in [1, {n - 1}] for {n} points, got {wanted}.")
    ranks = sorted(set(wanted) | {1})
    dev = data.device
    data64 = data.to(torch.float64)
    # A power of two brings the largest centred norm near 1 (exact): no float32 overflow or underflow.
    spread = float((data64 - data64.mean(dim=0)).abs().max())
    scale = 2.0 ** -np.floor(np.log2(spread)) if spread > 0 else 1.0
    data64 = data64 * scale
    mean = data64.mean(dim=0)
    centred64 = data64 - mean
    xc = centred64.to(torch.float32)
    sq64 = (centred64 * centred64).sum(dim=1)
    sq = sq64.to(torch.float32)
    norms = (data64 * data64).sum(dim=1)
    gamma = float32_error_factor(dim)
    shift = 2.1 * gamma * sq64 + 1e-30
    bits = key_bits(n)
    mask = (1 << bits) - 1
    # Blocks that stay in the CPU's cache; on a GPU, large blocks (few kernel launches per row).
    budget = 1 << 23 if dev.type == "cpu" else chunk_budget(dev) // 8
    step = chunk_rows(4 * n, dev, chunk_size, max_rows=n, budget_bytes=budget)
    out = torch.empty((n, len(ranks)), dtype=torch.float64, device=dev)
    has_duplicates = False
    zeros = torch.zeros(1, dtype=torch.long, device=dev)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = torch.arange(start, stop, device=dev)
        score = torch.addmm(sq[None, :], xc[start:stop], xc.T, alpha=-2.0)
        score.add_((sq64[start:stop] + shift[start:stop]).to(torch.float32)[:, None]).clamp_(min=0.0)
        score[rows - start, rows] = float("inf")
        keys = score.view(torch.int32)
        keys.bitwise_and_(~mask).bitwise_or_(torch.arange(n, dtype=torch.int32, device=dev))
        listed, rest = _smallest_keys(keys, max(ranks) + 1)
        d2, _, ok = exact_order_statistics(
            data64,
            norms,
            listed,
            bits,
            sq64[start:stop],
            shift[start:stop],
            gamma,
            ranks,
            query=rows,
            base=zeros.expand(stop - start),
            rest=rest,
        )
        if not bool(ok.all()):  # a band reaches past the listed keys: sort those rows in full
            bad = (~ok).nonzero()[:, 0]
            full = keys[bad].clone()
            if full.device.type == "cpu":
                full.numpy().sort(axis=1)
            else:
                full = torch.sort(full, dim=1).values
            d2[bad], _, _ = exact_order_statistics(
                data64,
                norms,
                full,
                bits,
                sq64[start + bad],
                shift[start + bad],
                gamma,
                ranks,
                query=start + bad,
                base=zeros.expand(bad.numel()),
            )
        out[start:stop] = d2
    # Identical rows, and only they, are at exactly 0 (near pairs are recomputed from differences).
    has_duplicates = bool((out[:, 0] == 0).any())
    return out[:, [ranks.index(r) for r in wanted]] / scale**2, has_duplicates


def exact_rank_distances_deduplicated(
    data: torch.Tensor, ranks: Sequence[int], what: str = "the estimator", shrink: bool = False
) -> tuple[torch.Tensor, int, list[int]]:
    """:func:`exact_rank_distances` of the cloud with its identical rows removed (chapters 3 and 4).

    Args:
        data: ``(n, d)`` points.
        ranks: 1-based neighbour ranks.
        what: name of the caller, used in the error message.
        shrink: drop the ranks that the distinct points do not allow (keeping at
            least rank 2) instead of raising.

    Returns:
        ``(dist, n_distinct, ranks)``: ``(n_distinct, len(ranks))`` float64 distances
        (not squared) floored at :data:`DISTANCE_FLOOR`, the number of distinct
        points and the ranks kept.

    Raises:
        EmbgeoInputError: if fewer than ``max(ranks) + 1`` distinct points remain.
    """
    if data.ndim != 2:
        raise EmbgeoInputError(f"data must be 2-D (points x features), got shape {tuple(data.shape)}.")
    ranks = sorted({int(r) for r in ranks})
    n_distinct = data.shape[0]
    if data.shape[0] >= ranks[-1] + 1:
        d2, has_duplicates = exact_rank_distances(data, ranks)
        if not has_duplicates:
            return d2.sqrt_().clamp_(min=DISTANCE_FLOOR), n_distinct, ranks
    data = unique_rows(data)
    n_distinct = data.shape[0]
    if shrink and n_distinct >= 3:
        ranks = [r for r in ranks if r <= n_distinct - 1]
    if n_distinct < ranks[-1] + 1:
        raise _too_few(n_distinct, ranks[-1], what)
    d2, _ = exact_rank_distances(data, ranks)
    return d2.sqrt_().clamp_(min=DISTANCE_FLOOR), n_distinct, ranks
