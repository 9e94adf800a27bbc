"""Coherence of token neighbourhoods: do a token's nearest neighbours share its label? (chapter 3)

Lee et al. (2025) show low-ID tokens whose neighbours form meaningful groups
(numbers, names, word variants). To *measure* that, every token gets a label
read from its text (:func:`embgeo_utils.labels.token_labels`) and a token's
coherence is the fraction of its nearest neighbours that share its label,
minus the chance of that label among all neighbour slots
(:func:`neighbor_label_agreement`). :func:`coherence_test` compares two groups
of tokens (the lowest- and highest-ID deciles) with a permutation null.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared Global and Local
    Geometry of Language Model Embeddings, arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import stats
from .errors import EmbgeoInputError

__all__ = [
    "CoherenceResult",
    "coherence_test",
    "neighbor_label_agreement",
]


def neighbor_label_agreement(
    labels: Sequence[Any] | np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray | Sequence[int] | None = None,
    adjust: bool = True,
) -> np.ndarray:
    """Per-token agreement of its neighbours' labels with its own label (chapter 3).

    ``a_i = |{j in N_i : label_j == label_i}| / k``. With ``adjust=True`` the
    chance level of token ``i``'s own label is subtracted: the frequency of that
    label among all neighbour slots, so that tokens of a common kind do not look
    coherent merely because their kind is common; 0 then means "as random".

    Args:
        labels: one label per row of the table (entries never referenced may be anything).
        indices: ``(n, k)`` neighbour rows (self excluded), e.g. from ``neighbors.knn(table, k, queries=rows)``.
        rows: the ``n`` query rows the neighbours belong to; default ``0..n-1``.
        adjust: subtract the chance agreement.

    Returns:
        float64 array ``(n,)``.

    Raises:
        EmbgeoInputError: when ``indices`` is not ``(n, k)`` with one row per query row.
    """
    lab = np.asarray(labels).astype(str)
    idx = np.asarray(indices)
    own_rows = np.arange(idx.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != len(own_rows):
        raise EmbgeoInputError(
            f"indices must be (n, k) with one row per query row ({len(own_rows)}), got shape {idx.shape}."
        )
    own = lab[own_rows]
    neigh = lab[idx]
    agree = (neigh == own[:, None]).mean(axis=1)
    if adjust:
        values, counts = np.unique(neigh, return_counts=True)
        freq = dict(zip(values.tolist(), (counts / neigh.size).tolist(), strict=True))
        agree = agree - np.array([freq.get(o, 0.0) for o in own])
    return agree


@dataclass(frozen=True)
class CoherenceResult:
    """Outcome of :func:`coherence_test` (chapter 3): group means, their difference and its permutation null."""

    low_mean: float
    high_mean: float
    difference: float
    null_mean: float
    null_std: float
    z: float
    p_value: float
    n_low: int
    n_high: int
    n_permutations: int


def _as_index(group: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(group)
    return np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64)


def coherence_test(
    values: np.ndarray | Sequence[float],
    low: np.ndarray | Sequence[int],
    high: np.ndarray | Sequence[int],
    n: int = 1000,
    seed: int = 0,
) -> CoherenceResult:
    """Is a per-token value (e.g. label agreement) larger in group ``low`` than in group ``high``? (chapter 3)

    The statistic is ``mean(values[low]) - mean(values[high])``; the null
    reassigns the pooled tokens of both groups to groups of the same sizes at
    random ``n`` times (the ``t``-th ``rng.permutation`` of a numpy generator
    seeded with ``seed``); the p-value is one-sided,
    ``(1 + #{null >= observed}) / (1 + n)`` (:func:`embgeo_utils.stats.from_null`).

    Args:
        values: ``(n_tokens,)`` per-token values.
        low, high: boolean masks (or index arrays) of the two groups, e.g. the lowest- and highest-ID deciles.
        n: permutations.
        seed: seed of the permutations.

    Raises:
        EmbgeoInputError: an empty group or a non-positive ``n``.
    """
    vals = np.asarray(values, dtype=float)
    lo, hi = _as_index(low), _as_index(high)
    if len(lo) == 0 or len(hi) == 0:
        raise EmbgeoInputError("Both groups need at least one token; use more tokens or wider quantiles.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EmbgeoInputError(f"n (number of permutations) must be a positive integer, got {n!r}.")
    pooled = np.concatenate([vals[lo], vals[hi]])
    n_low = len(lo)
    observed = float(pooled[:n_low].mean() - pooled[n_low:].mean())
    rng = np.random.default_rng(seed)
    null = np.empty(n)
    step = max(1, (1 << 22) // len(pooled))
    for start in range(0, n, step):
        stop = min(n, start + step)
        shuffled = pooled[np.stack([rng.permutation(len(pooled)) for _ in range(stop - start)])]
        null[start:stop] = shuffled[:, :n_low].mean(axis=1) - shuffled[:, n_low:].mean(axis=1)
    res = stats.from_null(observed, null)
    return CoherenceResult(
        float(vals[lo].mean()),
        float(vals[hi].mean()),
        observed,
        res.null_mean,
        res.null_std,
        res.z,
        res.p_value,
        n_low,
        len(hi),
        int(n),
    )
