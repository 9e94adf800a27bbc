"""Tests for embgeo_utils.geometry.similarity (chapter 1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

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


def _pairs_table(pairs, n_permutations: int, device, n: int = 200):
    tables = _zoo(n)
    shared = {p: _identity_shared(n) for p in pairs}
    return ch01.compare_models(
        tables,
        shared,
        n_tokens=n,
        n_permutations=n_permutations,
        n_permutations_complements=5,
        knn_k=5,
        seed=0,
        device=device,
    )


@pytest.fixture(scope="module")
def zoo_pairs(device):
    """The pair table of the synthetic zoo at 500 permutations (floor 1/501), computed once."""
    return _pairs_table([("a", "b"), ("a", "c"), ("b", "c")], 500, device, n=120)


def test_compare_models_matches_the_measures(device, tmp_cache) -> None:
    table = _pairs_table([("a", "b")], 30, device)
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
        ch01.compare_models(_zoo(), {}, device=device)
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch01.compare_models({"a": X}, {("a", "b"): _identity_shared(200)}, device=device)


def test_claim6_planted_absent_and_partly(zoo_pairs) -> None:
    rows = {(r["model A"], r["model B"]): i for i, r in zoo_pairs.iterrows()}
    planted = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "b")]]])
    assert planted.verdict == "reproduced" and planted.n_hold == 1
    # one check per pair (the raw r); its p-value sits at the floor 1/501
    assert planted.adjusted == pytest.approx((1 / 501,))
    absent = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "c")], rows[("b", "c")]]])
    assert absent.verdict == "not reproduced"
    mixed = ch01.check_claim6(zoo_pairs.loc[[rows[("a", "b")], rows[("b", "c")]]])
    assert mixed.verdict == "partly reproduced" and mixed.holds == (True, False)


def test_claim6_minimum_effect_and_resolution(zoo_pairs, device) -> None:
    table = zoo_pairs.iloc[[0]]
    weak = table.assign(**{"r raw": table["null mean raw"] + 0.05})
    assert ch01.check_claim6(weak).holds == (False,)
    with pytest.warns(UserWarning, match="n_permutations >= 100"):
        few = ch01.check_claim6(_pairs_table([("a", "b")], 20, device, n=60))
    assert few.verdict == "not reproduced"  # p >= 1/21: no evidence at alpha = 0.01
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


def test_chapter1_tables_and_figures(device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = _zoo(50)
    shared = {("a", "b"): _identity_shared(50)}
    overlap = ch01.shared_vocabulary_table(shared, tables)
    assert overlap.loc[0, "shared tokens"] == 50 and overlap.loc[0, "vocabulary B"] == 50
    table = _pairs_table([("a", "b"), ("a", "c")], 5, device, n=50)
    ch01.plot_pair_heatmaps(table, ["a", "b", "c"])
    ch01.plot_cosine_scatter(ch01.token_pair_cosines(tables["a"], tables["b"], [str(i) for i in range(50)], 100))
    rng = np.random.default_rng(0)
    ch01.plot_layer_map(
        similarity.layer_map(rng.normal(size=(30, 2, 4)), rng.normal(size=(30, 3, 5)), device=device), "a", "b", 30
    )
    plt.close("all")


def test_compare_models_rows_are_cached_by_content(tmp_cache, monkeypatch) -> None:
    first = _pairs_table([("a", "b"), ("a", "c")], 20, "cpu")
    assert len(list(tmp_cache.rglob("*.npz"))) == 2

    def no_test(*args, **kwargs):
        raise AssertionError("the cached rows should have been read")

    monkeypatch.setattr(ch01, "permutation_test", no_test)
    again = _pairs_table([("a", "b"), ("a", "c")], 20, "cpu")
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(AssertionError, match="cached rows"):  # other permutation count: another key
        _pairs_table([("a", "b")], 21, "cpu")
