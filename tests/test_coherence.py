"""Coherence statistics of token neighbourhoods (embgeo_utils.chapters.ch03_intrinsic_dimension; chapter 3), on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_tokens import kind_encoder, token_string

from embgeo_utils.chapters import ch03_intrinsic_dimension as ch03
from embgeo_utils.chapters.ch03_intrinsic_dimension import COHERENCE_LABEL, LocalIDs
from embgeo_utils.core.errors import EmbgeoInputError


def _local_ids(planted: bool, n: int = 400, k: int = 10, seed: int = 0) -> LocalIDs:
    """Tokens 0..n-1; the lower half has low IDs. Planted: low-ID tokens' neighbours share their kind."""
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, 4, size=n)
    local_id = np.where(np.arange(n) < n // 2, 2, 9)
    nbrs = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero((kinds == kinds[i]) & (np.arange(n) != i)) if planted and i < n // 2 else None
        if pool is None:
            pool = np.delete(np.arange(n), i)
        nbrs[i] = rng.choice(pool, size=k, replace=False)
    order = np.argsort(local_id + rng.random(n) * 0.1, kind="stable")
    strings = {t: token_string(int(kinds[t]), t) for t in range(n)}
    return LocalIDs(
        "toy", np.arange(n), local_id, np.full(n, 9), nbrs, order, np.arange(10), strings, 64, n, n, (0.0, 0.0)
    )


def test_label_agreement():
    lab = np.array(["a"] * 50 + ["b"] * 50)
    same = np.array([[(i + 1) % 50 + 50 * (i >= 50)] for i in range(100)])
    assert np.all(ch03.neighbor_label_agreement(lab, same, adjust=False) == 1.0)
    assert np.allclose(ch03.neighbor_label_agreement(lab, same), 0.5)
    # Query rows: the neighbours of rows 3 and 60 only.
    agree = ch03.neighbor_label_agreement(lab, same[[3, 60]], rows=[3, 60], adjust=False)
    np.testing.assert_array_equal(agree, [1.0, 1.0])
    with pytest.raises(EmbgeoInputError, match="one row per query row"):
        ch03.neighbor_label_agreement(lab, same[:5], rows=[1, 2])


def test_coherence_test_planted_and_absent():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(1, 0.1, 30), rng.normal(0, 0.1, 30)])
    res = ch03.coherence_test(values, np.arange(30), np.arange(30, 60), n=200, seed=0)
    assert res.difference > 0.8 and res.p_value == pytest.approx(1 / 201) and res.z > 5
    res0 = ch03.coherence_test(values[30:], np.arange(15), np.arange(15, 30), n=200, seed=0)
    assert res0.p_value > 0.01
    mask = np.zeros(60, dtype=bool)
    mask[:30] = True
    assert ch03.coherence_test(values, mask, ~mask, n=200, seed=0) == res


