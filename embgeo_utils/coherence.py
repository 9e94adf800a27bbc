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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import labels, stats
from .cache import atomic_path, cache_dir
from .device import NUMPY_CHUNK_BYTES, chunk_rows
from .errors import EmbgeoInputError
from .token_dimension import COHERENCE_LABEL, LocalIDs

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CoherenceResult",
    "coherence_table",
    "coherence_test",
    "extreme_id_examples",
    "low_id_examples",
    "neighbor_label_agreement",
    "semantic_coherence",
    "stratified_difference_test",
    "string_encoder",
]


def _check_ids(ids: Mapping[str, Any], coherence_k: int) -> None:
    """The per-token IDs are there and ``coherence_k`` fits their neighbour lists."""
    if not ids:
        raise EmbgeoInputError("No model's IDs given; run token_dimension.per_token_ids first.")
    for m in ids.values():
        if isinstance(coherence_k, bool) or not 1 <= coherence_k <= m.neighbors.shape[1]:
            raise EmbgeoInputError(f"coherence_k must lie in [1, {m.neighbors.shape[1]}] (the k of the IDs).")


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

    _check_ids(ids, coherence_k)
    out = []
    for name, m in ids.items():
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


def stratified_difference_test(
    values: np.ndarray | Sequence[float],
    low: np.ndarray | Sequence[bool],
    strata: np.ndarray | Sequence[Any],
    n: int = 1000,
    seed: int = 0,
) -> CoherenceResult:
    """Is a per-token value larger in group ``low`` than in the rest, *within* strata? (chapter 3)

    The statistic is the weighted mean over strata of ``mean(low) - mean(rest)``
    with weights ``n_low * n_rest / (n_low + n_rest)`` (the usual weights of a
    stratified two-sample comparison); strata holding only one group are left
    out. The null shuffles group membership within each stratum, ``n`` times
    (a numpy generator seeded with ``seed``); the p-value is one-sided,
    ``(1 + #{null >= observed}) / (1 + n)``. ``low_mean`` and ``high_mean`` are
    the plain means of the two groups over the strata used.

    Args:
        values: ``(m,)`` per-token values.
        low: ``(m,)`` bool, True for the tokens of the first group (the rest is the second).
        strata: ``(m,)`` stratum label of each token.
        n: permutations.
        seed: seed of the permutations.

    Raises:
        EmbgeoInputError: when no stratum holds both groups, or a non-positive ``n``.
    """
    vals = np.asarray(values, dtype=float)
    grp = np.asarray(low, dtype=bool)
    lab = np.asarray(strata).astype(str)
    if not (len(vals) == len(grp) == len(lab)):
        raise EmbgeoInputError("values, low and strata need one entry per token.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EmbgeoInputError(f"n (number of permutations) must be a positive integer, got {n!r}.")
    rng = np.random.default_rng(seed)
    observed, null, total = 0.0, np.zeros(n), 0.0
    used = np.zeros(len(vals), dtype=bool)
    for stratum in np.unique(lab):
        where = np.flatnonzero(lab == stratum)
        v, g = vals[where], grp[where]
        n_low = int(g.sum())
        if n_low == 0 or n_low == len(v):
            continue
        used[where] = True
        weight = n_low * (len(v) - n_low) / len(v)
        total += weight
        observed += weight * (v[g].mean() - v[~g].mean())
        shuffled = v[np.argsort(rng.random((n, len(v))), axis=1)]
        null += weight * (shuffled[:, :n_low].mean(axis=1) - shuffled[:, n_low:].mean(axis=1))
    if total == 0:
        raise EmbgeoInputError("No stratum holds tokens of both groups; use coarser strata or more tokens.")
    res = stats.from_null(observed / total, null / total)
    return CoherenceResult(
        float(vals[used & grp].mean()), float(vals[used & ~grp].mean()), res.statistic, res.null_mean,
        res.null_std, res.z, res.p_value, int((used & grp).sum()), int((used & ~grp).sum()), int(n),
    )  # fmt: skip


def string_encoder(
    name: str = "minilm-l6", batch_size: int = 256, use_cache: bool = True, folder: Path | None = None
) -> Callable[..., np.ndarray]:
    """A function mapping strings to unit-norm sentence embeddings of the encoder ``name`` (chapter 3).

    Embeddings are mean-pooled last hidden states (``steering.sentence_embeddings``), computed
    with strings sorted by length (less padding) and cached per string in ``<folder>/<name>.npz``
    (default folder ``~/.cache/embgeo/string_embeddings``) so that a rerun encodes nothing new.
    """
    from . import models, steering

    path = (folder or cache_dir("string_embeddings")) / f"{name.replace('/', '_')}.npz"
    store: dict[str, np.ndarray] = {}
    if use_cache and path.exists():
        with np.load(path, allow_pickle=False) as data:
            store = dict(zip(data["strings"].tolist(), data["vectors"], strict=True))
    loaded: list[Any] = []

    def encode(strings: Sequence[str]) -> np.ndarray:
        todo = sorted({s for s in strings if s not in store}, key=len)
        if todo:
            if not loaded:
                loaded.append(models.load(name, device="cpu"))
            vectors = steering.sentence_embeddings(loaded[0], todo, batch_size=batch_size)
            store.update(zip(todo, vectors, strict=True))
            if use_cache:
                keys = list(store)
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, strings=np.array(keys), vectors=np.stack([store[k] for k in keys]))
        return np.stack([store[s] for s in strings]) if strings else np.empty((0, 0))

    return encode


