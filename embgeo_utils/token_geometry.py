"""Layer-by-layer geometry of a prompt's token cloud (chapter 4).

For every prompt, the hidden states of its ``T`` tokens at one layer form a point
cloud. ``layer_observables`` measures, for every prompt and layer at once:

* GRIDE intrinsic dimension at ranks ``n2 = 2, 4, 8, ...`` (headline: ``n2 = 2``)
  and TwoNN, after removing duplicate points (see :mod:`embgeo_utils.intrinsic_dim`);
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
float64 (:func:`~embgeo_utils.neighbors.exact_order_statistics`), so the results
equal those of the float64 route.

The chapter itself runs on top of that: ``run_layerwise`` measures every model at
every shuffle level and returns tidy tables (``LayerwiseRun``); ``id_peaks``,
``loss_table``, ``max_mean_cosine``, ``scale_curve_table``, ``id_loss_correlation``,
``strongest_correlation`` and ``paper_comparison`` summarise them; and
``check_claim1`` ... ``check_claim5`` (all five: ``check_claims``) test the
ledger's claims 1-5 with pre-declared checks judged by
:func:`embgeo_utils.stats.verdict`.

References:
    K. Viswanathan, Y. Gardinazzi, G. Panerai, A. Cazzaniga, M. Biagetti (2025),
    The Geometry of Tokens in Internal Representations of Large Language Models,
    arXiv:2501.10573.

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), The generalized ratios intrinsic
    dimension estimator, Sci. Rep. 12, 20005.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from . import stats
from .cache import array_digest, cache_dir, content_key, load_frame, save_frame
from .device import chunk_budget, chunk_rows, get_device
from .errors import EmbgeoInputError
from .intrinsic_dim import (
    check_scales,
    check_twonn_args,
    default_scales,
    gride_batched,
    gride_from_distances,
    twonn_from_distances,
)
from .models import LoadedModel
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
    "PAPER_REFERENCE",
    "ClaimCheck",
    "LayerObservables",
    "LayerwiseRun",
    "check_claim1",
    "check_claim2",
    "check_claim3",
    "check_claim4",
    "check_claim5",
    "check_claims",
    "claims_summary",
    "distinct_levels",
    "id_loss_correlation",
    "id_peaks",
    "layer_observables",
    "loss_table",
    "max_mean_cosine",
    "paper_comparison",
    "run_layerwise",
    "scale_curve_table",
    "strongest_correlation",
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
    (:func:`~embgeo_utils.neighbors.exact_order_statistics`). ``work`` holds buffers
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
    :func:`~embgeo_utils.intrinsic_dim.gride_scaling`,
    :func:`~embgeo_utils.intrinsic_dim.twonn` and
    :func:`~embgeo_utils.neighbors.neighborhood_overlap` applied to every cloud
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
            so that a batch stays near the CPU cache; :func:`~embgeo_utils.device.chunk_rows`).
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
    from .progress import tqdm

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


# ----------------------------------------------------------------------------------------
# The chapter's run: every model at every shuffle level, as tidy tables


@dataclass
class LayerwiseRun:
    """Everything chapter 4 measures, as tidy pandas tables (returned by :func:`run_layerwise`).

    Attributes:
        geometry: one row per model, shuffle level ``S``, prompt and layer
            ``1..L`` with ``depth = layer / L``, the headline GRIDE ``ID``
            (``n2 = 2``, or the first scale), ``TwoNN``, ``cos_mean``,
            ``cos_std``, the prompt's ``loss``, ``ID n2=<n2>`` for the other
            scales and ``chi_<k>`` (overlap of the layer with the next; NaN at
            the last layer).
        losses: one row per model, ``S`` and prompt: the mean next-token ``loss`` (nats).
        curves: the GRIDE scale curve at the peak layer of the mean profile, for
            the lowest and highest shuffle level: ``model, S, peak layer, prompt, n2, ID``.
        sources: the passage behind each prompt: ``model, prompt, source, title``.
        n_tokens: tokens per prompt ``T``.
        seconds: wall time per model.
    """

    geometry: pd.DataFrame
    losses: pd.DataFrame
    curves: pd.DataFrame
    sources: pd.DataFrame
    n_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The models in the order they were run."""
        return list(dict.fromkeys(self.geometry["model"]))

    @property
    def shuffle_levels(self) -> list[int]:
        """The shuffle levels, ascending."""
        return sorted(int(s) for s in self.geometry["S"].unique())


def _shuffle_levels(shuffle_levels: Sequence[int]) -> list[int]:
    values = list(shuffle_levels)
    if not values or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in values):
        raise EmbgeoInputError(
            f"shuffle_levels must be a list of non-negative integers (0 = the text as written), got {shuffle_levels!r}."
        )
    return sorted({int(s) for s in values})


