"""One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PALETTE", "model_colors", "use_book_style"]

PALETTE = "colorblind"


def use_book_style() -> None:
    """Apply the book's seaborn/matplotlib style (labelled axes are the caller's job)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold", "figure.autolayout": True})


def model_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per model name, stable across chapters for the packaged models."""
    import seaborn as sns

    from .models import REGISTRY

    order = list(REGISTRY) + [n for n in names if n not in REGISTRY]
    colors = sns.color_palette(PALETTE, n_colors=max(10, len(order)))
    return {name: colors[order.index(name) % len(colors)] for name in names}


# ---------------------------------------------------------------------------
# Chapters 0-2: models and text, global orientation, local geometry by LLE
# ---------------------------------------------------------------------------

__all__ += [
    "cosine_scatter",
    "embedding_norms",
    "layer_map",
    "lle_errors",
    "neighbour_overlap",
    "pair_heatmaps",
    "passage_lengths",
    "real_vs_shuffled_loss",
    "topic_counts",
]


def _axes(figsize: tuple[float, float], ax: Any = None) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize)


def embedding_norms(norms: Any, ax: Any = None) -> Any:
    """Chapter 0: violins of token-embedding row norms relative to each table's median (log scale).

    Args:
        norms: tidy DataFrame with ``model`` and ``norm / median norm`` (from ``sanity.embedding_tables``).
    """
    import seaborn as sns

    fig, ax = _axes((8, 3.6), ax)
    names = list(dict.fromkeys(norms["model"]))
    sns.violinplot(
        data=norms,
        x="model",
        y="norm / median norm",
        hue="model",
        cut=0,
        palette=model_colors(names),
        ax=ax,
        legend=False,
    )
    ax.set_yscale("log")
    ax.set_xlabel("")
    ax.set_ylabel("row norm / median row norm (log)")
    ax.set_title("Token-embedding norms per model")
    return fig


def passage_lengths(lengths: Any, tokenizer_name: str, ax: Any = None) -> Any:
    """Chapter 0: box plot of candidate passage lengths (tokens) per source."""
    import seaborn as sns

    fig, ax = _axes((8, 3.4), ax)
    sns.boxplot(data=lengths, x="source", y="tokens", hue="source", ax=ax, legend=False)
    ax.set_xlabel("")
    ax.set_ylabel(f"passage length ({tokenizer_name} tokens)")
    ax.set_title("Candidate passage lengths per source")
    return fig


def topic_counts(topics: Any, ax: Any = None) -> Any:
    """Chapter 0: horizontal bars of Wikipedia summaries per topic."""
    import seaborn as sns

    fig, ax = _axes((8, 3.4), ax)
    sns.barplot(x=topics.values, y=topics.index, color=sns.color_palette()[0], ax=ax)
    ax.set_xlabel("summaries")
    ax.set_ylabel("")
    ax.set_title("Wikipedia summaries per topic (the labels used for steering and coherence)")
    return fig


def real_vs_shuffled_loss(losses: Any, n_passages: int, passage_tokens: int, ax: Any = None) -> Any:
    """Chapter 0: mean next-token loss per model on real and shuffled text, with 95 % intervals.

    Args:
        losses: tidy DataFrame of ``sanity.real_vs_shuffled_loss`` (one row per passage).
    """
    import seaborn as sns

    long = losses.melt(id_vars=["model", "source"], var_name="text", value_name="loss")
    fig, ax = _axes((8, 3.6), ax)
    sns.barplot(data=long, x="model", y="loss", hue="text", errorbar=("ci", 95), ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"Loss on {n_passages} real passages of {passage_tokens} tokens")
    return fig


def pair_heatmaps(pairs: Any, model_names: Sequence[str]) -> Any:
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


def cosine_scatter(cos_pairs: Any, ax: Any = None) -> Any:
    """Chapter 1: token-pair cosines in model A against model B, with a least-squares line.

    Args:
        cos_pairs: DataFrame whose last two columns are the cosines in A and in B
            (from ``similarity.token_pair_cosines``).
    """
    import seaborn as sns

    x, y = cos_pairs.columns[-2], cos_pairs.columns[-1]
    fig, ax = _axes((5.5, 5), ax)
    sns.scatterplot(data=cos_pairs, x=x, y=y, s=6, alpha=0.35, linewidth=0, ax=ax)
    sns.regplot(data=cos_pairs, x=x, y=y, scatter=False, color="black", ax=ax)
    ax.set_title(f"Token-pair cosines (centred), {len(cos_pairs)} pairs")
    return fig


def layer_map(layers: Any, model_a: str, model_b: str, n_tokens: int, ax: Any = None) -> Any:
    """Chapter 1: heatmap of the layer x layer cosine-matrix correlation (layer 0 at the bottom).

    Args:
        layers: tidy DataFrame with ``layer A``, ``layer B``, ``r`` (from ``similarity.layer_map``).
    """
    import seaborn as sns

    fig, ax = _axes((7, 6), ax)
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


def lle_errors(errors: Any, k: int, n_tokens: int, order: Sequence[str] | None = None, ax: Any = None) -> Any:
    """Chapter 2: box plots of the relative reconstruction error in B, per pair and weighting (log scale).

    Args:
        errors: tidy DataFrame with ``pair``, ``weights``, ``relative error`` (from ``lle.compare_pairs``).
        order: the weightings in legend order (default: as they appear).
    """
    import seaborn as sns

    fig, ax = _axes((10, 4.5), ax)
    sns.boxplot(
        data=errors,
        x="pair",
        y="relative error",
        hue="weights",
        hue_order=list(order) if order is not None else None,
        showfliers=False,
        ax=ax,
    )
    ax.set_yscale("log")
    ax.set_xlabel("model A → model B")
    ax.set_ylabel("relative reconstruction error ‖y − Σ w y‖² / ‖y‖²")
    ax.set_title(f"LLE reconstruction in B, k = {k}, {n_tokens} shared tokens")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def neighbour_overlap(summary: Any, k: int, ax: Any = None) -> Any:
    """Chapter 2: bars of the neighbour-set overlap of A and B per pair, beside its chance level."""
    import seaborn as sns

    plot = summary.melt(
        id_vars="pair", value_vars=["neighbour overlap", "overlap chance k/(n-1)"], var_name="", value_name="overlap"
    )
    fig, ax = _axes((7, 3.4), ax)
    sns.barplot(data=plot, y="pair", x="overlap", hue="", ax=ax)
    ax.set_xlabel(f"mean fraction of shared {k}-nearest neighbours")
    ax.set_ylabel("")
    ax.set_title("Neighbour-set overlap between A and B")
    return fig
