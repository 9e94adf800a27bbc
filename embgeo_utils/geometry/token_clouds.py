"""Layer-by-layer geometry of a prompt's token cloud (chapter 4).

For every prompt, the hidden states of its ``T`` tokens at one layer form a point
cloud. ``layer_observables`` measures, for every prompt and layer at once:

* GRIDE intrinsic dimension at ranks ``n2 = 2, 4, 8, ...`` (headline: ``n2 = 2``)
  and TwoNN, after removing duplicate points (see :mod:`embgeo_utils.geometry.intrinsic_dim`);
* the neighbourhood overlap ``chi_k`` between consecutive layers ``l`` and
  ``l + 1``: the mean over tokens of the fraction of shared ``k`` nearest
  Euclidean neighbours (the token itself excluded by index, duplicates kept);
* the mean and standard deviation of the off-diagonal token x token cosine
  similarities (Viswanathan et al. average the full matrix, diagonal included;
  we leave the diagonal of ones out).

One Gram matrix per cloud serves the distances, the neighbour lists and the
cosines. With ``dtype=torch.float32`` (what the chapter uses) the clouds of all
prompts and layers are processed in batches: the float32 Gram matrices only
*rank* the candidates, and every distance that decides an estimate (the ranks
GRIDE and TwoNN read, the nearest sets of the overlap) is recomputed exactly in
float64 (:func:`~embgeo_utils.geometry.neighbors.exact_order_statistics`), so the results
equal those of the float64 route.

Chapter 4 runs these kernels over every model and shuffle level
(:mod:`embgeo_utils.chapters.ch04_layerwise_geometry`).

References:
    K. Viswanathan, Y. Gardinazzi, G. Panerai, A. Cazzaniga, M. Biagetti (2025),
    The Geometry of Tokens in Internal Representations of Large Language Models,
    arXiv:2501.10573.

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), The generalized ratios intrinsic
    dimension estimator, Sci. Rep. 12, 20005.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..core.device import chunk_budget, chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import tqdm
from .intrinsic_dim import (
    check_scales,
    check_twonn_args,
    default_scales,
    gride_from_distances,
    twonn_from_distances,
)
from .neighbors import (
    DISTANCE_FLOOR,
    exact_order_statistics,
    float32_error_factor,
    key_bits,
    knn_from_sq_distances,
    single_thread,
    sort_keys,
)

__all__ = [
    "LayerObservables",
    "layer_observables",
]


@dataclass
class LayerObservables:
    """Per-prompt, per-layer observables of chapter 4 (numpy arrays).

    Attributes:
        scales: GRIDE ranks ``n2`` (``n1 = n2 / 2``), shape ``(n_scales,)``.
        gride: GRIDE IDs, ``(prompts, layers, n_scales)``.
        gride_err: their Fisher-information standard errors, same shape.
        twonn: TwoNN IDs, ``(prompts, layers)``.
        overlap: ``{k: (prompts, layers - 1)}`` overlap of layer ``l`` with ``l + 1``.
        cos_mean: mean off-diagonal cosine similarity, ``(prompts, layers)``.
        cos_std: its standard deviation, ``(prompts, layers)``.
    """

    scales: np.ndarray
    gride: np.ndarray
    gride_err: np.ndarray
    twonn: np.ndarray
    overlap: dict[int, np.ndarray] = field(default_factory=dict)
    cos_mean: np.ndarray = field(default_factory=lambda: np.empty(0))
    cos_std: np.ndarray = field(default_factory=lambda: np.empty(0))


def _check_hidden(hidden: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    if hidden.ndim != 4:
        raise EmbgeoInputError(
            f"hidden must be 4-D (prompts x layers x tokens x features), got shape {tuple(hidden.shape)}; "
            "add a leading axis for a single prompt."
        )
    return tuple(int(s) for s in hidden.shape)  # type: ignore[return-value]


def _check_overlap_k(overlap_k: Sequence[int], n_tokens: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in overlap_k)
    if any(k < 1 or k > n_tokens - 1 for k in ks):
        raise EmbgeoInputError(f"overlap_k values must lie in [1, {n_tokens - 1}] for {n_tokens} tokens, got {ks}.")
    return ks


@torch.no_grad()
def _one_prompt(
    x: torch.Tensor,
    scales: np.ndarray,
    ks: tuple[int, ...],
    discard_fraction: float,
    twonn_algorithm: Literal["base", "ml"],
    dtype: torch.dtype,
    chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """All observables of one prompt ``x`` of shape ``(layers, tokens, d)``."""
    n_layers, n_tokens, _ = x.shape
    gride_ids, gride_err, two, cmean, cstd, knn_idx = [], [], [], [], [], []
    off = n_tokens * (n_tokens - 1)
    for start in range(0, n_layers, chunk_size):
        raw = x[start : start + chunk_size]
        if not bool(torch.isfinite(raw).all()):
            raise EmbgeoInputError("hidden holds NaN or infinite values; fix the activations first.")
        xs = raw.to(dtype)
        mean = xs.mean(dim=1, keepdim=True)
        xc = xs - mean
        sq = (xc * xc).sum(dim=2)
        gram = torch.bmm(xc, xc.transpose(1, 2))

        # Cosines from the uncentred Gram matrix G = Gc + a_i + a_j + |mean|^2, a_i = xc_i . mean.
        a = (xc * mean).sum(dim=2)
        norms_sq = (xs * xs).sum(dim=2)
        if bool((norms_sq <= 0).any()):
            raise EmbgeoInputError("hidden holds zero vectors, whose cosine is undefined; drop those tokens.")
        w = norms_sq.rsqrt()
        cos = gram.clone().add_(a[:, :, None]).add_(a[:, None, :]).add_((mean * mean).sum(dim=2)[:, :, None])
        cos.mul_(w[:, :, None]).mul_(w[:, None, :])
        diag = cos.diagonal(dim1=1, dim2=2)
        s1 = cos.sum(dim=(1, 2), dtype=torch.float64) - diag.sum(dim=1, dtype=torch.float64)
        s2 = cos.square_().sum(dim=(1, 2), dtype=torch.float64) - diag.sum(dim=1, dtype=torch.float64)
        m = s1 / off
        cmean.append(m)
        cstd.append((s2 / off - m * m).clamp_(min=0.0).sqrt_())
        del cos

        d2 = gram.mul_(-2.0).add_(sq[:, :, None]).add_(sq[:, None, :])
        d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        knn_idx.append(torch.topk(d2, max(ks), dim=2, largest=False, sorted=True).indices)
        dist, valid = knn_from_sq_distances(raw, d2, sq, int(scales.max()), "GRIDE")
        ids, err = gride_from_distances(dist, valid, scales // 2, scales)
        gride_ids.append(ids)
        gride_err.append(err)
        two.append(twonn_from_distances(dist, valid, discard_fraction, twonn_algorithm))

    idx = torch.cat(knn_idx)
    overlaps = []
    for k in ks:
        a_idx, b_idx = idx[:-1, :, :k], idx[1:, :, :k]
        shared = (a_idx[:, :, :, None] == b_idx[:, :, None, :]).any(dim=3).sum(dim=2)
        overlaps.append(shared.to(torch.float64).mean(dim=1) / k)
    return (
        torch.cat(gride_ids),
        torch.cat(gride_err),
        torch.cat(two),
        torch.stack(overlaps) if overlaps else torch.empty(0),
        torch.cat(cmean),
        torch.cat(cstd),
    )


def _cosine_moments(
    score: torch.Tensor, w: torch.Tensor, unit_sum: torch.Tensor, b: torch.Tensor, sq: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the off-diagonal cosines of each cloud of a batch (chapter 4).

    The mean is exact: ``sum_{i != j} cos_ij = |sum_i u_i|^2 - sum_i |u_i|^2`` for
    the unit vectors ``u_i = w_i x_i`` (``unit_sum``, float64). The spread is summed
    about that mean from the float32 ``score_ij = |c_j|^2 - 2 c_i.c_j`` of the
    centred points ``c = x - mean``: ``cos_ij = w_i w_j (c_i.c_j + b_i + b_j)`` with
    ``b_i = c_i.mean + |mean|^2 / 2`` and ``sq = |c|^2``; ``t`` is a buffer shaped like ``score``.
    """
    n_tokens = score.shape[1]
    off = n_tokens * (n_tokens - 1)
    m = ((unit_sum * unit_sum).sum(dim=1) - n_tokens) / off
    # t_ij = w_j (c_i.c_j + b_i + b_j) - m / w_i, so that w_i t_ij = cos_ij - m.
    col = (w * (b + 0.5 * sq)).to(torch.float32)[:, None, :]
    torch.addcmul(col, score, (-0.5 * w).to(torch.float32)[:, None, :], out=t)
    left = torch.stack([b, -m[:, None] / w], dim=2).to(torch.float32)
    right = torch.stack([w, torch.ones_like(w)], dim=1).to(torch.float32)
    t.baddbmm_(left, right)
    t_diag = t.diagonal(dim1=1, dim2=2).to(torch.float64)
    # Row sums in float32 (about 1e-7 of the spread), the rest in float64.
    s1 = (t.sum(dim=2).to(torch.float64) * w).sum(dim=1) - (t_diag * w).sum(dim=1)
    s2 = (torch.linalg.vector_norm(t, dim=2).to(torch.float64).square() * w * w).sum(dim=1)
    s2 = s2 - (t_diag * t_diag * w * w).sum(dim=1)
    var = (s2 / off - (s1 / off) ** 2).clamp_(min=0.0)
    return m, var.sqrt_()