def test_coherence_test_matches_the_permutation_loop():
    """The batched null is the loop `rng.permutation(pooled)` of the chapter's first version, draw for draw."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=80)
    lo, hi = np.arange(0, 25), np.arange(40, 80)
    res = ch03.coherence_test(values, lo, hi, n=300, seed=7)
    pooled = np.concatenate([values[lo], values[hi]])
    gen = np.random.default_rng(7)
    null = np.empty(300)
    for t in range(300):
        perm = gen.permutation(pooled)
        null[t] = perm[:25].mean() - perm[25:].mean()
    observed = pooled[:25].mean() - pooled[25:].mean()
    assert res.difference == pytest.approx(observed, abs=1e-15)
    assert res.p_value == (1 + int((null >= observed).sum())) / 301
    assert res.null_mean == pytest.approx(null.mean(), abs=1e-14)
    assert res.null_std == pytest.approx(null.std(ddof=1), rel=1e-12)


def test_coherence_test_errors():
    with pytest.raises(EmbgeoInputError, match="at least one token"):
        ch03.coherence_test(np.ones(5), np.array([], dtype=int), np.arange(5))
    with pytest.raises(EmbgeoInputError, match="positive integer"):
        ch03.coherence_test(np.ones(5), np.arange(2), np.arange(2, 5), n=0)


def test_coherence_table_planted_and_absent():
    planted = ch03.coherence_table({"toy": _local_ids(True)}, coherence_k=5, n_permutations=200, seed=0)
    assert list(planted.columns) == [
        "model",
        "label",
        "groups",
        "tokens per group",
        "coherence low ID",
        "coherence high ID",
        "difference",
        "z",
        "p",
    ]
    row = planted[planted["label"] == COHERENCE_LABEL].iloc[0]
    assert row["tokens per group"] == 40 and row["difference"] > 0.5 and row["p"] == pytest.approx(1 / 201)
    assert row["coherence low ID"] == pytest.approx(0.75, abs=0.05)  # 1 minus the chance of one of 4 kinds
    assert (planted["label"] == "analogy category").sum() == 0  # no whole word: that label is skipped
    absent = ch03.coherence_table({"toy": _local_ids(False)}, coherence_k=5, n_permutations=200, seed=0)
    row = absent.iloc[0]
    assert abs(row["difference"]) < 0.1 and row["p"] > 0.01


def test_coherence_table_errors():
    with pytest.raises(EmbgeoInputError, match="No model"):
        ch03.coherence_table({})
    with pytest.raises(EmbgeoInputError, match="coherence_k"):
        ch03.coherence_table({"toy": _local_ids(True)}, coherence_k=11)


def test_low_id_examples():
    ids = _local_ids(True)
    table = ch03.low_id_examples({"toy": ids}, n_examples=4, n_neighbours=3, seed=0)
    assert list(table.columns) == ["model", "token", "local ID", "nearest neighbours"] and len(table) == 4
    assert (table["local ID"] == 2).all()
    assert all(len(cell.split(", ")) == 3 for cell in table["nearest neighbours"])
    assert table.equals(ch03.low_id_examples({"toy": ids}, n_examples=4, n_neighbours=3, seed=0))
    with pytest.raises(EmbgeoInputError, match="positive"):
        ch03.low_id_examples({"toy": ids}, n_examples=0)


def test_stratified_test_removes_a_confound():
    """Low group over-represented in a high-value stratum: the plain difference is large, the stratified one not."""
    rng = np.random.default_rng(0)
    strata = np.repeat(["rare", "common"], 200)
    values = np.where(strata == "rare", 1.0, 0.0) + 0.1 * rng.normal(size=400)
    low = np.zeros(400, dtype=bool)
    low[:150] = True  # 150 of the 200 "rare" tokens ...
    low[200:250] = True  # ... and 50 of the "common" ones
    plain = values[low].mean() - values[~low].mean()
    res = ch03.stratified_difference_test(values, low, strata, n=500, seed=0)
    assert plain > 0.4 and abs(res.difference) < 0.05 and res.p_value > 0.01
    planted = values + 0.3 * low
    res = ch03.stratified_difference_test(planted, low, strata, n=500, seed=0)
    assert res.difference == pytest.approx(0.3, abs=0.05) and res.p_value == pytest.approx(1 / 501)
    assert res.n_low == 200 and res.n_high == 200
    with pytest.raises(EmbgeoInputError, match="both groups"):
        ch03.stratified_difference_test(values, low, np.arange(400), n=10)
    with pytest.raises(EmbgeoInputError, match="one entry"):
        ch03.stratified_difference_test(values, low[:5], strata, n=10)


def test_semantic_coherence_planted_and_absent():
    columns = ["model", "encoder", "independent", "tokens per group", "strata", "similarity low ID",
               "similarity high ID", "difference", "unstratified difference", "null std", "z", "p"]  # fmt: skip
    planted = ch03.semantic_coherence(
        {"toy": _local_ids(True), "kinds": _local_ids(True)}, kind_encoder, "kinds", coherence_k=5, n_tokens=40,
        n_reference=100, n_permutations=200,
    )  # fmt: skip
    assert list(planted.columns) == columns and planted["independent"].tolist() == [True, False]
    row = planted.iloc[0]
    # Low-ID neighbours share the token's kind (similarity 1), high-ID ones do 1 time in 4; minus chance (~1/4).
    assert row["similarity low ID"] == pytest.approx(0.75, abs=0.1) and row["difference"] > 0.5
    assert row["p"] == pytest.approx(1 / 201) and 20 <= row["tokens per group"] <= 40  # in strata with both
    absent = ch03.semantic_coherence({"toy": _local_ids(False)}, kind_encoder, "kinds", coherence_k=5,
                                          n_tokens=40, n_permutations=200)  # fmt: skip
    assert abs(absent.iloc[0]["difference"]) < 0.15 and absent.iloc[0]["p"] > 0.01
    with pytest.raises(EmbgeoInputError, match="coherence_k"):
        ch03.semantic_coherence({"toy": _local_ids(True)}, kind_encoder, coherence_k=11)


@pytest.mark.models
def test_string_encoder_caches(tmp_path):
    encode = ch03.string_encoder("minilm-l6", folder=tmp_path)
    emb = encode([" Paris", " London", "ing", " Paris"])
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # two capitals are closer than a capital and a suffix
    np.testing.assert_array_equal(emb[0], emb[3])
    assert (tmp_path / "minilm-l6.npz").exists()
    again = ch03.string_encoder("minilm-l6", folder=tmp_path)([" London"])  # read back from the cache
    np.testing.assert_allclose(again[0], emb[1], atol=1e-6)


def test_extreme_id_examples():
    ids = _local_ids(True)
    table = ch03.extreme_id_examples({"toy": ids}, n_low=4, n_high=2, n_neighbours=3, low_fraction=0.1)
    assert list(table.columns) == ["model", "group", "token", "local ID", "nearest neighbours"]
    assert table["group"].tolist() == ["lowest ID"] * 4 + ["highest ID"] * 2
    assert (table.loc[table.group == "lowest ID", "local ID"] == 2).all()
    assert (table.loc[table.group == "highest ID", "local ID"] == 9).all()
    assert table.iloc[0]["token"] == repr(ids.strings[int(ids.rows[ids.order[0]])])  # the lowest comes first
    assert table.equals(ch03.extreme_id_examples({"toy": ids}, n_low=4, n_high=2, n_neighbours=3,
                                                      low_fraction=0.1))  # fmt: skip
    with pytest.raises(EmbgeoInputError, match="positive"):
        ch03.extreme_id_examples({"toy": ids}, n_low=0)
