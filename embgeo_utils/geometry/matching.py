"""Matching two dictionaries' features and comparing their decoder geometry (chapter 5).

Two SAEs, one per model, encode the same tokens. :func:`activation_correlation`
gives the Pearson correlation of every latent of A with every latent of B over
those tokens; :func:`match_features` pairs them (many-to-one: each B latent with
its most correlated A latent, as Lan et al.; or one-to-one by optimal
assignment), and :func:`one_per_a` keeps one pair per A latent (Lan et al.'s
de-duplication). The paired decoder rows are then compared with :func:`svcca` and
:func:`rsa`, each against a null of random re-pairings (:func:`svcca_test`,
:func:`rsa_test`, built on :func:`embgeo_utils.core.stats.permutation_test`).

Many-to-one pairs need their own null. When several B latents share one A partner,
the A side holds repeated rows, and B's latents that share a partner tend to be split
features whose decoder rows resemble each other; shuffling B's rows breaks that
alignment, so the real pairing beats such a null with no shared geometry at all.
:func:`rsa_group_test` keeps the group structure and permutes which A latent each
group is paired with; :func:`group_sizes` says how many distinct latents the pairs use.
Chapter 5's filters and pipeline live in :mod:`embgeo_utils.chapters.ch05_sae_feature_matching`.

References:
    M. Lan, P. Torr, A. Meek, A. Khakzar, D. Krueger, F. Barez (2024), Quantifying
    feature space universality across large language models via sparse
    autoencoders, arXiv:2410.06981.

    J. Son et al. (2025), Semantic convergence: investigating shared
    representations across scaled LLMs, arXiv:2507.22918.

    M. Raghu, J. Gilmer, J. Yosinski, J. Sohl-Dickstein (2017), SVCCA: singular
    vector canonical correlation analysis, NeurIPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..core.device import chunk_budget, chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.stats import PermutationResult, permutation_test, permutation_tests

__all__ = [
    "FeaturePairs",
    "activation_correlation",
    "group_sizes",
    "hungarian_pairs",
    "match_features",
    "one_per_a",
    "rsa",
    "rsa_group_test",
    "rsa_test",
    "svcca",
    "svcca_curve_test",
    "svcca_test",
]


def _latents(z: Any, name: str, dev: torch.device) -> torch.Tensor:
    t = torch.as_tensor(z)
    if t.ndim != 2:
        raise EmbgeoInputError(f"{name} must be 2-D (tokens x latents), got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise EmbgeoInputError(f"{name} holds NaN or infinite values; re-encode the activations.")
    return t.to(dev)


@torch.no_grad()
def activation_correlation(
    za: Any, zb: Any, device: str | torch.device = "auto", chunk_size: int | None = None
) -> np.ndarray:
    """Pearson correlation of every latent of A with every latent of B, ``(n_a, n_b)`` (chapter 5).

    Both inputs are ``(tokens, latents)`` activations of the same tokens. Means and
    standard deviations are accumulated in float64 over token chunks; the cross
    products use a sparse product when the latents are sparse (as TopK latents
    are), so the cost scales with the non-zeros. A latent that never varies has
    correlation 0 with everything (never NaN).

    Raises:
        EmbgeoInputError: if the token counts differ, or on NaN/inf.
    """
    dev = get_device(device)
    a = _latents(za, "za", dev)
    b = _latents(zb, "zb", dev)
    if a.shape[0] != b.shape[0]:
        raise EmbgeoInputError(
            f"za and zb must hold the same tokens: {a.shape[0]} rows != {b.shape[0]} rows. "
            "Encode the same token positions with both SAEs."
        )
    n = a.shape[0]
    if n < 2:
        raise EmbgeoInputError("Correlations need at least 2 tokens.")
    step = chunk_rows(8 * (a.shape[1] + b.shape[1]), dev, chunk_size, max_rows=n)
    cross = torch.zeros((a.shape[1], b.shape[1]), dtype=torch.float64, device=dev)
    sa = torch.zeros(a.shape[1], dtype=torch.float64, device=dev)
    sb = torch.zeros(b.shape[1], dtype=torch.float64, device=dev)
    qa = torch.zeros_like(sa)
    qb = torch.zeros_like(sb)
    for start in range(0, n, step):
        xa = a[start : start + step].double()
        xb = b[start : start + step].double()
        sa += xa.sum(0)
        sb += xb.sum(0)
        qa += (xa * xa).sum(0)
        qb += (xb * xb).sum(0)
        if float((xa != 0).float().mean()) < 0.1 and dev.type == "cpu":
            cross += torch.sparse.mm(xa.T.to_sparse(), xb)
        else:
            cross += xa.T @ xb
    ma, mb = sa / n, sb / n
    va = (qa / n - ma * ma).clamp_min(0)
    vb = (qb / n - mb * mb).clamp_min(0)
    cov = cross / n - ma[:, None] * mb[None, :]
    da, db = va.sqrt(), vb.sqrt()
    # A latent with (numerically) no variance correlates with nothing.
    ok_a = da > 1e-12 * (1 + ma.abs())
    ok_b = db > 1e-12 * (1 + mb.abs())
    corr = cov / (da[:, None] * db[None, :]).clamp_min(1e-300)
    corr[~ok_a] = 0
    corr[:, ~ok_b] = 0
    return corr.clamp_(-1, 1).cpu().numpy()


@dataclass(frozen=True)
class FeaturePairs:
    """Matched latents (chapter 5): index ``a[i]`` of A with ``b[i]`` of B, and their correlation."""

    a: np.ndarray
    b: np.ndarray
    corr: np.ndarray
    method: str

    def __len__(self) -> int:
        return int(self.a.size)

    def subset(self, keep: np.ndarray) -> FeaturePairs:
        return FeaturePairs(self.a[keep], self.b[keep], self.corr[keep], self.method)


def match_features(corr: np.ndarray, method: Literal["max", "hungarian"] = "max") -> FeaturePairs:
    """Pair latents of A and B from their correlation matrix ``(n_a, n_b)`` (chapter 5).

    ``"max"``: many-to-one, each B latent with its most correlated A latent (Lan
    et al.); ``"hungarian"``: one-to-one, the assignment that maximises the total
    correlation (:func:`scipy.optimize.linear_sum_assignment`).
    """
    c = np.asarray(corr, dtype=np.float64)
    if c.ndim != 2 or 0 in c.shape:
        raise EmbgeoInputError(f"corr must be a non-empty 2-D matrix, got shape {c.shape}.")
    if not np.isfinite(c).all():
        raise EmbgeoInputError("corr holds NaN/inf; compute it with activation_correlation.")
    if method == "max":
        b = np.arange(c.shape[1])
        a = c.argmax(axis=0)
    elif method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        a, b = linear_sum_assignment(-c)
    else:
        raise EmbgeoInputError(f"method must be 'max' or 'hungarian', got {method!r}.")
    return FeaturePairs(np.asarray(a), np.asarray(b), c[a, b], method)


def hungarian_pairs(
    corr: np.ndarray, rows_ok: np.ndarray | None = None, cols_ok: np.ndarray | None = None, min_corr: float = 0.1
) -> FeaturePairs:
    """One-to-one pairs that maximise the total correlation among the candidates above ``min_corr`` (chapter 5).

    Only latents marked in ``rows_ok`` (A) and ``cols_ok`` (B) and entries above ``min_corr`` are candidates, so
    the assignment is solved on a sparse graph (:func:`scipy.sparse.csgraph.min_weight_full_bipartite_matching`,
    with one zero-correlation way out per A latent so that a latent without a good partner stays unpaired). On the
    candidates it equals the dense assignment of :func:`match_features` with entries at or below ``min_corr`` set to
    ``min_corr``; pairs at or below ``min_corr`` are dropped.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    c = np.asarray(corr, dtype=np.float64)
    if c.ndim != 2 or 0 in c.shape or not np.isfinite(c).all():
        raise EmbgeoInputError(f"corr must be a finite, non-empty 2-D matrix, got shape {c.shape}.")
    ok = c > min_corr
    if rows_ok is not None:
        ok &= np.asarray(rows_ok, dtype=bool)[:, None]
    if cols_ok is not None:
        ok &= np.asarray(cols_ok, dtype=bool)[None, :]
    r, q = np.nonzero(ok)
    empty = np.zeros(0, dtype=np.int64)
    if not r.size:
        return FeaturePairs(empty, empty, np.zeros(0), "hungarian")
    n_a, n_b = c.shape
    # weights: 1 + (1 - corr) on candidates, 2 on each A latent's own way out (worth a correlation of min_corr)
    rows = np.r_[r, np.arange(n_a)]
    cols = np.r_[q, n_b + np.arange(n_a)]
    weights = np.r_[2.0 - c[r, q], np.full(n_a, 2.0 - min_corr)]
    graph = coo_matrix((weights, (rows, cols)), shape=(n_a, n_b + n_a)).tocsr()
    match = min_weight_full_bipartite_matching(graph)[1]
    a = np.flatnonzero(match < n_b)
    b = match[a]
    keep = c[a, b] > min_corr
    return FeaturePairs(a[keep], b[keep].astype(np.int64), c[a[keep], b[keep]], "hungarian")


