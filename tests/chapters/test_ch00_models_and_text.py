"""Tests for embgeo_utils.chapters.ch00_models_and_text (chapter 0: the model zoo and the corpus)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.chapters import ch00_models_and_text as ch00
from embgeo_utils.core.errors import EmbgeoInputError


def test_embedding_tables_norms_anisotropy_duplicates(chapter_params) -> None:
    rng = np.random.default_rng(0)
    sphere = rng.normal(size=(500, 16))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)  # every row norm 1, no common offset
    offset = rng.normal(size=(500, 16)) + 3.0  # a common offset: positive raw cosines
    offset[10] = offset[20]  # one duplicate row
    p = chapter_params(ch00, pair_sample=3000)
    tables = ch00.embedding_tables({"sphere": sphere, "offset": torch.as_tensor(offset)}, p)
    summary, norms = tables.summary, tables.norms
    assert list(summary.index) == ["sphere", "offset"]
    assert summary.loc["sphere", "norm CV"] == pytest.approx(0.0, abs=1e-6)
    assert summary.loc["sphere", "median norm"] == pytest.approx(1.0, abs=1e-6)
    assert abs(summary.loc["sphere", "mean cosine (raw)"]) < 0.03
    assert summary.loc["offset", "mean cosine (raw)"] > 0.8
    assert abs(summary.loc["offset", "mean cosine (centred)"]) < 0.03
    assert summary.loc["offset", "duplicate rows"] == 1 and summary.loc["sphere", "duplicate rows"] == 0
    assert len(norms) == 1000 and set(norms.columns) == {"model", "norm / median norm"}
    assert norms.groupby("model")["norm / median norm"].median().to_numpy() == pytest.approx([1.0, 1.0])
    again = ch00.embedding_tables({"sphere": sphere, "offset": offset}, p).summary
    pd.testing.assert_frame_equal(summary, again, check_dtype=False)
    with pytest.raises(EmbgeoInputError, match="pair_sample"):
        ch00.embedding_tables({"x": sphere}, chapter_params(ch00, pair_sample=0))
    with pytest.raises(EmbgeoInputError, match="2-D"):
        ch00.embedding_tables({"x": np.ones(5)}, p)


def test_loss_summary_and_checks() -> None:
    losses = pd.DataFrame(
        {
            "model": ["m1", "m1", "m2", "m2"],
            "source": ["s", "t", "s", "t"],
            ch00.LOSS_REAL: [2.0, 3.0, 4.0, 4.4],
            ch00.LOSS_SHUFFLED: [6.0, 7.0, 8.0, 9.0],
        }
    )
    summary = ch00.loss_summary(losses)
    assert summary.loc["m1", ch00.LOSS_REAL] == pytest.approx(2.5)
    assert summary.loc["m2", "perplexity (real)"] == pytest.approx(np.exp(4.2))
    checks = ch00.loss_checks(summary)
    assert checks["pass"].tolist() == [True, True] and checks["value"][1] == pytest.approx(4.2)
    bad = summary.assign(**{ch00.LOSS_SHUFFLED: [1.0, 9.0]})
    assert ch00.loss_checks(bad)["pass"].tolist() == [False, True]
    assert ch00.loss_checks(summary, max_real_loss=4.0)["pass"].tolist() == [True, False]
    with pytest.raises(EmbgeoInputError, match="lacks"):
        ch00.loss_summary(losses.drop(columns=[ch00.LOSS_REAL]))


def test_topic_counts() -> None:
    topics = ch00.topic_counts()
    assert topics.sum() == 10033 and len(topics) == 12
    assert topics.is_monotonic_decreasing


def test_chapter0_figures(chapter_params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    tables = {"smollm2-135m": rng.normal(size=(50, 4)), "other": rng.normal(size=(40, 4))}
    norms = ch00.embedding_tables(tables, chapter_params(ch00)).norms
    ch00.plot_embedding_norms(norms)
    ch00.plot_passage_lengths(pd.DataFrame({"source": ["a", "a", "b"], "tokens": [10, 20, 30]}), "tok")
    ch00.plot_topic_counts(pd.Series({"x": 3, "y": 1}))
    losses = pd.DataFrame(
        {"model": ["m"] * 3, "source": ["s"] * 3, ch00.LOSS_REAL: [1.0, 2, 3], ch00.LOSS_SHUFFLED: [4.0, 5, 6]}
    )
    ch00.plot_real_vs_shuffled_loss(losses, 3, 64)
    plt.close("all")
