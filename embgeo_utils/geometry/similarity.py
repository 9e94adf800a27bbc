"""Global similarity of two point clouds over the same items (chapter 1).

The cosine-similarity matrix of the items in cloud A against that in cloud B
(Pearson of the upper triangles), with Spearman, linear CKA and mutual k-NN as
complements, a permutation null that breaks the item correspondence, and the
layer x layer map of the same statistic. Chapter 1 applies them to the tokens two
models share (:mod:`embgeo_utils.chapters.ch01_global_orientation`).

All measures take ``X`` ``(n, d1)`` and ``Y`` ``(n, d2)`` whose rows are the same
items; the widths may differ. ``measure(name, X, Y)`` is the single entry point.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Kornblith, Norouzi, Lee, Hinton (2019). Similarity of Neural Network
    Representations Revisited. ICML. arXiv:1905.00414.
    Huh, Cheung, Wang, Isola (2024). The Platonic Representation Hypothesis.
    arXiv:2405.07987 (mutual k-NN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from ..core.device import chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.stats import PermutationResult, from_null
from ..core.validation import as_matrix
from .neighbors import check_k, knn, shared_neighbor_counts

__all__ = [
    "cka",
    "cosine_matrix_correlation",
    "layer_map",
    "measure",
    "measures",
    "mutual_knn",
    "permutation_test",
    "spearman_cosine",
]


Array = np.ndarray | torch.Tensor


_FULL_MATRIX_ROWS = 5000  # up to this many rows the permutation test may keep both cosine matrices


_LOW_RANK_FACTOR = 300  # ... unless d_a * d_b < 300 n, where the low-rank cross term is cheaper


def _pair(X: Array, Y: Array, dev: torch.device, min_rows: int = 3, dtype: torch.dtype = torch.float32):
    x = as_matrix(X, "X", device=dev, dtype=dtype, min_rows=min_rows)
    y = as_matrix(Y, "Y", device=dev, dtype=dtype, min_rows=min_rows)
    if x.shape[0] != y.shape[0]:
        raise EmbgeoInputError(
            f"X and Y must hold the same items, row for row: {x.shape[0]} rows != {y.shape[0]} rows "
            "(select the shared tokens in both models first)."
        )
    return x, y


def _unit(data: torch.Tensor, name: str, center: bool) -> torch.Tensor:
    if center:
        data = data - data.mean(dim=0, keepdim=True)
    norms = data.norm(dim=1, keepdim=True)
    zero = int((norms <= 1e-12 * max(1.0, float(norms.max()))).sum())
    if zero:
        where = "after mean-centring " if center else ""
        raise EmbgeoInputError(
            f"{name} holds {zero} zero vectors {where}: cosine similarity is undefined for them; drop those rows first."
        )
    return data / norms


def _mean_offdiag_cos(unit: torch.Tensor) -> float:
    """Exact mean of the off-diagonal cosines: (||sum_i u_i||^2 - n) / (n (n - 1))."""
    n = unit.shape[0]
    total = unit.to(torch.float64).sum(dim=0)
    return float(((total * total).sum() - n) / (n * (n - 1)))


def _pearson_from_sums(sa: float, sb: float, saa: float, sbb: float, sab: float, m: int) -> float:
    var_a = saa - sa * sa / m
    var_b = sbb - sb * sb / m
    if var_a <= 0 or var_b <= 0:
        raise EmbgeoInputError(
            "The cosine similarities of one cloud are all equal, so their correlation is undefined; "
            "check that the rows are not all parallel."
        )
    return float((sab - sa * sb / m) / math.sqrt(var_a * var_b))


@torch.no_grad()
def cosine_matrix_correlation(
    X: Array,
    Y: Array,
    center: bool = False,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
) -> float:
    """Chapter 1: Pearson r between the cosine-similarity matrices of X's rows and Y's rows.

    Only the upper triangles (pairs ``i < j``) enter, so the unit diagonal does
    not inflate r. The matrices are never stored: row blocks of both matrices
    are computed together and the five sums of the Pearson formula are
    accumulated in float64 (after subtracting each matrix's exact mean
    off-diagonal cosine, to avoid cancellation), so memory stays bounded for
    ``n`` in the tens of thousands.

    Args:
        X: ``(n, d1)`` model A's vectors of n items.
        Y: ``(n, d2)`` model B's vectors of the same items.
        center: subtract each cloud's mean vector first (anisotropic embedding
            clouds have large raw cosines; chapter 1 reports both).
        device: where to compute.
        chunk_size: rows per block (default: a block pair under ~512 MiB).

    Returns:
        r as a Python float.

    Raises:
        EmbgeoInputError: mismatched rows, fewer than 3 rows, NaN/inf, zero vectors.

    References:
        Lee et al. (2025), arXiv:2503.21073.
    """
    dev = get_device(device)
    x, y = _pair(X, Y, dev)
    ux, uy = _unit(x, "X", center), _unit(y, "Y", center)
    n = ux.shape[0]
    cx, cy = _mean_offdiag_cos(ux), _mean_offdiag_cos(uy)
    step = chunk_rows(4 * n, dev, chunk_size, max_rows=n)
    sa = sb = saa = sbb = sab = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        # Columns start.. only: the block's own square is masked to its strict upper triangle.
        a = ux[start:stop] @ ux[start:].T - cx
        b = uy[start:stop] @ uy[start:].T - cy
        width = stop - start
        a[:, :width] = torch.triu(a[:, :width], diagonal=1)
        b[:, :width] = torch.triu(b[:, :width], diagonal=1)
        sa += float(a.sum(dtype=torch.float64))
        sb += float(b.sum(dtype=torch.float64))
        saa += float((a * a).sum(dtype=torch.float64))
        sbb += float((b * b).sum(dtype=torch.float64))
        sab += float((a * b).sum(dtype=torch.float64))
    return _pearson_from_sums(sa, sb, saa, sbb, sab, n * (n - 1) // 2)


def _centered64(data: torch.Tensor) -> torch.Tensor:
    data = data.to(torch.float64)
    return data - data.mean(dim=0, keepdim=True)


@torch.no_grad()
def cka(X: Array, Y: Array, device: str | torch.device = "auto") -> float:
    """Chapter 1: linear centred kernel alignment between two representations of the same items.

    ``CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
    ``Xc, Yc`` (float64). Invariant to orthogonal transforms and isotropic scaling
    of either cloud; 1 for identical clouds.

    Args:
        X: ``(n, d1)``; Y: ``(n, d2)``, same rows.
        device: where to compute.

    Returns:
        CKA in ``[0, 1]`` as a Python float.

    References:
        Kornblith et al. (2019), Similarity of Neural Network Representations
        Revisited, ICML (arXiv:1905.00414).
    """
    dev = get_device(device)
    x, y = _pair(X, Y, dev, min_rows=2, dtype=torch.float64)
    xc, yc = _centered64(x), _centered64(y)
    hxx = torch.linalg.matrix_norm(xc.T @ xc)
    hyy = torch.linalg.matrix_norm(yc.T @ yc)
    if float(hxx) == 0 or float(hyy) == 0:
        raise EmbgeoInputError("One cloud has zero variance (all rows equal): CKA is undefined.")
    hxy = torch.linalg.matrix_norm(xc.T @ yc) ** 2
    return float(hxy / (hxx * hyy))


def mutual_knn(X: Array, Y: Array, k: int = 10, device: str | torch.device = "auto") -> float:
    """Chapter 1: mean fraction of shared cosine k-nearest neighbours (self excluded).

    ``mean_i |N_k^X(i) & N_k^Y(i)| / k`` with neighbours by cosine similarity.
    Chance level for unrelated clouds is ``k / (n - 1)``.

    References:
        Huh et al. (2024), The Platonic Representation Hypothesis, arXiv:2405.07987.
    """
    dev = get_device(device)
    x, y = _pair(X, Y, dev)
    check_k(k, x.shape[0], exclude_self=True)
    _, ix = knn(x, k, metric="cosine", device=dev)
    _, iy = knn(y, k, metric="cosine", device=dev)
    return float(shared_neighbor_counts(ix, iy).mean() / k)


def _sample_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j when there are at most ``max_pairs``, else ``max_pairs`` random ones (seeded)."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=max_pairs)
    j = rng.integers(0, n - 1, size=max_pairs)
    j = j + (j >= i)  # uniform over j != i
    return np.minimum(i, j), np.maximum(i, j)


@torch.no_grad()
def spearman_cosine(
    X: Array,
    Y: Array,
    center: bool = False,
    max_pairs: int = 2_000_000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> float:
    """Chapter 1: Spearman rank correlation of the cosine upper triangles of X and Y.

    With ``n (n - 1) / 2 <= max_pairs`` all pairs ``i < j`` are used (exact).
    Beyond that, ``max_pairs`` pairs are drawn uniformly at random (with
    replacement, fixed ``seed``, so the result is deterministic) and the rank
    correlation is computed on them: an estimate whose standard error is about
    ``1 / sqrt(max_pairs)`` (below 0.001 at the default). Ties get average ranks.

    References:
        Lee et al. (2025), arXiv:2503.21073.
    """
    dev = get_device(device)
    x, y = _pair(X, Y, dev)
    ux, uy = _unit(x, "X", center), _unit(y, "Y", center)
    rows, cols = _sample_pairs(ux.shape[0], max_pairs, seed)
    order = np.argsort(rows, kind="stable")  # pairs grouped by row: each block of Gram rows is one GEMM
    rows, cols = rows[order], cols[order]
    n = ux.shape[0]
    a = np.empty(len(rows), dtype=np.float64)
    b = np.empty(len(rows), dtype=np.float64)
    step = chunk_rows(8 * n, dev)
    for start in range(0, n, step):
        lo, hi = np.searchsorted(rows, [start, start + step])
        if lo == hi:
            continue
        r = torch.from_numpy(rows[lo:hi] - start).to(dev)
        c = torch.from_numpy(cols[lo:hi]).to(dev)
        a[lo:hi] = (ux[start : start + step] @ ux.T)[r, c].double().cpu().numpy()
        b[lo:hi] = (uy[start : start + step] @ uy.T)[r, c].double().cpu().numpy()
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denom == 0:
        raise EmbgeoInputError("The cosine similarities of one cloud are all equal: Spearman is undefined.")
    return float(ra @ rb / denom)


_MEASURES: dict[str, Callable[..., float]] = {
    "cosine_corr": cosine_matrix_correlation,
    "cosine_corr_centered": lambda X, Y, **kw: cosine_matrix_correlation(X, Y, center=True, **kw),
    "cka": cka,
    "mutual_knn": mutual_knn,
    "spearman": spearman_cosine,
}


def measures() -> list[str]:
    """Names accepted by ``measure`` and ``permutation_test`` (chapter 1)."""
    return sorted(_MEASURES)


def measure(name: str, X: Array, Y: Array, **kw: Any) -> float:
    """Chapter 1: compute a similarity measure by name.

    Names: ``"cosine_corr"``, ``"cosine_corr_centered"``, ``"cka"``,
    ``"mutual_knn"`` (``k=10`` by default) and ``"spearman"``. Extra keyword
    arguments go to the underlying function (e.g. ``device``, ``k``).
    """
    if name not in _MEASURES:
        raise EmbgeoInputError(f"Unknown similarity measure {name!r}; choose one of {measures()}.")
    return float(_MEASURES[name](X, Y, **kw))


class _FastNull:
    """Permutation null for cosine correlation and CKA without recomputing the clouds' geometry.

    Permuting Y's rows leaves every per-cloud quantity of these statistics
    unchanged (the set of off-diagonal cosines of Y, the Gram norms of CKA);
    only the cross term depends on the permutation ``p``:

    * cosine correlation, n <= 5000: ``sum_{i != j} A_ij B_{p_i p_j}`` with both
      (mean-shifted, zero-diagonal) cosine matrices kept on the device and
      ``B`` re-indexed by ``p``;
    * cosine correlation, larger n: the same sum as
      ``||Ux^T Uy[p]||_F^2 - n`` (unit rows), in float64, shifted by the means;
    * CKA: ``||Xc^T Yc[p]||_F^2``.
    """

    def __init__(self, kind: str, X: Array, Y: Array, dev: torch.device, center: bool = False) -> None:
        self.kind = kind
        if kind == "cka":
            x, y = _pair(X, Y, dev, min_rows=2, dtype=torch.float64)
            self.x, self.y = _centered64(x), _centered64(y)
            self.norm = float(torch.linalg.matrix_norm(self.x.T @ self.x) * torch.linalg.matrix_norm(self.y.T @ self.y))
            if self.norm == 0:
                raise EmbgeoInputError("One cloud has zero variance (all rows equal): CKA is undefined.")
            return
        x, y = _pair(X, Y, dev)
        ux, uy = _unit(x, "X", center), _unit(y, "Y", center)
        n = ux.shape[0]
        self.n, self.m = n, n * (n - 1) // 2
        self.cx, self.cy = _mean_offdiag_cos(ux), _mean_offdiag_cos(uy)
        # Off-diagonal sums of the shifted matrices over pairs i<j (the shift makes the first-order sums ~0).
        self.sa = self.sb = 0.0
        # Re-indexing an n x n matrix costs ~n^2 memory traffic per permutation, the low-rank cross term
        # ||Ux^T Uy[p]||^2 costs n * d_a * d_b flops: the full matrices win only for few rows or wide tables.
        if n <= _FULL_MATRIX_ROWS and ux.shape[1] * uy.shape[1] > _LOW_RANK_FACTOR * n:
            a = ux @ ux.T - self.cx
            b = uy @ uy.T - self.cy
            a.fill_diagonal_(0)
            b.fill_diagonal_(0)
            self.sa, self.sb = float(a.sum(dtype=torch.float64)) / 2, float(b.sum(dtype=torch.float64)) / 2
            self.saa = float((a * a).sum(dtype=torch.float64)) / 2
            self.sbb = float((b * b).sum(dtype=torch.float64)) / 2
            self.a, self.b = a, b
            self.full = True
        else:
            self.full = False
            self.ux, self.uy = ux.to(torch.float64), uy.to(torch.float64)
            # Sum of squares of the shifted off-diagonal entries via ||U^T U||_F^2 = sum_ij cos_ij^2.
            for name, u, c in (("saa", self.ux, self.cx), ("sbb", self.uy, self.cy)):
                total_sq = float(torch.linalg.matrix_norm(u.T @ u) ** 2) - n  # sum_{i != j} cos^2
                total = float((u.sum(dim=0) ** 2).sum()) - n  # sum_{i != j} cos
                off = n * (n - 1)
                setattr(self, name, (total_sq - 2 * c * total + c * c * off) / 2)

    def __call__(self, perm: torch.Tensor | None) -> float:
        if self.kind == "cka":
            y = self.y if perm is None else self.y[perm]
            return float(torch.linalg.matrix_norm(self.x.T @ y) ** 2 / self.norm)
        if self.full:
            b = self.b if perm is None else self.b[perm[:, None], perm[None, :]]
            sab = float((self.a * b).sum(dtype=torch.float64)) / 2
        else:
            uy = self.uy if perm is None else self.uy[perm]
            n = self.n
            cross = float(torch.linalg.matrix_norm(self.ux.T @ uy) ** 2) - n  # sum_{i != j} cosX_ij cosY_pipj
            tx = float((self.ux.sum(dim=0) ** 2).sum()) - n
            ty = float((self.uy.sum(dim=0) ** 2).sum()) - n
            sab = (cross - self.cy * tx - self.cx * ty + self.cx * self.cy * n * (n - 1)) / 2
        return _pearson_from_sums(self.sa, self.sb, self.saa, self.sbb, sab, self.m)


def _fast_kind(stat: str | Callable[..., float], kw: dict[str, Any]) -> tuple[str, bool] | None:
    """Which fast null applies to ``stat`` (with keyword arguments ``kw``), if any."""
    extra = set(kw) - {"center"}
    if extra:
        return None
    if stat in ("cosine_corr", "cosine_corr_centered") or stat is cosine_matrix_correlation:
        if stat == "cosine_corr_centered" and "center" in kw:
            return None
        return "cosine", bool(kw.get("center", stat == "cosine_corr_centered"))
    if (stat == "cka" or stat is cka) and not kw:
        return "cka", False
    return None


def permutation_test(
    stat: str | Callable[..., float],
    X: Array,
    Y: Array,
    n: int = 200,
    seed: int = 0,
    device: str | torch.device = "auto",
    **kw: Any,
) -> PermutationResult:
    """Chapter 1: permutation null for a similarity statistic by shuffling Y's rows.

    The null permutes the rows of ``Y`` (breaking the token correspondence
    between the two models) ``n`` times with a seeded generator; the p-value is
    one-sided, ``(1 + #{null >= observed}) / (1 + n)``.

    For ``"cosine_corr"``, ``"cosine_corr_centered"`` and ``"cka"`` (names or the
    functions themselves) the clouds' geometry is computed once and each
    permutation only re-indexes it (see ``_FastNull``); any other statistic is
    recomputed from scratch for every permutation.

    Args:
        stat: a name from ``measures()`` or a callable ``stat(X, Y, **kw) -> float``.
        X: ``(n_items, d1)``; Y: ``(n_items, d2)``, same rows.
        n: number of permutations (chapter 1 uses at least 200).
        seed: seed of the permutations.
        device: where to compute.
        **kw: passed to the statistic.

    Returns:
        :class:`~embgeo_utils.core.stats.PermutationResult`.

    References:
        Lee et al. (2025), arXiv:2503.21073.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EmbgeoInputError(f"n (number of permutations) must be a positive integer, got {n!r}.")
    dev = get_device(device)
    rows_x = as_matrix(X, "X").shape[0]
    rows_y = as_matrix(Y, "Y").shape[0]
    if rows_x != rows_y:
        raise EmbgeoInputError(f"X and Y must hold the same items, row for row: {rows_x} rows != {rows_y} rows.")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(rows_y) for _ in range(n)]
    fast = _fast_kind(stat, kw)
    if fast is not None:
        null_fn = _FastNull(fast[0], X, Y, dev, center=fast[1])
        observed = null_fn(None)
        null = np.array([null_fn(torch.from_numpy(p).to(dev)) for p in perms])
    else:
        if isinstance(stat, str):
            if stat not in _MEASURES:
                raise EmbgeoInputError(
                    f"Unknown similarity measure {stat!r}; choose one of {measures()} or pass a callable."
                )
            fn: Callable[..., float] = _MEASURES[stat]
            kw = {"device": dev, **kw}
        else:
            fn = stat
        y_all = Y if isinstance(Y, torch.Tensor) else np.asarray(Y)
        observed = float(fn(X, y_all, **kw))
        take = (lambda p: y_all[torch.from_numpy(p)]) if isinstance(y_all, torch.Tensor) else (lambda p: y_all[p])
        null = np.array([float(fn(X, take(p), **kw)) for p in perms])
    return from_null(float(observed), null)


