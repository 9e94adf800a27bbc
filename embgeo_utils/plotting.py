"""One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    ax.set_xlabel("model")
    ax.set_ylabel("row norm / median row norm (log)")
    ax.set_title("Token-embedding norms per model")
    return fig


def passage_lengths(lengths: Any, tokenizer_name: str, ax: Any = None) -> Any:
    """Chapter 0: box plot of candidate passage lengths (tokens) per source."""
    import seaborn as sns

    fig, ax = _axes((8, 3.4), ax)
    sns.boxplot(data=lengths, x="source", y="tokens", hue="source", ax=ax, legend=False)
    ax.set_xlabel("source")
    ax.set_ylabel(f"passage length ({tokenizer_name} tokens)")
    ax.set_title("Candidate passage lengths per source")
    return fig


def topic_counts(topics: Any, ax: Any = None) -> Any:
    """Chapter 0: horizontal bars of Wikipedia summaries per topic."""
    import seaborn as sns

    fig, ax = _axes((8, 3.4), ax)
    sns.barplot(x=topics.values, y=topics.index, color=sns.color_palette()[0], ax=ax)
    ax.set_xlabel("summaries")
    ax.set_ylabel("topic")
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
    ax.set_xlabel("model")
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
    ax.set_ylabel("model pair (A → B)")
    ax.set_title("Neighbour-set overlap between A and B")
    return fig


# Chapter 3

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ += [
    "embedding_gride_curves",
    "neighbourhood_coherence_bars",
    "token_id_by_frequency",
    "token_id_correlation_heatmap",
    "token_id_distributions",
    "semantic_coherence_bars",
    "undertrained_id_histograms",
]


def _need_columns(frame: pd.DataFrame, columns: Sequence[str], made_by: str) -> None:
    from .errors import EmbgeoInputError

    missing = [c for c in columns if c not in getattr(frame, "columns", ())]
    if missing:
        raise EmbgeoInputError(f"The table lacks the columns {missing}; pass the output of {made_by}.")


def token_id_distributions(tokens: pd.DataFrame, k: int, variance: float) -> Figure:
    """Chapter 3: violins of per-token local ID, nearest against random neighbourhoods, one per model.

    Each half is scaled to the same width (``density_norm="width"``): random
    neighbourhoods' IDs are concentrated near the ceiling, and with equal areas
    their half would shrink to a line.

    Args:
        tokens: ``token_dimension.token_frame`` (``model``, ``width``, ``local ID``, ``random ID``).
        k: neighbours per token (the ceiling of the ID, drawn as a line).
        variance: the variance threshold of the local PCA (for the axis label).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    _need_columns(tokens, ("model", "width", "local ID", "random ID"), "token_dimension.token_frame")
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