@torch.no_grad()
def _clouds_float32(
    raw: torch.Tensor, ranks: list[int], top: int, work: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank distances, duplicate mask, exact nearest sets and cosine moments of a batch of clouds.

    ``raw``: ``(b, T, d)`` float32 clouds. Neighbours are ranked with one float32
    ``baddbmm`` per batch on the centred points; the squared distances at ``ranks``
    (duplicates masked, as for GRIDE) and the ``top`` nearest indices (duplicates
    kept, as for the overlap) are exact
    (:func:`~embgeo_utils.geometry.neighbors.exact_order_statistics`). ``work`` holds buffers
    reused from batch to batch (fresh large allocations cost page faults on the CPU).
    """
    b, n_tokens, dim = raw.shape
    dev = raw.device
    raw64 = work["raw64"][:b]
    raw64.copy_(raw)
    norms_sq = torch.linalg.vector_norm(raw64, dim=2).square_()
    if not bool(torch.isfinite(norms_sq).all()):
        raise EmbgeoInputError("hidden holds NaN or infinite values; fix the activations first.")
    if bool((norms_sq <= 0).any()):
        raise EmbgeoInputError("hidden holds zero vectors, whose cosine is undefined; drop those tokens.")
    w = norms_sq.rsqrt()
    # One pass over the float64 points gives the mean and the sum of the unit vectors.
    both = torch.bmm(torch.stack([torch.full_like(w, 1.0 / n_tokens), w], dim=1), raw64)
    mean, unit_sum = both[:, 0], both[:, 1]
    mean32 = mean.to(torch.float32)
    mean = mean32.to(torch.float64)  # the centre actually subtracted
    xc = torch.sub(raw, mean32[:, None, :], out=work["xc"][:b])
    xm = torch.bmm(raw64, mean[:, :, None])[:, :, 0]
    mm = (mean * mean).sum(dim=1, keepdim=True)
    sq64 = (norms_sq - 2.0 * xm + mm).clamp_(min=0.0)  # |x - mean|^2
    sq = sq64.to(torch.float32)
    top_sq = float(sq64.max())
    if not 1e-30 < top_sq < 1e30:
        raise EmbgeoInputError(
            f"hidden states with squared norms near {top_sq:.1e} are out of the float32 range this route ranks "
            "in; use dtype=torch.float64 (or rescale the hidden states)."
        )

    gamma = float32_error_factor(dim)
    shift = 2.1 * gamma * sq64 + 1e-30
    bits = key_bits(n_tokens)
    points = raw64.view(b * n_tokens, dim)
    norms = norms_sq.view(-1)

    score = torch.baddbmm(sq[:, None, :], xc, xc.transpose(1, 2), alpha=-2.0, out=work["score"][:b])
    cmean, cstd = _cosine_moments(score, w, unit_sum, xm - 0.5 * mm, sq64, work["t"][:b])
    score.add_((sq64 + shift).to(torch.float32)[:, :, None]).clamp_(min=0.0)
    score.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    keys = sort_keys(score.view(b * n_tokens, n_tokens), bits)
    d2, nearest, _ = exact_order_statistics(
        points, norms, keys, bits, sq64.reshape(-1), shift.reshape(-1), gamma, ranks, top
    )

    # Duplicates: the nearest candidate within the error bound of zero, confirmed by exact comparison.
    tol = (shift + 8.4 * gamma * sq64).reshape(-1)
    near_zero = keys[:, 0].view(torch.float32).to(torch.float64) <= tol
    valid = torch.ones(b * n_tokens, dtype=torch.bool, device=dev)
    if bool(near_zero.any()):
        rows = near_zero.nonzero()[:, 0]
        limit = (tol[rows] * (1 + 1e-6)).to(torch.float32).view(torch.int32) | ((1 << bits) - 1)
        count = torch.searchsorted(keys[rows], (limit + 1)[:, None]).reshape(-1)
        member = rows.repeat_interleave(count)
        start = torch.cumsum(count, 0) - count
        pos = torch.arange(int(count.sum()), device=dev) - start.repeat_interleave(count)
        col = (keys[member, pos] & ((1 << bits) - 1)).to(torch.long)
        other = col + (member // n_tokens) * n_tokens
        flat = raw.view(b * n_tokens, dim)
        same = (flat[member] == flat[other]).all(dim=1)
        group = torch.arange(b * n_tokens, device=dev)
        group.scatter_reduce_(0, member[same], other[same], reduce="amin")
        valid = group == torch.arange(b * n_tokens, device=dev)
        if not bool(valid.all()):
            group = group.view(b, n_tokens) - torch.arange(b, device=dev)[:, None] * n_tokens
            ok = valid.view(b, n_tokens)
            n_distinct = int(ok.sum(dim=1).min())
            if n_distinct < max(ranks) + 1:
                raise EmbgeoInputError(
                    f"GRIDE at neighbour rank {max(ranks)} needs at least {max(ranks) + 1} distinct points, "
                    f"but only {n_distinct} remain after removing duplicates: use a longer prompt or smaller scales."
                )
            clouds = (~ok).any(dim=1).nonzero()[:, 0]
            g = group[clouds]
            mask = (g[:, :, None] == g[:, None, :]) | ~ok[clouds][:, None, :]
            sub = torch.baddbmm(sq[clouds][:, None, :], xc[clouds], xc[clouds].transpose(1, 2), alpha=-2.0)
            sub.add_((sq64[clouds] + shift[clouds]).to(torch.float32)[:, :, None]).clamp_(min=0.0)
            sub.masked_fill_(mask, float("inf"))
            sub_keys = sort_keys(sub.view(-1, n_tokens), bits)
            sub_rows = (clouds[:, None] * n_tokens + torch.arange(n_tokens, device=dev)[None, :]).reshape(-1)
            sub_d2, _, _ = exact_order_statistics(
                points,
                norms,
                sub_keys,
                bits,
                sq64.reshape(-1)[sub_rows],
                shift.reshape(-1)[sub_rows],
                gamma,
                ranks,
                0,
                query=sub_rows,
                base=(sub_rows // n_tokens) * n_tokens,
            )
            d2[sub_rows] = sub_d2
    return (
        d2.view(b, n_tokens, len(ranks)),
        valid.view(b, n_tokens),
        nearest.view(b, n_tokens, top),
        cmean,
        cstd,
    )


def _observables_float32(
    hidden: np.ndarray | torch.Tensor,
    dev: torch.device,
    scales: np.ndarray,
    ks: tuple[int, ...],
    discard_fraction: float,
    twonn_algorithm: Literal["base", "ml"],
    chunk_size: int,
    show: bool,
    tqdm: Any,
) -> LayerObservables:
    """:func:`layer_observables` with float32 ranking and exact decisive distances, batched over prompts and layers."""
    n_prompts, n_layers, n_tokens, dim = _check_hidden(hidden)
    tensor = torch.as_tensor(hidden) if isinstance(hidden, np.ndarray) else hidden
    flat = tensor.reshape(n_prompts * n_layers, n_tokens, dim)
    n1s, n2s = scales // 2, scales
    ranks = sorted({1, 2} | {int(r) for r in n1s} | {int(r) for r in n2s})
    if ranks[-1] > n_tokens - 1:
        raise EmbgeoInputError(
            f"GRIDE at neighbour rank {ranks[-1]} needs at least {ranks[-1] + 1} distinct points, "
            f"but the prompts have {n_tokens} tokens: use a longer prompt or smaller scales."
        )
    top = max(ks) if ks else 0
    n_clouds = flat.shape[0]
    gride_ids = torch.empty((n_clouds, len(scales)), dtype=torch.float64)
    gride_err = torch.empty_like(gride_ids)
    two = torch.empty(n_clouds, dtype=torch.float64)
    cmean = torch.empty(n_clouds, dtype=torch.float64)
    cstd = torch.empty(n_clouds, dtype=torch.float64)
    nearest = torch.empty((n_clouds, n_tokens, top), dtype=torch.long)
    size = min(chunk_size, n_clouds)
    work = {
        "raw64": torch.empty((size, n_tokens, dim), dtype=torch.float64, device=dev),
        "xc": torch.empty((size, n_tokens, dim), dtype=torch.float32, device=dev),
        "score": torch.empty((size, n_tokens, n_tokens), dtype=torch.float32, device=dev),
        "t": torch.empty((size, n_tokens, n_tokens), dtype=torch.float32, device=dev),
    }
    starts = range(0, n_clouds, chunk_size)
    for start in tqdm(starts, disable=not show, desc="layer clouds", total=len(starts)):
        stop = min(n_clouds, start + chunk_size)
        raw = flat[start:stop].to(device=dev, dtype=torch.float32)
        d2, valid, near, m, sd = _clouds_float32(raw, ranks, top, work)
        with single_thread():  # GRIDE's Newton steps: many small ops
            dist = d2.sqrt_().clamp_(min=DISTANCE_FLOOR)
            ids, err = gride_from_distances(dist, valid, n1s, n2s, ranks=ranks)
            gride_ids[start:stop], gride_err[start:stop] = ids.cpu(), err.cpu()
            two[start:stop] = twonn_from_distances(dist[:, :, :2], valid, discard_fraction, twonn_algorithm).cpu()
        cmean[start:stop], cstd[start:stop] = m.cpu(), sd.cpu()
        nearest[start:stop] = near.cpu()
    overlap: dict[int, np.ndarray] = {}
    near4 = nearest.view(n_prompts, n_layers, n_tokens, top)
    for k in ks:
        a_idx, b_idx = near4[:, :-1, :, :k], near4[:, 1:, :, :k]
        shared = (a_idx[..., :, None] == b_idx[..., None, :]).any(dim=-1).sum(dim=-1)
        overlap[k] = (shared.to(torch.float64).mean(dim=-1) / k).numpy()
    shape = (n_prompts, n_layers)
    return LayerObservables(
        scales=scales,
        gride=gride_ids.view(*shape, len(scales)).numpy(),
        gride_err=gride_err.view(*shape, len(scales)).numpy(),
        twonn=two.view(shape).numpy(),
        overlap=overlap,
        cos_mean=cmean.view(shape).numpy(),
        cos_std=cstd.view(shape).numpy(),
    )


def layer_observables(
    hidden: np.ndarray | torch.Tensor,
    scales: Sequence[int] | np.ndarray | None = None,
    overlap_k: Sequence[int] = (1, 2, 4),
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    discard_fraction: float = 0.1,
    twonn_algorithm: str = "base",
    dtype: torch.dtype = torch.float64,
    progress: bool | None = None,
) -> LayerObservables:
    """GRIDE, TwoNN, neighbourhood overlap and cosine statistics per prompt and layer.

    Chapter 4. The values are those of
    :func:`~embgeo_utils.geometry.intrinsic_dim.gride_scaling`,
    :func:`~embgeo_utils.geometry.intrinsic_dim.twonn` and
    :func:`~embgeo_utils.geometry.neighbors.neighborhood_overlap` applied to every cloud
    in turn (tested), computed from one Gram matrix per cloud. Tied neighbours
    (duplicated tokens) enter the overlap in index order.

    Args:
        hidden: ``(prompts, layers, tokens, d)`` hidden states (numpy or torch,
            float32 is fine). Leave out positions that should not be in the
            cloud (e.g. a BOS token) before calling.
        scales: even GRIDE ranks ``n2``; default ``2, 4, ..., 256`` (capped at
            ``tokens - 1``), the range of Viswanathan et al.
        overlap_k: neighbourhood sizes for ``chi_k``.
        device: where to compute (``"auto"``: GPU if present).
        chunk_size: clouds (layers) per batch; default keeps the batch's ``(T, T)``
            buffers within the device's chunk budget (an eighth of it with float32,
            so that a batch stays near the CPU cache; :func:`~embgeo_utils.core.device.chunk_rows`).
        discard_fraction: TwoNN fraction of largest ratios left out (DADApy default 0.1).
        twonn_algorithm: ``"base"`` (DADApy's linear fit) or ``"ml"``.
        dtype: precision of the Gram matrices. float64 (default): each prompt's
            layers are one batch and everything comes from the float64 Gram
            matrices. float32: batches of clouds across prompts and layers,
            float32 Gram matrices rank the candidates and the decisive distances
            are recomputed exactly in float64, so the results equal the float64
            route to about 1e-12, two to three times faster on the CPU.
        progress: show a ``tqdm`` bar (default: when there are 10 prompts or more).

    Returns:
        A :class:`LayerObservables` of numpy arrays.

    Raises:
        EmbgeoInputError: on a bad shape, NaN/inf, zero vectors, bad scales or
            ``overlap_k``, or a cloud with too few distinct tokens for the largest scale.

    References:
        K. Viswanathan et al. (2025), arXiv:2501.10573.
    """
    n_prompts, n_layers, n_tokens, _ = _check_hidden(hidden)
    dev = get_device(device)
    scales_arr = default_scales(n_tokens, 256) if scales is None else check_scales(scales)
    ks = _check_overlap_k(overlap_k, n_tokens)
    twonn_algorithm = check_twonn_args(discard_fraction, twonn_algorithm)
    if dtype not in (torch.float32, torch.float64):
        raise EmbgeoInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if dtype == torch.float32:
        # A batch of clouds: the float32 score matrices, their keys and the cosine buffer.
        chunk_size = chunk_rows(8 * n_tokens * n_tokens, dev, chunk_size, budget_bytes=chunk_budget(dev) // 8)
    else:
        chunk_size = chunk_rows(torch.finfo(dtype).bits // 8 * n_tokens * n_tokens, dev, chunk_size)
    show = n_prompts >= 10 if progress is None else progress

    if dtype == torch.float32:
        return _observables_float32(
            hidden, dev, scales_arr, ks, discard_fraction, twonn_algorithm, chunk_size, show, tqdm
        )
    results: list[tuple[torch.Tensor, ...]] = []
    for p in tqdm(range(n_prompts), disable=not show, desc="prompts"):
        x = torch.as_tensor(hidden[p]).to(dev)
        if not x.is_floating_point():
            x = x.to(torch.float32)
        results.append(_one_prompt(x, scales_arr, ks, discard_fraction, twonn_algorithm, dtype, chunk_size))

    def stack(i: int) -> np.ndarray:
        return torch.stack([r[i] for r in results]).cpu().numpy()

    overlap_all = stack(3) if ks else np.empty((n_prompts, 0, n_layers - 1))
    return LayerObservables(
        scales=scales_arr,
        gride=stack(0),
        gride_err=stack(1),
        twonn=stack(2),
        overlap={k: overlap_all[:, j] for j, k in enumerate(ks)},
        cos_mean=stack(4),
        cos_std=stack(5),
    )
