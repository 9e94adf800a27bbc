"""Intrinsic dimension of whole token-embedding tables, per token and global, across models (chapter 3).

Chapter 3 measures, for every token of a model's input-embedding table, the
local intrinsic dimension (ID) of its neighbourhood, and asks three questions
of it (claim 8 of the ledger): is it far below the width, does a token's ID in
one model predict its ID in another, and are low-ID neighbourhoods coherent.
The estimators live in :mod:`embgeo_utils.intrinsic_dim`, the label statistics
in :mod:`embgeo_utils.coherence`; this module runs them over the tables of
several models and returns tidy tables:

* :func:`per_token_ids`: local PCA ID of each token and of a random
  neighbourhood of the same size (the reference), one :class:`LocalIDs` per model;
* :func:`drop_tokens`: the same IDs without some tokens (the under-trained ones,
  :mod:`embgeo_utils.undertrained`);
* :func:`token_frame`, :func:`id_summary`: those IDs as tables;
* :func:`id_correlations`: Spearman of per-token ID across model pairs, with a
  permutation null;
* :func:`global_ids`: TwoNN and the GRIDE scale curve of each table;
* :func:`check_claim8`: the verdict of claim 8.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared Global and Local
    Geometry of Language Model Embeddings, arXiv:2503.21073.

    E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), Sci. Rep. 7, 12140 (TwoNN).

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), Sci. Rep. 12, 20005 (GRIDE).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import intrinsic_dim, labels, lle, neighbors, stats, vocab
from .cache import array_digest, cache_dir, content_key, load_arrays, save_arrays
from .device import NUMPY_CHUNK_BYTES, chunk_rows, get_device
from .errors import EmbgeoInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COHERENCE_LABEL",
    "LocalIDs",
    "check_claim8",
    "correlation_summary",
    "drop_tokens",
    "failing_checks",
    "global_ids",
    "id_correlations",
    "id_summary",
    "per_token_ids",
    "token_frame",
    "tokens_to_evaluate",
]

ArrayLike = np.ndarray | torch.Tensor

#: The label whose neighbourhood agreement claim 8 tests (see :func:`embgeo_utils.coherence.coherence_table`).
COHERENCE_LABEL = "kind + capitalised"


@dataclass(frozen=True)
class LocalIDs:
    """Per-token local IDs of one embedding table (chapter 3).

    Attributes:
        model: the model's name.
        rows: sorted token ids that got an ID (rows of the table).
        local_id: local PCA ID of each token's nearest-neighbour neighbourhood, row for row.
        random_id: local PCA ID of the token plus ``k`` random tokens of the same table (the reference).
        neighbors: ``(len(rows), k)`` nearest neighbours of each token (rows of the table), nearest first.
        order: positions into ``rows`` sorted by ``local_id``, ties broken at random (seeded);
            its first tenth is the lowest-ID decile.
        common_rows: token ids of the strings shared by every model, in the order of the common sample.
        strings: normalised string of every alignable token id of the table.
        width: the table's width ``d``.
        n_table_rows: the table's number of rows.
        n_alignable: tokens of the table that have a normalised string (the vocabulary sampled from).
        seconds: wall time of the neighbour search and of the two local PCAs.
    """

    model: str
    rows: np.ndarray
    local_id: np.ndarray
    random_id: np.ndarray
    neighbors: np.ndarray
    order: np.ndarray
    common_rows: np.ndarray
    strings: dict[int, str]
    width: int
    n_table_rows: int
    n_alignable: int
    seconds: tuple[float, float] = (0.0, 0.0)

    def common_index(self) -> np.ndarray:
        """Position of each evaluated token in the common sample, -1 for tokens outside it."""
        out = np.full(len(self.rows), -1, dtype=np.int64)
        out[np.searchsorted(self.rows, self.common_rows)] = np.arange(len(self.common_rows))
        return out

    def frame(self, strata: bool = False) -> pd.DataFrame:
        """One row per evaluated token: model, token id, text, width, local ID, random ID, common index.

        With ``strata``, also the word-frequency stratum (:func:`embgeo_utils.labels.frequency_strata`).
        """
        import pandas as pd

        text = [self.strings.get(int(r), "") for r in self.rows]
        data = {
            "model": self.model,
            "token": self.rows,
            "text": text,
            "width": self.width,
            "local ID": self.local_id,
            "random ID": self.random_id,
            "common index": self.common_index(),
        }
        if strata:
            data["Zipf stratum"] = labels.frequency_strata(text)
        return pd.DataFrame(data)


def tokens_to_evaluate(
    vocabulary_size: int,
    id_tokens: int | str = "auto",
    device: str | torch.device = "auto",
    cpu_all_tokens_up_to: int = 50_000,
    cpu_id_tokens: int = 50_000,
) -> int | str:
    """How many tokens of one vocabulary get an ID: ``"all"`` or a number (chapter 3).

    ``id_tokens`` is ``"all"``, a positive number, or ``"auto"``: every token on
    a GPU; on a CPU, every token of a vocabulary of at most
    ``cpu_all_tokens_up_to`` tokens and ``cpu_id_tokens`` tokens of a larger one.

    Raises:
        EmbgeoInputError: on an ``id_tokens`` that is none of these.
    """
    if id_tokens not in ("auto", "all"):
        if isinstance(id_tokens, bool) or not isinstance(id_tokens, (int, np.integer)) or id_tokens < 1:
            raise EmbgeoInputError(
                f"id_tokens must be 'auto', 'all' or a positive number of tokens, got {id_tokens!r}."
            )
        return int(id_tokens)
    if id_tokens == "all":
        return "all"
    if get_device(device).type != "cpu" or vocabulary_size <= cpu_all_tokens_up_to:
        return "all"
    return int(cpu_id_tokens)


def _local_ids(
    name: str,
    table: ArrayLike,
    strings: Mapping[str, int],
    common: Sequence[str],
    how_many: tuple[int | str, int, int],
    k: int,
    variance: float,
    seed: int,
    tie_break: np.random.Generator,
    dev: torch.device,
    use_cache: bool = True,
) -> LocalIDs:
    n_rows, width = int(table.shape[0]), int(table.shape[1])
    strings_by_id = {int(i): s for s, i in strings.items() if i < n_rows}
    ids = np.array(sorted(strings_by_id), dtype=np.int64)
    n_tokens = tokens_to_evaluate(len(ids), how_many[0], dev, how_many[1], how_many[2])
    if n_tokens == "all":
        rows = ids
    else:
        strata = labels.frequency_strata([strings_by_id[i] for i in ids])
        rows = ids[labels.stratified_sample(strata, int(n_tokens), seed=seed)]
    common_rows = np.array([strings[s] for s in common], dtype=np.int64)
    rows = np.union1d(rows, common_rows)
    path = None
    if use_cache:
        key = content_key("local-ids-v1", array_digest(table), array_digest(rows), k, variance, seed, dev.type)
        path = cache_dir("token_ids") / f"{key}.npz"
    cached = load_arrays(path) if path is not None else None
    if cached is not None and {"neighbors", "local_id", "random_id"} <= set(cached):
        nbrs, local_id, random_id = cached["neighbors"], cached["local_id"], cached["random_id"]
        search_s = pca_s = 0.0
    else:
        start = time.perf_counter()
        _, nbrs = neighbors.knn(table, k, device=dev, queries=rows)
        search_s = time.perf_counter() - start
        local_id = intrinsic_dim.local_pca_id(table, k=k, variance=variance, device=dev, rows=rows, indices=nbrs)
        random_hood = lle.random_neighbors(n_rows, k, seed=seed)[rows]
        random_id = intrinsic_dim.local_pca_id(
            table, k=k, variance=variance, device=dev, rows=rows, indices=random_hood
        )
        pca_s = time.perf_counter() - start - search_s
        if path is not None:
            save_arrays(path, {"neighbors": nbrs, "local_id": local_id, "random_id": random_id})
    order = np.argsort(local_id + tie_break.random(len(rows)) * 0.1, kind="stable")
    return LocalIDs(
        model=name, rows=rows, local_id=local_id, random_id=random_id, neighbors=nbrs, order=order,
        common_rows=common_rows, strings=strings_by_id, width=width, n_table_rows=n_rows, n_alignable=len(ids),
        seconds=(search_s, pca_s),
    )  # fmt: skip


def per_token_ids(
    tables: Mapping[str, ArrayLike],
    vocabularies: Mapping[str, Mapping[str, int]],
    k: int = 50,
    variance: float = 0.9,
    id_tokens: int | str = "auto",
    cpu_all_tokens_up_to: int = 50_000,
    cpu_id_tokens: int = 50_000,
    n_common: int = 1500,
    seed: int = 0,
    device: str | torch.device = "auto",
    verbose: bool = True,
    cache: bool = True,
) -> dict[str, LocalIDs]:
    """Local ID of the tokens of each embedding table, and of random neighbourhoods (chapter 3).

    For each model, the tokens that have a normalised string are evaluated: all
    of them, or (see :func:`tokens_to_evaluate`) a sample spread evenly over
    word-frequency strata; on top, ``n_common`` strings present in *every*
    vocabulary (:func:`embgeo_utils.vocab.common_strings`, seeded) are
    evaluated in every model. Neighbours are searched in the whole table
    (``neighbors.knn(table, k, queries=rows)``). The ID is
    :func:`embgeo_utils.intrinsic_dim.local_pca_id` of the token and its ``k``
    nearest neighbours; the reference is the same estimate on the token and
    ``k`` random tokens (``lle.random_neighbors``, seeded).

    One generator seeded with ``seed`` draws the common sample and then, model
    after model, the random tie-break of :attr:`LocalIDs.order`.

    Args:
        tables: model name → ``(vocab, d)`` input-embedding table (``models.input_embeddings``).
        vocabularies: model name → ``{string: token id}`` (``vocab.normalized_vocabulary``).
        k: neighbours per token.
        variance: fraction of variance the local principal components must explain.
        id_tokens, cpu_all_tokens_up_to, cpu_id_tokens: how many tokens get an ID (:func:`tokens_to_evaluate`).
        n_common: strings shared by every vocabulary that get an ID in every model.
        seed: seed of the samples, the random neighbourhoods and the tie-break.
        device: where the neighbour search and PCA run.
        verbose: print one line per model (tokens, median IDs, times).
        cache: keep each model's neighbours and IDs on disk, keyed by the table's
            values, the evaluated rows, ``k``, ``variance``, ``seed`` and the device
            type, so a rerun reads them (times then show 0 s).

    Returns:
        model name → :class:`LocalIDs`, in the order of ``tables``.

    Raises:
        EmbgeoInputError: no table, a table without a vocabulary, or a bad ``id_tokens``.
    """
    if not tables:
        raise EmbgeoInputError("No embedding table given: install at least one model (`make models`).")
    missing = [name for name in tables if name not in vocabularies]
    if missing:
        raise EmbgeoInputError(f"No vocabulary for {missing}; pass vocab.normalized_vocabulary(...) for every table.")
    dev = get_device(device)
    rng = np.random.default_rng(seed)
    common = vocab.common_strings([vocabularies[name] for name in tables], n_common, seed=rng)
    if verbose:
        shared = len(vocab.common_strings([vocabularies[name] for name in tables]))
        print(f"strings in every vocabulary: {shared}; sampled {len(common)}")
    out: dict[str, LocalIDs] = {}
    for name, table in tables.items():
        how_many = (id_tokens, cpu_all_tokens_up_to, cpu_id_tokens)
        ids = _local_ids(name, table, vocabularies[name], common, how_many, k, variance, seed, rng, dev, cache)
        out[name] = ids
        if verbose:
            print(
                f"{name}: {len(ids.rows):,} of {ids.n_alignable:,} tokens, median ID {np.median(ids.local_id):.0f} "
                f"(random neighbourhoods {np.median(ids.random_id):.0f}), d = {ids.width}; "
                f"neighbour search {ids.seconds[0]:.0f} s, local PCA {ids.seconds[1]:.0f} s"
            )
    return out


def drop_tokens(ids: Mapping[str, LocalIDs], drop: Mapping[str, np.ndarray]) -> dict[str, LocalIDs]:
    """The evaluated tokens of each model without the rows in ``drop`` (chapter 3: under-trained tokens out).

    Each model keeps its evaluated tokens outside ``drop[model]`` with their IDs
    and neighbourhoods unchanged (neighbours are still the nearest rows of the
    whole table); :attr:`LocalIDs.order` keeps its order (and tie-break) among
    the kept tokens. The common sample keeps the strings whose token is kept in
    *every* model, so that the cross-model correlation compares the same tokens.

    Args:
        ids: :func:`per_token_ids`.
        drop: model name → row indices (or a bool mask over the table) to leave out; a model
            missing from it keeps every token.

    Returns:
        model name → :class:`LocalIDs`, in the order of ``ids``.

    Raises:
        EmbgeoInputError: when a model would keep no token.
    """
    masks = {}
    for name, m in ids.items():
        rows = np.asarray(drop.get(name, np.empty(0, dtype=np.int64)))
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        masks[name] = ~np.isin(m.rows, rows)
        if not masks[name].any():
            raise EmbgeoInputError(f"Dropping those tokens leaves no evaluated token of {name}.")
    common_ok: np.ndarray | None = None
    for name, m in ids.items():
        ok = masks[name][np.searchsorted(m.rows, m.common_rows)]
        common_ok = ok if common_ok is None else common_ok & ok
    out: dict[str, LocalIDs] = {}
    for name, m in ids.items():
        keep = masks[name]
        new_position = np.cumsum(keep) - 1
        order = new_position[m.order[keep[m.order]]]
        out[name] = LocalIDs(
            model=m.model, rows=m.rows[keep], local_id=m.local_id[keep], random_id=m.random_id[keep],
            neighbors=m.neighbors[keep], order=order,
            common_rows=m.common_rows[common_ok] if common_ok is not None else m.common_rows,
            strings=m.strings, width=m.width, n_table_rows=m.n_table_rows, n_alignable=m.n_alignable,
            seconds=m.seconds,
        )  # fmt: skip
    return out


def token_frame(ids: Mapping[str, LocalIDs], strata: bool = True) -> pd.DataFrame:
    """All evaluated tokens of all models, one row each (chapter 3; see :meth:`LocalIDs.frame`)."""
    import pandas as pd

    if not ids:
        raise EmbgeoInputError("No model's IDs given; run per_token_ids first.")
    return pd.concat([m.frame(strata=strata) for m in ids.values()], ignore_index=True)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EmbgeoInputError(f"{what} lacks the columns {missing}; build it with the chapter-3 functions.")


def id_summary(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per model: width, tokens, median / mean / 10th / 90th percentile of the local ID, and the reference (chapter 3).

    Args:
        tokens: :func:`token_frame`.

    Returns:
        One row per model (index ``model``): ``width d``, ``tokens``, ``median ID``, ``mean ID``,
        ``10th pct``, ``90th pct``, ``median ID, random neighbourhoods``, ``median ID / d``.
    """
    import pandas as pd

    _require(tokens, ("model", "width", "local ID", "random ID"), "tokens")
    rows = []
    for name, group in tokens.groupby("model", sort=False):
        local, width = group["local ID"].to_numpy(), int(group["width"].iloc[0])
        rows.append(
            {
                "model": name,
                "width d": width,
                "tokens": len(group),
                "median ID": float(np.median(local)),
                "mean ID": float(np.mean(local)),
                "10th pct": float(np.percentile(local, 10)),
                "90th pct": float(np.percentile(local, 90)),
                "median ID, random neighbourhoods": float(np.median(group["random ID"].to_numpy())),
                "median ID / d": float(np.median(local) / width),
            }
        )
    return pd.DataFrame(rows).set_index("model")


