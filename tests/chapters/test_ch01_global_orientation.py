"""Tests for embgeo_utils.chapters.ch01_global_orientation (chapter 1: global orientation)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.chapters import ch01_global_orientation as ch01
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import similarity
from embgeo_utils.geometry.similarity import (
    cka,
    cosine_matrix_correlation,
    mutual_knn,
    spearman_cosine,
)
from embgeo_utils.lm.vocab import SharedVocabulary


def _related(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 24)) + 0.3
    Y = X @ rng.normal(size=(24, 16)) + 2.0 * rng.normal(size=(n, 16))
    return X, Y


def _identity_shared(n: int):

    ids = np.arange(n)
    return SharedVocabulary(ids, ids, tuple(f"t{i}" for i in range(n)), True, "byte-bpe", "byte-bpe")


def _zoo(n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Three synthetic tables: b is a noisy linear image of a, c is unrelated to both."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 24)) + 0.3
    return {"a": a, "b": a @ rng.normal(size=(24, 16)) + 0.5 * rng.normal(size=(n, 16)), "c": rng.normal(size=(n, 20))}


def _params(chapter_params, n_permutations: int, device, n: int = 200) -> ch01.Parameters:
    return chapter_params(
        ch01, n_tokens=n, n_permutations=n_permutations, n_permutations_complements=5, knn_k=5, seed=0, device=device
    )


def _pairs_table(chapter_params, pairs, n_permutations: int, device, n: int = 200):
    tables = _zoo(n)
    shared = {p: _identity_shared(n) for p in pairs}
    return ch01.compare_models(tables, shared, _params(chapter_params, n_permutations, device, n))


@pytest.fixture()
def zoo_pairs(chapter_params, device):
    """The pair table of the synthetic zoo at 500 permutations (floor 1/501)."""
    return _pairs_table(chapter_params, [("a", "b"), ("a", "c"), ("b", "c")], 500, device, n=120)


def test_compare_models_matches_the_measures(chapter_params, device, tmp_cache) -> None:
    table = _pairs_table(chapter_params, [("a", "b")], 30, device)
    X, Y = _zoo()["a"], _zoo()["b"]
    row = table.iloc[0]
    assert (row["model A"], row["model B"], row["tokens"], row["permutations"]) == ("a", "b", 200, 30)
    assert row["r raw"] == pytest.approx(cosine_matrix_correlation(X, Y, device=device), abs=1e-6)
    assert row["r centred"] == pytest.approx(cosine_matrix_correlation(X, Y, center=True, device=device), abs=1e-6)
    assert row["CKA"] == pytest.approx(cka(X, Y, device=device), abs=1e-6)
    assert row["spearman raw"] == pytest.approx(spearman_cosine(X, Y, device=device), abs=1e-9)
    assert row["mutual kNN@5"] == pytest.approx(mutual_knn(X, Y, k=5, device=device))
    assert row["mutual kNN chance"] == pytest.approx(5 / 199)
    assert row["p raw"] == pytest.approx(1 / 31)
    with pytest.raises(EmbgeoInputError, match="pairs"):
        ch01.compare_models(_zoo(), {}, _params(chapter_params, 30, device))
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch01.compare_models({"a": X}, {("a", "b"): _identity_shared(200)}, _params(chapter_params, 30, device))


def test_claim6_planted_absent_and_partly(zoo_pairs) -> None:
    rows = {(r["model A"], r["model B"]): i for i, r in zoo_pairs.iterrows()}
    planted = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "b")]]])
    assert planted.verdict == "reproduced" and planted.n_hold == 1
    # one check per pair (the raw r); its p-value sits at the floor 1/501
    assert planted.adjusted == pytest.approx((1 / 501,))
    absent = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "c")], rows[("b", "c")]]])
    assert absent.verdict == "not reproduced" and absent.status == ("absent", "absent")
    mixed = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "b")], rows[("b", "c")]]])
    assert mixed.verdict == "partly reproduced" and mixed.status == ("holds", "absent")
    assert all(c.min_effect_source and c.n_permutations == 500 for c in planted.checks)


def test_claim6_minimum_effect_and_resolution(zoo_pairs, chapter_params, device) -> None:
    table = zoo_pairs.iloc[[0]]
    weak = table.assign(**{"r raw": table["null mean raw"] + 0.05})
    assert ch01.check_claim6(weak).holds == (False,)
    # 20 permutations: p >= 1/21, no check could ever reach alpha = 0.01: refused, naming what is needed
    with pytest.raises(EmbgeoInputError, match="at least 100 permutations"):
        ch01.check_claim6(_pairs_table(chapter_params, [("a", "b")], 20, device, n=60))
    with pytest.raises(EmbgeoInputError, match="compare_models"):
        ch01.check_claim6(table.drop(columns=["p raw"]))


def test_token_pair_cosines(device) -> None:
    X, Y = _related(60)
    strings = [f"w{i}" for i in range(60)]
    pairs = ch01.token_pair_cosines(X, Y, strings, n_pairs=500, seed=1, names=("A", "B"))
    assert list(pairs.columns) == ["token 1", "token 2", "cosine in A", "cosine in B"]
    assert 450 < len(pairs) <= 500 and (pairs["token 1"] != pairs["token 2"]).all()
    total = (pairs["cosine in A"] + pairs["cosine in B"]).to_numpy()
    assert np.all(np.diff(total) <= 1e-12)  # most similar pairs first
    i, j = int(pairs["token 1"][0][2:-1]), int(pairs["token 2"][0][2:-1])
    Xc = X - X.mean(0)
    assert pairs["cosine in A"][0] == pytest.approx(Xc[i] @ Xc[j] / np.linalg.norm(Xc[i]) / np.linalg.norm(Xc[j]))
    with pytest.raises(EmbgeoInputError, match="same tokens"):
        ch01.token_pair_cosines(X, Y, strings[:10])


def test_chapter1_tables_and_figures(chapter_params, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = _zoo(50)
    shared = {("a", "b"): _identity_shared(50)}
    overlap = ch01.shared_vocabulary_table(shared, tables)
    assert overlap.loc[0, "shared tokens"] == 50 and overlap.loc[0, "vocabulary B"] == 50
    table = _pairs_table(chapter_params, [("a", "b"), ("a", "c")], 5, device, n=50)
    ch01.plot_pair_heatmaps(table, ["a", "b", "c"])
    ch01.plot_cosine_scatter(ch01.token_pair_cosines(tables["a"], tables["b"], [str(i) for i in range(50)], 100))
    rng = np.random.default_rng(0)
    ch01.plot_layer_map(
        similarity.layer_map(rng.normal(size=(30, 2, 4)), rng.normal(size=(30, 3, 5)), device=device), "a", "b", 30
    )
    plt.close("all")


def test_compare_models_rows_are_cached_by_content(chapter_params, tmp_cache, monkeypatch) -> None:
    first = _pairs_table(chapter_params, [("a", "b"), ("a", "c")], 20, "cpu")
    entries = sorted((tmp_cache / "similarity").glob("*/entry.json"))
    assert len(entries) == 2  # one entry per pair
    assert all(json.loads(e.read_text())["meta"]["function"] == "pair_statistics" for e in entries)
    assert all(list(e.parent.glob("a*.npy")) == [] for e in entries)  # a row of JSON scalars, no arrays

    def no_test(*args, **kwargs):
        raise AssertionError("the cached rows should have been read")

    monkeypatch.setattr(ch01, "permutation_test", no_test)
    again = _pairs_table(chapter_params, [("a", "b"), ("a", "c")], 20, "cpu")
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(AssertionError, match="cached rows"):  # other permutation count: another key
        _pairs_table(chapter_params, [("a", "b")], 21, "cpu")
    assert len(list((tmp_cache / "similarity").glob("*/entry.json"))) == 2  # the miss wrote nothing
    # without the cache, the rows are computed again (and equal the cached ones)
    monkeypatch.setattr(ch01, "permutation_test", similarity.permutation_test)
    fresh = ch01.compare_models(
        _zoo(), {("a", "b"): _identity_shared(200)}, _params(chapter_params, 20, "cpu"), cache=False
    )
    pd.testing.assert_frame_equal(fresh, first.iloc[[0]])


def test_pair_statistics_key_holds_every_input() -> None:
    tables = _zoo(20)
    X, Y = tables["a"], tables["b"]
    args = {
        "model_a": "a",
        "model_b": "b",
        "X": X,
        "Y": Y,
        "n_permutations": 20,
        "n_permutations_centred": 10,
        "n_permutations_complements": 5,
        "knn_k": 5,
        "seed": 0,
        "device": torch.device("cpu"),
    }
    base = ch01.pair_statistics.key(**args)
    changed = {
        "model_a": "x",
        "model_b": "x",
        "X": X + 1e-9,
        "Y": Y[::-1].copy(),
        "n_permutations": 21,
        "n_permutations_centred": 11,
        "n_permutations_complements": 6,
        "knn_k": 6,
        "seed": 1,
        "device": torch.device("cuda"),
    }
    for name, value in changed.items():
        assert ch01.pair_statistics.key(**{**args, name: value}) != base, name
    assert ch01.pair_statistics.key(**{**args, "X": torch.as_tensor(X)}) == base  # arrays by their values
    assert ch01.pair_statistics.key(**{**args, "device": torch.device("cuda", 1)}) == ch01.pair_statistics.key(
        **{**args, "device": torch.device("cuda")}
    )  # the device by its type


def test_layer_alignment_result_and_missing_pair(chapter_params, device) -> None:
    rng = np.random.default_rng(0)
    table = similarity.layer_map(rng.normal(size=(30, 2, 4)), rng.normal(size=(30, 3, 5)), device=device)
    layer = ch01.LayerAlignment("a", "b", 30, table)
    assert layer.grid.shape == (2, 3) and layer.grid.loc[1, 2] == table["r"].iloc[-1]
    assert layer.best["r"] == table["r"].max()
    p = chapter_params(ch01, layer_pair=["a", "b"], device=device)
    with pytest.raises(EmbgeoInputError, match="layer pair"):
        ch01.layer_alignment({("a", "c"): _identity_shared(30)}, p)
