"""One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
Figures are drawn for the page's column: at most :data:`COLUMN_INCHES` wide and at most
:data:`MAX_PANELS_ACROSS` panels side by side (more go to further rows), so that the
page shows them at close to their drawn size and their labels stay legible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import EmbgeoInputError
from ..lm.models import REGISTRY

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COLUMN_INCHES",
    "DPI",
    "MAX_PANELS_ACROSS",
    "PALETTE",
    "model_colors",
    "use_book_style",
]


PALETTE = "colorblind"
#: Resolution of the figures in the executed notebooks (pixels per inch of figure size).
DPI = 110
#: Widest figure, in inches: the page's column at 1280 px shows it at no less than two thirds of its drawn width.
COLUMN_INCHES = 9.0
#: Panels side by side at most; more go to further rows.
MAX_PANELS_ACROSS = 2


def use_book_style() -> None:
    """Apply the book's seaborn/matplotlib style (labelled axes are the caller's job)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update({"figure.dpi": DPI, "savefig.dpi": 150, "axes.titleweight": "bold", "figure.autolayout": True})


def model_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per model name, stable across chapters for the packaged models."""
    import seaborn as sns

    order = list(REGISTRY) + [n for n in names if n not in REGISTRY]
    colors = sns.color_palette(PALETTE, n_colors=max(10, len(order)))
    return {name: colors[order.index(name) % len(colors)] for name in names}


def figure_axes(figsize: tuple[float, float], ax: Any = None) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize)


def need_columns(frame: pd.DataFrame, columns: Sequence[str], made_by: str) -> None:

    missing = [c for c in columns if c not in getattr(frame, "columns", ())]
    if missing:
        raise EmbgeoInputError(f"The table lacks the columns {missing}; pass the output of {made_by}.")


def finish_axes(figure: Any, title: str, show: bool) -> Any:
    import matplotlib.pyplot as plt

    figure.suptitle(title, y=1.03)
    if show:
        plt.show()
    return figure
