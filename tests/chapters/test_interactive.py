"""The interactive figures: bounded sizes, values in the tooltips, and the chapters' headline figures."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from embgeo_utils.chapters import ch01_global_orientation as ch01
from embgeo_utils.chapters import ch04_layerwise_geometry as ch04
from embgeo_utils.chapters import ch05_sae_feature_matching as ch05
from embgeo_utils.chapters import interactive
from embgeo_utils.core.errors import EmbgeoInputError


def _matrix(n: int, m: int) -> pd.DataFrame:
    values = np.arange(n * m, dtype=float).reshape(n, m)
    return pd.DataFrame(values, index=range(n), columns=range(m))


def test_downsample_averages_blocks_and_names_their_range():
    small = _matrix(10, 4)
    assert interactive.downsample(small, 16) is small  # small enough: unchanged
    big = _matrix(130, 7)
    out = interactive.downsample(big, 64)
    assert out.shape == (64, 7)
    assert out.index[0] == "0–2" and out.index[-1] == "128–129"  # 130 rows in 64 groups of 2 or 3
    assert out.iloc[0, 0] == pytest.approx(big.iloc[0:3, 0].mean())
    assert out.iloc[-1, 6] == pytest.approx(big.iloc[128:130, 6].mean())
    with_nan = big.astype(float)
    with_nan.iloc[0, 0] = np.nan
    assert interactive.downsample(with_nan, 64).iloc[0, 0] == pytest.approx(with_nan.iloc[1:3, 0].mean())
    with pytest.raises(EmbgeoInputError, match="at least 1"):
        interactive.downsample(big, 0)
    with pytest.raises(EmbgeoInputError, match="empty"):
        interactive.downsample(big.iloc[:0], 8)


def test_a_large_heatmap_stays_within_its_budget_and_the_tooltip_names_the_value():
    fig = interactive.heatmap_panels([("map", _matrix(300, 200) / 6e4)], "t", "layer B", "layer A", "r")
    (trace,) = fig.data
    assert np.array(trace["z"]).shape == (interactive.MAX_SIDE, interactive.MAX_SIDE)
    assert fig.nbytes <= interactive.FIGURE_BUDGET
    assert "r = %{z:.3f}" in trace["hovertemplate"] and "layer A %{y}" in trace["hovertemplate"]
    assert fig.kind == "heatmap" and "template" not in fig.layout


def test_numbers_keep_four_digits_and_missing_values_become_null():
    m = pd.DataFrame([[1 / 3, np.nan], [123456.789, -2e-7]])
    (trace,) = interactive.heatmap_panels([("m", m)], "t", "x", "y", "v").data
    assert trace["z"] == [[0.3333, None], [123500.0, -2e-07]]
    json.loads(interactive.heatmap_panels([("m", m)], "t", "x", "y", "v").to_json())  # valid JSON, no NaN


def test_a_figure_over_its_budget_is_refused(monkeypatch):
    monkeypatch.setattr(interactive, "FIGURE_BUDGET", 500)
    with pytest.raises(EmbgeoInputError, match="budget"):
        interactive.heatmap_panels([("m", _matrix(40, 40))], "t", "x", "y", "v")


def test_no_more_than_two_panels_side_by_side():
    frame = pd.DataFrame({"x": [0, 1] * 3, "y": [1.0, 2.0] * 3, "c": ["a"] * 6, "p": list("ppqqrr")})
    fig = interactive.line_panels(frame, "x", "y", "c", "p", "t", "x", "y")
    axes = {k: v for k, v in fig.layout.items() if k.startswith("xaxis")}
    assert len(axes) == 3
    lefts = sorted({round(v["domain"][0], 3) for v in axes.values()})
    assert len(lefts) == 2  # three panels on a grid of two columns


def test_the_html_element_holds_the_specification_and_cannot_be_closed_early():
    m = pd.DataFrame([[0.5]], index=["</script><b>"], columns=["b"])
    fig = interactive.heatmap_panels([("m", m)], 'say "hi"', "x", "y", "v")
    html = fig.to_html()
    assert html.startswith(f'<div class="{interactive.HTML_CLASS}" data-kind="heatmap"')
    assert html.count("</script>") == 1 and 'aria-label="say &quot;hi&quot;"' in html
    payload = html.split('<script type="application/json">', 1)[1].rsplit("</script>", 1)[0]
    assert json.loads(payload)["data"][0]["y"] == ["</script><b>"]
    bundle = fig._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"}  # a MIME type the book's HTML builder does not know warns


def test_a_scatter_keeps_a_seeded_sample_and_shows_the_tokens():
    rng = np.random.default_rng(0)
    n = interactive.MAX_POINTS * 3
    frame = pd.DataFrame({"token 1": [f"'t{i}'" for i in range(n)], "token 2": ["'u'"] * n,
                          "cosine in a": rng.normal(size=n), "cosine in b": rng.normal(size=n)})  # fmt: skip
    one = interactive.scatter(frame, "cosine in a", "cosine in b", ["token 1", "token 2"], "t", seed=3)
    two = interactive.scatter(frame, "cosine in a", "cosine in b", ["token 1", "token 2"], "t", seed=3)
    assert len(one.data[0]["x"]) == interactive.MAX_POINTS and one.to_json() == two.to_json()
    assert "token 1: %{customdata[0]}" in one.data[0]["hovertemplate"]
    assert one.nbytes <= interactive.FIGURE_BUDGET
    with pytest.raises(EmbgeoInputError, match="lacks the columns"):
        interactive.scatter(frame, "x", "cosine in b", [], "t")


def test_show_displays_the_static_figure_then_the_interactive_one(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    fig = plt.figure()
    figure = interactive.heatmap_panels([("m", _matrix(2, 2))], "t", "x", "y", "v")
    interactive.show(fig, figure)
    assert shown == [fig, figure] and not plt.fignum_exists(fig.number)


def test_chapter_headline_figures_have_interactive_versions():
    pairs = pd.DataFrame({"model A": ["a", "a"], "model B": ["b", "c"], "r raw": [0.3, 0.2], "r centred": [0.2, 0.1]})
    heat = ch01.interactive_pair_heatmaps(pairs, ["a", "b", "c"])
    assert [t["type"] for t in heat.data] == ["heatmap", "heatmap"] and heat.data[0]["z"][0][1] == 0.3
    layers = pd.DataFrame([(i, j, 0.01 * i + 0.02 * j) for i in range(31) for j in range(19)],
                          columns=["layer A", "layer B", "r"])  # fmt: skip
    layer_map = ch01.interactive_layer_map(layers, "a", "b", 100)
    assert np.array(layer_map.data[0]["z"]).shape == (31, 19) and layer_map.data[0]["y"][0] == "0"
    rng = np.random.default_rng(0)
    geometry = pd.DataFrame({"model": np.repeat(["m1", "m2", "m3"], 40), "S": np.tile(np.repeat([0, 5], 20), 3),
                             "depth": np.tile(np.repeat([0.25, 0.5, 0.75, 1.0], 5), 6), "ID": rng.normal(10, 1, 120)})  # fmt: skip
    table = ch04.layer_profile_table(geometry, "ID")
    assert len(table) == 24 and (table["se"] > 0).all()
    profiles = ch04.interactive_layer_profiles(geometry, "ID", "ID (dimensions)", "title")
    lines = [t for t in profiles.data if t.get("mode") == "lines+markers"]
    assert len(lines) == 6 and lines[0]["y"][0] == pytest.approx(table["mean"].iloc[0], rel=1e-3)
    profile = pd.DataFrame({"depth": [0.25, 0.5], "RSA excess": [0.1, 0.2], "RSA excess min": [0.05, 0.1],
                            "RSA excess max": [0.15, 0.3], "ceiling RSA excess": [0.4, 0.5], "fvu A": [0.2, 0.3],
                            "fvu B": [0.25, 0.35]})  # fmt: skip
    depth = ch05.interactive_depth_profile(profile)
    names = [t["name"] for t in depth.data if t.get("mode") == "lines+markers"]
    assert names == ["A vs B (band: range of seeds)", "seed ceiling (same model)", "model A", "model B"]
    assert ch05.plot_depth_profile(profile, show=False) is not None
    plt.close("all")