def _centred_ranks(values: np.ndarray, what: str) -> np.ndarray:
    from scipy.stats import rankdata

    ranks = rankdata(values).astype(np.float64)
    ranks -= ranks.mean()
    norm = float(np.sqrt(ranks @ ranks))
    if norm == 0:
        raise EmbgeoInputError(f"Every common token has the same ID in {what}; a rank correlation is undefined.")
    return ranks / norm


def id_correlations(tokens: pd.DataFrame, n_permutations: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Spearman correlation of per-token ID across every pair of models, with a permutation null (chapter 3).

    For models A and B, the IDs of the tokens of the common sample (column
    ``common index`` of :func:`token_frame`, matched by string) are
    rank-correlated. The null re-pairs B's IDs with A's at random: permutation
    ``t`` is the ``t``-th ``rng.permutation`` of a numpy generator seeded with
    ``seed`` (the stream ``similarity.permutation_test`` draws); the p-value is
    one-sided, ``(1 + #{null >= observed}) / (1 + n_permutations)``
    (:func:`embgeo_utils.stats.from_null`).

    Args:
        tokens: :func:`token_frame` of at least two models.
        n_permutations: permutations of the null.
        seed: seed of the permutations.

    Returns:
        One row per pair: ``model A``, ``model B``, ``tokens``, ``Spearman``, ``null mean``, ``null std``,
        ``z``, ``p``. Empty (with these columns) for a single model.

    Raises:
        EmbgeoInputError: missing columns, models with different common samples, fewer than 3 common tokens.
    """
    import pandas as pd

    _require(tokens, ("model", "local ID", "common index"), "tokens")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 1:
        raise EmbgeoInputError(f"n_permutations must be a positive integer, got {n_permutations!r}.")
    common = tokens[tokens["common index"] >= 0]
    by_model = {
        name: g.sort_values("common index")["local ID"].to_numpy(dtype=np.float64)
        for name, g in common.groupby("model", sort=False)
    }
    names = [n for n in pd.unique(tokens["model"]) if n in by_model]
    sizes = {len(v) for v in by_model.values()}
    if len(sizes) > 1:
        raise EmbgeoInputError(f"The models hold common samples of different sizes {sorted(sizes)}; use one sample.")
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = by_model[a], by_model[b]
            if len(x) < 3:
                raise EmbgeoInputError(f"Only {len(x)} common tokens: raise n_common to at least 3.")
            rx, ry = _centred_ranks(x, a), _centred_ranks(y, b)
            rng = np.random.default_rng(seed)
            null = np.empty(n_permutations)
            step = chunk_rows(8 * len(y), budget_bytes=NUMPY_CHUNK_BYTES)
            for start in range(0, n_permutations, step):
                stop = min(n_permutations, start + step)
                perms = np.stack([rng.permutation(len(y)) for _ in range(stop - start)])
                null[start:stop] = ry[perms] @ rx
            res = stats.from_null(float(rx @ ry), null)
            rows.append(
                {
                    "model A": a,
                    "model B": b,
                    "tokens": len(x),
                    "Spearman": res.statistic,
                    "null mean": res.null_mean,
                    "null std": res.null_std,
                    "z": res.z,
                    "p": res.p_value,
                }
            )
    columns = ["model A", "model B", "tokens", "Spearman", "null mean", "null std", "z", "p"]
    return pd.DataFrame(rows, columns=columns)


def global_ids(
    tables: Mapping[str, ArrayLike],
    n_points: int = 4000,
    seed: int = 0,
    max_scale: int = 512,
    device: str | torch.device = "auto",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Global ID of each embedding table: TwoNN and the GRIDE scale curve on a random sample of rows (chapter 3).

    Each table gives ``min(n_points, rows)`` rows drawn without replacement with
    a generator seeded with ``seed``;
    :func:`embgeo_utils.intrinsic_dim.twonn` and
    :func:`embgeo_utils.intrinsic_dim.gride_scaling` (ranks ``n2 = 2, 4, ...``
    up to ``min(max_scale, points // 4)``) run on them, duplicate rows removed.

    Returns:
        ``(summary, curves)``: one row per model (index ``model``: ``points``, ``TwoNN``, ``GRIDE n2=2``,
        ``GRIDE max over scales``, ``width d``) and the tidy scale curves (``model``, ``n2``, ``ID``, ``error``).

    Raises:
        EmbgeoInputError: no table, ``n_points`` below 8, or too few distinct rows.
    """
    import pandas as pd

    if not tables:
        raise EmbgeoInputError("No embedding table given: install at least one model (`make models`).")
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 8:
        raise EmbgeoInputError(f"n_points must be an integer of at least 8, got {n_points!r}.")
    dev = get_device(device)
    summary, curves = [], []
    for name, table in tables.items():
        n_rows = int(table.shape[0])
        pick = np.sort(np.random.default_rng(seed).choice(n_rows, size=min(n_points, n_rows), replace=False))
        X = table[pick]
        scales, ids_g, errs = intrinsic_dim.gride_scaling(X, max_scale=min(max_scale, len(pick) // 4), device=dev)
        summary.append(
            {
                "model": name,
                "points": len(pick),
                "TwoNN": intrinsic_dim.twonn(X, device=dev),
                "GRIDE n2=2": float(ids_g[0]),
                "GRIDE max over scales": float(ids_g.max()),
                "width d": int(table.shape[1]),
            }
        )
        curves.append(pd.DataFrame({"model": name, "n2": scales, "ID": ids_g, "error": errs}))
    return pd.DataFrame(summary).set_index("model"), pd.concat(curves, ignore_index=True)


def correlation_summary(correlations: pd.DataFrame) -> dict[str, float | int | None]:
    """Median, smallest and largest Spearman over the model pairs of :func:`id_correlations` (chapter 3's ledger row).

    Returns:
        ``{"median": ..., "min": ..., "max": ..., "pairs": ..., "pairs significant": ...}`` (significant: raw
        ``p < 0.01``); values are None when there is no pair.
    """
    _require(correlations, ("Spearman", "p"), "correlations")
    rho = correlations["Spearman"].to_numpy(dtype=np.float64)
    if len(rho) == 0:
        return {"median": None, "min": None, "max": None, "pairs": 0, "pairs significant": 0}
    return {
        "median": float(np.median(rho)),
        "min": float(rho.min()),
        "max": float(rho.max()),
        "pairs": len(rho),
        "pairs significant": int((correlations["p"].to_numpy() < 0.01).sum()),
    }


def failing_checks(verdict: stats.Verdict) -> list[str]:
    """Names of the checks of a verdict that do not hold (for the ledger's details; every chapter)."""
    return [c.name for c, ok in zip(verdict.checks, verdict.holds, strict=True) if not ok]


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def check_claim8(
    tokens: pd.DataFrame,
    semantic: pd.DataFrame,
    correlations: pd.DataFrame,
    alpha: float = 0.01,
    correction: str = "holm",
) -> stats.Verdict:
    """The verdict of claim 8 (chapter 3): per-token ID ≪ d, low-ID neighbourhoods coherent, ID shared across models.

    The chapter passes the tables of the *trained* tokens (under-trained ones
    dropped, :func:`drop_tokens`). Checks, declared before the data are seen
    (one per model or pair):

    1. **ID ≪ d**, per model: effect ``d / 10 − median local ID`` (minimum 0:
       the median is below a tenth of the width); p-value: one-sided
       Mann–Whitney test that the local IDs are smaller than the IDs of random
       neighbourhoods of the same tokens (``scipy.stats.mannwhitneyu``,
       ``alternative="less"``) — the reference matters because ``k`` caps the ID.
    2. **Semantic coherence**, per model whose row is ``independent`` (the
       encoder is not the model under study): effect = the stratified
       difference in encoder similarity between the lowest- and highest-ID
       deciles (column ``difference`` of
       :func:`embgeo_utils.coherence.semantic_coherence`; minimum 0); p-value:
       its stratified permutation p.
    3. **Cross-model agreement**, per pair: effect = Spearman of per-token ID on
       the common tokens (minimum 0); p-value: its permutation p
       (:func:`id_correlations`).

    The surface-label coherence (:data:`COHERENCE_LABEL`) is a secondary result and not a check.
    The p-values are adjusted together with ``correction`` (Holm by default) and
    :func:`embgeo_utils.stats.verdict` gives the verdict at ``alpha``.

    Args:
        tokens: :func:`token_frame` (``model``, ``width``, ``local ID``, ``random ID``).
        semantic: :func:`embgeo_utils.coherence.semantic_coherence` (``model``, ``independent``,
            ``difference``, ``p``, ``tokens per group``).
        correlations: :func:`id_correlations` (``model A``, ``model B``, ``tokens``, ``Spearman``, ``p``).
        alpha: significance level.
        correction: ``"holm"``, ``"bonferroni"`` or ``"none"``.

    Returns:
        :class:`~embgeo_utils.stats.Verdict`; ``.table()`` lists the checks.

    Raises:
        EmbgeoInputError: missing columns or no token.
    """
    from scipy.stats import mannwhitneyu

    _require(tokens, ("model", "width", "local ID", "random ID"), "tokens")
    _require(semantic, ("model", "independent", "difference", "p", "tokens per group"), "semantic")
    _require(correlations, ("model A", "model B", "tokens", "Spearman", "p"), "correlations")
    if tokens.empty:
        raise EmbgeoInputError("tokens is empty; run per_token_ids on at least one model.")
    checks = []
    for name, group in tokens.groupby("model", sort=False):
        local = group["local ID"].to_numpy(dtype=np.float64)
        reference = group["random ID"].to_numpy(dtype=np.float64)
        width = float(group["width"].iloc[0])
        p = float(mannwhitneyu(local, reference, alternative="less").pvalue)
        checks.append(
            stats.Check(
                f"{name}: ID ≪ d (d/10 − median ID; Mann–Whitney vs random neighbourhoods)",
                width / 10 - float(np.median(local)),
                p,
                0.0,
                len(group),
                # large-sample standard error of a median, sqrt(pi/2) * sd / sqrt(n)
                float(np.sqrt(np.pi / 2) * local.std(ddof=1) / np.sqrt(len(local))) if len(local) > 1 else None,
            )
        )
    for row in semantic[semantic["independent"].astype(bool)].to_dict(orient="records"):
        checks.append(
            stats.Check(
                f"{row['model']}: low-ID neighbourhoods semantically more coherent than high-ID (stratified)",
                float(row["difference"]),
                float(row["p"]),
                0.0,
                int(row["tokens per group"]),
                _finite(row.get("null std")),
            )
        )
    for row in correlations.to_dict(orient="records"):
        checks.append(
            stats.Check(
                f"{row['model A']} vs {row['model B']}: per-token ID correlates (Spearman)",
                float(row["Spearman"]),
                float(row["p"]),
                0.0,
                int(row["tokens"]),
                _finite(row.get("null std")),
            )
        )
    return stats.verdict(checks, alpha=alpha, correction=correction)
