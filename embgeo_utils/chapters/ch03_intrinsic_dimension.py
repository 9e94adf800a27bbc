"""Chapter 3, intrinsic dimension of token embeddings: how many dimensions does a token's neighbourhood use?

For every token of a model's input-embedding table the chapter measures the local intrinsic dimension (ID) of its
``k`` nearest neighbours by local PCA, against the same estimate on ``k`` random tokens (the reference, since ``k``
caps the ID), and asks the three questions of claim 8: is the per-token ID far below the width, does a token's ID
in one model predict its ID in another, and are low-ID neighbourhoods coherent, judged by a separate sentence
encoder. Under-trained tokens (:mod:`embgeo_utils.lm.undertrained`) are left out of every test. Beside the
per-token IDs, TwoNN and the GRIDE scale curve give each table's global ID.

The stages, in the notebook's order:

* :func:`per_token_ids`: the local ID of the evaluated tokens of each table and of random neighbourhoods, one
  :class:`LocalIDs` per model (neighbours and IDs cached by :func:`neighbourhood_ids`); :func:`drop_tokens` leaves
  out the under-trained ones; :func:`token_frame` and :func:`id_summary` turn them into tables;
* :func:`id_correlations`: Spearman of per-token ID across model pairs with a permutation null, summarised by
  :func:`correlation_summary` (a :class:`CorrelationSummary`);
* :func:`semantic_coherence`: encoder similarity of the lowest- against the highest-ID decile's neighbourhoods,
  compared within strata (:func:`stratified_difference_test`), the encoder from :func:`string_encoder` (its
  embeddings cached by :func:`string_embeddings`); :func:`coherence_table` is the secondary surface-label version
  (:func:`neighbor_label_agreement`, :func:`coherence_test`); :func:`extreme_id_examples` and
  :func:`low_id_examples` show neighbourhoods as text;
* :func:`global_ids`: TwoNN and GRIDE of each table (a :class:`GlobalIDs`);
* :func:`check_claim8`: the verdict of claim 8;
* the chapter's figures, ``plot_*``.

The stages take the chapter's :class:`Parameters` (the notebook's cell tagged ``parameters``).

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared Global and Local
    Geometry of Language Model Embeddings, arXiv:2503.21073.

    S. Land, M. Bartolo (2024), Fishing for Magikarp: Automatically Detecting
    Under-trained Tokens in Large Language Models, arXiv:2405.05417.

    E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), Sci. Rep. 7, 12140 (TwoNN).

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), Sci. Rep. 12, 20005 (GRIDE).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core import stats
from ..core.cache import cached
from ..core.device import NUMPY_CHUNK_BYTES, chunk_rows, get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import LOG
from ..geometry import intrinsic_dim, lle, neighbors
from ..lm import labels, models, steering, vocab
from .style import COLUMN_INCHES, MAX_PANELS_ACROSS, model_colors, need_columns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CHAPTER",
    "COHERENCE_LABEL",
    "CoherenceResult",
    "CorrelationSummary",
    "GlobalIDs",
    "LocalIDs",
    "Parameters",
    "SEMANTIC_COLUMNS",
    "TITLE",
    "check_claim8",
    "coherence_table",
    "coherence_test",
    "correlation_summary",
    "drop_tokens",
    "extreme_id_examples",
    "failing_checks",
    "global_ids",
    "id_correlations",
    "id_summary",
    "low_id_examples",
    "neighbor_label_agreement",
    "neighbourhood_ids",
    "per_token_ids",
    "plot_embedding_gride_curves",
    "plot_neighbourhood_coherence_bars",
    "plot_semantic_coherence_bars",
    "plot_token_id_by_frequency",
    "plot_token_id_correlation_heatmap",
    "plot_token_id_distributions",
    "plot_undertrained_id_histograms",
    "semantic_coherence",
    "stratified_difference_test",
    "string_embeddings",
    "string_encoder",
    "token_frame",
    "tokens_to_evaluate",
]


CHAPTER = "ch03_intrinsic_dimension"
TITLE = "Intrinsic dimension of token embeddings"


@dataclass(frozen=True)
class Parameters:
    """Chapter 3's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_names: list[str]
    k: int
    variance: float
    id_tokens: int | str
    cpu_all_tokens_up_to: int
    cpu_id_tokens: int
    n_common: int
    coherence_k: int
    n_permutations: int
    global_points: int
    alpha: float
    seed: int
    device: str
    count_sources: list[str] | None
    semantic_encoder: str
    semantic_tokens: int

    def models(self) -> list[str]:
        """The models whose embedding tables the chapter measures (``model_names``), in order."""
        return list(self.model_names)


ArrayLike = np.ndarray | torch.Tensor


#: The surface label of :func:`coherence_table`'s main comparison (claim 8's secondary result, not one of its checks).
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
        seconds: wall time of the neighbour search and of the two local PCAs when they were computed (a result read
            from the cache keeps the times of the run that computed it).
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

        With ``strata``, also the word-frequency stratum (:func:`embgeo_utils.lm.labels.frequency_strata`).
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


def _evaluated_rows(
    strings_by_id: Mapping[int, str], common_rows: np.ndarray, p: Parameters, dev: torch.device
) -> np.ndarray:
    """Chapter 3: the sorted token ids of one table that get an ID: a sample (or all) of the alignable ones, and the
    common sample."""
    ids = np.array(sorted(strings_by_id), dtype=np.int64)
    n_tokens = tokens_to_evaluate(len(ids), p.id_tokens, dev, p.cpu_all_tokens_up_to, p.cpu_id_tokens)
    if n_tokens == "all":
        rows = ids
    else:
        strata = labels.frequency_strata([strings_by_id[i] for i in ids])
        rows = ids[labels.stratified_sample(strata, int(n_tokens), seed=p.seed)]
    return np.union1d(rows, common_rows)