def layer_map(
    hidden_a: Array, hidden_b: Array, center: bool = True, device: str | torch.device = "auto"
) -> pd.DataFrame:
    """Chapter 1: cosine-matrix correlation between every layer of A and every layer of B.

    Args:
        hidden_a: ``(tokens, layers_a + 1, d_a)`` hidden states of the shared tokens in model A.
        hidden_b: ``(tokens, layers_b + 1, d_b)`` the same tokens in model B.
        center: mean-centre each layer's cloud first (chapter 1 does).
        device: where to compute.

    Returns:
        Tidy DataFrame, one row per layer pair: ``layer A``, ``layer B``, ``r``.
    """
    ha = torch.as_tensor(np.asarray(hidden_a) if not isinstance(hidden_a, torch.Tensor) else hidden_a)
    hb = torch.as_tensor(np.asarray(hidden_b) if not isinstance(hidden_b, torch.Tensor) else hidden_b)
    if ha.ndim != 3 or hb.ndim != 3 or ha.shape[0] != hb.shape[0]:
        raise EmbgeoInputError(
            f"hidden_a and hidden_b must be (tokens, layers, d) stacks of the same tokens; got {tuple(ha.shape)} and "
            f"{tuple(hb.shape)}."
        )
    dev = get_device(device)
    ua = _layer_units(ha, "hidden_a", center, dev)  # (layers, tokens, d), unit rows
    ub = _layer_units(hb, "hidden_b", center, dev)
    r = _cosine_correlations(ua, ub)
    rows = [{"layer A": p, "layer B": q, "r": float(r[p, q])} for p in range(ua.shape[0]) for q in range(ub.shape[0])]
    return pd.DataFrame(rows)