def one_per_a(pairs: FeaturePairs) -> FeaturePairs:
    """One pair per A latent: the one with the highest correlation (chapter 5; Lan et al.'s de-duplication).

    Ties go to the lower B index. The pairs keep their original order; ``method`` gains ``"+one-per-A"``.
    """
    if not len(pairs):
        return FeaturePairs(pairs.a, pairs.b, pairs.corr, f"{pairs.method}+one-per-A")
    order = np.lexsort((pairs.b, -pairs.corr, pairs.a))  # by A latent, then correlation (descending), then B
    first = np.r_[True, pairs.a[order][1:] != pairs.a[order][:-1]]
    keep = np.zeros(len(pairs), dtype=bool)
    keep[order[first]] = True
    kept = pairs.subset(keep)
    return FeaturePairs(kept.a, kept.b, kept.corr, f"{pairs.method}+one-per-A")


def group_sizes(pairs: FeaturePairs) -> dict[str, Any]:
    """How many distinct latents a set of pairs uses, and how they group (chapter 5).

    Returns:
        ``pairs``; ``distinct A`` and ``distinct B`` (latents used); ``largest group`` (most pairs sharing one A
        latent); ``pairs sharing an A latent`` (pairs whose A latent has another partner); and ``groups of size``
        ``{size: number of A latents with that many partners}``.
    """
    if not len(pairs):
        return {"pairs": 0, "distinct A": 0, "distinct B": 0, "largest group": 0, "pairs sharing an A latent": 0,
                "groups of size": {}}  # fmt: skip
    _, counts = np.unique(pairs.a, return_counts=True)
    sizes, how_many = np.unique(counts, return_counts=True)
    return {
        "pairs": len(pairs),
        "distinct A": int(counts.size),
        "distinct B": int(np.unique(pairs.b).size),
        "largest group": int(counts.max()),
        "pairs sharing an A latent": int(counts[counts > 1].sum()),
        "groups of size": {int(k): int(v) for k, v in zip(sizes, how_many)},
    }


