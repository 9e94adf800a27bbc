"""Chapter 1, global orientation: do two models arrange the same tokens alike?

Two models trained apart place their tokens in unrelated coordinates, but the *relations* between tokens can agree.
The chapter compares the cosine-similarity matrix of a sample of shared tokens in model A with that in model B
(Pearson r of the upper triangles), against a permutation null that breaks the token correspondence, and tests
claim 6 of the ledger: the matrices correlate across models far above the null. The stages:

1. :func:`shared_vocabulary_table`: the tokens every pair of models shares (:mod:`embgeo_utils.lm.vocab`);
2. :func:`compare_models`: for every pair, the sampled rows (:func:`sample_rows`) and their statistics
   (:func:`pair_statistics`, cached on disk): r raw and mean-centred, linear CKA, Spearman and mutual k-NN, each
   with its permutation null; one row per pair;
3. :func:`token_pair_cosines`: the cosines of random token pairs in both models, the points of the scatter plot;
4. :func:`layer_alignment`: one pair followed through the hidden layers (:class:`LayerAlignment`, a layer x layer
   map of the centred correlation of tokens presented alone);
5. :func:`check_claim6`: claim 6's verdict from the table of stage 2.

The ``plot_*`` functions draw the chapter's figures in the book's style (:mod:`embgeo_utils.chapters.style`).

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Kornblith, Norouzi, Lee, Hinton (2019). Similarity of Neural Network
    Representations Revisited. ICML. arXiv:1905.00414.
    Huh, Cheung, Wang, Isola (2024). The Platonic Representation Hypothesis.
    arXiv:2405.07987 (mutual k-NN).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core import stats
from ..core.cache import cached
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import as_matrix, check_pairs
from ..geometry.similarity import Array, layer_map, permutation_test, spearman_cosine
from ..lm import activations, models
from ..lm.vocab import SharedVocabulary
from . import interactive
from .style import COLUMN_INCHES, figure_axes

__all__ = [
    "CHAPTER",
    "LayerAlignment",
    "Parameters",
    "TITLE",
    "check_claim6",
    "compare_models",
    "interactive_cosine_scatter",
    "interactive_layer_map",
    "interactive_pair_heatmaps",
    "layer_alignment",
    "pair_matrix",
    "pair_statistics",
    "plot_cosine_scatter",
    "plot_layer_map",
    "plot_pair_heatmaps",
    "sample_rows",
    "shared_vocabulary_table",
    "token_pair_cosines",
]


CHAPTER = "ch01_global_orientation"
TITLE = "Global orientation"


@dataclass(frozen=True)
class Parameters:
    """Chapter 1's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_names: list[str]
    n_tokens: int
    n_permutations: int
    n_permutations_centred: int
    n_permutations_complements: int
    knn_k: int
    scatter_points: int
    layer_pair: list[str]
    n_layer_tokens: int
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """The models the chapter compares, in order."""
        return list(self.model_names)


@dataclass(frozen=True)
class LayerAlignment:
    """What :func:`layer_alignment` measured (chapter 1).

    Attributes:
        model_a: the first model of ``layer_pair``; model_b: the second.
        tokens: the shared tokens run through both models.
        table: one row per layer pair: ``layer A``, ``layer B`` (0: the input embeddings as the model sees them) and
            ``r``, the Pearson r of the mean-centred cosine matrices (:func:`embgeo_utils.geometry.similarity.layer_map`).
    """

    model_a: str
    model_b: str
    tokens: int
    table: pd.DataFrame

    @property
    def grid(self) -> pd.DataFrame:
        """``r`` as a table, layers of A as rows and layers of B as columns."""
        return self.table.pivot(index="layer A", columns="layer B", values="r")

    @property
    def best(self) -> pd.Series:
        """The row of :attr:`table` with the highest ``r``."""
        return self.table.loc[self.table["r"].idxmax()]


def shared_vocabulary_table(
    shared: Mapping[tuple[str, str], SharedVocabulary], tables: Mapping[str, Array]
) -> pd.DataFrame:
    """Chapter 1: one row per model pair: shared tokens, alignment schemes and both vocabulary sizes.

    Args:
        shared: ``(model A, model B)`` to their :class:`~embgeo_utils.lm.vocab.SharedVocabulary`.
        tables: model name to its input-embedding table ``(vocabulary, d)``.
    """
    check_pairs(shared, tables)
    return pd.DataFrame(
        [
            {
                "model A": a,
                "model B": b,
                "shared tokens": len(s),
                "scheme A": s.scheme_a,
                "scheme B": s.scheme_b,
                "vocabulary A": tables[a].shape[0],
                "vocabulary B": tables[b].shape[0],
            }
            for (a, b), s in shared.items()
        ]
    )


