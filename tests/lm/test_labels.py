"""Token labels and word-frequency strata (embgeo_utils.lm.labels; chapter 3)."""

from __future__ import annotations

import numpy as np
import pytest

from embgeo_utils.core import errors
from embgeo_utils.lm import labels


def test_token_labels():
    lab = labels.token_labels([" the", "ing", " 1,000", "});", " \n", " Paris", "x86", " zzyzx", " king"])
    assert list(lab.kind) == [
        "word",
        "fragment",
        "number",
        "punctuation/code",
        "whitespace",
        "word",
        "other",
        "fragment",
        "word",
    ]
    assert lab.capitalised.tolist() == [False, False, False, False, False, True, False, False, False]
    assert lab.analogy[5] == "capital-common-countries"
    assert lab.analogy[0] == ""
    assert set(lab.kind) <= set(labels.KINDS)
    frame = lab.frame([" the", "ing", " 1,000", "});", " \n", " Paris", "x86", " zzyzx", " king"])
    assert list(frame.columns) == ["token", "kind", "capitalised", "analogy", "zipf"] and len(frame) == 9


def test_analogy_file_sections():
    cats = labels.analogy_categories()
    assert len(set(cats.values())) == 14
    assert cats["athens"] == "capital-common-countries"


def test_zipf_and_frequency_strata():
    z = labels.zipf_frequencies(["the", "", "zzyzxqq"])
    assert z[0] > 6 and z[1] == 0.0 and z[2] < 1
    strata = labels.frequency_strata([" the", "zzyzxqq", " Paris", "});"])
    assert strata[0] == 5 and strata[1] == 0 and strata[3] == 0 and 2 <= strata[2] <= 5
    assert strata.dtype == np.int64


def test_stratified_sample():
    strata = np.array([0] * 100 + [1] * 5 + [2] * 50)
    pick = labels.stratified_sample(strata, 40, seed=0)
    counts = np.bincount(strata[pick], minlength=3)
    assert counts.sum() == 40 and counts[1] == 5 and abs(int(counts[0]) - int(counts[2])) <= 1
    assert len(np.unique(pick)) == 40
    np.testing.assert_array_equal(pick, labels.stratified_sample(strata, 40, seed=0))
    np.testing.assert_array_equal(labels.stratified_sample(strata, 500), np.arange(len(strata)))


def test_errors():
    with pytest.raises(errors.VocabularyError, match="positive"):
        labels.stratified_sample(np.zeros(10), 0)