@cached("token_ids", version=1)
def neighbourhood_ids(
    table: ArrayLike, rows: np.ndarray, k: int, variance: float, seed: int, device: torch.device
) -> dict[str, Any]:
    """Chapter 3, cached: the nearest neighbours and local IDs of the ``rows`` of one embedding table.

    Neighbours are searched in the whole table (``neighbors.knn(table, k, queries=rows)``); the ID is
    :func:`embgeo_utils.geometry.intrinsic_dim.local_pca_id` of each token and its ``k`` nearest neighbours at
    ``variance``, the reference the same estimate on the token and ``k`` random rows of the table
    (``lle.random_neighbors(n_rows, k, seed)``). The cache key holds the table's and the rows' values, ``k``,
    ``variance``, ``seed`` and the device type.

    Returns:
        ``neighbors`` (``(len(rows), k)`` rows of the table, nearest first), ``local_id`` and ``random_id`` (one per
        row), and ``seconds``: the wall time of the neighbour search and of the two local PCAs when they were
        computed.
    """
    n_rows = int(table.shape[0])
    start = time.perf_counter()
    _, nbrs = neighbors.knn(table, k, device=device, queries=rows)
    search_s = time.perf_counter() - start
    local_id = intrinsic_dim.local_pca_id(table, k=k, variance=variance, device=device, rows=rows, indices=nbrs)
    random_hood = lle.random_neighbors(n_rows, k, seed=seed)[rows]
    random_id = intrinsic_dim.local_pca_id(table, k=k, variance=variance, device=device, rows=rows, indices=random_hood)
    pca_s = time.perf_counter() - start - search_s
    return {"neighbors": nbrs, "local_id": local_id, "random_id": random_id, "seconds": (search_s, pca_s)}


def _local_ids(
    name: str,
    table: ArrayLike,
    strings: Mapping[str, int],
    common: Sequence[str],
    p: Parameters,
    tie_break: np.random.Generator,
    dev: torch.device,
    cache: bool,
) -> LocalIDs:
    """Chapter 3: the :class:`LocalIDs` of one table (its evaluated rows, their cached IDs, the seeded order)."""
    n_rows, width = int(table.shape[0]), int(table.shape[1])
    strings_by_id = {int(i): s for s, i in strings.items() if i < n_rows}
    common_rows = np.array([strings[s] for s in common], dtype=np.int64)
    rows = _evaluated_rows(strings_by_id, common_rows, p, dev)
    measure = neighbourhood_ids if cache else neighbourhood_ids.compute
    found = measure(table, rows, p.k, p.variance, p.seed, dev)
    order = np.argsort(found["local_id"] + tie_break.random(len(rows)) * 0.1, kind="stable")
    return LocalIDs(
        model=name, rows=rows, local_id=found["local_id"], random_id=found["random_id"], neighbors=found["neighbors"],
        order=order, common_rows=common_rows, strings=strings_by_id, width=width, n_table_rows=n_rows,
        n_alignable=len(strings_by_id), seconds=(float(found["seconds"][0]), float(found["seconds"][1])),
    )  # fmt: skip