def undertrained_id_histograms(tokens: pd.DataFrame, k: int) -> Figure:
    """Chapter 3: per model, the local-ID histogram of trained and under-trained tokens, stacked.

    Args:
        tokens: ``token_dimension.token_frame`` of *all* evaluated tokens with a bool column ``under-trained``.
        k: neighbours per token (the largest possible ID).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    _need_columns(tokens, ("model", "local ID", "under-trained"), "token_frame(...) with an 'under-trained' column")
    names = list(dict.fromkeys(tokens["model"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 0.6, 3.2), sharey=False, squeeze=False)
    bins = np.arange(0.5, k + 1.5, 1.0)
    for ax, name in zip(axes[0], names, strict=True):
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
    axes[0][0].set_ylabel("evaluated tokens")
    fig.suptitle("Local ID of trained and under-trained tokens")
    fig.tight_layout()
    return fig


def semantic_coherence_bars(semantic: pd.DataFrame, coherence_k: int) -> Figure | None:
    """Chapter 3: encoder similarity of the lowest- and highest-ID deciles' neighbourhoods, per model.

    Args:
        semantic: ``coherence.semantic_coherence``.
        coherence_k: neighbours compared (for the title).

    Returns:
        The Figure, or None for an empty table.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _need_columns(
        semantic, ("model", "encoder", "independent", "similarity low ID", "similarity high ID"),
        "coherence.semantic_coherence",
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


def token_id_by_frequency(tokens: pd.DataFrame) -> Figure:
    """Chapter 3: mean local ID (95 % CI) by word-frequency stratum, one line per model.

    Args:
        tokens: ``token_dimension.token_frame`` with its ``Zipf stratum`` column.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _need_columns(tokens, ("model", "Zipf stratum", "local ID"), "token_dimension.token_frame(ids, strata=True)")
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


def token_id_correlation_heatmap(correlations: pd.DataFrame) -> Figure | None:
    """Chapter 3: Spearman of per-token ID for every pair of models, as a symmetric heatmap.

    Args:
        correlations: ``token_dimension.id_correlations``.

    Returns:
        The Figure, or None when there is no pair (a single model).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import seaborn as sns

    _need_columns(correlations, ("model A", "model B", "tokens", "Spearman"), "token_dimension.id_correlations")
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


def neighbourhood_coherence_bars(
    coherence: pd.DataFrame, coherence_k: int, label: str = "kind + capitalised"
) -> Figure | None:
    """Chapter 3: coherence of the lowest- and highest-ID groups per model, for one label.

    Args:
        coherence: ``coherence.coherence_table``.
        coherence_k: neighbours compared (for the title).
        label: which label's rows to draw.

    Returns:
        The Figure, or None when the table has no row of that label.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _need_columns(coherence, ("model", "label", "coherence low ID", "coherence high ID"), "coherence.coherence_table")
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


def embedding_gride_curves(curves: pd.DataFrame, n_points: int) -> Figure:
    """Chapter 3: GRIDE ID against the neighbour rank n2 (error bars: Fisher standard error), one line per model.

    Args:
        curves: the curves of ``token_dimension.global_ids``.
        n_points: rows sampled per table (for the title).
    """
    import matplotlib.pyplot as plt

    _need_columns(curves, ("model", "n2", "ID", "error"), "token_dimension.global_ids")
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


# ----------------------------------------------------------------------------------------
# Chapter 4: layerwise token geometry

__all__ += ["gride_scale_curves", "id_loss_correlation_by_layer", "layer_profiles", "loss_by_shuffle_level"]


def _finish(figure: Any, title: str, show: bool) -> Any:
    import matplotlib.pyplot as plt

    figure.suptitle(title, y=1.03)
    if show:
        plt.show()
    return figure


def layer_profiles(geometry: Any, y: str, ylabel: str, title: str, show: bool = True) -> Any:
    """One panel per model: ``y`` against relative depth, one line per shuffle level, ± one standard error (chapter 4).

    Args:
        geometry: ``token_geometry.LayerwiseRun.geometry`` (columns ``model, S, depth`` and ``y``).
        y: the column to plot, e.g. ``"ID"``, ``"chi_1"``, ``"cos_mean"``.
        ylabel: its axis label, with units.
        title: the figure's title.
        show: show the figure now (inline), so that it comes before the cell's table.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    _need_columns(geometry, ["model", "S", "depth", y], "token_geometry.run_layerwise")
    grid = sns.relplot(
        data=geometry,
        x="depth",
        y=y,
        hue="S",
        col="model",
        kind="line",
        errorbar="se",
        palette="viridis",
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("relative depth (layer / number of layers)", ylabel)
    grid.set_titles("{col_name}")
    return _finish(grid.figure, title, show)


def gride_scale_curves(curves: Any, show: bool = True) -> Any:
    """GRIDE ID against the rank ``n2`` (log scale) at the peak layer, per model and shuffle level (chapter 4).

    Args:
        curves: ``token_geometry.LayerwiseRun.curves`` (columns ``model, S, n2, ID``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _need_columns(curves, ["model", "S", "n2", "ID"], "token_geometry.run_layerwise")
    levels = sorted(curves["S"].unique())
    palette = {s: plt.cm.viridis(i / max(1, len(levels) - 1)) for i, s in enumerate(levels)}
    grid = sns.relplot(
        data=curves,
        x="n2",
        y="ID",
        hue="S",
        col="model",
        kind="line",
        errorbar="se",
        marker="o",
        palette=palette,
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    for ax in grid.axes.flat:
        ax.set_xscale("log", base=2)
    grid.set_axis_labels("GRIDE rank n2 (neighbours, log scale)", "GRIDE ID (dimensions)")
    grid.set_titles("{col_name}")
    title = "GRIDE scale curve at the peak layer, " + " and ".join(f"S = {s}" for s in levels)
    return _finish(grid.figure, title, show)


def loss_by_shuffle_level(losses: Any, show: bool = True) -> Any:
    """Mean next-token loss (± one standard error) against the shuffle level, one colour per model (chapter 4).

    Args:
        losses: ``token_geometry.LayerwiseRun.losses`` (columns ``model, S, loss``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _need_columns(losses, ["model", "S", "loss"], "token_geometry.run_layerwise")
    names = list(dict.fromkeys(losses["model"]))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.pointplot(
        data=losses,
        x="S",
        y="loss",
        hue="model",
        errorbar="se",
        dodge=0.3 if len(names) > 1 else False,
        palette=model_colors(names),
        ax=ax,
    )
    ax.set_xlabel("shuffle level S (K = 4^S blocks)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title("Loss rises with the shuffle level")
    if show:
        plt.show()
    return fig


def id_loss_correlation_by_layer(corr: Any, show: bool = True) -> Any:
    """Pearson r(ID, loss) across prompts against relative depth, one panel per model (chapter 4).

    Args:
        corr: ``token_geometry.id_loss_correlation(...)`` (columns ``model, prompts, depth, r``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    _need_columns(corr, ["model", "prompts", "depth", "r"], "token_geometry.id_loss_correlation")
    grid = sns.relplot(
        data=corr, x="depth", y="r", hue="prompts", col="model", kind="line", marker="o", height=3.2, aspect=1.1
    )
    for ax in grid.axes.flat:
        ax.axhline(0, color="grey", lw=0.8)
    grid.set_axis_labels("relative depth (layer / number of layers)", "Pearson r(ID, loss) across prompts")
    grid.set_titles("{col_name}")
    return _finish(grid.figure, "Correlation of the layer's ID with the prompt's loss", show)


# Chapter 5: SAE feature matching across scale
__all__ += ["sae_layer_heatmaps", "svcca_curves"]


def sae_layer_heatmaps(grid: pd.DataFrame, names: tuple[str, str]) -> Figure:
    """Chapter 5: layer x layer heatmaps of RSA, SVCCA above its null, -log10 p of RSA, and pairs kept.

    Args:
        grid: ``feature_matching.run_pair(...).grid``.
        names: the two models (rows: A's layers, columns: B's layers).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    _need_columns(grid, ("layer A", "layer B", "pairs"), "feature_matching.run_pair")
    g = grid.copy()
    if "SVCCA" in g:
        g["SVCCA − null"] = g["SVCCA"] - g["SVCCA null mean"]
    if "RSA p" in g:
        g["−log10 p (RSA)"] = -np.log10(g["RSA p"].astype(float))
    panels = [c for c in ("RSA", "SVCCA − null", "−log10 p (RSA)", "pairs") if c in g]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, col in zip(np.atleast_1d(axes), panels):
        table = g.pivot(index="layer A", columns="layer B", values=col).astype(float)
        sns.heatmap(
            table,
            annot=True,
            fmt=".3g" if col != "pairs" else ".0f",
            cmap="viridis",
            ax=ax,
            cbar=False,
            annot_kws={"fontsize": 7},
        )
        ax.set_title(col)
        ax.set_xlabel(f"layer of {names[1]}")
        ax.set_ylabel(f"layer of {names[0]}")
    fig.suptitle("Paired SAE decoder geometry per layer pair", y=1.02)
    return fig


def svcca_curves(curves: pd.DataFrame, matched: Sequence[tuple[int, int]]) -> Figure:
    """Chapter 5: SVCCA against the number of kept singular directions, with the null, for the matched layer pairs."""
    import matplotlib.pyplot as plt
    import numpy as np

    _need_columns(
        curves, ("layer A", "layer B", "n_components", "SVCCA", "null mean", "null max"), "feature_matching.run_pair"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(matched))))
    for color, (la, lb) in zip(colors, matched):
        c = curves[(curves["layer A"] == la) & (curves["layer B"] == lb)]
        if c.empty:
            continue
        ax.plot(c["n_components"], c["SVCCA"], marker="o", color=color, label=f"layers {la} / {lb}")
        ax.fill_between(c["n_components"], c["null mean"], c["null max"], color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("singular directions kept per side (log scale)")
    ax.set_ylabel("SVCCA (mean canonical correlation)")
    ax.set_title("SVCCA of paired decoder rows; bands: permutation null, mean to max")
    ax.legend(fontsize=8)
    return fig


# Chapter 6: steering vectors carried across models (EMB2EMB)
__all__ += ["steering_sweep"]


def steering_sweep(summary: pd.DataFrame) -> Figure:
    """Chapter 6: per model pair, the concept score and the perplexity against strength, and one against the other.

    Args:
        summary: ``transfer.sweep_summary(...)`` (mean rise with 95 % bootstrap
            interval, geometric-mean perplexity ratio with its interval).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from .transfer import CONDITIONS

    _need_columns(
        summary, ("pair", "condition", "alpha", "rise", "rise low", "rise high", "ppl ratio"), "transfer.sweep_summary"
    )
    pairs = list(dict.fromkeys(summary["pair"]))
    conds = [c for c in CONDITIONS if c in set(summary["condition"]) and c != "none"]
    colors = dict(zip(conds, sns.color_palette("colorblind", n_colors=len(conds))))
    fig, axes = plt.subplots(len(pairs), 3, figsize=(14, 3.8 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        s = summary[summary["pair"] == pair]
        for c in conds:
            g = s[s["condition"] == c].sort_values("alpha")
            col = colors[c]
            err = np.vstack([g["rise"] - g["rise low"], g["rise high"] - g["rise"]])
            row[0].errorbar(g["alpha"], g["rise"], yerr=err, marker="o", capsize=3, color=col, label=c)
            perr = np.vstack([g["ppl ratio"] - g["ppl low"], g["ppl high"] - g["ppl ratio"]])
            row[1].errorbar(g["alpha"], g["ppl ratio"], yerr=perr, marker="o", capsize=3, color=col, label=c)
            row[2].plot(g["ppl ratio"], g["rise"], marker="o", color=col, label=c)
        row[0].axhline(0, color="grey", lw=0.8)
        row[0].set_xlabel("alpha (× median residual norm of B)")
        row[0].set_ylabel("rise in log P(topic tokens) (nats)")
        row[0].set_title(f"{pair}: concept score")
        row[1].axhline(2, color="grey", ls="--", lw=0.8)
        row[1].set_yscale("log")
        row[1].set_xlabel("alpha (× median residual norm of B)")
        row[1].set_ylabel("perplexity ratio on real text (log)")
        row[1].set_title("fluency (dashed: 2× unsteered)")
        row[2].axvline(2, color="grey", ls="--", lw=0.8)
        row[2].set_xscale("log")
        row[2].set_xlabel("perplexity ratio (log)")
        row[2].set_ylabel("rise in concept score (nats)")
        row[2].set_title("score against fluency")
        row[0].legend(fontsize=8)
    return fig
