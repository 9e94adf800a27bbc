"""Interactive versions of the book's headline figures, the static image kept for print (chapters 1, 4 and 5).

A headline figure is drawn twice. The matplotlib figure becomes the PNG of the executed notebook: what a printed
page, the downloaded notebook and a browser without JavaScript show. The :class:`InteractiveFigure` is a plotly
specification (data and layout as JSON) that the HTML page draws with plotly.js: hover a cell or a point for its
value, drag to zoom, double-click to reset. :func:`show` displays both, static first.

The page holds only the specification. plotly.js itself is served once from the site's own ``_static`` folder, to
the pages that hold an interactive figure (the book's Sphinx extension, :mod:`embgeo_utils.book.publish`, does
this): nothing is loaded from outside the site, and the book works offline and from a sub-path. On screen the
interactive figure takes the static image's place once it is drawn; in print the static image is shown.

Every figure is bounded in size: a heatmap is averaged down to at most :data:`MAX_SIDE` cells a side
(:func:`downsample`), a scatter keeps at most :data:`MAX_POINTS` points, numbers keep :data:`DIGITS` significant
digits, and a specification above :data:`FIGURE_BUDGET` bytes is refused. A page's interactive figures together
stay below :data:`PAGE_BUDGET` bytes (the site tests check it).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import EmbgeoInputError, MissingDependencyError
from ..core.serial import json_ready

__all__ = [
    "DIGITS",
    "FIGURE_BUDGET",
    "HTML_CLASS",
    "InteractiveFigure",
    "MAX_POINTS",
    "MAX_SIDE",
    "PAGE_BUDGET",
    "downsample",
    "heatmap_panels",
    "line_panels",
    "scatter",
    "show",
]


#: Largest side of a heatmap, in cells, after :func:`downsample`.
MAX_SIDE = 64
#: Most points a scatter keeps (a seeded sample of the rest).
MAX_POINTS = 1500
#: Significant digits kept of every number of a figure.
DIGITS = 4
#: Largest specification of one figure, in bytes of JSON.
FIGURE_BUDGET = 150_000
#: Largest total of a page's interactive figures, in bytes of JSON (checked on the built site).
PAGE_BUDGET = 400_000
#: The class of the element that holds a figure in the HTML (the page's script draws every such element).
HTML_CLASS = "embgeo-plotly"
#: Panels side by side at most (the column of the book's page holds two legibly).
MAX_COLUMNS = 2

_FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 13}
#: The colour-blind-safe palette of the static figures (seaborn's "colorblind").
COLORWAY = ["#0173B2", "#DE8F05", "#029E73", "#D55E00", "#CC78BC", "#CA9161", "#FBAFE4", "#949494", "#ECE133"]


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise MissingDependencyError(
            "The interactive figures need plotly: install the book's extras with `pip install -e '.[book]'`."
        ) from exc
    return go


@dataclass(frozen=True)
class InteractiveFigure:
    """A plotly figure's specification, ready for the book's HTML page (chapters 1, 4 and 5).

    Attributes:
        data: plotly traces (plain JSON values).
        layout: plotly layout (plain JSON values).
        label: what the figure shows, in words (its accessible name).
        kind: ``"heatmap"``, ``"lines"`` or ``"scatter"`` (the element's ``data-kind``).
    """

    data: list[dict[str, Any]]
    layout: dict[str, Any]
    label: str
    kind: str

    def spec(self) -> dict[str, Any]:
        """``{"data": ..., "layout": ...}``, as plotly.js takes it."""
        return {"data": self.data, "layout": self.layout}

    def to_json(self) -> str:
        """The specification as compact JSON (no NaN: missing values are null)."""
        return json.dumps(self.spec(), separators=(",", ":"), allow_nan=False)

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`to_json` (what the page carries for this figure)."""
        return len(self.to_json().encode())

    def to_html(self) -> str:
        """The element the page's script draws: the specification as JSON inside a ``div`` of :data:`HTML_CLASS`."""
        text = self.to_json().replace("</", "<\\/")  # nothing in the JSON can close the script element
        label = html.escape(self.label, quote=True)
        return (
            f'<div class="{HTML_CLASS}" data-kind="{self.kind}" role="figure" aria-label="{label}">'
            f'<p class="embgeo-plotly-note">The interactive version of this figure is drawn in the book\'s HTML '
            f"pages; the image above is the same figure.</p>"
            f'<script type="application/json">{text}</script></div>'
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"text/html": self.to_html(), "text/plain": f"<interactive figure: {self.label}>"}


def _finish(figure: Any, label: str, kind: str, height: int) -> InteractiveFigure:
    """Book style on a plotly figure, then its plain, bounded specification."""
    figure.update_layout(
        font=_FONT, colorway=COLORWAY, height=height, autosize=True, paper_bgcolor="white",
        plot_bgcolor="white", margin={"l": 60, "r": 20, "t": 90, "b": 50}, hoverlabel={"font": {"size": 13}},
    )  # fmt: skip
    figure.update_xaxes(showgrid=True, gridcolor="#e5e5e5", zeroline=False, automargin=True)
    figure.update_yaxes(showgrid=True, gridcolor="#e5e5e5", zeroline=False, automargin=True)
    spec = figure.to_plotly_json()
    layout = dict(spec["layout"])
    layout.pop("template", None)
    out = InteractiveFigure(json_ready(spec["data"], DIGITS), json_ready(layout, DIGITS), label, kind)
    if out.nbytes > FIGURE_BUDGET:
        raise EmbgeoInputError(
            f"The interactive figure {label!r} holds {out.nbytes:,} bytes, above its budget of {FIGURE_BUDGET:,}: "
            f"downsample it (at most {MAX_SIDE} cells a side, {MAX_POINTS} points)."
        )
    return out


def _groups(n: int, max_side: int) -> list[np.ndarray]:
    """``range(n)`` cut into at most ``max_side`` consecutive groups of near-equal size."""
    return [g for g in np.array_split(np.arange(n), min(n, max_side)) if g.size]


def _group_label(labels: Sequence[Any], group: np.ndarray) -> str:
    first, last = labels[int(group[0])], labels[int(group[-1])]
    return str(first) if group.size == 1 else f"{first}–{last}"


def downsample(matrix: Any, max_side: int = MAX_SIDE) -> Any:
    """A matrix averaged over blocks of consecutive rows and columns, at most ``max_side`` a side (chapters 1, 5).

    A matrix already small enough is returned as it is. Otherwise rows (and columns) are cut into ``max_side``
    groups of near-equal size and each block's mean (NaN left out) becomes one cell, labelled with the range of
    the labels it covers, e.g. ``"4–7"``.

    Args:
        matrix: a pandas DataFrame (its index and columns label the cells).
        max_side: most rows and columns kept.

    Returns:
        A DataFrame of at most ``max_side`` × ``max_side`` cells.

    Raises:
        EmbgeoInputError: ``max_side`` below 1 or an empty matrix.
    """
    import pandas as pd

    if max_side < 1:
        raise EmbgeoInputError(f"max_side must be at least 1, got {max_side}.")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise EmbgeoInputError("The matrix is empty; there is nothing to draw.")
    if max(matrix.shape) <= max_side:
        return matrix
    values = matrix.to_numpy(dtype=np.float64)
    rows, cols = _groups(values.shape[0], max_side), _groups(values.shape[1], max_side)
    with np.errstate(all="ignore"):
        cells = [[np.nanmean(values[np.ix_(r, c)]) for c in cols] for r in rows]
    return pd.DataFrame(
        cells,
        index=[_group_label(list(matrix.index), r) for r in rows],
        columns=[_group_label(list(matrix.columns), c) for c in cols],
    )


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels, at most :data:`MAX_COLUMNS` side by side."""
    cols = min(MAX_COLUMNS, max(1, n))
    return (n + cols - 1) // cols, cols


def _subplots(titles: Sequence[str], spacing: float, shared_y: bool = False) -> tuple[Any, int]:
    """A plotly figure with one panel per title, at most :data:`MAX_COLUMNS` across; returns it and its columns."""
    from plotly.subplots import make_subplots

    n_rows, n_cols = _grid(len(titles))
    specs: list[list[dict[str, Any] | None]] = [
        [{} if r * n_cols + c < len(titles) else None for c in range(n_cols)] for r in range(n_rows)
    ]
    fig = make_subplots(
        rows=n_rows, cols=n_cols, specs=specs, subplot_titles=list(titles), horizontal_spacing=spacing,
        vertical_spacing=min(0.3, 0.5 / max(1, n_rows)), shared_yaxes=shared_y,
    )  # fmt: skip
    return fig, n_cols


def _title(text: str, width: int = 60) -> dict[str, Any]:
    """A figure title broken into lines of at most ``width`` characters (plotly does not wrap titles)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return {"text": "<br>".join(lines), "x": 0.01, "xanchor": "left"}


def heatmap_panels(
    panels: Sequence[tuple[str, Any]],
    title: str,
    x_title: str,
    y_title: str,
    value: str,
    zrange: tuple[float, float] | None = None,
    annotate: bool = False,
    max_side: int = MAX_SIDE,
) -> InteractiveFigure:
    """Heatmaps of one or more matrices, side by side (at most two), hovering shows the value (chapters 1 and 5).

    Args:
        panels: ``(panel title, DataFrame)`` pairs; rows run up the y axis (first row at the bottom), columns along x.
        title: the figure's title.
        x_title, y_title: axis titles (what the columns and the rows are).
        value: what a cell holds, named in the tooltip and the colour bar, e.g. ``"r"``.
        zrange: the colour scale's range (default: the data's).
        annotate: write each cell's value in it (for small matrices).
        max_side: larger matrices are averaged down to this many cells a side (:func:`downsample`).
    """
    go = _plotly()
    if not panels:
        raise EmbgeoInputError("heatmap_panels needs at least one (title, matrix) panel.")
    same_rows = all(list(m.index) == list(panels[0][1].index) for _, m in panels)
    fig, n_cols = _subplots([t for t, _ in panels], 0.06 if same_rows else 0.14, shared_y=same_rows)
    n_rows = (len(panels) + n_cols - 1) // n_cols
    small = [downsample(m, max_side) for _, m in panels]
    lo = min(float(np.nanmin(m.to_numpy(dtype=float))) for m in small) if zrange is None else zrange[0]
    hi = max(float(np.nanmax(m.to_numpy(dtype=float))) for m in small) if zrange is None else zrange[1]
    for i, m in enumerate(small):
        values = m.to_numpy(dtype=np.float64)
        fig.add_trace(
            go.Heatmap(
                z=values, x=[str(c) for c in m.columns], y=[str(r) for r in m.index], zmin=lo, zmax=hi,
                colorscale="Viridis", showscale=i == len(small) - 1, colorbar={"title": {"text": value}},
                text=np.vectorize(lambda v: "" if not np.isfinite(v) else f"{v:.2f}")(values) if annotate else None,
                texttemplate="%{text}" if annotate else None,
                hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{value} = %{{z:.3f}}<extra></extra>",
            ),
            row=i // n_cols + 1, col=i % n_cols + 1,
        )  # fmt: skip
    fig.update_xaxes(title_text=x_title, type="category")
    fig.update_yaxes(type="category")
    for row in range(1, n_rows + 1):
        fig.update_yaxes(title_text=y_title, row=row, col=1)
    fig.update_layout(title=_title(title))
    return _finish(fig, title, "heatmap", 380 * n_rows + 60)


def line_panels(
    frame: Any,
    x: str,
    y: str,
    color: str,
    panel: str,
    title: str,
    x_title: str,
    y_title: str | Mapping[str, str],
    band: tuple[str, str] | None = None,
    color_title: str | None = None,
) -> InteractiveFigure:
    """Lines of ``y`` against ``x``, one per value of ``color``, one panel per value of ``panel`` (chapters 4, 5).

    At most two panels sit side by side; more go to further rows. Each panel keeps its own y scale.

    Args:
        frame: one row per point, with the columns named below (already averaged: one row per ``x``, line, panel).
        x, y: the columns along the axes.
        color: the column whose values make the lines (e.g. the shuffle level ``S``).
        panel: the column whose values make the panels (e.g. the model).
        title, x_title: the figure's title and the x axis title (with units).
        y_title: the y axis title, or one per panel (by the panel's value).
        band: columns of the lower and upper bound of a band drawn around each line (e.g. ± one standard error).
        color_title: the name of ``color`` in the legend and the tooltip (default: the column's name; ``""``: none,
            the values alone).
    """
    go = _plotly()
    need = [c for c in (x, y, color, panel, *(band or ())) if c not in frame.columns]
    if need:
        raise EmbgeoInputError(f"line_panels: the table lacks the columns {need}.")
    names = list(dict.fromkeys(frame[panel]))
    lines = list(dict.fromkeys(frame[color]))
    fig, n_cols = _subplots([str(n) for n in names], 0.12)
    n_rows = (len(names) + n_cols - 1) // n_cols
    label = color if color_title is None else color_title
    titles = {n: y_title if isinstance(y_title, str) else y_title[n] for n in names}
    for i, name in enumerate(names):
        where = {"row": i // n_cols + 1, "col": i % n_cols + 1}
        for j, level in enumerate(lines):
            part = frame[(frame[panel] == name) & (frame[color] == level)].sort_values(x)
            if part.empty:
                continue
            hue = COLORWAY[j % len(COLORWAY)] if len(lines) <= 3 else _viridis(j, len(lines))
            series = f"{label}: {level}" if label else str(level)
            tip = f"{name}<br>{series}<br>{x_title} %{{x:.3g}}<br>{titles[name]} %{{y:.4g}}<extra></extra>"
            fig.add_trace(
                go.Scatter(
                    x=part[x].to_numpy(), y=part[y].to_numpy(), mode="lines+markers", name=series,
                    line={"color": hue, "width": 2}, marker={"size": 6}, legendgroup=str(level),
                    showlegend=not any(str(level) == t.legendgroup and t.showlegend for t in fig.data),
                    hovertemplate=tip,
                ),
                **where,
            )  # fmt: skip
            if band is not None:
                xs = np.concatenate([part[x].to_numpy(), part[x].to_numpy()[::-1]])
                ys = np.concatenate([part[band[1]].to_numpy(), part[band[0]].to_numpy()[::-1]])
                fig.add_trace(
                    go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=hue, opacity=0.15, line={"width": 0},
                               hoverinfo="skip", showlegend=False, legendgroup=str(level)),
                    **where,
                )  # fmt: skip
        if where["col"] == 1 or len(set(titles.values())) > 1:
            fig.update_yaxes(title_text=titles[name], **where)
    fig.update_xaxes(title_text=x_title)
    fig.update_layout(title=_title(title), legend={"orientation": "h", "y": -0.2}, hovermode="closest")
    return _finish(fig, title, "lines", 340 * n_rows + 130)


def _viridis(i: int, n: int) -> str:
    """The ``i``-th of ``n`` colours along viridis (the static figures' shuffle-level palette)."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps["viridis"](i / max(1, n - 1))
    return f"rgb({round(255 * r)},{round(255 * g)},{round(255 * b)})"


def scatter(
    frame: Any,
    x: str,
    y: str,
    hover: Sequence[str],
    title: str,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    line: tuple[float, float] | None = None,
) -> InteractiveFigure:
    """A scatter of ``y`` against ``x``, hovering shows the point's ``hover`` columns and values (chapter 1).

    Args:
        frame: one row per point.
        x, y: the columns along the axes (also the axis titles).
        hover: columns shown in the tooltip beside x and y (e.g. the two tokens of a pair).
        title: the figure's title.
        max_points: more rows are sampled down to this many (seeded).
        seed: the sample's seed.
        line: ``(slope, intercept)`` of a line drawn over the points (e.g. the least-squares fit).
    """
    go = _plotly()

    need = [c for c in (x, y, *hover) if c not in frame.columns]
    if need:
        raise EmbgeoInputError(f"scatter: the table lacks the columns {need}.")
    if len(frame) > max_points:
        frame = frame.sample(max_points, random_state=seed)
    custom = frame[list(hover)].astype(str).to_numpy() if hover else None
    tip = "<br>".join(f"{h}: %{{customdata[{i}]}}" for i, h in enumerate(hover))
    tip += f"<br>{x} = %{{x:.3f}}<br>{y} = %{{y:.3f}}<extra></extra>"
    fig = go.Figure(
        go.Scatter(x=frame[x].to_numpy(), y=frame[y].to_numpy(), mode="markers", customdata=custom,
                   marker={"size": 5, "opacity": 0.45, "color": COLORWAY[0]}, hovertemplate=tip, name="token pairs"),
    )  # fmt: skip
    if line is not None and len(frame):
        ends = np.array([float(frame[x].min()), float(frame[x].max())])
        fig.add_trace(go.Scatter(x=ends, y=line[0] * ends + line[1], mode="lines", line={"color": "black"},
                                 name="least-squares line", hoverinfo="skip"))  # fmt: skip
    fig.update_layout(title=_title(title), xaxis_title=x, yaxis_title=y, showlegend=False)
    return _finish(fig, title, "scatter", 480)


def show(static: Any, figure: InteractiveFigure | None) -> None:
    """Display a matplotlib figure (the static PNG) and then its interactive version (chapters 1, 4 and 5).

    The matplotlib figure is closed after it is displayed, so a notebook does not show it a second time.
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    display(static)
    plt.close(static)
    if figure is not None:
        display(figure)