def run_layerwise(
    model_names: Sequence[str],
    n_prompts: int = 16,
    n_tokens: int = 256,
    shuffle_levels: Sequence[int] = (0, 1, 2, 3, 4, 5),
    scales: Sequence[int] = (2, 4, 8),
    scale_curve_max: int = 128,
    overlap_k: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    loader: Callable[[str], LoadedModel] | None = None,
    verbose: bool = True,
    cache: bool = True,
) -> LayerwiseRun:
    """Measure the layerwise geometry of real prompts, every model at every shuffle level (chapter 4).

    For each model: ``n_prompts`` passages of the book's corpus with at least
    ``n_tokens`` tokens in the model's tokenizer (:func:`~embgeo_utils.corpus.load_passages`,
    seed ``seed``), cut to ``n_tokens``; at each shuffle level ``S`` every
    passage is block-shuffled with its own order
    (:func:`~embgeo_utils.corpus.shuffle_tokens` with seed ``seed * 100003 + prompt``);
    the hidden states of layers ``1..L`` (the embedding layer skipped) and the
    loss come from :func:`~embgeo_utils.activations.hidden_states`, and
    :func:`layer_observables` measures them (float32 Gram matrices). At the
    lowest and the highest level, the GRIDE scale curve up to
    ``scale_curve_max`` is computed at the peak layer of the mean ID profile.

    Args:
        model_names: registry names, Hugging Face ids or paths.
        n_prompts: passages per model.
        n_tokens: tokens per prompt ``T``.
        shuffle_levels: levels ``S``; level ``S`` cuts a prompt into ``min(4^S, T)`` blocks.
        scales: GRIDE ranks ``n2`` computed at every layer; the headline ID is the first.
        scale_curve_max: largest ``n2`` of the scale curve at the peak layer.
        overlap_k: neighbourhood sizes of the overlap ``chi_k``.
        seed: seed of the passages and of the shuffles.
        device: where to run the models and the geometry.
        batch_size: prompts per forward pass.
        loader: ``name -> LoadedModel`` (default :func:`~embgeo_utils.models.load` on ``device``).
        verbose: print the time taken per model.
        cache: keep each model's tables per shuffle level on disk, keyed by the
            model, the token ids and the parameters of the geometry, so a rerun
            reads them instead of the hidden states. The hidden states themselves
            are not written to disk (about 10 GB at the chapter's defaults).

    Returns:
        A :class:`LayerwiseRun`.

    Raises:
        EmbgeoInputError: on no models, bad counts, levels or scales.
    """
    from . import activations, corpus, models  # imported here: the model stack is only needed to run

    if isinstance(model_names, str) or not list(model_names):
        raise EmbgeoInputError("model_names must be a non-empty list of model names.")
    if n_prompts < 1 or n_tokens < 4:
        raise EmbgeoInputError(f"Need n_prompts >= 1 and n_tokens >= 4, got {n_prompts} and {n_tokens}.")
    levels = _shuffle_levels(shuffle_levels)
    scales_arr = check_scales(scales)
    curve_scales = default_scales(n_tokens, scale_curve_max)
    dev = get_device(device)
    load = loader or (lambda name: models.load(name, device=dev))
    s_lo, s_hi = levels[0], levels[-1]
    frames, loss_frames, curve_frames, source_rows, seconds = [], [], [], [], {}
    for name in model_names:
        start = time.perf_counter()
        loaded = load(name)
        passages = corpus.load_passages(
            n_prompts, loaded.tokenizer, min_tokens=n_tokens, max_tokens=n_tokens, seed=seed
        )
        source_rows += [
            {"model": name, "prompt": i, "source": p.source, "title": p.title} for i, p in enumerate(passages)
        ]
        n_layers = 0
        for S in levels:
            ids = [corpus.shuffle_tokens(p.token_ids, S, seed=seed * 100_003 + i) for i, p in enumerate(passages)]
            key = content_key(
                "layerwise-v1", name, loaded.info.sha256, str(loaded.model.dtype), [array_digest(np.asarray(x)) for x in ids],
                int(n_tokens), scales_arr.tolist(), list(map(int, overlap_k)),
                curve_scales.tolist() if S in (s_lo, s_hi) else None, dev.type,
            )  # fmt: skip
            paths = [cache_dir("layerwise") / f"{key}-{part}.npz" for part in ("geometry", "loss", "curve")]
            geo, lss, crv = [load_frame(path) for path in paths] if cache else [None, None, None]
            if geo is not None and lss is not None and (crv is not None or S not in (s_lo, s_hi)):
                frames.append(geo)
                loss_frames.append(lss)
                if crv is not None and S in (s_lo, s_hi):
                    curve_frames.append(crv)
                n_layers = int(geo["layer"].nunique())
                continue
            acts = activations.hidden_states(loaded, ids, n_tokens, batch_size=batch_size, cache=False, progress=False)
            hidden = acts.hidden[:, 1:]  # skip the embedding layer: layers 1..L
            obs = layer_observables(
                hidden, scales=scales_arr, overlap_k=overlap_k, device=dev, dtype=torch.float32, progress=False
            )
            assert acts.loss is not None  # with_loss=True
            frames.append(_geometry_frame(name, S, obs, acts.loss))
            loss_frames.append(
                pd.DataFrame(
                    {"model": name, "S": S, "prompt": np.arange(len(passages)), "loss": acts.loss.astype(np.float64)}
                )
            )
            if cache:
                save_frame(frames[-1], paths[0])
                save_frame(loss_frames[-1], paths[1])
            n_layers = hidden.shape[1]
            if S in (s_lo, s_hi):
                peak = int(np.argmax(obs.gride[:, :, 0].mean(0)))
                curve = np.asarray(gride_batched(hidden[:, peak], scales=curve_scales, device=dev))
                p_idx, s_idx = np.meshgrid(np.arange(len(passages)), np.arange(len(curve_scales)), indexing="ij")
                curve_frames.append(
                    pd.DataFrame(
                        {
                            "model": name,
                            "S": S,
                            "peak layer": peak + 1,
                            "prompt": p_idx.ravel(),
                            "n2": curve_scales[s_idx.ravel()].astype(int),
                            "ID": curve.ravel(),
                        }
                    )
                )
                if cache:
                    save_frame(curve_frames[-1], paths[2])
            del acts, hidden
        seconds[name] = time.perf_counter() - start
        if verbose:
            print(f"{name}: {n_layers} layers, {len(levels)} shuffle levels in {seconds[name]:.0f} s")
        del loaded
    return LayerwiseRun(
        geometry=pd.concat(frames, ignore_index=True),
        losses=pd.concat(loss_frames, ignore_index=True),
        curves=pd.concat(curve_frames, ignore_index=True),
        sources=pd.DataFrame(source_rows),
        n_tokens=int(n_tokens),
        seconds=seconds,
    )


