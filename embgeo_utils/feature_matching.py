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

from .cache import array_digest, content_key
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
    "svcca_curve_test",
    "rsa_test",
    "pair_layers",
    "AlignedTokens",
    "align_positions",
    "aligned_activations",
    "LayerSAE",
    "train_layer_saes",
    "compare_layer",
    "best_depth_subsamples",
    "check_claim10",
    "PairResult",
    "run_pair",
    "seed_ceiling",
    "feature_examples",
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
    they are computed once and truncated for every value; each null uses the
    same seeded permutations.
    """
    dev = get_device(device)
    x, y = _paired_rows(X, Y, dev)
    values = [_check_components(n, x.shape[0]) for n in n_components]
    (ux_all, rx), (uy_all, ry) = _left_vectors(x), _left_vectors(y)
    out = []
    for n in values:
        ux, uy = ux_all[:, : min(n, rx)], uy_all[:, : min(n, ry)]

        def statistic(perms: torch.Tensor, ux: torch.Tensor = ux, uy: torch.Tensor = uy) -> torch.Tensor:
            # Re-pairing rows permutes the rows of Uy (the SVD of a row-permuted matrix).
            m = torch.einsum("nk,bnl->bkl", ux, uy[perms])
            return torch.linalg.svdvals(m).clamp(0, 1).mean(dim=1)

        out.append(permutation_test(statistic, ux.shape[0], n_permutations, seed, dev, chunk_size=64))
    return out


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

    n = rb.shape[0]
    # Ranks are integers or halves below 2**24, exact in float32; the triangle is gathered
    # from the flattened matrix for a batch of permutations at once.
    flat = (rb - mb).to(torch.float32).reshape(-1)
    a32 = a.to(torch.float32)
    step = chunk_rows(12 * tri.shape[1], dev, max_rows=64)

    def statistic(perms: torch.Tensor) -> torch.Tensor:
        out = torch.empty(perms.shape[0], dtype=torch.float64, device=dev)
        for start in range(0, perms.shape[0], step):
            p = perms[start : start + step]
            gathered = flat[p[:, tri[0]] * n + p[:, tri[1]]]
            out[start : start + step] = (gathered @ a32).double() / nb
        return out

    return permutation_test(statistic, n, n_permutations, seed, dev, chunk_size=step)


def pair_layers(n_layers_a: int, n_layers_b: int, depths: Sequence[float]) -> list[tuple[int, int]]:
    """Layers of A and B at the same relative depths (chapter 5): ``round(depth * L)``, at least 1."""
    out = []
    for d in depths:
        if not 0 < d <= 1:
            raise EmbgeoInputError(f"relative depths must lie in (0, 1], got {d}.")
        out.append((max(1, round(d * n_layers_a)), max(1, round(d * n_layers_b))))
    return out


# --- Chapter 5: from passages to layer-by-layer comparisons and the claim-10 check ---------------------------


@dataclass
class AlignedTokens:
    """Token positions that two tokenizers cut identically, with both models' activations (chapter 5).

    Attributes:
        acts_a, acts_b: ``{layer: (tokens, d)}`` float32 activations (block outputs) of the aligned positions.
        ids_a, ids_b: the token ids of each position in each tokenizer.
        passage: index of the passage each position comes from; position: its index in A's tokens.
        texts: the passages' texts; spans: ``(start, end)`` characters of each position.
        n_positions_a, n_positions_b: positions each model saw (before alignment).
    """

    acts_a: dict[int, np.ndarray]
    acts_b: dict[int, np.ndarray]
    ids_a: np.ndarray
    ids_b: np.ndarray
    passage: np.ndarray
    position: np.ndarray
    texts: list[str]
    spans: np.ndarray
    n_positions_a: int
    n_positions_b: int

    def __len__(self) -> int:
        return int(self.ids_a.size)

    def split(self, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Row masks (train, held-out): the last passages are held out whole."""
        n_pass = int(self.passage.max()) + 1
        cut = n_pass - max(1, int(round(heldout_fraction * n_pass)))
        train = self.passage < cut
        return train, ~train