def per_token_ids(
    tables: Mapping[str, ArrayLike],
    vocabularies: Mapping[str, Mapping[str, int]],
    p: Parameters,
    verbose: bool = True,
    cache: bool = True,
) -> dict[str, LocalIDs]:
    """Chapter 3: local ID of the tokens of each embedding table, and of random neighbourhoods.

    For each model, the tokens that have a normalised string are evaluated: all
    of them, or (see :func:`tokens_to_evaluate` with ``p.id_tokens``,
    ``p.cpu_all_tokens_up_to``, ``p.cpu_id_tokens``) a sample spread evenly over
    word-frequency strata; on top, ``p.n_common`` strings present in *every*
    vocabulary (:func:`embgeo_utils.lm.vocab.common_strings`, seeded) are
    evaluated in every model. Neighbours and IDs come from :func:`neighbourhood_ids`
    (``p.k`` neighbours, ``p.variance``, ``p.seed``, on ``p.device``).

    One generator seeded with ``p.seed`` draws the common sample and then, model
    after model, the random tie-break of :attr:`LocalIDs.order`.

    Args:
        tables: model name → ``(vocab, d)`` input-embedding table (``models.input_embeddings``).
        vocabularies: model name → ``{string: token id}`` (``vocab.normalized_vocabulary``).
        p: the chapter's parameters.
        verbose: log one line per model (tokens, median IDs, times).
        cache: read and keep each model's neighbours and IDs in the cache (kind ``token_ids``).

    Returns:
        model name → :class:`LocalIDs`, in the order of ``tables``.

    Raises:
        EmbgeoInputError: no table, a table without a vocabulary, or a bad ``p.id_tokens``.
    """
    if not tables:
        raise EmbgeoInputError("No embedding table given: install at least one model (`make models`).")
    missing = [name for name in tables if name not in vocabularies]
    if missing:
        raise EmbgeoInputError(f"No vocabulary for {missing}; pass vocab.normalized_vocabulary(...) for every table.")
    dev = get_device(p.device)
    rng = np.random.default_rng(p.seed)
    common = vocab.common_strings([vocabularies[name] for name in tables], p.n_common, seed=rng)
    if verbose:
        shared = len(vocab.common_strings([vocabularies[name] for name in tables]))
        LOG.info(f"strings in every vocabulary: {shared}; sampled {len(common)}")
    out: dict[str, LocalIDs] = {}
    for name, table in tables.items():
        ids = _local_ids(name, table, vocabularies[name], common, p, rng, dev, cache)
        out[name] = ids
        if verbose:
            LOG.info(
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


def id_correlations(tokens: pd.DataFrame, p: Parameters) -> pd.DataFrame:
    """Chapter 3: Spearman correlation of per-token ID across every pair of models, with a permutation null.

    For models A and B, the IDs of the tokens of the common sample (column
    ``common index`` of :func:`token_frame`, matched by string) are
    rank-correlated. The null re-pairs B's IDs with A's at random: permutation
    ``t`` is the ``t``-th ``rng.permutation`` of a numpy generator seeded with
    ``p.seed`` (the stream ``similarity.permutation_test`` draws); the p-value is
    one-sided, ``(1 + #{null >= observed}) / (1 + p.n_permutations)``
    (:func:`embgeo_utils.core.stats.from_null`).

    Args:
        tokens: :func:`token_frame` of at least two models.
        p: the chapter's parameters (``n_permutations``, ``seed``).

    Returns:
        One row per pair: ``model A``, ``model B``, ``tokens``, ``Spearman``, ``null mean``, ``null std``,
        ``z``, ``p``. Empty (with these columns) for a single model.

    Raises:
        EmbgeoInputError: missing columns, models with different common samples, fewer than 3 common tokens.
    """
    import pandas as pd

    _require(tokens, ("model", "local ID", "common index"), "tokens")
    n_permutations = p.n_permutations
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
            rng = np.random.default_rng(p.seed)
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


@dataclass(frozen=True)
class GlobalIDs:
    """What :func:`global_ids` measured (chapter 3).

    Attributes:
        summary: one row per model (index ``model``): ``points`` (rows sampled), ``TwoNN``, ``GRIDE n2=2``,
            ``GRIDE max over scales``, ``width d``.
        curves: the GRIDE scale curves, one row per model and scale: ``model``, ``n2``, ``ID``, ``error`` (Fisher
            standard error).
    """

    summary: pd.DataFrame
    curves: pd.DataFrame


def global_ids(tables: Mapping[str, ArrayLike], p: Parameters, max_scale: int = 512) -> GlobalIDs:
    """Chapter 3: global ID of each embedding table, TwoNN and the GRIDE scale curve on a random sample of rows.

    Each table gives ``min(p.global_points, rows)`` rows drawn without replacement with
    a generator seeded with ``p.seed``;
    :func:`embgeo_utils.geometry.intrinsic_dim.twonn` and
    :func:`embgeo_utils.geometry.intrinsic_dim.gride_scaling` (ranks ``n2 = 2, 4, ...``
    up to ``min(max_scale, points // 4)``) run on them on ``p.device``, duplicate rows removed.

    Returns:
        A :class:`GlobalIDs` (summary per model and tidy scale curves).

    Raises:
        EmbgeoInputError: no table, ``p.global_points`` below 8, or too few distinct rows.
    """
    import pandas as pd

    n_points = p.global_points
    if not tables:
        raise EmbgeoInputError("No embedding table given: install at least one model (`make models`).")
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 8:
        raise EmbgeoInputError(f"global_points must be an integer of at least 8, got {n_points!r}.")
    dev = get_device(p.device)
    summary, curves = [], []
    for name, table in tables.items():
        n_rows = int(table.shape[0])
        pick = np.sort(np.random.default_rng(p.seed).choice(n_rows, size=min(n_points, n_rows), replace=False))
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
    return GlobalIDs(pd.DataFrame(summary).set_index("model"), pd.concat(curves, ignore_index=True))


@dataclass(frozen=True)
class CorrelationSummary:
    """The cross-model agreement of :func:`id_correlations` in a few numbers (chapter 3's ledger row).

    Attributes:
        median: median Spearman over the model pairs (None without a pair).
        min: smallest Spearman (None without a pair).
        max: largest Spearman (None without a pair).
        pairs: number of model pairs.
        pairs_significant: pairs with a raw permutation ``p < 0.01``.
    """

    median: float | None
    min: float | None
    max: float | None
    pairs: int
    pairs_significant: int


def correlation_summary(correlations: pd.DataFrame) -> CorrelationSummary:
    """Chapter 3: median, smallest and largest Spearman over the model pairs of :func:`id_correlations`."""
    _require(correlations, ("Spearman", "p"), "correlations")
    rho = correlations["Spearman"].to_numpy(dtype=np.float64)
    if len(rho) == 0:
        return CorrelationSummary(None, None, None, 0, 0)
    return CorrelationSummary(
        median=float(np.median(rho)),
        min=float(rho.min()),
        max=float(rho.max()),
        pairs=len(rho),
        pairs_significant=int((correlations["p"].to_numpy() < 0.01).sum()),
    )


def failing_checks(verdict: stats.Verdict) -> list[str]:
    """Names of the checks of a verdict that do not hold (for the ledger's details; every chapter)."""
    return [c.name for c, ok in zip(verdict.checks, verdict.holds, strict=True) if not ok]


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


#: Claim 8's smallest effects that count, with where each comes from.
MIN_BELOW_REFERENCE = (
    0.5,
    "the claim's words: 'far below the width', read against the estimator's own ceiling (the ID of 51 points cannot "
    "exceed 50, below d/10 for three of the four models): a median local ID at most half the median ID of random "
    "neighbourhoods of the same table",
)
MIN_COHERENCE = (
    0.02,
    "practical: a difference of 0.02 in the encoder's mean cosine similarity between a token and its neighbours, "
    "twice the spread of the stratified permutation null at the book's defaults (about 0.01)",
)
MIN_AGREEMENT = (0.1, "practical: a rank correlation of 0.1, the conventional 'small' correlation (Cohen 1988)")


def check_claim8(
    tokens: pd.DataFrame,
    semantic: pd.DataFrame,
    correlations: pd.DataFrame,
    n_permutations: int,
    alpha: float = 0.01,
    correction: str = "holm",
) -> stats.Verdict:
    """The verdict of claim 8 (chapter 3): per-token ID ≪ d, low-ID neighbourhoods coherent, ID shared across models.

    The chapter passes the tables of the *trained* tokens (under-trained ones dropped, :func:`drop_tokens`).
    Checks, one per model or pair, each with its minimum effect and its source:

    1. **ID ≪ d**, per model: effect ``1 − median local ID / median random-neighbourhood ID``, minimum
       :data:`MIN_BELOW_REFERENCE` (the reference, not the width, because ``k`` caps the ID below ``d / 10``);
       p-value: one-sided Mann–Whitney test that the local IDs are smaller than the IDs of random neighbourhoods of
       the same tokens (``scipy.stats.mannwhitneyu``, ``alternative="less"``); standard error by the delta method
       from the large-sample standard errors of the two medians.
    2. **Semantic coherence**, per model whose row is ``independent`` (the encoder is not the model under
       study): effect = the stratified difference in encoder similarity between the lowest- and highest-ID
       deciles (column ``difference`` of :func:`semantic_coherence`), minimum :data:`MIN_COHERENCE`; p-value: its
       stratified permutation p (``n_permutations``). The encoder judging its own neighbourhoods (the row that is
       not ``independent``) is the **positive control**: the pipeline must see coherence where the neighbourhoods
       are built in the judge's own space before its absence elsewhere counts.
    3. **Cross-model agreement**, per pair: effect = Spearman of per-token ID on the common tokens, minimum
       :data:`MIN_AGREEMENT`; p-value: its permutation p (:func:`id_correlations`, ``n_permutations``).

    The surface-label coherence (:data:`COHERENCE_LABEL`) is a secondary result and not a check. The p-values are
    adjusted together with ``correction`` (Holm by default) and :func:`embgeo_utils.core.stats.verdict` gives the
    verdict at ``alpha``.

    Args:
        tokens: :func:`token_frame` (``model``, ``width``, ``local ID``, ``random ID``).
        semantic: :func:`semantic_coherence` (``model``, ``independent``, ``difference``, ``p``, ``tokens per group``).
        correlations: :func:`id_correlations` (``model A``, ``model B``, ``tokens``, ``Spearman``, ``p``).
        n_permutations: the permutations behind the coherence and correlation p-values.
        alpha: significance level.
        correction: ``"holm"``, ``"bonferroni"`` or ``"none"``.

    Returns:
        :class:`~embgeo_utils.core.stats.Verdict`; ``.table()`` lists the checks.

    Raises:
        EmbgeoInputError: missing columns or no token.
    """
    _require(tokens, ("model", "width", "local ID", "random ID"), "tokens")
    _require(semantic, ("model", "independent", "difference", "p", "tokens per group"), "semantic")
    _require(correlations, ("model A", "model B", "tokens", "Spearman", "p"), "correlations")
    if tokens.empty:
        raise EmbgeoInputError("tokens is empty; run per_token_ids on at least one model.")
    checks = [
        *_width_checks(tokens),
        *_semantic_checks(semantic, n_permutations),
        *_agreement_checks(correlations, n_permutations),
    ]
    return stats.verdict(checks, alpha=alpha, correction=correction)


def _width_checks(tokens: pd.DataFrame) -> list[stats.Check]:
    """Chapter 3, claim 8's first part: one "ID ≪ d" check per model (see :func:`check_claim8`)."""
    from scipy.stats import mannwhitneyu

    minimum, source = MIN_BELOW_REFERENCE
    checks = []
    for name, group in tokens.groupby("model", sort=False):
        local = group["local ID"].to_numpy(dtype=np.float64)
        reference = group["random ID"].to_numpy(dtype=np.float64)
        p = float(mannwhitneyu(local, reference, alternative="less").pvalue)
        m_local, m_ref = float(np.median(local)), float(np.median(reference))
        ratio = m_local / m_ref if m_ref > 0 else float("inf")
        se = None
        if len(local) > 1 and m_local > 0 and m_ref > 0:
            # large-sample standard error of a median, sqrt(pi/2) * sd / sqrt(n); delta method for the ratio
            se_l, se_r = (float(np.sqrt(np.pi / 2) * x.std(ddof=1) / np.sqrt(len(x))) for x in (local, reference))
            se = ratio * float(np.hypot(se_l / m_local, se_r / m_ref))
        checks.append(
            stats.Check(
                f"{name}: ID ≪ d (1 − median ID / median ID of random neighbourhoods; Mann–Whitney)",
                1.0 - ratio,
                p,
                minimum,
                len(group),
                se,
                min_effect_source=source,
            )
        )
    return checks


def _semantic_checks(semantic: pd.DataFrame, n_permutations: int) -> list[stats.Check]:
    """Chapter 3, claim 8's second part: semantic coherence per model judged by another encoder, and the control."""
    minimum, source = MIN_COHERENCE
    return [
        stats.Check(
            f"{row['model']}: low-ID neighbourhoods semantically more coherent than high-ID (stratified)"
            if row["independent"]
            else f"{row['model']} judged by itself: low-ID neighbourhoods more coherent (stratified)",
            float(row["difference"]),
            float(row["p"]),
            minimum,
            int(row["tokens per group"]),
            _finite(row.get("null std")),
            min_effect_source=source,
            n_permutations=n_permutations,
            control=not bool(row["independent"]),
        )
        for row in semantic.to_dict(orient="records")
    ]


def _agreement_checks(correlations: pd.DataFrame, n_permutations: int) -> list[stats.Check]:
    """Chapter 3, claim 8's third part: one cross-model agreement check per model pair."""
    minimum, source = MIN_AGREEMENT
    return [
        stats.Check(
            f"{row['model A']} vs {row['model B']}: per-token ID correlates (Spearman)",
            float(row["Spearman"]),
            float(row["p"]),
            minimum,
            int(row["tokens"]),
            _finite(row.get("null std")),
            min_effect_source=source,
            n_permutations=n_permutations,
        )
        for row in correlations.to_dict(orient="records")
    ]


def _check_ids(ids: Mapping[str, Any], coherence_k: int) -> None:
    """The per-token IDs are there and ``coherence_k`` fits their neighbour lists."""
    if not ids:
        raise EmbgeoInputError("No model's IDs given; run per_token_ids first.")
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
    ``(1 + #{null >= observed}) / (1 + n)`` (:func:`embgeo_utils.core.stats.from_null`).

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


def coherence_table(ids: Mapping[str, LocalIDs], p: Parameters, min_labelled: int = 20) -> pd.DataFrame:
    """Chapter 3: coherence of low- against high-ID neighbourhoods, per model and surface label (secondary result).

    Each evaluated token and each of its ``p.coherence_k`` nearest neighbours is
    labelled (:func:`embgeo_utils.lm.labels.token_labels`) in two ways:

    * ``"kind + capitalised"`` (:data:`COHERENCE_LABEL`):
      the kind joined with the capitalisation flag; the groups are the lowest-
      and highest-ID deciles of the evaluated tokens (:attr:`LocalIDs.order`,
      ties broken at random).
    * ``"analogy category"``: the analogy-set section, for tokens that have one;
      few do, so the groups are the lowest and highest ID quartiles of the
      labelled tokens, and a model with fewer than ``min_labelled`` of them is skipped.

    Coherence is :func:`neighbor_label_agreement` (chance-adjusted) and the
    groups are compared with :func:`coherence_test` (``p.n_permutations``
    permutations seeded with ``p.seed``).

    Args:
        ids: model name → :class:`LocalIDs` (:func:`per_token_ids`).
        p: the chapter's parameters (``coherence_k`` at most the ``k`` of the IDs, ``n_permutations``, ``seed``).
        min_labelled: fewest tokens with an analogy category for that label to be tested.

    Returns:
        One row per model and label: ``model``, ``label``, ``groups``, ``tokens per group``,
        ``coherence low ID``, ``coherence high ID``, ``difference``, ``z``, ``p``.

    Raises:
        EmbgeoInputError: no model, or ``coherence_k`` outside ``[1, k]``.
    """
    import pandas as pd

    _check_ids(ids, p.coherence_k)
    out = []
    for name, m in ids.items():
        for label_name, full in _surface_labels(m, p.coherence_k).items():
            if label_name == "analogy category":
                res = _quartile_coherence(m, full, p, min_labelled)
                groups = "lowest vs highest ID quartile of labelled tokens"
            else:
                res = _decile_coherence(m, full, p)
                groups = "lowest vs highest ID decile"
            if res is None:
                continue
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


def _surface_labels(m: LocalIDs, coherence_k: int) -> dict[str, np.ndarray]:
    """Chapter 3: the two labels of :func:`coherence_table` over the table's rows (``""`` where not needed).

    Every evaluated token and each of its ``coherence_k`` nearest neighbours gets its label; keys are
    :data:`COHERENCE_LABEL` and ``"analogy category"``, in that order.
    """
    needed = np.union1d(m.rows, m.neighbors[:, :coherence_k].ravel())
    lab = labels.token_labels([m.strings.get(int(r), "") for r in needed])
    kind_cap = np.array([f"{kd}|{cp}" for kd, cp in zip(lab.kind, lab.capitalised, strict=True)], dtype=object)
    out = {}
    for label_name, values in ((COHERENCE_LABEL, kind_cap), ("analogy category", lab.analogy)):
        full = np.full(m.n_table_rows, "", dtype=object)
        full[needed] = values
        out[label_name] = full
    return out


def _decile_coherence(m: LocalIDs, full: np.ndarray, p: Parameters) -> CoherenceResult:
    """Chapter 3: label agreement of the lowest- against the highest-ID decile of all evaluated tokens."""
    n_dec = max(1, len(m.rows) // 10)
    agree = neighbor_label_agreement(full, m.neighbors[:, : p.coherence_k], rows=m.rows)
    return coherence_test(agree, m.order[:n_dec], m.order[-n_dec:], n=p.n_permutations, seed=p.seed)


def _quartile_coherence(m: LocalIDs, full: np.ndarray, p: Parameters, min_labelled: int) -> CoherenceResult | None:
    """Chapter 3: label agreement of the lowest- against the highest-ID quartile of the labelled tokens.

    None when fewer than ``min_labelled`` evaluated tokens carry a label.
    """
    rows = m.rows
    has = full[rows] != ""
    if has.sum() < min_labelled:
        return None
    agree = neighbor_label_agreement(full, m.neighbors[:, : p.coherence_k][has], rows=rows[has])
    rank = np.empty(len(rows), dtype=np.int64)
    rank[m.order] = np.arange(len(rows))
    cut = max(1, int(has.sum()) // 4)
    srt = np.argsort(rank[has])
    return coherence_test(agree, srt[:cut], srt[-cut:], n=p.n_permutations, seed=p.seed)


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


@cached("string_embeddings", version=1)
def string_embeddings(encoder: models.LoadedModel, strings: list[str], batch_size: int) -> np.ndarray:
    """Chapter 3, cached: unit-norm sentence embeddings of ``strings`` by ``encoder``, row for row.

    Embeddings are mean-pooled last hidden states (``steering.sentence_embeddings``), computed with the strings
    sorted by length (less padding). The cache key holds the encoder (name, weights' sha256, dtype), the strings
    and ``batch_size``.

    Returns:
        float32 ``(len(strings), e)``.
    """
    by_length = sorted(range(len(strings)), key=lambda i: len(strings[i]))
    vectors = steering.sentence_embeddings(encoder, [strings[i] for i in by_length], batch_size=batch_size)
    out = np.empty_like(vectors)
    out[by_length] = vectors
    return out


def string_encoder(
    name: str = "minilm-l6", batch_size: int = 256, use_cache: bool = True
) -> Callable[[Sequence[str]], np.ndarray]:
    """Chapter 3: a function mapping strings to unit-norm sentence embeddings of the encoder ``name``.

    The encoder is loaded on the CPU now; each call embeds its distinct strings (sorted) with
    :func:`string_embeddings`, so a rerun with the same strings reads them from the cache (kind
    ``string_embeddings``; ``use_cache=False`` neither reads nor writes it).
    """
    encoder = models.load(name, device="cpu")
    embed = string_embeddings if use_cache else string_embeddings.compute

    def encode(strings: Sequence[str]) -> np.ndarray:
        if not strings:
            return np.empty((0, 0))
        distinct = sorted(set(strings))
        vectors = embed(encoder, distinct, batch_size)
        position = {s: i for i, s in enumerate(distinct)}
        return vectors[[position[s] for s in strings]]

    return encode


#: Columns of :func:`semantic_coherence`'s table.
SEMANTIC_COLUMNS = (
    "model", "encoder", "independent", "tokens per group", "strata", "similarity low ID", "similarity high ID",
    "difference", "unstratified difference", "null std", "z", "p",
)  # fmt: skip


def semantic_coherence(
    ids: Mapping[str, LocalIDs],
    encode: Callable[[Sequence[str]], np.ndarray],
    p: Parameters,
    n_reference: int = 500,
) -> pd.DataFrame:
    """Chapter 3: semantic coherence of low- against high-ID neighbourhoods, measured by a separate encoder.

    For each model, ``p.semantic_tokens`` tokens are drawn (seeded with ``p.seed``) from the lowest-ID
    decile and as many from the highest-ID decile of its evaluated tokens
    (:attr:`LocalIDs.order`). A token's value is the mean cosine, under
    ``encode``, between its string and the strings of its ``p.coherence_k``
    nearest neighbours in the model's table (neighbours without a string are
    skipped), minus its mean cosine to the strings of ``n_reference`` random
    evaluated tokens of the same model (its chance level). The deciles are
    compared within strata of word frequency x token kind
    (:func:`embgeo_utils.lm.labels.frequency_strata`, :func:`embgeo_utils.lm.labels.token_labels`)
    by :func:`stratified_difference_test` (``p.n_permutations`` permutations, ``p.seed``).

    The encoder should not be the model under study: the ``independent`` column is False
    for the model named ``p.semantic_encoder``, whose row is descriptive only.

    Args:
        ids: model name → :class:`LocalIDs` (usually without under-trained tokens).
        encode: strings → ``(n, e)`` unit-norm embeddings (:func:`string_encoder` of ``p.semantic_encoder``).
        p: the chapter's parameters.
        n_reference: random tokens of the chance level.

    Returns:
        One row per model, the columns of :data:`SEMANTIC_COLUMNS`: ``model``, ``encoder``, ``independent``,
        ``tokens per group``, ``strata``, ``similarity low ID``, ``similarity high ID``, ``difference``
        (stratified), ``unstratified difference``, ``null std``, ``z``, ``p``.

    Raises:
        EmbgeoInputError: no model, or ``p.coherence_k`` outside ``[1, k]``.
    """
    import pandas as pd

    _check_ids(ids, p.coherence_k)
    out = [_semantic_row(name, m, encode, p, n_reference) for name, m in ids.items()]
    return pd.DataFrame(out, columns=list(SEMANTIC_COLUMNS))


def _decile_draw(m: LocalIDs, n_tokens: int, n_reference: int, seed: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Chapter 3: positions of the tokens drawn from the lowest- and highest-ID deciles, how many are low, and the
    positions of the chance-level tokens (one generator seeded with ``seed``, in that order)."""
    rng = np.random.default_rng(seed)
    n_dec = max(1, len(m.rows) // 10)
    low = rng.choice(m.order[:n_dec], size=min(n_tokens, n_dec), replace=False)
    high = rng.choice(m.order[-n_dec:], size=min(n_tokens, n_dec), replace=False)
    pool = rng.choice(len(m.rows), size=min(n_reference, len(m.rows)), replace=False)
    return np.concatenate([low, high]), len(low), pool


def _neighbour_similarity(
    m: LocalIDs,
    picked: np.ndarray,
    pool: np.ndarray,
    encode: Callable[[Sequence[str]], np.ndarray],
    coherence_k: int,
) -> tuple[np.ndarray, list[str]]:
    """Chapter 3: each picked token's mean encoder cosine to its neighbours minus its mean cosine to the pool.

    Returns:
        The values (NaN for a token without a string or without a neighbour that has one) and the tokens' strings.
    """
    text = [m.strings.get(int(m.rows[i]), "") for i in picked]
    hood = [[m.strings.get(int(j), "") for j in m.neighbors[i, :coherence_k]] for i in picked]
    pool_text = [m.strings.get(int(m.rows[i]), "") for i in pool]
    distinct = sorted({*text, *pool_text, *(s for row in hood for s in row)} - {""})
    position = {s: i for i, s in enumerate(distinct)}
    emb = encode(distinct)
    tok = emb[[position.get(s, 0) for s in text]]
    chance = tok @ emb[[position[s] for s in pool_text if s]].T
    values = np.empty(len(picked))
    for i, row in enumerate(hood):
        nb = [position[s] for s in row if s]
        values[i] = (emb[nb] @ tok[i]).mean() - chance[i].mean() if nb and text[i] else np.nan
    return values, text


def _semantic_row(
    name: str, m: LocalIDs, encode: Callable[[Sequence[str]], np.ndarray], p: Parameters, n_reference: int
) -> dict[str, Any]:
    """Chapter 3: one model's row of :func:`semantic_coherence`."""
    picked, n_low, pool = _decile_draw(m, p.semantic_tokens, n_reference, p.seed)
    values, text = _neighbour_similarity(m, picked, pool, encode, p.coherence_k)
    lab = labels.token_labels(text)
    strata = np.array([f"{z}|{kd}" for z, kd in zip(labels.frequency_strata(text), lab.kind, strict=True)])
    is_low = np.arange(len(picked)) < n_low
    ok = ~np.isnan(values)
    res = stratified_difference_test(values[ok], is_low[ok], strata[ok], n=p.n_permutations, seed=p.seed)
    plain = float(values[ok & is_low].mean() - values[ok & ~is_low].mean())
    return {
        "model": name,
        "encoder": p.semantic_encoder,
        "independent": name != p.semantic_encoder,
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


def plot_token_id_distributions(tokens: pd.DataFrame, k: int, variance: float) -> Figure:
    """Chapter 3: violins of per-token local ID, nearest against random neighbourhoods, one per model.

    Each half is scaled to the same width (``density_norm="width"``): random
    neighbourhoods' IDs are concentrated near the ceiling, and with equal areas
    their half would shrink to a line.

    Args:
        tokens: :func:`token_frame` (``model``, ``width``, ``local ID``, ``random ID``).
        k: neighbours per token (the ceiling of the ID, drawn as a line).
        variance: the variance threshold of the local PCA (for the axis label).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    need_columns(tokens, ("model", "width", "local ID", "random ID"), "token_frame")
    label = tokens["model"] + "\n(d = " + tokens["width"].astype(str) + ")"
    dist = pd.concat(
        [
            pd.DataFrame({"model": label, "local ID": tokens["local ID"], "neighbourhood": "nearest"}),
            pd.DataFrame({"model": label, "local ID": tokens["random ID"], "neighbourhood": "random"}),
        ],
        ignore_index=True,
    )
    fig, ax = plt.subplots(figsize=(9, 4.2))
    sns.violinplot(
        data=dist, x="model", y="local ID", hue="neighbourhood", split=True, cut=0, inner="quart",
        density_norm="width", palette={"nearest": "#0072B2", "random": "#E69F00"}, ax=ax,
    )  # fmt: skip
    ax.axhline(k, color="grey", ls=":", lw=1)
    ax.text(-0.45, k + 0.5, f"ceiling k = {k}", color="grey", fontsize=8)
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelsize=9)
    ax.set_ylabel(f"local PCA ID ({int(variance * 100)} % variance, k = {k})")
    ax.set_title("Per-token intrinsic dimension")
    ax.legend(title="neighbourhood", loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_undertrained_id_histograms(tokens: pd.DataFrame, k: int) -> Figure:
    """Chapter 3: per model, the local-ID histogram of trained and under-trained tokens, stacked (two panels across).

    Args:
        tokens: :func:`token_frame` of *all* evaluated tokens with a bool column ``under-trained``.
        k: neighbours per token (the largest possible ID).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    need_columns(tokens, ("model", "local ID", "under-trained"), "token_frame(...) with an 'under-trained' column")
    names = list(dict.fromkeys(tokens["model"]))
    cols = min(MAX_PANELS_ACROSS, len(names))
    n_rows = (len(names) + cols - 1) // cols
    width = COLUMN_INCHES if cols > 1 else COLUMN_INCHES / 2 + 0.6
    fig, axes = plt.subplots(n_rows, cols, figsize=(width, 3.2 * n_rows), sharey=False, squeeze=False)
    bins = np.arange(0.5, k + 1.5, 1.0)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")  # an odd number of models leaves the last place empty
    for ax, name in zip(axes.flat, names):
        group = tokens[tokens["model"] == name]
        flagged = group["under-trained"].to_numpy(dtype=bool)
        values = group["local ID"].to_numpy()
        ax.hist(
            [values[~flagged], values[flagged]], bins=bins, stacked=True, color=["#0072B2", "#D55E00"],
            label=[f"trained ({(~flagged).sum():,})", f"under-trained ({flagged.sum():,})"],
        )  # fmt: skip
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("local ID")
        ax.legend(fontsize=7, loc="upper right")
    for row in axes:
        row[0].set_ylabel("evaluated tokens")
    fig.suptitle("Local ID of trained and under-trained tokens")
    fig.tight_layout()
    return fig


def plot_semantic_coherence_bars(semantic: pd.DataFrame, coherence_k: int) -> Figure | None:
    """Chapter 3: encoder similarity of the lowest- and highest-ID deciles' neighbourhoods, per model.

    Args:
        semantic: :func:`semantic_coherence`.
        coherence_k: neighbours compared (for the title).

    Returns:
        The Figure, or None for an empty table.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(
        semantic, ("model", "encoder", "independent", "similarity low ID", "similarity high ID"),
        "semantic_coherence",
    )  # fmt: skip
    if len(semantic) == 0:
        return None
    frame = semantic.assign(
        model=[m if ok else f"{m}\n(= encoder)" for m, ok in zip(semantic["model"], semantic["independent"])]
    )
    long = frame.melt(
        id_vars=["model"],
        value_vars=["similarity low ID", "similarity high ID"],
        var_name="group",
        value_name="similarity",
    )
    long["group"] = long["group"].map(
        {"similarity low ID": "lowest-ID decile", "similarity high ID": "highest-ID decile"}
    )
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(
        data=long, x="model", y="similarity", hue="group", palette=["#0072B2", "#E69F00"], ax=ax,
    )  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("")
    ax.set_ylabel(f"{semantic['encoder'].iloc[0]} cosine − chance")
    ax.set_title(f"Semantic similarity of a token to its {coherence_k} nearest neighbours")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_token_id_by_frequency(tokens: pd.DataFrame) -> Figure:
    """Chapter 3: mean local ID (95 % CI) by word-frequency stratum, one line per model.

    Args:
        tokens: :func:`token_frame` with its ``Zipf stratum`` column.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(tokens, ("model", "Zipf stratum", "local ID"), "token_frame(ids, strata=True)")
    names = list(dict.fromkeys(tokens["model"]))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.pointplot(
        data=tokens,
        x="Zipf stratum",
        y="local ID",
        hue="model",
        palette=model_colors(names),
        dodge=0.3,
        errorbar=("ci", 95),
        ax=ax,
    )
    ax.set_xlabel("word-frequency stratum (0: unknown; 1: Zipf 1–2 … 5: Zipf ≥ 5)")
    ax.set_ylabel("mean local ID")
    ax.set_title("Local ID by token frequency")
    return fig


def plot_token_id_correlation_heatmap(correlations: pd.DataFrame) -> Figure | None:
    """Chapter 3: Spearman of per-token ID for every pair of models, as a symmetric heatmap.

    Args:
        correlations: :func:`id_correlations`.

    Returns:
        The Figure, or None when there is no pair (a single model).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import seaborn as sns

    need_columns(correlations, ("model A", "model B", "tokens", "Spearman"), "id_correlations")
    if len(correlations) == 0:
        return None
    names = list(dict.fromkeys([*correlations["model A"], *correlations["model B"]]))
    mat = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for row in correlations.to_dict(orient="records"):
        mat.loc[row["model A"], row["model B"]] = mat.loc[row["model B"], row["model A"]] = row["Spearman"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sns.heatmap(
        mat,
        annot=True,
        fmt=".2f",
        vmin=-1,
        vmax=1,
        cmap="vlag",
        square=True,
        ax=ax,
        cbar_kws={"label": "Spearman of per-token ID"},
    )
    ax.set_title(f"Per-token ID across models\n({int(correlations['tokens'].iloc[0])} common tokens)")
    ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    fig.tight_layout()
    return fig


def plot_neighbourhood_coherence_bars(
    coherence: pd.DataFrame, coherence_k: int, label: str = "kind + capitalised"
) -> Figure | None:
    """Chapter 3: coherence of the lowest- and highest-ID groups per model, for one label.

    Args:
        coherence: :func:`coherence_table`.
        coherence_k: neighbours compared (for the title).
        label: which label's rows to draw.

    Returns:
        The Figure, or None when the table has no row of that label.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(coherence, ("model", "label", "coherence low ID", "coherence high ID"), "coherence_table")
    rows = coherence[coherence["label"] == label]
    if len(rows) == 0:
        return None
    long = rows.melt(
        id_vars=["model", "label"],
        value_vars=["coherence low ID", "coherence high ID"],
        var_name="group",
        value_name="coherence",
    )
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(data=long, x="model", y="coherence", hue="group", palette=["#0072B2", "#E69F00"], ax=ax)
    ax.tick_params(axis="x", labelsize=9)
    ax.set_xlabel("")
    ax.set_ylabel("neighbour label agreement − chance")
    shown = "kind + capitalisation" if label == "kind + capitalised" else label
    ax.set_title(f"Coherence of the {coherence_k} nearest neighbours ({shown})")
    return fig


def plot_embedding_gride_curves(curves: pd.DataFrame, n_points: int) -> Figure:
    """Chapter 3: GRIDE ID against the neighbour rank n2 (error bars: Fisher standard error), one line per model.

    Args:
        curves: the scale curves of :func:`global_ids` (``.curves``).
        n_points: rows sampled per table (for the title).
    """
    import matplotlib.pyplot as plt

    need_columns(curves, ("model", "n2", "ID", "error"), "global_ids(...).curves")
    names = list(dict.fromkeys(curves["model"]))
    colors = model_colors(names)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        c = curves[curves["model"] == name]
        ax.errorbar(c["n2"], c["ID"], yerr=c["error"], marker="o", ms=4, capsize=2, label=name, color=colors[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("neighbour rank n2 (n1 = n2 / 2)")
    ax.set_ylabel("GRIDE intrinsic dimension")
    ax.set_title(f"GRIDE scale curve, {n_points} rows per table")
    ax.legend(fontsize=8)
    return fig