def _geometry_frame(name: str, S: int, obs: LayerObservables, loss: np.ndarray) -> pd.DataFrame:
    """The rows of :attr:`LayerwiseRun.geometry` for one model and shuffle level (prompt-major)."""
    n_prompts, n_layers = obs.twonn.shape
    grid_p, grid_l = np.meshgrid(np.arange(n_prompts), np.arange(n_layers), indexing="ij")
    prompt, layer = grid_p.ravel(), grid_l.ravel()
    columns: dict[str, Any] = {
        "model": name,
        "S": int(S),
        "prompt": prompt,
        "layer": layer + 1,
        "depth": (layer + 1) / n_layers,
        "ID": obs.gride[:, :, 0].ravel(),
        "TwoNN": obs.twonn.ravel(),
        "cos_mean": obs.cos_mean.ravel(),
        "cos_std": obs.cos_std.ravel(),
        "loss": np.asarray(loss, dtype=np.float64)[prompt],
    }
    for j, n2 in enumerate(obs.scales[1:], start=1):
        columns[f"ID n2={n2}"] = obs.gride[:, :, j].ravel()
    for k, chi in obs.overlap.items():
        padded = np.concatenate([chi, np.full((n_prompts, 1), np.nan)], axis=1)  # no next layer after the last
        columns[f"chi_{k}"] = padded.ravel()
    return pd.DataFrame(columns)


# ----------------------------------------------------------------------------------------
# Tables of the chapter


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise EmbgeoInputError(
            f"{name} must be a pandas DataFrame (a table of run_layerwise), got {type(frame).__name__}."
        )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EmbgeoInputError(f"{name} lacks the column(s) {missing}; pass the table that run_layerwise returns.")
    if frame.empty:
        raise EmbgeoInputError(f"{name} is empty; run at least one model.")


def _layer_counts(geometry: pd.DataFrame) -> dict[str, int]:
    return {m: int(v) for m, v in geometry.groupby("model", sort=False)["layer"].max().items()}


def id_peaks(geometry: pd.DataFrame) -> pd.DataFrame:
    """Peak of the mean ID profile per model and shuffle level (chapter 4).

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, layer, ID``).

    Returns:
        DataFrame indexed by ``(model, S)`` with ``peak ID``, ``peak layer``,
        ``layers``, ``first-layer ID`` and ``last-layer ID`` (means over prompts).
    """
    _require(geometry, ["model", "S", "layer", "ID"], "geometry")
    id_mean = geometry.groupby(["model", "S", "layer"])["ID"].mean()
    agg = id_mean.groupby(["model", "S"]).agg(["max", "idxmax", "first", "last"])
    n_layers = _layer_counts(geometry)
    return pd.DataFrame(
        {
            "peak ID": agg["max"],
            "peak layer": [int(i[2]) for i in agg["idxmax"]],
            "layers": [n_layers[m] for m, _ in agg.index],
            "first-layer ID": agg["first"],
            "last-layer ID": agg["last"],
        }
    )


def loss_table(losses: pd.DataFrame) -> pd.DataFrame:
    """Mean next-token loss per model (rows) and shuffle level (columns) (chapter 4)."""
    _require(losses, ["model", "S", "loss"], "losses")
    return losses.groupby(["model", "S"])["loss"].mean().unstack("S")


def max_mean_cosine(geometry: pd.DataFrame) -> pd.DataFrame:
    """Largest layer mean of the mean cosine similarity, per model (rows) and shuffle level (columns) (chapter 4)."""
    _require(geometry, ["model", "S", "layer", "cos_mean"], "geometry")
    return geometry.groupby(["model", "S", "layer"])["cos_mean"].mean().groupby(["model", "S"]).max().unstack("S")


