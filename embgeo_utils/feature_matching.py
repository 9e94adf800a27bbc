"""Matching SAE features across models and comparing their decoder geometry (chapter 5).

Two SAEs, one per model, encode the same tokens. :func:`activation_correlation`
gives the Pearson correlation of every latent of A with every latent of B over
those tokens; :func:`match_features` pairs them (many-to-one: each B latent with
its most correlated A latent, as Lan et al.; or one-to-one by optimal
assignment); :func:`filter_pairs` applies Lan et al.'s filters and counts the
pairs left after each. The paired decoder rows are then compared with
:func:`svcca` and :func:`rsa`, each against a null of random re-pairings
(:func:`svcca_test`, :func:`rsa_test`, built on :func:`embgeo_utils.stats.permutation_test`).

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

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .device import chunk_rows, get_device
from .errors import EmbgeoInputError
from .stats import PermutationResult, permutation_test

__all__ = [
    "activation_correlation",
    "match_features",
    "FeaturePairs",
    "non_concept_tokens",
    "top_tokens",
    "filter_pairs",
    "svcca",
    "rsa",
    "svcca_test",
    "rsa_test",
    "pair_layers",
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


def non_concept_tokens(tokenizer: Any) -> np.ndarray:
    """Boolean mask over the vocabulary of non-concept tokens (chapter 5, Lan et al.'s filter).

    A token is non-concept when it is a special token (BOS, EOS, pad, ...), or
    its text is empty or made only of whitespace, newlines, punctuation or symbols.
    """
    size = len(tokenizer)
    mask = np.zeros(size, dtype=bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(size):
        if i in special:
            mask[i] = True
            continue
        text = tokenizer.decode([i])
        stripped = "".join(ch for ch in text if not ch.isspace())
        mask[i] = not stripped or all(unicodedata.category(ch)[0] in "PSZC" for ch in stripped)
    return mask


def top_tokens(z: Any, token_ids: np.ndarray, latents: np.ndarray, top: int = 5) -> np.ndarray:
    """Token ids at the ``top`` most activating positions of each latent, ``(len(latents), top)`` (chapter 5)."""
    t = torch.as_tensor(z)
    ids = np.asarray(token_ids).ravel()
    if ids.size != t.shape[0]:
        raise EmbgeoInputError(f"token_ids has {ids.size} entries for {t.shape[0]} rows of latents.")
    cols = t[:, torch.as_tensor(np.asarray(latents), dtype=torch.long)]
    rows = torch.topk(cols, min(top, t.shape[0]), dim=0).indices.T.cpu().numpy()
    return ids[rows]


def filter_pairs(
    pairs: FeaturePairs,
    za: Any,
    zb: Any,
    token_ids: np.ndarray,
    non_concept: np.ndarray,
    *,
    min_corr: float = 0.1,
    top: int = 5,
    drop_dead: bool = True,
    drop_non_concept: bool = True,
    require_shared_tokens: bool = True,
) -> tuple[FeaturePairs, list[dict[str, Any]]]:
    """Lan et al.'s filters on matched pairs, with the count left after each (chapter 5).

    In order: pairs with a dead latent (never active on these tokens); pairs whose
    ``top`` most activating tokens (either side) include a non-concept token; pairs
    whose top-token sets do not intersect; pairs with correlation ``<= min_corr``.
    Each filter can be switched off.

    Returns:
        The pairs kept, and one row per step: ``{"filter", "pairs left"}``.
    """
    ids = np.asarray(token_ids).ravel()
    za_t, zb_t = torch.as_tensor(za), torch.as_tensor(zb)
    counts = [{"filter": "matched", "pairs left": len(pairs)}]
    keep = np.ones(len(pairs), dtype=bool)
    if drop_dead:
        alive_a = (za_t > 0).any(dim=0).cpu().numpy()
        alive_b = (zb_t > 0).any(dim=0).cpu().numpy()
        keep &= alive_a[pairs.a] & alive_b[pairs.b]
        counts.append({"filter": "dead latents dropped", "pairs left": int(keep.sum())})
    tops_a = top_tokens(za_t, ids, pairs.a, top)
    tops_b = top_tokens(zb_t, ids, pairs.b, top)
    if drop_non_concept:
        mask = np.asarray(non_concept, dtype=bool)
        keep &= ~(mask[tops_a].any(axis=1) | mask[tops_b].any(axis=1))
        counts.append({"filter": f"non-concept top-{top} tokens dropped", "pairs left": int(keep.sum())})
    if require_shared_tokens:
        shared = (tops_a[:, :, None] == tops_b[:, None, :]).any(axis=(1, 2))
        keep &= shared
        counts.append({"filter": f"top-{top} token sets intersect", "pairs left": int(keep.sum())})
    if min_corr is not None:
        keep &= pairs.corr > min_corr
        counts.append({"filter": f"correlation > {min_corr}", "pairs left": int(keep.sum())})
    return pairs.subset(keep), counts


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


def _top_left_vectors(x: torch.Tensor, n_components: int) -> torch.Tensor:
    xc = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    keep = min(n_components, int((s > s[0] * 1e-10).sum()) if s.numel() else 0)
    if keep < 1:
        raise EmbgeoInputError("A side has no variance after centring; SVCCA is undefined.")
    return u[:, :keep]


def _svcca_bases(X: Any, Y: Any, n_components: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(n_components, bool) or int(n_components) != n_components or n_components < 1:
        raise EmbgeoInputError(f"n_components must be a positive integer, got {n_components!r}.")
    x, y = _paired_rows(X, Y, dev)
    if n_components >= x.shape[0]:
        raise EmbgeoInputError(f"n_components = {n_components} must be below the number of pairs ({x.shape[0]}).")
    return _top_left_vectors(x, n_components), _top_left_vectors(y, n_components)


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
    dev = get_device(device)
    ux, uy = _svcca_bases(X, Y, n_components, dev)

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        # Re-pairing rows permutes the rows of Uy (the SVD of a row-permuted matrix).
        m = torch.einsum("nk,bnl->bkl", ux, uy[perms])
        return torch.linalg.svdvals(m).clamp(0, 1).mean(dim=1)

    return permutation_test(statistic, ux.shape[0], n_permutations, seed, dev, chunk_size=64)


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
    unchanged as a set, so each null value is one gather and one dot product.
    """
    dev = get_device(device)
    a, rb, tri, mb, nb = _rsa_parts(X, Y, max_rows, seed, dev)

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        out = torch.empty(perms.shape[0], dtype=torch.float64, device=dev)
        for i, p in enumerate(perms):
            out[i] = (a * (rb[p[tri[0]], p[tri[1]]] - mb)).sum() / nb
        return out

    return permutation_test(statistic, rb.shape[0], n_permutations, seed, dev, chunk_size=32)


def pair_layers(n_layers_a: int, n_layers_b: int, depths: Sequence[float]) -> list[tuple[int, int]]:
    """Layers of A and B at the same relative depths (chapter 5): ``round(depth * L)``, at least 1."""
    out = []
    for d in depths:
        if not 0 < d <= 1:
            raise EmbgeoInputError(f"relative depths must lie in (0, 1], got {d}.")
        out.append((max(1, round(d * n_layers_a)), max(1, round(d * n_layers_b))))
    return out