def sample_rows(
    tables: Mapping[str, Array], pair: tuple[str, str], shared: SharedVocabulary, n_tokens: int, seed: int
) -> tuple[Array, Array]:
    """Chapter 1: the input-embedding rows of ``n_tokens`` shared tokens in both models of ``pair``.

    The tokens are ``shared.sample(n_tokens, seed)`` (at most all shared tokens, in a seeded order); the rows are
    taken as stored (numpy or torch), row ``i`` of both arrays being the same token.
    """
    sample = shared.sample(n_tokens, seed=seed)
    return tables[pair[0]][sample.ids_a], tables[pair[1]][sample.ids_b]


def _null_columns(label: str, res: stats.PermutationResult) -> dict[str, Any]:
    """The statistic, null mean and std, z and p of one permutation test, named for ``label`` (chapter 1)."""
    return {
        f"r {label}" if label != "CKA" else "CKA": res.statistic,
        f"null mean {label}": res.null_mean,
        f"null std {label}": res.null_std,
        f"z {label}": res.z,
        f"p {label}": res.p_value,
    }


@cached("similarity", version=1)
def pair_statistics(
    model_a: str,
    model_b: str,
    X: Array,
    Y: Array,
    n_permutations: int,
    n_permutations_centred: int,
    n_permutations_complements: int,
    knn_k: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Chapter 1: one row of :func:`compare_models`, the statistics of one pair's sampled rows (cached).

    ``X`` and ``Y`` hold the same tokens row for row (:func:`sample_rows`). Each statistic is measured against the
    permutation null of :func:`embgeo_utils.geometry.similarity.permutation_test` (B's rows shuffled, seeded with
    ``seed``): Pearson r of the raw cosine matrices (``n_permutations``) and of the mean-centred ones
    (``n_permutations_centred``), linear CKA (``n_permutations_complements``), and mutual cosine k-NN with ``knn_k``
    neighbours (``max(1, n_permutations_complements // 5)`` permutations, each recomputing both neighbour searches);
    Spearman's rank correlation of the raw cosines has no null.

    The entry (cache kind ``similarity``) is keyed by the model names, the digests of ``X`` and ``Y``, every count,
    ``knn_k``, ``seed`` and the device type, so a rerun reads it.

    Returns:
        The row as a dict, keys in the order of :func:`compare_models`'s columns.
    """
    out: dict[str, Any] = {"model A": model_a, "model B": model_b, "tokens": len(X), "permutations": n_permutations}
    for label, stat, n_perm in (
        ("raw", "cosine_corr", n_permutations),
        ("centred", "cosine_corr_centered", n_permutations_centred),
        ("CKA", "cka", n_permutations_complements),
    ):
        out.update(_null_columns(label, permutation_test(stat, X, Y, n=n_perm, seed=seed, device=device)))
    out["spearman raw"] = spearman_cosine(X, Y, device=device)
    knn_res = permutation_test(
        "mutual_knn", X, Y, n=max(1, n_permutations_complements // 5), seed=seed, device=device, k=knn_k
    )
    out.update(
        {
            f"mutual kNN@{knn_k}": knn_res.statistic,
            "mutual kNN null": knn_res.null_mean,
            "mutual kNN chance": knn_k / (len(X) - 1),
            "p mutual kNN": knn_res.p_value,
        }
    )
    return out


def compare_models(
    tables: Mapping[str, Array],
    shared: Mapping[tuple[str, str], SharedVocabulary],
    p: Parameters,
    cache: bool = True,
) -> pd.DataFrame:
    """Chapter 1: the cosine-matrix correlation of every model pair, with its null and its complements.

    For each pair, ``p.n_tokens`` shared tokens are drawn with ``p.seed`` (:func:`sample_rows`) and measured by
    :func:`pair_statistics` with ``p.n_permutations`` (raw r: the claim-6 checks), ``p.n_permutations_centred``,
    ``p.n_permutations_complements``, ``p.knn_k``, ``p.seed`` and ``p.device``. With ``cache`` each pair's row is
    read from the cache when an earlier run computed it (``pair_statistics.compute`` otherwise).

    Returns:
        One row per pair: ``model A``, ``model B``, ``tokens``, ``permutations``, then for ``raw``,
        ``centred`` and ``CKA`` the statistic (``r raw``, ``r centred``, ``CKA``), ``null mean``, ``null std``,
        ``z`` and ``p``, then ``spearman raw``, ``mutual kNN@k``, ``mutual kNN null``, ``mutual kNN chance``,
        ``p mutual kNN``.

    Raises:
        EmbgeoInputError: no pair, or a model of a pair without an embedding table.
    """
    check_pairs(shared, tables, "Chapter 1 compares models in pairs: no pair was given (install at least two models).")
    dev = get_device(p.device)
    measure: Callable[..., dict[str, Any]] = pair_statistics if cache else pair_statistics.compute
    rows = []
    for (a, b), s in shared.items():
        X, Y = sample_rows(tables, (a, b), s, p.n_tokens, p.seed)
        counts = (p.n_permutations, p.n_permutations_centred, p.n_permutations_complements)
        rows.append(measure(a, b, X, Y, *counts, p.knn_k, p.seed, dev))
    return pd.DataFrame(rows)


def token_pair_cosines(
    X: Array,
    Y: Array,
    strings: Sequence[str],
    n_pairs: int = 4000,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
    center: bool = True,
) -> pd.DataFrame:
    """Chapter 1: the cosines of random token pairs in two models, the points of the cosine scatter.

    ``n_pairs`` index pairs ``(i, j)`` are drawn with a seeded generator and pairs
    with ``i == j`` dropped; each row holds the two tokens (as ``repr`` strings,
    so spaces and newlines show) and the pair's cosine in each model, after
    mean-centring each cloud when ``center``.

    Returns:
        DataFrame with ``token 1``, ``token 2``, ``cosine in <A>``, ``cosine in <B>``, sorted by the sum of
        the two cosines, largest first (the head holds the pairs both models find most similar).
    """
    x = as_matrix(X, "X").cpu().numpy()
    y = as_matrix(Y, "Y").cpu().numpy()
    n = x.shape[0]
    if y.shape[0] != n or len(strings) != n:
        raise EmbgeoInputError(
            f"X ({n} rows), Y ({y.shape[0]}) and strings ({len(strings)}) must describe the same tokens."
        )
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise EmbgeoInputError(f"n_pairs must be a positive integer, got {n_pairs!r}.")
    units = []
    for name, m in (("X", x), ("Y", y)):
        m = m - m.mean(0) if center else m
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise EmbgeoInputError(f"{name} holds zero vectors: their cosine is undefined; drop those rows first.")
        units.append(m / norms)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, size=(2, n_pairs))
    keep = i != j
    i, j = i[keep], j[keep]
    ca, cb = (units[0][i] * units[0][j]).sum(1), (units[1][i] * units[1][j]).sum(1)
    order = np.argsort(-ca - cb, kind="stable")
    return pd.DataFrame(
        {
            "token 1": [repr(strings[t]) for t in i[order]],
            "token 2": [repr(strings[t]) for t in j[order]],
            f"cosine in {names[0]}": ca[order],
            f"cosine in {names[1]}": cb[order],
        }
    )


def layer_alignment(shared: Mapping[tuple[str, str], SharedVocabulary], p: Parameters) -> LayerAlignment:
    """Chapter 1: the layer x layer map of one pair of models, ``p.layer_pair``, over tokens presented alone.

    ``p.n_layer_tokens`` shared tokens of the pair are drawn with seed ``p.seed + 1``; each is run alone after a
    newline token in both models (:func:`embgeo_utils.lm.activations.lone_token_states`, on ``p.device``), and the
    mean-centred cosine-matrix correlation of every layer of A with every layer of B is measured
    (:func:`embgeo_utils.geometry.similarity.layer_map`).

    Raises:
        EmbgeoInputError: ``shared`` holds neither order of the pair.
    """
    la, lb = p.layer_pair
    key = (la, lb) if (la, lb) in shared else (lb, la)
    if key not in shared:
        raise EmbgeoInputError(f"No shared vocabulary of the layer pair {p.layer_pair}; compute it with the others.")
    sample = shared[key].sample(p.n_layer_tokens, seed=p.seed + 1)
    ids = dict(zip(key, (sample.ids_a, sample.ids_b)))
    dev = get_device(p.device)
    # [tokens, layers + 1, d]: each token alone after a newline, at the token's position
    states = {name: activations.lone_token_states(models.load(name, device=dev), ids[name]) for name in (la, lb)}
    table = layer_map(states[la], states[lb], center=True, device=dev)
    return LayerAlignment(la, lb, len(sample), table)


#: Claim 6's smallest effect that counts (r above its null mean) and where it comes from.
MIN_EFFECT_6 = (
    0.1,
    "practical: 'far above the null' read as a correlation of the cosine matrices at least 0.1 above the "
    "null's mean (a tenth of the correlation scale); a first measurement, SmolLM2 vs Gemma-3 on 3,000 "
    "tokens, gave r = 0.23",
)


def check_claim6(pairs: pd.DataFrame, alpha: float = 0.01, correction: str = "holm") -> stats.Verdict:
    """Chapter 1: the verdict of claim 6, cosine matrices correlate across models far above the null.

    One check per model pair (rows of :func:`compare_models`): the Pearson r of the raw cosine matrices exceeds
    its permutation null. The mean-centred r (anisotropy removed) is reported beside it, with its own null, as a
    robustness check outside the verdict: one check per pair keeps the Holm family small enough for the
    permutation floor to resolve it.

    Each check's effect is ``r - null mean``, its minimum :data:`MIN_EFFECT_6`, its p-value the one-sided
    permutation p of :func:`permutation_test` (with its number of permutations, so that the verdict refuses a
    count too small for Holm to reach ``alpha``), its standard error the null's standard deviation and ``n``
    the number of tokens. The verdict comes from :func:`embgeo_utils.core.stats.verdict`.

    Raises:
        EmbgeoInputError: an empty table or missing columns.
    """
    need = ["model A", "model B", "tokens", "r raw", "null mean raw", "p raw", "permutations"]
    missing = [c for c in need if c not in pairs.columns]
    if pairs.empty or missing:
        raise EmbgeoInputError(
            f"check_claim6 needs the table of compare_models (missing columns: {missing or 'none, but no rows'})."
        )
    minimum, source = MIN_EFFECT_6
    checks = [
        stats.Check(
            f"{row['model A']} vs {row['model B']}: raw r above null",
            float(row["r raw"] - row["null mean raw"]),
            float(row["p raw"]),
            minimum,
            int(row["tokens"]),
            float(row["null std raw"]) if "null std raw" in row and np.isfinite(row["null std raw"]) else None,
            min_effect_source=source,
            n_permutations=int(row["permutations"]),
        )
        for _, row in pairs.iterrows()
    ]
    return stats.verdict(checks, alpha=alpha, correction=correction)


def pair_matrix(pairs: Any, model_names: Sequence[str], label: str) -> pd.DataFrame:
    """Chapter 1: the model x model matrix of ``r <label>`` (``"raw"`` or ``"centred"``), 1 on the diagonal.

    Args:
        pairs: one row per model pair with ``model A``, ``model B`` and ``r <label>`` (from :func:`compare_models`).
        model_names: the models, in the order of the rows and columns.
    """
    mat = pd.DataFrame(np.eye(len(model_names)), index=list(model_names), columns=list(model_names))
    for _, r in pairs.iterrows():
        mat.loc[r["model A"], r["model B"]] = mat.loc[r["model B"], r["model A"]] = r[f"r {label}"]
    return mat


def plot_pair_heatmaps(pairs: Any, model_names: Sequence[str], show: bool = False) -> Any:
    """Chapter 1: model x model heatmaps of the cosine-matrix correlation, raw and mean-centred.

    Args:
        pairs: one row per model pair with ``model A``, ``model B``, ``r raw``, ``r centred``
            (from :func:`compare_models`).
        model_names: the models, in the order of the axes.
        show: display the figure now, then its interactive version (:func:`interactive_pair_heatmaps`).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.9))
    small = len(model_names) <= 6
    for ax, label in zip(axes, ("raw", "centred")):
        sns.heatmap(
            pair_matrix(pairs, model_names, label),
            annot=small,
            fmt=".2f",
            vmin=0,
            vmax=1,
            cmap="viridis",
            square=True,
            ax=ax,
            cbar_kws={"label": "Pearson r of cosine matrices", "shrink": 0.8},
        )
        ax.set_title(f"Cosine-matrix correlation ({label})")
        ax.set_xlabel("model B")
        ax.set_ylabel("model A")
    fig.tight_layout()
    if show:
        interactive.show(fig, interactive_pair_heatmaps(pairs, model_names))
    return fig


def interactive_pair_heatmaps(pairs: Any, model_names: Sequence[str]) -> interactive.InteractiveFigure:
    """Chapter 1: :func:`plot_pair_heatmaps` as an interactive figure (hover a cell for the pair's r)."""
    panels = [(f"{label}", pair_matrix(pairs, model_names, label)) for label in ("raw", "centred")]
    return interactive.heatmap_panels(
        panels, "Cosine-matrix correlation of every pair of models", "model B", "model A", "r", zrange=(0.0, 1.0),
        annotate=len(model_names) <= 6,
    )  # fmt: skip


def plot_cosine_scatter(cos_pairs: Any, ax: Any = None, show: bool = False, seed: int = 0) -> Any:
    """Chapter 1: token-pair cosines in model A against model B, with a least-squares line.

    Args:
        cos_pairs: DataFrame whose last two columns are the cosines in A and in B
            (from :func:`token_pair_cosines`).
        show: display the figure now, then its interactive version (:func:`interactive_cosine_scatter`).
        seed: the seed of the interactive figure's sample of points (when there are more than it keeps).
    """
    import seaborn as sns

    x, y = cos_pairs.columns[-2], cos_pairs.columns[-1]
    fig, ax = figure_axes((5.5, 5), ax)
    sns.scatterplot(data=cos_pairs, x=x, y=y, s=6, alpha=0.35, linewidth=0, ax=ax)
    sns.regplot(data=cos_pairs, x=x, y=y, scatter=False, color="black", ax=ax)
    ax.set_title(f"Token-pair cosines (centred), {len(cos_pairs)} pairs")
    if show:
        interactive.show(fig, interactive_cosine_scatter(cos_pairs, seed=seed))
    return fig


def interactive_cosine_scatter(cos_pairs: Any, seed: int = 0) -> interactive.InteractiveFigure:
    """Chapter 1: :func:`plot_cosine_scatter` as an interactive figure (hover a point for its two tokens).

    At most :data:`~embgeo_utils.chapters.interactive.MAX_POINTS` pairs are drawn (a seeded sample); the line is the
    least-squares fit over every pair.
    """
    x, y = cos_pairs.columns[-2], cos_pairs.columns[-1]
    fit = tuple(np.polyfit(cos_pairs[x], cos_pairs[y], 1)) if len(cos_pairs) > 1 else None
    title = f"Token-pair cosines (centred), {len(cos_pairs)} pairs"
    if len(cos_pairs) > interactive.MAX_POINTS:
        title += f" ({interactive.MAX_POINTS} drawn)"
    return interactive.scatter(cos_pairs, x, y, ["token 1", "token 2"], title, seed=seed, line=fit)


def plot_layer_map(layers: Any, model_a: str, model_b: str, n_tokens: int, ax: Any = None, show: bool = False) -> Any:
    """Chapter 1: heatmap of the layer x layer cosine-matrix correlation (layer 0 at the bottom).

    Args:
        layers: tidy DataFrame with ``layer A``, ``layer B``, ``r`` (``LayerAlignment.table``, from :func:`layer_alignment`).
        show: display the figure now, then its interactive version (:func:`interactive_layer_map`).
    """
    import seaborn as sns

    fig, ax = figure_axes((6.4, 5.4), ax)
    sns.heatmap(
        layers.pivot(index="layer A", columns="layer B", values="r"),
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "Pearson r of centred cosine matrices"},
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"{model_b} layer")
    ax.set_ylabel(f"{model_a} layer")
    ax.set_title(f"Layer × layer alignment, {n_tokens} lone shared tokens")
    if show:
        interactive.show(fig, interactive_layer_map(layers, model_a, model_b, n_tokens))
    return fig


def interactive_layer_map(layers: Any, model_a: str, model_b: str, n_tokens: int) -> interactive.InteractiveFigure:
    """Chapter 1: :func:`plot_layer_map` as an interactive figure (hover a cell for the two layers and their r).

    Layer 0 (the input embeddings) is at the bottom left; maps larger than
    :data:`~embgeo_utils.chapters.interactive.MAX_SIDE` layers a side are averaged over blocks of layers.
    """
    grid = layers.pivot(index="layer A", columns="layer B", values="r")
    grid.index, grid.columns = [int(v) for v in grid.index], [int(v) for v in grid.columns]
    return interactive.heatmap_panels(
        [(f"{model_a} against {model_b}", grid)], f"Layer × layer alignment, {n_tokens} lone shared tokens",
        f"{model_b} layer", f"{model_a} layer", "r",
    )  # fmt: skip