def scale_curve_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean GRIDE ID per model, shuffle level and peak layer (rows) and rank ``n2`` (columns) (chapter 4)."""
    _require(curves, ["model", "S", "peak layer", "n2", "ID"], "curves")
    return curves.groupby(["model", "S", "peak layer", "n2"])["ID"].mean().unstack("n2")


def id_loss_correlation(geometry: pd.DataFrame, shuffle_level: int | None = None) -> pd.DataFrame:
    """Pearson r between a layer's ID and the prompt's loss, across prompts, at every layer (chapter 4).

    One-sided test of r > 0 (``scipy.stats.pearsonr``). Two sets of points per
    model: the prompts at ``shuffle_level`` (default: the lowest level, the
    text as written), labelled ``"S = <level>"``, and all prompts of all levels
    pooled, labelled ``"all S pooled"`` (confounded by shuffling, which raises
    both quantities).

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, layer, ID, loss``).
        shuffle_level: the level of the headline correlation.

    Returns:
        DataFrame with ``model, prompts, layer, depth, r, p, n``, one row per layer and set.
    """
    _require(geometry, ["model", "S", "layer", "ID", "loss"], "geometry")
    level = int(geometry["S"].min()) if shuffle_level is None else int(shuffle_level)
    if level not in set(geometry["S"]):
        raise EmbgeoInputError(f"shuffle_level {level} is not in the run; choose one of {sorted(set(geometry['S']))}.")
    n_layers = _layer_counts(geometry)
    rows = []
    for name in n_layers:
        mine = geometry[geometry["model"] == name]
        for label, part in [(f"S = {level}", mine[mine["S"] == level]), ("all S pooled", mine)]:
            for layer, sub in part.groupby("layer"):
                res = sps.pearsonr(sub["ID"], sub["loss"], alternative="greater")
                rows.append(
                    {
                        "model": name,
                        "prompts": label,
                        "layer": layer,
                        "depth": layer / n_layers[name],
                        "r": res.statistic,
                        "p": res.pvalue,
                        "n": len(sub),
                    }
                )
    return pd.DataFrame(rows)


def strongest_correlation(corr: pd.DataFrame) -> pd.DataFrame:
    """The layer with the largest r per model and set of prompts, with its Bonferroni p over layers (chapter 4).

    Args:
        corr: the table of :func:`id_loss_correlation`.

    Returns:
        DataFrame indexed by ``(model, prompts)`` with ``layer, depth, r, p,
        p (Bonferroni), n, layers tested``; the Bonferroni p is ``min(1, p * number of layers)``
        (:func:`~embgeo_utils.stats.bonferroni` over the layers of the set).
    """
    _require(corr, ["model", "prompts", "layer", "r", "p", "n"], "corr")
    rows = []
    for (name, label), part in corr.groupby(["model", "prompts"]):
        if not np.isfinite(part["r"].to_numpy(dtype=np.float64)).any():
            raise EmbgeoInputError(f"No layer of {name} ({label}) has a finite r: the ID or the loss is constant.")
        adjusted = stats.bonferroni(part["p"].to_numpy())
        best = int(np.nanargmax(part["r"].to_numpy(dtype=np.float64)))
        row = part.iloc[best].to_dict()
        row["p (Bonferroni)"] = float(adjusted[best])
        row["layers tested"] = len(part)
        rows.append(row)
    cols = ["model", "prompts", "layer", "depth", "r", "p", "p (Bonferroni)", "n", "layers tested"]
    return pd.DataFrame(rows)[[c for c in cols if c in rows[0]]].set_index(["model", "prompts"])


#: Reference numbers of Viswanathan et al. (2025), 50 prompts of 1,024 tokens (METHODS.md): peak ID
#: (``"value @ layer"``), loss and largest mean cosine; keys ending in ``lo`` are for the text as
#: written (S = 0), in ``hi`` for the finest shuffle (S = 5). :func:`paper_comparison` names them by level.
PAPER_REFERENCE: tuple[dict[str, Any], ...] = (
    {
        "model": "Llama-3-8B (P2)",
        "layers": 32,
        "peak ID lo": "9.5 @ 13",
        "peak ID hi": "13.9 @ 10",
        "loss lo": 1.87,
        "loss hi": 7.49,
        "max mean cos lo": 0.32,
        "max mean cos hi": 0.83,
    },
    {"model": "Mistral-7B (P2)", "layers": 32, "peak ID lo": "9.2", "peak ID hi": "15.0"},
    {"model": "Pythia-6.9B (P2)", "layers": 32, "peak ID lo": "8.2", "peak ID hi": "13.9"},
    {"model": "Pythia-160m (P2)", "layers": 12, "peak ID lo": "7.8 @ 8"},
    {"model": "GPT-2 (P2)", "layers": 12, "peak ID lo": "7.3 @ 9"},
)


def paper_comparison(
    peaks: pd.DataFrame, losses: pd.DataFrame, cos_max: pd.DataFrame, models: Sequence[str] | None = None
) -> pd.DataFrame:
    """Our peak IDs, losses and largest mean cosines next to the paper's reference numbers (chapter 4).

    The paper's shuffled numbers are at its highest level, ``S = 5``; ours at
    the highest level of the run (the column names give both levels).

    Args:
        peaks: :func:`id_peaks`.
        losses: :func:`loss_table`.
        cos_max: :func:`max_mean_cosine`.
        models: order of our models (default: the order of ``peaks``).

    Returns:
        DataFrame indexed by model: the paper's models first (missing numbers
        are NaN), then ours.
    """
    levels = sorted({int(s) for s in peaks.index.get_level_values("S")})
    lo, hi = levels[0], levels[-1]
    names = {"lo": lo, "hi": hi}

    def rename(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in row.items():
            head, _, tail = key.rpartition(" ")
            out[f"{head} S={names[tail]}" if tail in names else key] = value
        return out

    ours = []
    for name in models or dict.fromkeys(peaks.index.get_level_values("model")):
        pk = peaks.loc[name]
        ours.append(
            rename(
                {
                    "model": name,
                    "layers": int(pk["layers"].iloc[0]),
                    "peak ID lo": f"{pk.loc[lo, 'peak ID']:.1f} @ {int(pk.loc[lo, 'peak layer'])}",
                    "peak ID hi": f"{pk.loc[hi, 'peak ID']:.1f} @ {int(pk.loc[hi, 'peak layer'])}",
                    "loss lo": round(losses.loc[name, lo], 2),
                    "loss hi": round(losses.loc[name, hi], 2),
                    "max mean cos lo": round(cos_max.loc[name, lo], 2),
                    "max mean cos hi": round(cos_max.loc[name, hi], 2),
                }
            )
        )
    paper = pd.DataFrame([rename(r) for r in PAPER_REFERENCE])
    return pd.concat([paper, pd.DataFrame(ours)]).set_index("model")


# ----------------------------------------------------------------------------------------
# Claims 1-5 of the ledger


@dataclass(frozen=True)
class ClaimCheck:
    """The test of one ledger claim in chapter 4.

    Attributes:
        number: the claim's number in the ledger (1-5).
        verdict: the :class:`~embgeo_utils.stats.Verdict` of its checks.
        table: per-model numbers behind the checks (DataFrame indexed by model),
            with ``checks holding`` and ``holds`` (every check of the model holds).
        statistic: what :attr:`value` is.
        value: the claim's headline statistic.
        null: what the statistic is tested against.
    """

    number: int
    verdict: stats.Verdict
    table: pd.DataFrame
    statistic: str
    value: float
    null: str


def _levels(geometry: pd.DataFrame, need_two: bool) -> tuple[int, int]:
    levels = sorted(int(s) for s in geometry["S"].unique())
    if need_two and len(levels) < 2:
        raise EmbgeoInputError(
            f"Claims 2-4 compare shuffle levels, but the run has only S = {levels}; add a higher level (e.g. 5)."
        )
    return levels[0], levels[-1]


def _per_prompt(geometry: pd.DataFrame, name: str, S: int, column: str, layers: Sequence[int]) -> np.ndarray:
    """``column`` averaged over ``layers``, one value per prompt (sorted by prompt)."""
    sub = geometry[(geometry["model"] == name) & (geometry["S"] == S) & (geometry["layer"].isin(list(layers)))]
    return sub.groupby("prompt")[column].mean().sort_index().to_numpy()


def _peak_layer(geometry: pd.DataFrame, name: str, S: int) -> int:
    """Layer of the largest mean ID over prompts."""
    sub = geometry[(geometry["model"] == name) & (geometry["S"] == S)]
    return int(sub.groupby("layer")["ID"].mean().idxmax())


def _ratio_se(test: stats.TestResult, baseline: np.ndarray) -> float | None:
    """Standard error of ``mean(a) / mean(baseline) - 1``, from the paired test's se of ``mean(a - baseline)``."""
    return None if test.se is None else float(test.se / abs(baseline.mean()))


