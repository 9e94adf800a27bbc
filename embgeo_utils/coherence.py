"""Coherence of token neighbourhoods: do a token's nearest neighbours share its label? (chapter 3)

Lee et al. (2025) show low-ID tokens whose neighbours form meaningful groups
(numbers, names, word variants). To *measure* that, every token gets a label
read from its text (:func:`embgeo_utils.labels.token_labels`) and a token's
coherence is the fraction of its nearest neighbours that share its label,
minus the chance of that label among all neighbour slots
(:func:`neighbor_label_agreement`). :func:`coherence_test` compares two groups
of tokens (the lowest- and highest-ID deciles) with a permutation null;
:func:`coherence_table` runs it for every model and label, and
:func:`low_id_examples` lists example low-ID neighbourhoods as text.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared Global and Local
    Geometry of Language Model Embeddings, arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import labels, stats
from .device import NUMPY_CHUNK_BYTES, chunk_rows
from .errors import EmbgeoInputError
from .token_dimension import COHERENCE_LABEL, LocalIDs

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CoherenceResult",
    "coherence_table",
    "coherence_test",
    "low_id_examples",
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
    step = chunk_rows(8 * len(pooled), budget_bytes=NUMPY_CHUNK_BYTES)
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


def coherence_table(
    ids: Mapping[str, LocalIDs],
    coherence_k: int = 10,
    n_permutations: int = 1000,
    seed: int = 0,
    min_labelled: int = 20,
) -> pd.DataFrame:
    """Coherence of low- against high-ID neighbourhoods, per model and label (chapter 3).

    Each evaluated token and each of its ``coherence_k`` nearest neighbours is
    labelled (:func:`embgeo_utils.labels.token_labels`) in two ways:

    * ``"kind + capitalised"`` (:data:`~embgeo_utils.token_dimension.COHERENCE_LABEL`):
      the kind joined with the capitalisation flag; the groups are the lowest-
      and highest-ID deciles of the evaluated tokens (:attr:`LocalIDs.order`,
      ties broken at random).
    * ``"analogy category"``: the analogy-set section, for tokens that have one;
      few do, so the groups are the lowest and highest ID quartiles of the
      labelled tokens, and a model with fewer than ``min_labelled`` of them is skipped.

    Coherence is :func:`neighbor_label_agreement` (chance-adjusted) and the
    groups are compared with :func:`coherence_test`.

    Args:
        ids: model name → :class:`~embgeo_utils.token_dimension.LocalIDs` (``per_token_ids``).
        coherence_k: nearest neighbours compared with the token (at most the ``k`` of the IDs).
        n_permutations: permutations of each null.
        seed: seed of the permutations.
        min_labelled: fewest tokens with an analogy category for that label to be tested.

    Returns:
        One row per model and label: ``model``, ``label``, ``groups``, ``tokens per group``,
        ``coherence low ID``, ``coherence high ID``, ``difference``, ``z``, ``p``.

    Raises:
        EmbgeoInputError: no model, or ``coherence_k`` outside ``[1, k]``.
    """
    import pandas as pd

    if not ids:
        raise EmbgeoInputError("No model's IDs given; run token_dimension.per_token_ids first.")
    out = []
    for name, m in ids.items():
        if isinstance(coherence_k, bool) or not 1 <= coherence_k <= m.neighbors.shape[1]:
            raise EmbgeoInputError(f"coherence_k must lie in [1, {m.neighbors.shape[1]}] (the k of the IDs).")
        rows, nbrs = m.rows, m.neighbors[:, :coherence_k]
        needed = np.union1d(rows, nbrs.ravel())
        lab = labels.token_labels([m.strings.get(int(r), "") for r in needed])
        kind_cap = np.array([f"{kd}|{cp}" for kd, cp in zip(lab.kind, lab.capitalised, strict=True)], dtype=object)
        n_dec = max(1, len(rows) // 10)
        low, high = m.order[:n_dec], m.order[-n_dec:]
        for label_name, values in ((COHERENCE_LABEL, kind_cap), ("analogy category", lab.analogy)):
            full = np.full(m.n_table_rows, "", dtype=object)
            full[needed] = values
            if label_name == "analogy category":
                has = full[rows] != ""
                if has.sum() < min_labelled:
                    continue
                agree = neighbor_label_agreement(full, nbrs[has], rows=rows[has])
                rank = np.empty(len(rows), dtype=np.int64)
                rank[m.order] = np.arange(len(rows))
                cut = max(1, int(has.sum()) // 4)
                srt = np.argsort(rank[has])
                res = coherence_test(agree, srt[:cut], srt[-cut:], n=n_permutations, seed=seed)
                groups = "lowest vs highest ID quartile of labelled tokens"
            else:
                agree = neighbor_label_agreement(full, nbrs, rows=rows)
                res = coherence_test(agree, low, high, n=n_permutations, seed=seed)
                groups = "lowest vs highest ID decile"
            out.append(
                {
                    "model": name,
                    "label": label_name,
                    "groups": groups,
                    "tokens per group": res.n_low,
                    "coherence low ID": res.low_mean,
                    "coherence high ID": res.high_mean,
                    "difference": res.difference,
                    "z": res.z,
                    "p": res.p_value,
                }
            )
    columns = ["model", "label", "groups", "tokens per group", "coherence low ID", "coherence high ID", "difference"]
    return pd.DataFrame(out, columns=[*columns, "z", "p"])


def low_id_examples(
    ids: Mapping[str, LocalIDs], n_examples: int = 6, n_neighbours: int = 8, seed: int = 0
) -> pd.DataFrame:
    """Example neighbourhoods of the lowest-ID decile, as text (chapter 3).

    For each model, ``n_examples`` tokens drawn at random (seeded) from its
    lowest-ID decile, each with its ``n_neighbours`` nearest neighbours;
    strings are shown with ``repr`` so that leading spaces are visible.

    Returns:
        One row per example: ``model``, ``token``, ``local ID``, ``nearest neighbours``.
    """
    import pandas as pd

    if n_examples < 1 or n_neighbours < 1:
        raise EmbgeoInputError("n_examples and n_neighbours must be positive.")
    out = []
    for name, m in ids.items():
        low = m.order[: max(1, len(m.rows) // 10)]
        pick = np.random.default_rng(seed).choice(low, size=min(n_examples, len(low)), replace=False)
        for p in pick:
            row = int(m.rows[p])
            out.append(
                {
                    "model": name,
                    "token": repr(m.strings.get(row, "")),
                    "local ID": int(m.local_id[p]),
                    "nearest neighbours": ", ".join(
                        repr(m.strings.get(int(j), "?")) for j in m.neighbors[p, :n_neighbours]
                    ),
                }
            )
    return pd.DataFrame(out, columns=["model", "token", "local ID", "nearest neighbours"])
