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
    "DISTANCE_FLOOR",
    "batched_knn_distances",
    "check_k",
    "check_queries",
    "deduplicated_knn_distances",
    "duplicate_groups",
    "knn",
    "knn_from_sq_distances",
    "neighborhood_overlap",
    "neighborhood_overlap_batched",
    "shared_neighbor_counts",
    "smallest_sorted",
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


# ----------------------------------------------------------------------------------------
# Sorted neighbour distances with duplicate rows removed or masked (chapters 3 and 4)
#
# Identical rows (common in quantized embedding tables and in hidden states of repeated
# tokens) give zero distances and infinite distance ratios. The single-cloud route deletes
# duplicate rows first (``deduplicated_knn_distances``). The batched route keeps the array
# shape and masks duplicates instead (``knn_from_sq_distances``): each group of identical
# rows is represented by its first row, the other copies are marked invalid, and every
# point's neighbour list skips the copies of itself and the non-first copies of other
# groups. That is exactly the neighbour structure of the de-duplicated cloud, so both routes
# give the same distances for the points they keep.

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