def _claim(
    number: int,
    checks: list[stats.Check],
    rows: list[dict[str, Any]],
    alpha: float,
    statistic: str,
    value: float,
    null: str,
) -> ClaimCheck:
    """The verdict of ``checks`` and the per-model table, with how many of each model's checks hold."""
    verdict = stats.verdict(checks, alpha=alpha, correction="holm")
    for row in rows:
        mine = [ok for c, ok in zip(verdict.checks, verdict.holds) if c.name.startswith(f"{row['model']}: ")]
        row["checks holding"] = f"{sum(mine)} of {len(mine)}"
        row["holds"] = bool(mine) and all(mine)
    return ClaimCheck(number, verdict, pd.DataFrame(rows).set_index("model"), statistic, float(value), null)


def check_claim1(geometry: pd.DataFrame, alpha: float = 0.01, min_rise: float = 0.1) -> ClaimCheck:
    """Claim 1: the ID of the token cloud rises, then falls over the layers (chapter 4).

    Pre-declared checks, per model, on the text as written (the lowest shuffle level):

    * the peak layer ``l*`` of the mean ID profile is interior: effect = layers
      between ``l*`` and the nearer end, minimum 1, descriptive (no p-value);
    * the ID at ``l*`` exceeds the ID at the first layer: effect = mean ID at
      ``l*`` / mean ID at the first layer - 1, minimum ``min_rise`` (10 %),
      one-sided Wilcoxon signed-rank test over prompts;
    * the same against the last layer.

    The p-values of all models are Holm-adjusted together and the verdict comes
    from :func:`~embgeo_utils.stats.verdict`. The peak is chosen on the same data,
    which favours it slightly; the minimum rise guards against a flat profile.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID``).
        alpha: significance level.
        min_rise: smallest relative rise of the peak over the first and last layers.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest peak / last-layer ratio over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "ID"], "geometry")
    lo, _ = _levels(geometry, need_two=False)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        layers = geometry.loc[geometry["model"] == name, "layer"]
        first_layer, last_layer = int(layers.min()), int(layers.max())
        l_star = _peak_layer(geometry, name, lo)
        peak, first, last = (
            _per_prompt(geometry, name, lo, "ID", [layer]) for layer in (l_star, first_layer, last_layer)
        )
        t_first, t_last = stats.wilcoxon(peak, first), stats.wilcoxon(peak, last)
        ratio_first, ratio_last = peak.mean() / first.mean(), peak.mean() / last.mean()
        checks += [
            stats.Check(
                f"{name}: peak layer {l_star} is interior",
                float(min(l_star - first_layer, last_layer - l_star)),
                None,
                1.0,
                last_layer - first_layer + 1,
            ),
            stats.Check(
                f"{name}: ID at peak > first layer",
                float(ratio_first - 1),
                t_first.p_value,
                min_rise,
                t_first.n,
                _ratio_se(t_first, first),
            ),
            stats.Check(
                f"{name}: ID at peak > last layer",
                float(ratio_last - 1),
                t_last.p_value,
                min_rise,
                t_last.n,
                _ratio_se(t_last, last),
            ),
        ]
        rows.append(
            {
                "model": name,
                "peak layer": l_star,
                "layers": last_layer,
                "peak/first": ratio_first,
                "peak/last": ratio_last,
                "p (peak > first)": t_first.p_value,
                "p (peak > last)": t_last.p_value,
            }
        )
    return _claim(
        1,
        checks,
        rows,
        alpha,
        f"min over models of mean(ID at peak) / mean(ID at last layer), S={lo}",
        min(r["peak/last"] for r in rows),
        "peak ID no higher than first/last-layer ID (one-sided Wilcoxon over prompts, Holm)",
    )


def distinct_levels(shuffle_levels: Sequence[int], n_tokens: int) -> list[int]:
    """The levels that shuffle differently from the level before them (chapter 4).

    Level ``S`` cuts ``T = n_tokens`` tokens into ``min(4^S, T)`` blocks; once
    ``4^S >= T`` every token is its own block, and higher levels are the same
    treatment with another random order. Returns the sorted levels with a new
    number of blocks.
    """
    levels = _shuffle_levels(shuffle_levels)
    blocks = [min(4 ** int(S), int(n_tokens)) for S in levels]
    return [S for i, S in enumerate(levels) if i == 0 or blocks[i] > blocks[i - 1]]


def check_claim2(geometry: pd.DataFrame, losses: pd.DataFrame, n_tokens: int, alpha: float = 0.01) -> ClaimCheck:
    """Claim 2: shuffling raises the loss and the peak ID, monotonically in S (chapter 4).

    Pre-declared checks, per model:

    * loss: Spearman rho between ``S`` and the prompt's loss over all prompt x
      level points, one-sided (``scipy.stats.spearmanr``); effect = rho, minimum 0;
    * peak ID: the same for ``S`` and the per-prompt ID at the peak layer of
      that level's mean profile;
    * monotone loss: effect = the smallest rise of the mean loss from one level
      to the next, minimum 0 (descriptive: it holds when the mean never falls);
    * monotone peak ID: the same for the mean peak ID.

    Monotonicity is judged over :func:`distinct_levels` only: levels with the
    same number of blocks are one treatment with two random orders. The
    p-values of all models are Holm-adjusted together and the verdict comes
    from :func:`~embgeo_utils.stats.verdict`; when only the loss checks hold,
    the claim is partly reproduced.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID``).
        losses: :attr:`LayerwiseRun.losses` (columns ``model, S, prompt, loss``).
        n_tokens: tokens per prompt ``T`` (sets which levels differ).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest Spearman rho(S, peak ID) over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "ID"], "geometry")
    _require(losses, ["model", "S", "prompt", "loss"], "losses")
    _levels(geometry, need_two=True)
    levels = sorted(int(s) for s in geometry["S"].unique())
    distinct = distinct_levels(levels, n_tokens)
    mean_loss = loss_table(losses)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        lsub = losses[losses["model"] == name]
        rho_loss = stats.spearman(lsub["S"], lsub["loss"])
        pk = pd.concat(
            [
                pd.DataFrame({"S": S, "ID": _per_prompt(geometry, name, S, "ID", [_peak_layer(geometry, name, S)])})
                for S in levels
            ]
        )
        rho_id = stats.spearman(pk["S"], pk["ID"])
        steps_loss = np.diff(mean_loss.loc[name, distinct].to_numpy(dtype=np.float64))
        steps_id = np.diff(pk.groupby("S")["ID"].mean().loc[distinct].to_numpy(dtype=np.float64))
        checks += [
            stats.Check(
                f"{name}: loss rises with S (Spearman)",
                rho_loss.effect,
                rho_loss.p_value,
                0.0,
                rho_loss.n,
                rho_loss.se,
            ),
            stats.Check(
                f"{name}: peak ID rises with S (Spearman)", rho_id.effect, rho_id.p_value, 0.0, rho_id.n, rho_id.se
            ),
        ]
        if len(distinct) > 1:
            checks += [
                stats.Check(
                    f"{name}: mean loss never falls from one level to the next",
                    float(steps_loss.min()),
                    None,
                    0.0,
                    len(distinct),
                ),
                stats.Check(
                    f"{name}: mean peak ID never falls from one level to the next",
                    float(steps_id.min()),
                    None,
                    0.0,
                    len(distinct),
                ),
            ]
        rows.append(
            {
                "model": name,
                "rho(S, loss)": rho_loss.statistic,
                "p loss": rho_loss.p_value,
                "decreases in mean loss": int((steps_loss < 0).sum()),
                "rho(S, peak ID)": rho_id.statistic,
                "p peak ID": rho_id.p_value,
                "decreases in mean peak ID": int((steps_id < 0).sum()),
            }
        )
    return _claim(
        2,
        checks,
        rows,
        alpha,
        "min over models of Spearman rho(S, peak ID); loss rho in details",
        min(r["rho(S, peak ID)"] for r in rows),
        "no association of S with loss / peak ID (one-sided Spearman, Holm); mean never falls",
    )


