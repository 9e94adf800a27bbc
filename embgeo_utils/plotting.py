"""One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["use_book_style", "model_colors", "PALETTE"]

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