def _layer_units(hidden: torch.Tensor, name: str, center: bool, dev: torch.device) -> torch.Tensor:
    layers = [as_matrix(hidden[:, p], f"{name}[:, {p}]", device=dev, min_rows=3) for p in range(hidden.shape[1])]
    return torch.stack([_unit(x, f"{name}[:, {p}]", center) for p, x in enumerate(layers)])


def _cosine_correlations(ua: torch.Tensor, ub: torch.Tensor, chunk_size: int | None = None) -> np.ndarray:
    """Pearson r of the cosine upper triangles of every layer of A with every layer of B (chapter 1).

    The same statistic as :func:`cosine_matrix_correlation` for each pair of
    layers, but every layer's cosine matrix is computed once, block by block of
    rows, and the cross sums of all layer pairs come from one product per block.
    """
    n = ua.shape[1]
    la, lb = ua.shape[0], ub.shape[0]
    ca = torch.tensor([_mean_offdiag_cos(u) for u in ua], device=ua.device, dtype=ua.dtype)[:, None, None]
    cb = torch.tensor([_mean_offdiag_cos(u) for u in ub], device=ub.device, dtype=ub.dtype)[:, None, None]
    step = chunk_rows(12 * n * (la + lb), ua.device, chunk_size, max_rows=n)  # float32 blocks and their float64 copies
    sa = torch.zeros(la, dtype=torch.float64, device=ua.device)
    saa = torch.zeros_like(sa)
    sb = torch.zeros(lb, dtype=torch.float64, device=ua.device)
    sbb = torch.zeros_like(sb)
    sab = torch.zeros(la, lb, dtype=torch.float64, device=ua.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        # Columns start.. only: the block's own square is masked to its strict upper triangle.
        keep = torch.ones(stop - start, n - start, dtype=torch.bool, device=ua.device).triu(1)
        a = (torch.matmul(ua[:, start:stop], ua[:, start:].transpose(1, 2)) - ca)[:, keep]  # (la, m)
        b = (torch.matmul(ub[:, start:stop], ub[:, start:].transpose(1, 2)) - cb)[:, keep]  # (lb, m)
        sa += a.sum(dim=1, dtype=torch.float64)
        saa += (a * a).sum(dim=1, dtype=torch.float64)
        sb += b.sum(dim=1, dtype=torch.float64)
        sbb += (b * b).sum(dim=1, dtype=torch.float64)
        sab += a.double() @ b.double().T
    m = n * (n - 1) // 2
    out = np.empty((la, lb))
    for p in range(la):
        for q in range(lb):
            out[p, q] = _pearson_from_sums(
                float(sa[p]), float(sb[q]), float(saa[p]), float(sbb[q]), float(sab[p, q]), m
            )
    return out