def check_claim3(geometry: pd.DataFrame, alpha: float = 0.01) -> ClaimCheck:
    """Claim 3: shuffled prompts have a higher mean cosine similarity in the late layers (chapter 4).

    Pre-declared check, per model: the per-prompt mean cosine averaged over the
    last third of the layers (at least one), highest shuffle level against the
    lowest; effect = difference of the means, minimum 0; one-sided Wilcoxon
    signed-rank test over prompts. Holm across models; verdict from
    :func:`~embgeo_utils.stats.verdict`.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, cos_mean``).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest difference over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "cos_mean"], "geometry")
    lo, hi = _levels(geometry, need_two=True)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        L = int(geometry.loc[geometry["model"] == name, "layer"].max())
        late = [layer for layer in range(1, L + 1) if layer > L - max(1, L // 3)]
        cos_lo, cos_hi = (
            _per_prompt(geometry, name, lo, "cos_mean", late),
            _per_prompt(geometry, name, hi, "cos_mean", late),
        )
        test = stats.wilcoxon(cos_hi, cos_lo)
        diff = float(cos_hi.mean() - cos_lo.mean())
        checks.append(
            stats.Check(
                f"{name}: mean cosine of layers {late[0]}-{late[-1]}, S={hi} > S={lo}",
                diff,
                test.p_value,
                0.0,
                test.n,
                test.se,
            )
        )
        rows.append(
            {
                "model": name,
                "late layers": f"{late[0]}-{late[-1]}",
                f"cos S={lo}": cos_lo.mean(),
                f"cos S={hi}": cos_hi.mean(),
                "difference": diff,
                "p": test.p_value,
            }
        )
    return _claim(
        3,
        checks,
        rows,
        alpha,
        f"min over models of mean cosine difference S={hi} - S={lo}, last third of layers",
        min(r["difference"] for r in rows),
        "no difference (one-sided Wilcoxon over prompts, Holm)",
    )


def check_claim4(geometry: pd.DataFrame, alpha: float = 0.01, k: int = 1, window: int = 2) -> ClaimCheck:
    """Claim 4: the neighbour overlap chi_k is lower for shuffled prompts near the ID peak (chapter 4).

    Pre-declared check, per model: the per-prompt ``chi_k`` averaged over the
    transitions ``l -> l + 1`` for ``l`` within ``window`` layers of the peak of
    the lowest level's mean ID profile, lowest shuffle level against the
    highest; effect = ``chi_k(lowest) - chi_k(highest)`` (positive when the
    shuffled overlap is lower), minimum 0; one-sided Wilcoxon signed-rank test
    over prompts. Holm across models; verdict from :func:`~embgeo_utils.stats.verdict`.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID, chi_<k>``).
        alpha: significance level.
        k: neighbourhood size (1 in the ledger).
        window: layers on either side of the peak.

    Returns:
        A :class:`ClaimCheck`; its value is the largest ``chi_k(highest) - chi_k(lowest)`` over models.
    """
    chi = f"chi_{k}"
    _require(geometry, ["model", "S", "prompt", "layer", "ID", chi], "geometry")
    lo, hi = _levels(geometry, need_two=True)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        L = int(geometry.loc[geometry["model"] == name, "layer"].max())
        l_star = _peak_layer(geometry, name, lo)
        near = [layer for layer in range(l_star - window, l_star + window + 1) if 1 <= layer <= L - 1]
        if not near:
            raise EmbgeoInputError(f"{name} has a single layer: there is no transition l -> l + 1 to compare.")
        chi_lo, chi_hi = _per_prompt(geometry, name, lo, chi, near), _per_prompt(geometry, name, hi, chi, near)
        test = stats.wilcoxon(chi_lo, chi_hi)
        checks.append(
            stats.Check(
                f"{name}: {chi} of layers {near[0]}-{near[-1]}, S={hi} < S={lo}",
                float(chi_lo.mean() - chi_hi.mean()),
                test.p_value,
                0.0,
                test.n,
                test.se,
            )
        )
        rows.append(
            {
                "model": name,
                "layers l (l→l+1)": f"{near[0]}-{near[-1]}",
                f"{chi} S={lo}": chi_lo.mean(),
                f"{chi} S={hi}": chi_hi.mean(),
                "difference": chi_hi.mean() - chi_lo.mean(),
                "p": test.p_value,
            }
        )
    return _claim(
        4,
        checks,
        rows,
        alpha,
        f"max over models of {chi} difference S={hi} - S={lo}, within {window} layers of the ID peak",
        max(r["difference"] for r in rows),
        "no difference (one-sided Wilcoxon over prompts, Holm)",
    )


def check_claim5(geometry: pd.DataFrame, alpha: float = 0.01) -> ClaimCheck:
    """Claim 5: across prompts, a layer's ID correlates positively with the loss (chapter 4).

    Pre-declared check, per model: the largest per-layer Pearson r between ID
    and loss over the prompts at the lowest shuffle level
    (:func:`id_loss_correlation`), effect = r, minimum 0, p = its one-sided p
    times the number of layers (Bonferroni over layers,
    :func:`strongest_correlation`). The models' p-values are then Holm-adjusted
    together; verdict from :func:`~embgeo_utils.stats.verdict`. The correlation
    pooled over all levels (confounded by shuffling) is reported, not tested.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID, loss``).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest max r over models.
    """
    lo, _ = _levels(geometry, need_two=False)
    best = strongest_correlation(id_loss_correlation(geometry, lo))
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        b, pooled = best.loc[(name, f"S = {lo}")], best.loc[(name, "all S pooled")]
        checks.append(
            stats.Check(
                f"{name}: Pearson r(ID, loss) at layer {int(b['layer'])}, S={lo}",
                float(b["r"]),
                float(b["p (Bonferroni)"]),
                0.0,
                int(b["n"]),
                float(1 / np.sqrt(int(b["n"]) - 1)),
                int(b["layers tested"]),
            )
        )
        rows.append(
            {
                "model": name,
                "best layer": int(b["layer"]),
                "max r": b["r"],
                "p": b["p"],
                "p (Bonferroni)": b["p (Bonferroni)"],
                "prompts": int(b["n"]),
                "pooled max r": pooled["r"],
                "pooled p (Bonferroni)": pooled["p (Bonferroni)"],
            }
        )
    return _claim(
        5,
        checks,
        rows,
        alpha,
        f"min over models of the max per-layer Pearson r(ID, loss), S={lo}",
        min(r["max r"] for r in rows),
        "r <= 0 (one-sided Pearson test, Bonferroni over layers, Holm)",
    )


def check_claims(run: LayerwiseRun, alpha: float = 0.01) -> list[ClaimCheck]:
    """Claims 1-5 of the ledger on one run (chapter 4); see :func:`check_claim1` ... :func:`check_claim5`.

    Each claim's checks are Holm-adjusted together and judged by
    :func:`~embgeo_utils.stats.verdict` at ``alpha``.
    """
    if not isinstance(run, LayerwiseRun):
        raise EmbgeoInputError(f"run must be the LayerwiseRun of run_layerwise, got {type(run).__name__}.")
    return [
        check_claim1(run.geometry, alpha),
        check_claim2(run.geometry, run.losses, run.n_tokens, alpha),
        check_claim3(run.geometry, alpha),
        check_claim4(run.geometry, alpha),
        check_claim5(run.geometry, alpha),
    ]


def claims_summary(claims: Sequence[ClaimCheck], peaks: pd.DataFrame) -> str:
    """The chapter's summary in markdown: each verdict and where it holds, the peaks, the correlations (chapter 4).

    Args:
        claims: :func:`check_claims`.
        peaks: :func:`id_peaks`.
    """
    from .results import CLAIMS

    by_number = {c.number: c for c in claims}
    lines = []
    for c in claims:
        passed = ", ".join(c.table.index[c.table["holds"].astype(bool)]) or "none"
        lines.append(f"- **Claim {c.number}** ({CLAIMS[c.number][0]}): *{c.verdict.verdict}* — holds in {passed}.")
    levels = sorted({int(s) for s in peaks.index.get_level_values("S")})
    lo, hi = levels[0], levels[-1]
    if 1 in by_number:
        c1 = by_number[1].table
        lines.append(
            "- The ID peak sits at relative depth "
            + ", ".join(f"{r['peak layer'] / r['layers']:.2f} ({m})" for m, r in c1.iterrows())
            + f" for S = {lo}; at S = {hi} it moves to layer "
            + ", ".join(f"{int(peaks.loc[(m, hi), 'peak layer'])} ({m})" for m in c1.index)
            + "."
        )
    if 5 in by_number:
        c5 = by_number[5].table
        lines.append(
            f"- ID–loss correlation at S = {lo}: max r "
            + ", ".join(
                f"{r['max r']:.2f} (layer {r['best layer']}, Bonferroni p {r['p (Bonferroni)']:.3g}, {m})"
                for m, r in c5.iterrows()
            )
            + "; pooled over S (confounded by shuffling): "
            + ", ".join(f"{r['pooled max r']:.2f}" for _, r in c5.iterrows())
            + "."
        )
    return "\n".join(lines)