def _paired_rows(X: Any, Y: Any, dev: torch.device, min_rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X).to(dev, torch.float64)
    y = torch.as_tensor(np.asarray(Y) if not isinstance(Y, torch.Tensor) else Y).to(dev, torch.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise EmbgeoInputError("X and Y must be 2-D (pairs x width).")
    if x.shape[0] != y.shape[0]:
        raise EmbgeoInputError(f"X and Y must be paired row for row: {x.shape[0]} != {y.shape[0]} rows.")
    if x.shape[0] < min_rows:
        raise EmbgeoInputError(f"Need at least {min_rows} pairs, got {x.shape[0]}.")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise EmbgeoInputError("X or Y holds NaN/inf values.")
    return x, y


def _left_vectors(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Left singular vectors of the centred rows, and the numerical rank."""
    xc = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum()) if s.numel() else 0
    if rank < 1:
        raise EmbgeoInputError("A side has no variance after centring; SVCCA is undefined.")
    return u, rank


def _check_components(n_components: Any, n_rows: int) -> int:
    if isinstance(n_components, bool) or int(n_components) != n_components or n_components < 1:
        raise EmbgeoInputError(f"n_components must be a positive integer, got {n_components!r}.")
    if n_components >= n_rows:
        raise EmbgeoInputError(f"n_components = {n_components} must be below the number of pairs ({n_rows}).")
    return int(n_components)


def _svcca_bases(X: Any, Y: Any, n_components: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _paired_rows(X, Y, dev)
    n = _check_components(n_components, x.shape[0])
    (ux, rx), (uy, ry) = _left_vectors(x), _left_vectors(y)
    return ux[:, : min(n, rx)], uy[:, : min(n, ry)]


def svcca(X: Any, Y: Any, n_components: int = 20, device: str | torch.device = "auto") -> float:
    """SVCCA of paired rows (chapter 5): mean canonical correlation after SVD reduction.

    Each side is centred and projected on its top ``n_components`` singular
    directions; the canonical correlations of the two projections are the singular
    values of ``Ux^T Uy`` (orthonormal bases), and SVCCA is their mean.
    """
    ux, uy = _svcca_bases(X, Y, n_components, get_device(device))
    return float(torch.linalg.svdvals(ux.T @ uy).clamp(0, 1).mean())


def svcca_test(
    X: Any,
    Y: Any,
    n_components: int = 20,
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> PermutationResult:
    """SVCCA against random re-pairings of the rows (chapter 5), batched on the device."""
    return svcca_curve_test(X, Y, [n_components], n_permutations, seed, device)[0]


def svcca_curve_test(
    X: Any,
    Y: Any,
    n_components: Sequence[int] = (5, 10, 20, 50, 100),
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> list[PermutationResult]:
    """:func:`svcca_test` at several ``n_components`` with one SVD per side (chapter 5).

    The singular vectors of each side do not depend on how many are kept, so
    they are computed once and truncated for every value, and every value is
    tested on the same seeded permutations
    (:func:`~embgeo_utils.core.stats.permutation_tests`). For a re-pairing
    ``p``, ``Ux^T Uy[p] = Ux[q]^T Uy`` with ``q`` the inverse of ``p``:
    :func:`_svcca_null` gathers the side with fewer columns and forms the
    products of a whole chunk of permutations as one matrix product, at the
    largest ``n_components``; every smaller value's matrix is its leading block.
    """
    dev = get_device(device)
    x, y = _paired_rows(X, Y, dev)
    values = [_check_components(n, x.shape[0]) for n in n_components]
    (ux_all, rx), (uy_all, ry) = _left_vectors(x), _left_vectors(y)
    sizes = [(min(n, rx), min(n, ry)) for n in values]
    ux = ux_all[:, : max(k for k, _ in sizes)].contiguous()
    uy = uy_all[:, : max(c for _, c in sizes)].contiguous()
    n = ux.shape[0]
    step = chunk_rows(16 * n * min(ux.shape[1], uy.shape[1]), dev, max_rows=64)

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        m = _svcca_null(ux, uy, perms)
        return torch.stack([torch.linalg.svdvals(m[:, :k, :c]).clamp(0, 1).mean(dim=1) for k, c in sizes], dim=1)

    return permutation_tests(statistic, n, n_permutations, seed, dev, chunk_size=step)


def _svcca_null(ux: torch.Tensor, uy: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``Ux^T Uy[p]`` for every permutation ``p``, ``(b, k, c)``, as one product with the gathered narrow side."""
    b, n = perms.shape
    k, c = ux.shape[1], uy.shape[1]
    if k <= c:
        inverse = torch.empty_like(perms).scatter_(1, perms, torch.arange(n, device=perms.device).expand(b, n))
        # Column block j of `wide` is Ux[q_j]: one (l, n) @ (n, b k) product gives every Uy^T Ux[q_j].
        wide = ux.index_select(0, inverse.T.reshape(-1)).view(n, b * k)
        return (uy.T @ wide).view(c, b, k).permute(1, 2, 0)
    wide = uy.index_select(0, perms.T.reshape(-1)).view(n, b * c)
    return (ux.T @ wide).view(k, b, c).permute(1, 0, 2)


def _rank_matrix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-correlation matrix's strict lower triangle as average ranks, and the triangle's indices."""
    from scipy.stats import rankdata

    xc = x - x.mean(dim=1, keepdim=True)
    norms = xc.norm(dim=1, keepdim=True)
    if bool((norms <= 0).any()):
        raise EmbgeoInputError("A row is constant, so its correlation with other rows is undefined; drop it.")
    u = xc / norms
    corr = u @ u.T
    n = x.shape[0]
    rows, cols = torch.tril_indices(n, n, offset=-1, device=x.device)
    ranks = torch.as_tensor(rankdata(corr[rows, cols].cpu().numpy()), device=x.device)
    full = torch.zeros((n, n), dtype=torch.float64, device=x.device)
    full[rows, cols] = ranks
    full = full + full.T
    return full, torch.stack([rows, cols])


def _rsa_parts(X: Any, Y: Any, max_rows: int | None, seed: int, dev: torch.device):
    x, y = _paired_rows(X, Y, dev)
    if max_rows is not None and x.shape[0] > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))
        x, y = x[pick], y[pick]
    ra, tri = _rank_matrix(x)
    rb, _ = _rank_matrix(y)
    a = ra[tri[0], tri[1]]
    a = a - a.mean()
    a = a / a.norm().clamp_min(1e-300)
    mb = float(rb[tri[0], tri[1]].mean())
    nb = float((rb[tri[0], tri[1]] - mb).norm())
    return a, rb, tri, mb, nb


def rsa(X: Any, Y: Any, max_rows: int | None = 2000, seed: int = 0, device: str | torch.device = "auto") -> float:
    """RSA of paired rows (chapter 5): Spearman correlation of the two row-correlation matrices.

    Rows are compared by Pearson correlation within each side; the strict lower
    triangles of the two matrices are ranked and correlated. ``max_rows`` pairs
    are drawn (seeded) when there are more, to bound memory (``n^2`` entries).
    """
    a, rb, tri, mb, nb = _rsa_parts(X, Y, max_rows, seed, get_device(device))
    return float((a * (rb[tri[0], tri[1]] - mb)).sum() / nb)


def rsa_test(
    X: Any,
    Y: Any,
    max_rows: int | None = 2000,
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> PermutationResult:
    """RSA against random re-pairings of the rows (chapter 5).

    Re-pairing permutes the rows and columns of B's rank matrix; ranks are
    unchanged as a set, so each null value is a gather and a dot product. With
    ``S`` A's centred, normalised ranks in the strict lower triangle (zero
    elsewhere) and ``R`` B's centred ranks, the value of permutation ``p`` is
    ``sum(S * R[p][:, p])`` over ``nb``: :func:`_rsa_null` gathers whole rows of
    ``R``, then the columns of a cache-sized block of rows, and dots them with
    the block of ``S`` (no index arithmetic over the triangle). Every
    permutation is computed alone, so its value does not depend on the chunk it
    is drawn in: the identity gives exactly the observed value.
    """
    dev = get_device(device)
    a, rb, tri, mb, nb = _rsa_parts(X, Y, max_rows, seed, dev)
    n = rb.shape[0]
    # Ranks are integers or halves below 2**24, exact in float32 (the diagonal's -mb meets S's zeros).
    r32 = (rb - mb).to(torch.float32)
    lower = torch.zeros((n, n), dtype=torch.float32, device=dev)
    lower[tri[0], tri[1]] = a.to(torch.float32)
    # Row blocks that stay in the CPU's cache; on a GPU, large blocks (few kernel launches).
    budget = 1 << 21 if dev.type == "cpu" else chunk_budget(dev) // 8
    rows = chunk_rows(8 * n, dev, max_rows=n, budget_bytes=budget)
    blocks = [(s, min(n, s + rows), lower[s : s + rows, : min(n, s + rows)].contiguous()) for s in range(0, n, rows)]
    del lower

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        return _rsa_null(r32, blocks, perms) / nb

    return permutation_test(statistic, n, n_permutations, seed, dev, chunk_size=64)


def _rsa_null(r: torch.Tensor, blocks: Sequence[tuple[int, int, torch.Tensor]], perms: torch.Tensor) -> torch.Tensor:
    """``sum(S * r[p][:, p])`` for every permutation ``p``, ``S`` given as row blocks of its lower triangle.

    Block ``(start, stop, s)`` holds rows ``start:stop`` and columns ``:stop``; each block's dot product is
    accumulated in float32, the blocks' sum in float64. One permutation at a time, the same operations for each.
    """
    out = []
    for p in perms:
        parts = [
            torch.dot(r.index_select(0, p[start:stop]).index_select(1, p[:stop]).reshape(-1), s.reshape(-1))
            for start, stop, s in blocks
        ]
        out.append(torch.stack(parts).double().sum())
    return torch.stack(out)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, ties averaged) along the last axis of a ``(b, m)`` tensor, as float64."""
    b, m = values.shape
    order = torch.argsort(values, dim=1, stable=True)
    ordered = torch.gather(values, 1, order)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = torch.cumsum(new_run.long(), dim=1) - 1 + torch.arange(b, device=values.device)[:, None] * m
    position = torch.arange(1, m + 1, dtype=torch.float64, device=values.device).expand(b, m).reshape(-1)
    flat_run = run.reshape(-1)
    first = torch.full((b * m,), float("inf"), dtype=torch.float64, device=values.device)
    last = torch.zeros(b * m, dtype=torch.float64, device=values.device)
    first.scatter_reduce_(0, flat_run, position, "amin")
    last.scatter_reduce_(0, flat_run, position, "amax")
    average = ((first + last) / 2)[flat_run].reshape(b, m)
    ranks = torch.empty_like(average)
    ranks.scatter_(1, order, average)
    return ranks


def rsa_group_test(
    X: Any,
    groups: Any,
    Y: Any,
    max_rows: int | None = 2000,
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> PermutationResult:
    """RSA of many-to-one pairs against a null that keeps their groups (chapter 5).

    Pair ``i`` joins A's row ``X[groups[i]]`` with B's row ``Y[i]``; pairs that share an A latent form a group.
    The statistic is :func:`rsa` of ``(X[groups], Y)``. The null permutes which A row each group is paired with
    (the identities of the A partners, across groups) and leaves B's rows and the grouping as they are, so the
    repeated A rows still line up with B's groups in every null draw: what that alignment alone produces is in
    the null too. Ranks are recomputed (ties averaged) for every draw. ``max_rows`` pairs are drawn (seeded) when
    there are more.

    Args:
        X: ``(n_a, width_a)`` A's rows (only the rows named in ``groups`` are used).
        groups: ``(n,)`` the A row of every pair.
        Y: ``(n, width_b)`` B's row of every pair.
    """
    dev = get_device(device)
    g = np.asarray(groups, dtype=np.int64).ravel()
    x_all = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X)
    if g.size and (g.min() < 0 or g.max() >= len(x_all)):
        raise EmbgeoInputError(f"groups must index the {len(x_all)} rows of X.")
    _, y = _paired_rows(x_all[g], Y, dev)
    if max_rows is not None and g.size > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(g.size, max_rows, replace=False))
        g, y = g[pick], y[pick]
    used, local = np.unique(g, return_inverse=True)
    if used.size < 2:
        raise EmbgeoInputError("The pairs use a single A latent; a group null needs at least two.")
    xu = torch.as_tensor(x_all[used], dtype=torch.float64, device=dev)
    xc = xu - xu.mean(dim=1, keepdim=True)
    unit = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-300)
    ca = (unit @ unit.T).clamp(-1, 1).reshape(-1)
    ca_dup = torch.ones_like(ca)  # a row repeated within a group correlates 1 with itself
    rb, tri = _rank_matrix(y)
    b = rb[tri[0], tri[1]]
    b = (b - b.mean()) / (b - b.mean()).norm().clamp_min(1e-300)
    gi = torch.as_tensor(local, device=dev)[tri[0]]
    gj = torch.as_tensor(local, device=dev)[tri[1]]
    u = used.size
    step = chunk_rows(48 * tri.shape[1], dev, max_rows=64)

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        out = torch.empty(perms.shape[0], dtype=torch.float64, device=dev)
        for start in range(0, perms.shape[0], step):
            p = perms[start : start + step]
            pi, pj = p[:, gi], p[:, gj]
            values = torch.where(pi == pj, ca_dup[0], ca[pi * u + pj])
            ranks = _average_ranks(values)
            ranks = ranks - ranks.mean(dim=1, keepdim=True)
            out[start : start + step] = (ranks @ b) / ranks.norm(dim=1).clamp_min(1e-300)
        return out

    return permutation_test(statistic, u, n_permutations, seed, dev, chunk_size=step)
