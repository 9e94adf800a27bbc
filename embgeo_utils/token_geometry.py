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

All layers of one prompt are processed as one batch: a single Gram matrix per
layer serves the distances, the neighbour lists and the cosines.

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

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import chunk_rows, get_device
from .errors import EmbgeoInputError
from .intrinsic_dim import (
    check_scales,
    check_twonn_args,
    default_scales,
    gride_from_distances,
    twonn_from_distances,
)
from .neighbors import knn_from_sq_distances

__all__ = ["LayerObservables", "layer_observables"]


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
    twonn_algorithm: str,
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

    Chapter 4. Each prompt's layers are one batch on the device. The values are
    those of :func:`~embgeo_utils.intrinsic_dim.gride_scaling`,
    :func:`~embgeo_utils.intrinsic_dim.twonn` and
    :func:`~embgeo_utils.neighbors.neighborhood_overlap` applied to every cloud
    in turn (tested), computed from one Gram matrix per layer.

    Args:
        hidden: ``(prompts, layers, tokens, d)`` hidden states (numpy or torch,
            float32 is fine). Leave out positions that should not be in the
            cloud (e.g. a BOS token) before calling.
        scales: even GRIDE ranks ``n2``; default ``2, 4, ..., 256`` (capped at
            ``tokens - 1``), the range of Viswanathan et al.
        overlap_k: neighbourhood sizes for ``chi_k``.
        device: where to compute (``"auto"``: GPU if present).
        chunk_size: layers per batch; default keeps each ``(chunk_size, T, T)`` buffer within
            the device's chunk budget (:func:`~embgeo_utils.device.chunk_rows`).
        discard_fraction: TwoNN fraction of largest ratios left out (DADApy default 0.1).
        twonn_algorithm: ``"base"`` (DADApy's linear fit) or ``"ml"``.
        dtype: precision of the Gram matrices. float64 (default) reproduces the
            single-cloud functions to ~1e-9; float32 is about twice as fast on
            the CPU with relative errors of order 1e-5 on the IDs.
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
    chunk_size = chunk_rows(torch.finfo(dtype).bits // 8 * n_tokens * n_tokens, dev, chunk_size)
    show = n_prompts >= 10 if progress is None else progress

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
