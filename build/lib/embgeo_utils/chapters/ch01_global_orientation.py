"""Global similarity of two point clouds over the same items (chapter 1).

Chapter 1 (global orientation) compares two models through the same tokens:
the cosine-similarity matrix of the tokens in model A against that in model B
(Pearson of the upper triangles), with Spearman, linear CKA and mutual k-NN as
complements, and a permutation null that breaks the token correspondence.

All measures take ``X`` ``(n, d1)`` and ``Y`` ``(n, d2)`` whose rows are the same
items; the widths may differ. ``measure(name, X, Y)`` is the single entry point
used by the notebooks.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Kornblith, Norouzi, Lee, Hinton (2019). Similarity of Neural Network
    Representations Revisited. ICML. arXiv:1905.00414.
    Huh, Cheung, Wang, Isola (2024). The Platonic Representation Hypothesis.
    arXiv:2405.07987 (mutual k-NN).


One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core import stats
from ..core.cache import array_digest, cache_dir, content_key, frame_row, load_frame, save_frame
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import as_matrix, check_pairs
from ..geometry.similarity import Array, permutation_test, spearman_cosine
from ..lm.vocab import SharedVocabulary
from .style import figure_axes

__all__ = [
    "check_claim6",
    "compare_models",
    "plot_cosine_scatter",
    "plot_layer_map",
    "plot_pair_heatmaps",
    "shared_vocabulary_table",
    "token_pair_cosines",
]


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


def compare_models(
    tables: Mapping[str, Array],
    shared: Mapping[tuple[str, str], SharedVocabulary],
    n_tokens: int = 3000,
    n_permutations: int = 1000,
    n_permutations_complements: int = 50,
    knn_k: int = 10,
    n_permutations_centred: int = 200,
    seed: int = 0,
    device: str | torch.device = "auto",
    cache: bool = True,
) -> pd.DataFrame:
    """Chapter 1: the cosine-matrix correlation of every model pair, with its null and its complements.

    For each pair, ``n_tokens`` shared tokens are drawn (``shared[pair].sample(n_tokens, seed)``)
    and their input-embedding rows taken in both models. Measured, each against the permutation
    null of :func:`permutation_test` (the token correspondence of B shuffled):

    * ``r raw`` / ``r centred``: Pearson r of the cosine matrices, raw (``n_permutations``
      permutations: the claim-6 checks) and mean-centred (``n_permutations_centred``);
    * ``CKA``: linear CKA, ``n_permutations_complements`` permutations;
    * ``mutual kNN@k``: mutual cosine k-NN, ``max(1, n_permutations_complements // 5)`` permutations
      (each recomputes both neighbour searches), with chance ``k / (n - 1)``;
    * ``spearman raw``: Spearman rank correlation of the raw cosines (no null).

    With ``cache`` each pair's row is kept on disk under a key of the sampled rows'
    values, the permutation counts, ``knn_k``, ``seed`` and the device type, so a
    rerun reads it.

    Returns:
        One row per pair: ``model A``, ``model B``, ``tokens``, ``permutations``, then for ``raw``,
        ``centred`` and ``CKA`` the statistic, ``null mean``, ``null std``, ``z`` and ``p``, then
        ``spearman raw``, ``mutual kNN@k``, ``mutual kNN null``, ``mutual kNN chance``, ``p mutual kNN``.

    Raises:
        EmbgeoInputError: no pair, or a model of a pair without an embedding table.
    """
    check_pairs(shared, tables, "Chapter 1 compares models in pairs: no pair was given (install at least two models).")
    dev = get_device(device)
    rows = []
    for (a, b), s in shared.items():
        sample = s.sample(n_tokens, seed=seed)
        X = tables[a][sample.ids_a]
        Y = tables[b][sample.ids_b]
        path = None
        if cache:
            key = content_key(
                "compare-v2", a, b, array_digest(X), array_digest(Y), n_permutations, n_permutations_centred,
                n_permutations_complements, knn_k, seed, dev.type,
            )  # fmt: skip
            path = cache_dir("similarity") / f"{key}.npz"
            cached = load_frame(path)
            if cached is not None and len(cached) == 1:
                rows.append(frame_row(cached))
                continue
        out: dict[str, Any] = {"model A": a, "model B": b, "tokens": len(sample), "permutations": n_permutations}
        for label, stat, n_perm in (
            ("raw", "cosine_corr", n_permutations),
            ("centred", "cosine_corr_centered", n_permutations_centred),
            ("CKA", "cka", n_permutations_complements),
        ):
            res = permutation_test(stat, X, Y, n=n_perm, seed=seed, device=dev)
            out.update(
                {
                    f"r {label}" if label != "CKA" else "CKA": res.statistic,
                    f"null mean {label}": res.null_mean,
                    f"null std {label}": res.null_std,
                    f"z {label}": res.z,
                    f"p {label}": res.p_value,
                }
            )
        out["spearman raw"] = spearman_cosine(X, Y, device=dev)
        knn_res = permutation_test(
            "mutual_knn", X, Y, n=max(1, n_permutations_complements // 5), seed=seed, device=dev, k=knn_k
        )
        out.update(
            {
                f"mutual kNN@{knn_k}": knn_res.statistic,
                "mutual kNN null": knn_res.null_mean,
                "mutual kNN chance": knn_k / (len(sample) - 1),
                "p mutual kNN": knn_res.p_value,
            }
        )
        if path is not None:
            save_frame(pd.DataFrame([out]), path)
        rows.append(out)
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


def check_claim6(
    pairs: pd.DataFrame, alpha: float = 0.01, min_effect: float = 0.1, correction: str = "holm"
) -> stats.Verdict:
    """Chapter 1: the verdict of claim 6, cosine matrices correlate across models far above the null.

    Pre-declared checks, one per model pair (rows of :func:`compare_models`): the
    Pearson r of the raw cosine matrices exceeds its permutation null. The
    mean-centred r (anisotropy removed) is reported beside it, with its own null,
    as a robustness check outside the verdict: one check per pair keeps the Holm
    family small enough for the permutation floor to resolve it.

    Each check's effect is ``r - null mean`` (positive in the claimed direction), its
    minimum effect ``min_effect`` = 0.1 (a correlation of a few hundredths could be
    significant with enough tokens yet mean little), its p-value the one-sided
    permutation p of :func:`permutation_test`, and ``n`` the number of tokens. The
    p-values of all checks are adjusted together (Holm by default) and compared with
    ``alpha`` by :func:`embgeo_utils.core.stats.verdict`: **reproduced** when every check
    holds, **partly reproduced** when some do, **not reproduced** otherwise.

    With ``m`` checks, Holm can reach ``alpha`` only if the permutation floor
    ``1 / (permutations + 1)`` is below ``alpha / m``; when the table's permutation
    count is too small for that, a warning says how many permutations are needed.

    Raises:
        EmbgeoInputError: an empty table or missing columns.
    """
    need = ["model A", "model B", "tokens", "r raw", "null mean raw", "p raw"]
    missing = [c for c in need if c not in pairs.columns]
    if pairs.empty or missing:
        raise EmbgeoInputError(
            f"check_claim6 needs the table of compare_models (missing columns: {missing or 'none, but no rows'})."
        )
    checks = [
        stats.Check(
            f"{row['model A']} vs {row['model B']}: raw r above null",
            float(row["r raw"] - row["null mean raw"]),
            float(row["p raw"]),
            min_effect,
            int(row["tokens"]),
            float(row["null std raw"]) if "null std raw" in row and np.isfinite(row["null std raw"]) else None,
        )
        for _, row in pairs.iterrows()
    ]
    if "permutations" in pairs.columns:
        fewest = int(pairs["permutations"].min())
        m = len(checks) if correction in ("holm", "bonferroni") else 1
        if m / (fewest + 1) >= alpha:
            warnings.warn(
                f"With {fewest} permutations the smallest p-value is 1/{fewest + 1}; after {correction} over {m} checks "
                f"it cannot fall below alpha = {alpha}. Use n_permutations >= {math.ceil(m / alpha)} for a conclusive verdict.",
                stacklevel=2,
            )
    return stats.verdict(checks, alpha=alpha, correction=correction)


def plot_pair_heatmaps(pairs: Any, model_names: Sequence[str]) -> Any:
    """Chapter 1: model x model heatmaps of the cosine-matrix correlation, raw and mean-centred.

    Args:
        pairs: one row per model pair with ``model A``, ``model B``, ``r raw``, ``r centred``
            (from ``similarity.compare_models``).
        model_names: the models, in the order of the axes.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, label in zip(axes, ("raw", "centred")):
        mat = pd.DataFrame(np.eye(len(model_names)), index=list(model_names), columns=list(model_names))
        for _, r in pairs.iterrows():
            mat.loc[r["model A"], r["model B"]] = mat.loc[r["model B"], r["model A"]] = r[f"r {label}"]
        sns.heatmap(
            mat,
            annot=True,
            fmt=".2f",
            vmin=0,
            vmax=1,
            cmap="viridis",
            square=True,
            ax=ax,
            cbar_kws={"label": "Pearson r of cosine matrices"},
        )
        ax.set_title(f"Cosine-matrix correlation ({label})")
        ax.set_xlabel("model B")
        ax.set_ylabel("model A")
    return fig


def plot_cosine_scatter(cos_pairs: Any, ax: Any = None) -> Any:
    """Chapter 1: token-pair cosines in model A against model B, with a least-squares line.

    Args:
        cos_pairs: DataFrame whose last two columns are the cosines in A and in B
            (from ``similarity.token_pair_cosines``).
    """
    import seaborn as sns

    x, y = cos_pairs.columns[-2], cos_pairs.columns[-1]
    fig, ax = figure_axes((5.5, 5), ax)
    sns.scatterplot(data=cos_pairs, x=x, y=y, s=6, alpha=0.35, linewidth=0, ax=ax)
    sns.regplot(data=cos_pairs, x=x, y=y, scatter=False, color="black", ax=ax)
    ax.set_title(f"Token-pair cosines (centred), {len(cos_pairs)} pairs")
    return fig


def plot_layer_map(layers: Any, model_a: str, model_b: str, n_tokens: int, ax: Any = None) -> Any:
    """Chapter 1: heatmap of the layer x layer cosine-matrix correlation (layer 0 at the bottom).

    Args:
        layers: tidy DataFrame with ``layer A``, ``layer B``, ``r`` (from ``similarity.layer_map``).
    """
    import seaborn as sns

    fig, ax = figure_axes((7, 6), ax)
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
    return fig