def semantic_coherence(
    ids: Mapping[str, LocalIDs],
    encode: Callable[[Sequence[str]], np.ndarray],
    encoder_name: str = "minilm-l6",
    coherence_k: int = 10,
    n_tokens: int = 200,
    n_reference: int = 500,
    n_permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Semantic coherence of low- against high-ID neighbourhoods, measured by a separate encoder (chapter 3).

    For each model, ``n_tokens`` tokens are drawn (seeded) from the lowest-ID
    decile and as many from the highest-ID decile of its evaluated tokens
    (:attr:`LocalIDs.order`). A token's value is the mean cosine, under
    ``encode``, between its string and the strings of its ``coherence_k``
    nearest neighbours in the model's table (neighbours without a string are
    skipped), minus its mean cosine to the strings of ``n_reference`` random
    evaluated tokens of the same model (its chance level). The deciles are
    compared within strata of word frequency x token kind
    (:func:`embgeo_utils.labels.frequency_strata`, :func:`embgeo_utils.labels.token_labels`)
    by :func:`stratified_difference_test`.

    The encoder should not be the model under study: the ``independent`` column is False
    for the model named ``encoder_name``, whose row is descriptive only.

    Args:
        ids: model name → :class:`~embgeo_utils.token_dimension.LocalIDs` (usually without under-trained tokens).
        encode: strings → ``(n, e)`` unit-norm embeddings (:func:`string_encoder`).
        encoder_name: the encoder's name (for the table and the independence flag).
        coherence_k: nearest neighbours compared with the token.
        n_tokens: tokens drawn from each decile.
        n_reference: random tokens of the chance level.
        n_permutations: permutations of the stratified null.
        seed: seed of the draws and the permutations.

    Returns:
        One row per model: ``model``, ``encoder``, ``independent``, ``tokens per group``, ``strata``,
        ``similarity low ID``, ``similarity high ID``, ``difference`` (stratified), ``unstratified difference``,
        ``z``, ``p``.

    Raises:
        EmbgeoInputError: no model, or ``coherence_k`` outside ``[1, k]``.
    """
    import pandas as pd

    _check_ids(ids, coherence_k)
    out = []
    for name, m in ids.items():
        rng = np.random.default_rng(seed)
        n_dec = max(1, len(m.rows) // 10)
        low = rng.choice(m.order[:n_dec], size=min(n_tokens, n_dec), replace=False)
        high = rng.choice(m.order[-n_dec:], size=min(n_tokens, n_dec), replace=False)
        picked = np.concatenate([low, high])
        pool = rng.choice(len(m.rows), size=min(n_reference, len(m.rows)), replace=False)
        text = [m.strings.get(int(m.rows[p]), "") for p in picked]
        hood = [[m.strings.get(int(j), "") for j in m.neighbors[p, :coherence_k]] for p in picked]
        pool_text = [m.strings.get(int(m.rows[p]), "") for p in pool]
        vocab = sorted({*text, *pool_text, *(s for row in hood for s in row)} - {""})
        position = {s: i for i, s in enumerate(vocab)}
        emb = encode(vocab)
        tok = emb[[position.get(s, 0) for s in text]]
        chance = tok @ emb[[position[s] for s in pool_text if s]].T
        values = np.empty(len(picked))
        for i, row in enumerate(hood):
            nb = [position[s] for s in row if s]
            values[i] = (emb[nb] @ tok[i]).mean() - chance[i].mean() if nb and text[i] else np.nan
        lab = labels.token_labels(text)
        strata = np.array([f"{z}|{kd}" for z, kd in zip(labels.frequency_strata(text), lab.kind, strict=True)])
        is_low = np.arange(len(picked)) < len(low)
        ok = ~np.isnan(values)
        res = stratified_difference_test(values[ok], is_low[ok], strata[ok], n=n_permutations, seed=seed)
        plain = float(values[ok & is_low].mean() - values[ok & ~is_low].mean())
        out.append(
            {
                "model": name,
                "encoder": encoder_name,
                "independent": name != encoder_name,
                "tokens per group": min(res.n_low, res.n_high),
                "strata": int(len(np.unique(strata[ok]))),
                "similarity low ID": res.low_mean,
                "similarity high ID": res.high_mean,
                "difference": res.difference,
                "unstratified difference": plain,
                "null std": res.null_std,
                "z": res.z,
                "p": res.p_value,
            }
        )
    columns = ["model", "encoder", "independent", "tokens per group", "strata", "similarity low ID"]
    return pd.DataFrame(
        out, columns=[*columns, "similarity high ID", "difference", "unstratified difference", "null std", "z", "p"]
    )


def extreme_id_examples(
    ids: Mapping[str, LocalIDs], n_low: int = 8, n_high: int = 3, n_neighbours: int = 8, low_fraction: float = 0.01
) -> pd.DataFrame:
    """The lowest- and highest-ID neighbourhoods of each model, picked by a fixed rule (chapter 3).

    Rule (no hand-picking, no randomness beyond the seeded tie-break of
    :attr:`LocalIDs.order`): ``n_low`` tokens at evenly spaced ranks through the
    lowest ``low_fraction`` of evaluated tokens by ID (the first is the lowest),
    and the ``n_high`` highest-ID tokens. Strings are shown with ``repr`` so
    that leading spaces are visible.

    Returns:
        One row per example: ``model``, ``group`` (``"lowest ID"`` / ``"highest ID"``), ``token``,
        ``local ID``, ``nearest neighbours``.
    """
    import pandas as pd

    if n_low < 1 or n_high < 0 or n_neighbours < 1 or not 0 < low_fraction <= 1:
        raise EmbgeoInputError("n_low and n_neighbours must be positive, n_high >= 0, low_fraction in (0, 1].")
    out = []
    for name, m in ids.items():
        span = max(1, int(round(len(m.rows) * low_fraction)))
        ranks = np.unique(np.linspace(0, span - 1, min(n_low, span)).round().astype(int))
        chosen = [("lowest ID", int(m.order[r])) for r in ranks]
        chosen += [("highest ID", int(p)) for p in m.order[::-1][: min(n_high, len(m.rows))]]
        for group, p in chosen:
            out.append(
                {
                    "model": name,
                    "group": group,
                    "token": repr(m.strings.get(int(m.rows[p]), "")),
                    "local ID": int(m.local_id[p]),
                    "nearest neighbours": ", ".join(
                        repr(m.strings.get(int(j), "?")) for j in m.neighbors[p, :n_neighbours]
                    ),
                }
            )
    return pd.DataFrame(out, columns=["model", "group", "token", "local ID", "nearest neighbours"])