def _offsets(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"][:max_tokens]), [tuple(o) for o in enc["offset_mapping"][:max_tokens]]


def align_positions(spans_a: Sequence[tuple[int, int]], spans_b: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pairs ``(i, j)`` of positions whose character spans coincide exactly (chapter 5).

    Empty spans are never paired. For one tokenizer every position pairs with itself.
    """
    index_b = {tuple(s): j for j, s in enumerate(spans_b) if s[1] > s[0]}
    pairs = [(i, index_b[tuple(s)]) for i, s in enumerate(spans_a) if s[1] > s[0] and tuple(s) in index_b]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def aligned_activations(
    a: Any,
    b: Any,
    texts: Sequence[str],
    layers_a: Sequence[int],
    layers_b: Sequence[int],
    max_tokens: int = 256,
    skip_first: int = 1,
    progress: bool = True,
) -> AlignedTokens:
    """Block-output activations of two models on the same texts, at the positions both tokenizers share (chapter 5).

    Each text is tokenized by each model (no special tokens; BOS added and left
    out by :func:`~embgeo_utils.activations.hidden_states` where a model needs
    it); positions whose character spans coincide are kept, except the first
    ``skip_first`` positions of each text (outsized activations in these models).
    Hidden states are cached per text and model.
    """
    from .activations import hidden_states

    for loaded, layers in ((a, layers_a), (b, layers_b)):
        bad = [lay for lay in layers if not 1 <= lay < loaded.info.n_layers]
        if bad:
            raise EmbgeoInputError(
                f"layers {bad} out of range for {loaded.info.name}: use blocks 1..{loaded.info.n_layers - 1} "
                "(the last hidden state is taken after the final norm)."
            )
    rows_a: dict[int, list[np.ndarray]] = {lay: [] for lay in layers_a}
    rows_b: dict[int, list[np.ndarray]] = {lay: [] for lay in layers_b}
    ids_a, ids_b, passage, position, spans = [], [], [], [], []
    seen_a = seen_b = 0
    kept_texts: list[str] = []
    for text in tqdm_texts(texts, progress):
        ia, sa = _offsets(a.tokenizer, text, max_tokens)
        end = sa[-1][1] if sa else 0
        ib, sb = _offsets(b.tokenizer, text[:end], 10 * max_tokens)
        if len(ia) <= skip_first + 1 or len(ib) <= skip_first + 1:
            continue
        pairs = align_positions(sa, sb)
        pairs = pairs[(pairs[:, 0] >= skip_first) & (pairs[:, 1] >= skip_first)]
        if not len(pairs):
            continue
        ha = hidden_states(a, [ia], len(ia), with_loss=False, layers=list(layers_a), progress=False).hidden[0]
        hb = hidden_states(b, [ib], len(ib), with_loss=False, layers=list(layers_b), progress=False).hidden[0]
        for j, lay in enumerate(layers_a):
            rows_a[lay].append(ha[j, pairs[:, 0]])
        for j, lay in enumerate(layers_b):
            rows_b[lay].append(hb[j, pairs[:, 1]])
        ids_a.append(np.asarray(ia)[pairs[:, 0]])
        ids_b.append(np.asarray(ib)[pairs[:, 1]])
        passage.append(np.full(len(pairs), len(kept_texts)))
        position.append(pairs[:, 0])
        spans.append(np.asarray(sa)[pairs[:, 0]])
        kept_texts.append(text)
        seen_a += len(ia) - skip_first
        seen_b += len(ib) - skip_first
    if not kept_texts:
        raise EmbgeoInputError("No text gave aligned positions; use longer texts or check the tokenizers.")
    return AlignedTokens(
        {lay: np.concatenate(v) for lay, v in rows_a.items()},
        {lay: np.concatenate(v) for lay, v in rows_b.items()},
        np.concatenate(ids_a),
        np.concatenate(ids_b),
        np.concatenate(passage),
        np.concatenate(position),
        kept_texts,
        np.concatenate(spans),
        seen_a,
        seen_b,
    )


def tqdm_texts(texts: Sequence[str], progress: bool) -> Any:
    """The texts, wrapped in a compact progress bar when ``progress`` (chapter 5)."""
    from .progress import tqdm

    return tqdm(list(texts), desc="texts", unit="text", disable=not progress, mininterval=5.0)


@dataclass
class LayerSAE:
    """One trained SAE with its held-out quality (chapter 5)."""

    model: str
    layer: int
    sae: Any
    history: Any
    metrics: dict[str, float]


def train_layer_saes(
    acts: dict[int, np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    model_key: str,
    model_name: str,
    *,
    expansion: int = 4,
    k: int = 32,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[int, LayerSAE]:
    """A cached TopK SAE per layer on the training rows, evaluated on the held-out rows (chapter 5).

    The cache key holds ``model_key`` (the model's digest), the layer, a digest of
    the training activations and every hyperparameter.
    """
    from .cache import content_key
    from .sae import cached_sae, sae_metrics

    out = {}
    for layer, x in acts.items():
        x_train = np.ascontiguousarray(x[train])
        key = {"model": model_key, "layer": layer, "tokens": content_key(x_train.tobytes())}
        sae, history = cached_sae(
            x_train, expansion * x.shape[1], k, key, seed=seed, device=device, progress=progress, **train_kwargs
        )
        out[layer] = LayerSAE(model_name, layer, sae, history, sae_metrics(sae, x[heldout]))
    return out


def compare_layer(
    za: Any,
    zb: Any,
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    ids: np.ndarray,
    non_concept: np.ndarray,
    *,
    n_components: Sequence[int] = (5, 10, 20, 50, 100),
    n_permutations: int = 1000,
    rsa_rows: int = 1000,
    min_corr: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> tuple[dict[str, Any], list[dict[str, Any]], FeaturePairs]:
    """Match two SAEs' latents on the same tokens and compare the paired decoder rows (chapter 5).

    Returns:
        A row of statistics (pairs kept, mean matched correlation, RSA and its
        null, SVCCA at the first usable ``n_components`` and its null), the
        SVCCA curve rows (one per ``n_components`` with its null), and the kept pairs.
    """
    corr = activation_correlation(za, zb, device=device)
    pairs = match_features(corr, "max")
    kept, counts = filter_pairs(pairs, za, zb, ids, non_concept, min_corr=min_corr)
    row: dict[str, Any] = {f"after: {c['filter']}": c["pairs left"] for c in counts}
    row.update({"pairs": len(kept), "mean corr (kept)": float(kept.corr.mean()) if len(kept) else float("nan")})
    curve = []
    if len(kept) >= 10:
        x, y = dec_a[kept.a], dec_b[kept.b]
        r = rsa_test(x, y, max_rows=rsa_rows, n_permutations=n_permutations, seed=seed, device=device)
        row.update(
            {
                "RSA": r.statistic,
                "RSA null mean": r.null_mean,
                "RSA null std": r.null_std,
                "RSA null max": r.null_max,
                "RSA p": r.p_value,
            }
        )
        usable = [n for n in n_components if n < len(kept) - 1]
        tests = svcca_curve_test(x, y, usable, n_permutations, seed, device) if usable else []
        for n, s in zip(usable, tests):
            curve.append(
                {
                    "n_components": n,
                    "SVCCA": s.statistic,
                    "null mean": s.null_mean,
                    "null std": s.null_std,
                    "null max": s.null_max,
                    "p": s.p_value,
                }
            )
        if curve:
            head = curve[min(2, len(curve) - 1)]  # n = 20 when the pairs allow it (the google/svcca tutorial's choice)
            row.update(
                {
                    "SVCCA": head["SVCCA"],
                    "SVCCA n": head["n_components"],
                    "SVCCA null mean": head["null mean"],
                    "SVCCA null std": head["null std"],
                    "SVCCA p": head["p"],
                }
            )
    return row, curve, kept


def _cached_compare_layer(key: str | None, compute: Any) -> tuple[dict[str, Any], list[dict[str, Any]], FeaturePairs]:
    """:func:`compare_layer`'s result, read from the cache under ``key`` or computed and stored there."""
    import pandas as pd

    from .cache import cache_dir, frame_row, load_arrays, load_frame, save_arrays, save_frame

    if key is None:
        return compute()
    folder = cache_dir("sae", "compare")
    paths = [folder / f"{key}-{part}.npz" for part in ("row", "curve", "kept")]
    row_f, curve_f, kept_f = load_frame(paths[0]), load_frame(paths[1]), load_arrays(paths[2])
    if row_f is not None and curve_f is not None and kept_f is not None and len(row_f) == 1:
        kept = FeaturePairs(kept_f["a"], kept_f["b"], kept_f["corr"], str(kept_f["method"]))
        row = frame_row(row_f)
        return row, curve_f.to_dict(orient="records"), kept
    row, curve, kept = compute()
    save_arrays(paths[2], {"a": kept.a, "b": kept.b, "corr": kept.corr, "method": np.array(kept.method)})
    save_frame(pd.DataFrame(curve), paths[1])
    save_frame(pd.DataFrame([row]), paths[0])
    return row, curve, kept


def best_depth_subsamples(
    decoder_pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    depth: dict[tuple[int, int], float],
    n_subsamples: int = 50,
    fraction: float = 0.5,
    rsa_rows: int = 500,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Relative depth of the layer pair with the highest RSA, over subsamples of the matched pairs (chapter 5).

    Each replicate draws ``fraction`` of every layer pair's matched features
    without replacement (a subsampling bootstrap: resampling with replacement
    would duplicate rows, whose correlation of 1 inflates RSA) and recomputes RSA
    on at most ``rsa_rows`` of them.
    """
    rng = np.random.default_rng(seed)
    keys = [key for key, (x, _) in decoder_pairs.items() if len(x) >= 20]
    if not keys:
        raise EmbgeoInputError("No layer pair has 20 matched features; lower the filters or use more tokens.")
    best = np.empty(n_subsamples)
    for i in range(n_subsamples):
        values = []
        for key in keys:
            x, y = decoder_pairs[key]
            pick = rng.choice(len(x), max(10, int(fraction * len(x))), replace=False)
            values.append(rsa(x[pick], y[pick], max_rows=rsa_rows, seed=int(rng.integers(1 << 30)), device=device))
        best[i] = depth[keys[int(np.argmax(values))]]
    return best


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def check_claim10(
    grid: Any,
    matched: Sequence[tuple[int, int]],
    depth_a: dict[int, float],
    depth_b: dict[int, float],
    boot_argmax: np.ndarray,
    alpha: float = 0.01,
) -> Any:
    """Claim 10 (chapter 5): paired decoder geometry beats the null, and is highest in the middle layers.

    Checks, declared in advance:

    * (a) for every matched-depth layer pair: RSA above its permutation null
      (effect RSA minus the null mean, one-sided permutation p), and SVCCA above
      its null at the reported ``n`` (effect SVCCA minus the null mean);
    * (b) the layer pair with the highest RSA lies at an interior depth: effect
      = fraction of bootstrap replicates (``boot_argmax``: mean relative depth of
      the best pair per replicate) whose maximum is neither at the shallowest nor
      at the deepest studied depth, minus 0.5; smallest effect 0.45 (95 % of
      replicates). Descriptive (no p-value).

    The p-values are Holm-adjusted together (:func:`embgeo_utils.stats.verdict`).
    """
    from .stats import Check, verdict

    g = grid.set_index(["layer A", "layer B"])
    checks = []
    for la, lb in matched:
        r = g.loc[(la, lb)]
        n = int(r["pairs"])
        if n < 10 or "RSA" not in r or not np.isfinite(r.get("RSA", np.nan)):
            checks.append(Check(f"RSA > null, layers {la}/{lb}", -1.0, 1.0, n=n))
            continue
        checks.append(
            Check(
                f"RSA > null, layers {la}/{lb}",
                float(r["RSA"] - r["RSA null mean"]),
                float(r["RSA p"]),
                n=n,
                se=_finite_or_none(r.get("RSA null std")),
            )
        )
        if np.isfinite(r.get("SVCCA", np.nan)):
            checks.append(
                Check(
                    f"SVCCA(n={int(r['SVCCA n'])}) > null, layers {la}/{lb}",
                    float(r["SVCCA"] - r["SVCCA null mean"]),
                    float(r["SVCCA p"]),
                    n=n,
                    se=_finite_or_none(r.get("SVCCA null std")),
                )
            )
    depths = sorted({round((depth_a[la] + depth_b[lb]) / 2, 6) for la, lb in matched})
    boot = np.asarray(boot_argmax, dtype=float)
    interior = np.mean([(d > depths[0] + 1e-9) and (d < depths[-1] - 1e-9) for d in boot]) if boot.size else 0.0
    checks.append(
        Check(
            "best layer pair at an interior depth (bootstrap share - 0.5)",
            float(interior - 0.5),
            None,
            min_effect=0.45,
            n=int(boot.size),
        )
    )
    return verdict(checks, alpha=alpha)


@dataclass
class PairResult:
    """Everything chapter 5 measures for one pair of models (chapter 5).

    Attributes:
        names: ``(A, B)``; layers_a, layers_b: the blocks studied.
        aligned: the aligned tokens and activations.
        saes: one table row per SAE (model, layer, relative depth, FVU, L0, dead fraction, loss recovered...).
        grid: one row per layer pair (filters, matched correlation, RSA, SVCCA with nulls and p-values).
        curves: SVCCA over ``n_components`` with the null, per layer pair.
        decoders: ``{(layer A, layer B): (rows of A's decoder, rows of B's decoder)}`` of the kept pairs.
        kept: ``{(layer A, layer B): FeaturePairs}``; latents: the encoded tokens per side and layer.
    """

    names: tuple[str, str]
    layers_a: list[int]
    layers_b: list[int]
    aligned: AlignedTokens
    saes: Any
    grid: Any
    curves: Any
    decoders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    kept: dict[tuple[int, int], FeaturePairs]
    trained: dict[str, dict[int, LayerSAE]]

    def depth(self, la: int, lb: int) -> float:
        return float(self.grid.set_index(["layer A", "layer B"]).loc[(la, lb), "depth"])


def _loss_ids(loaded: Any, texts: Sequence[str], n_tokens: int) -> tuple[np.ndarray, int]:
    bos = [loaded.tokenizer.bos_token_id] if loaded.info.needs_bos else []
    rows = [bos + loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(len(r) for r in rows + [list(range(n_tokens + len(bos)))])
    return np.array([r[:width] for r in rows], dtype=np.int64), 1 + len(bos)


def run_pair(
    a: Any,
    b: Any,
    texts: Sequence[str],
    depths: Sequence[float],
    *,
    max_tokens: int = 256,
    heldout_fraction: float = 0.2,
    expansion: int = 4,
    k: int = 32,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float | None = None,
    n_permutations: int = 1000,
    n_components: Sequence[int] = (5, 10, 20, 50, 100),
    rsa_rows: int = 1000,
    min_corr: float = 0.1,
    loss_texts: int = 4,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cache: bool = True,
) -> PairResult:
    """Chapter 5 for one pair of loaded models: align, train SAEs, match every layer pair, compare (chapter 5).

    Layers are taken at the same relative ``depths`` in both models
    (:func:`pair_layers`). SAEs are trained on the aligned tokens of the first
    ``1 - heldout_fraction`` of the texts and evaluated on the rest (FVU, L0, dead
    fraction; loss recovered on ``loss_texts`` held-out texts). Latents of all
    aligned tokens are matched for every layer of A against every layer of B;
    SVCCA is computed at every ``n_components`` for the pairs at matching depth
    and at the headline value (the third) for the others. With ``cache`` each
    layer pair's comparison is kept on disk under a key of both layers'
    activations and SAE weights and of the comparison's parameters, so a rerun
    reads it.
    """
    import pandas as pd

    from .sae import cached_loss_recovered, encode_all

    pairs = pair_layers(a.info.n_layers, b.info.n_layers, depths)
    layers_a = sorted({la for la, _ in pairs})
    layers_b = sorted({lb for _, lb in pairs})
    aligned = aligned_activations(a, b, texts, layers_a, layers_b, max_tokens=max_tokens, progress=progress)
    train, held = aligned.split(heldout_fraction)
    opts: dict[str, Any] = dict(
        expansion=expansion,
        k=k,
        seed=seed,
        device=device,
        progress=progress,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
    )
    trained = {
        "A": train_layer_saes(aligned.acts_a, train, held, a.info.sha256 or a.info.name, a.info.name, **opts),
        "B": train_layer_saes(aligned.acts_b, train, held, b.info.sha256 or b.info.name, b.info.name, **opts),
    }
    held_texts = sorted(set(aligned.passage[held].tolist()))[:loss_texts]
    sae_rows = []
    for side, loaded, acts in (("A", a, aligned.acts_a), ("B", b, aligned.acts_b)):
        ids, skip = _loss_ids(loaded, [aligned.texts[i] for i in held_texts], max_tokens)
        clean = None
        for layer, item in trained[side].items():
            mean = acts[layer][train].mean(axis=0)
            rec = cached_loss_recovered(loaded, ids, layer, item.sae, mean, skip_first=skip, clean=clean)
            clean = rec["clean"]
            sae_rows.append(
                {
                    "model": loaded.info.name,
                    "layer": layer,
                    "depth": layer / loaded.info.n_layers,
                    "latents": item.sae.n_latents,
                    "k": item.sae.k,
                    "train tokens": int(train.sum()),
                    "held-out tokens": int(held.sum()),
                    **{m: item.metrics[m] for m in ("fvu", "l0", "dead_fraction")},
                    "loss clean": rec["clean"],
                    "loss spliced": rec["spliced"],
                    "loss mean-ablated": rec["ablated"],
                    "loss recovered": rec["recovered"],
                    "train seconds": item.history.seconds,
                    "from cache": item.history.from_cache,
                }
            )
    non_concept = non_concept_tokens(a.tokenizer)
    latents_a = {la: encode_all(trained["A"][la].sae, aligned.acts_a[la]) for la in layers_a}
    latents_b = {lb: encode_all(trained["B"][lb].sae, aligned.acts_b[lb]) for lb in layers_b}
    grid_rows, curve_rows, decoders, kept_all = [], [], {}, {}
    dev_type = get_device(device).type
    layer_keys = {
        (side, layer): content_key(
            array_digest(acts[layer]), *(array_digest(t) for t in item.sae.state_dict().values())
        )
        for side, acts in (("A", aligned.acts_a), ("B", aligned.acts_b))
        for layer, item in trained[side].items()
    }
    tokens_key = content_key(array_digest(aligned.ids_a), array_digest(non_concept))
    # The SVCCA curve over n_components is drawn for the pairs at matching depth; the
    # other cells of the grid need only the headline n (the third value, 20 by default).
    headline = [list(n_components)[min(2, len(n_components) - 1)]] if len(n_components) else []
    for la in layers_a:
        for lb in layers_b:
            dec_a = trained["A"][la].sae.W_dec.detach().cpu().numpy()
            dec_b = trained["B"][lb].sae.W_dec.detach().cpu().numpy()
            comps = list(n_components if (la, lb) in pairs else headline)
            key = content_key(
                "compare-layer-v1", layer_keys[("A", la)], layer_keys[("B", lb)], tokens_key, comps, n_permutations,
                rsa_rows, min_corr, seed, dev_type,
            )  # fmt: skip
            row, curve, kept = _cached_compare_layer(
                key if cache else None,
                lambda la=la, lb=lb, dec_a=dec_a, dec_b=dec_b, comps=comps: compare_layer(
                    latents_a[la],
                    latents_b[lb],
                    dec_a,
                    dec_b,
                    aligned.ids_a,
                    non_concept,
                    n_components=comps,
                    n_permutations=n_permutations,
                    rsa_rows=rsa_rows,
                    min_corr=min_corr,
                    seed=seed,
                    device=device,
                ),
            )
            depth = (la / a.info.n_layers + lb / b.info.n_layers) / 2
            grid_rows.append(
                {
                    "layer A": la,
                    "layer B": lb,
                    "depth A": la / a.info.n_layers,
                    "depth B": lb / b.info.n_layers,
                    "depth": depth,
                    "matched depth": (la, lb) in pairs,
                    **row,
                }
            )
            curve_rows += [{"layer A": la, "layer B": lb, **c} for c in curve]
            decoders[(la, lb)] = (dec_a[kept.a], dec_b[kept.b])
            kept_all[(la, lb)] = kept
    return PairResult(
        (a.info.name, b.info.name),
        layers_a,
        layers_b,
        aligned,
        pd.DataFrame(sae_rows),
        pd.DataFrame(grid_rows),
        pd.DataFrame(curve_rows),
        decoders,
        kept_all,
        trained,
    )


def seed_ceiling(
    result: PairResult,
    side: str = "A",
    layer: int | None = None,
    seed: int = 1,
    n_permutations: int = 1000,
    rsa_rows: int = 1000,
    device: str | torch.device = "auto",
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """The same comparison between two SAEs of one model and layer that differ only in their seed (chapter 5).

    It shows how similar "the same model" looks through this pipeline: the
    ceiling that cross-model numbers are read against.
    """
    from .sae import cached_sae, encode_all

    trained = result.trained[side]
    layers = sorted(trained)
    layer = layers[len(layers) // 2] if layer is None else layer
    acts = (result.aligned.acts_a if side == "A" else result.aligned.acts_b)[layer]
    train, _ = result.aligned.split(0.2)
    first = trained[layer].sae
    from .cache import content_key

    x_train = np.ascontiguousarray(acts[train])
    key = {"model": result.names[0 if side == "A" else 1], "layer": layer, "tokens": content_key(x_train.tobytes())}
    second, _ = cached_sae(
        x_train, first.n_latents, first.k, key, seed=seed, device=device, progress=progress, **train_kwargs
    )
    ids = result.aligned.ids_a if side == "A" else result.aligned.ids_b
    row, _, _ = compare_layer(
        encode_all(first, acts),
        encode_all(second, acts),
        first.W_dec.detach().cpu().numpy(),
        second.W_dec.detach().cpu().numpy(),
        ids,
        np.zeros(int(ids.max()) + 1, dtype=bool),
        n_permutations=n_permutations,
        rsa_rows=rsa_rows,
        device=device,
    )
    return {"model": result.names[0 if side == "A" else 1], "layer": layer, **row}


def feature_examples(result: PairResult, la: int, lb: int, n: int = 4, top: int = 3, width: int = 40) -> Any:
    """The best-correlated kept pairs of a layer pair with their top-activating contexts (chapter 5).

    Each context shows ``width`` characters either side of the token, the token in bold.
    """
    import pandas as pd

    kept = result.kept[(la, lb)]
    if not len(kept):
        return pd.DataFrame()
    order = np.argsort(-kept.corr)[:n]
    al = result.aligned
    from .sae import encode_all

    za = encode_all(result.trained["A"][la].sae, al.acts_a[la])
    rows = []
    for i in order:
        col = za[:, int(kept.a[i])]
        best = torch.topk(col, min(top, col.shape[0])).indices.cpu().numpy()
        contexts = []
        for r in best:
            text = al.texts[int(al.passage[r])]
            s, e = (int(v) for v in al.spans[r])
            left = text[max(0, s - width) : s].replace("\n", " ")
            right = text[e : e + width].replace("\n", " ")
            contexts.append(f"…{left}**{text[s:e].strip() or '␣'}**{right}…")
        rows.append(
            {
                "latent A": int(kept.a[i]),
                "latent B": int(kept.b[i]),
                "correlation": float(kept.corr[i]),
                "top contexts (A's latent)": " / ".join(contexts),
            }
        )
    return pd.DataFrame(rows)
