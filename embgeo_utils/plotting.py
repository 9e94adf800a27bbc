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


# ----------------------------------------------------------------------------------------
# Chapter 4: layerwise token geometry

__all__ += ["gride_scale_curves", "id_loss_correlation_by_layer", "layer_profiles", "loss_by_shuffle_level"]


def _check_columns(data: Any, columns: Sequence[str], name: str) -> None:
    from .errors import EmbgeoInputError

    missing = [c for c in columns if c not in getattr(data, "columns", ())]
    if missing:
        raise EmbgeoInputError(f"{name} lacks the column(s) {missing}; pass the table that token_geometry returns.")


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

    _check_columns(geometry, ["model", "S", "depth", y], "geometry")
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

    _check_columns(curves, ["model", "S", "n2", "ID"], "curves")
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

    _check_columns(losses, ["model", "S", "loss"], "losses")
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

    _check_columns(corr, ["model", "prompts", "depth", "r"], "corr")
    grid = sns.relplot(
        data=corr, x="depth", y="r", hue="prompts", col="model", kind="line", marker="o", height=3.2, aspect=1.1
    )
    for ax in grid.axes.flat:
        ax.axhline(0, color="grey", lw=0.8)
    grid.set_axis_labels("relative depth (layer / number of layers)", "Pearson r(ID, loss) across prompts")
    grid.set_titles("{col_name}")
    return _finish(grid.figure, "Correlation of the layer's ID with the prompt's loss", show)
