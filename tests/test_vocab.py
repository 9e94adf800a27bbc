"""Shared vocabulary and token labels (embgeo_utils.vocab; chapters 1-3), on the real packaged tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from embgeo_utils import errors, vocab


@pytest.fixture(scope="module")
def minilm_tok(device):
    from embgeo_utils import models

    return models.load("minilm-l6", device=device).tokenizer


@pytest.fixture(scope="module")
def smol_gemma(smollm, gemma):
    return vocab.shared_vocabulary(smollm.tokenizer, gemma.tokenizer)


def test_byte_to_unicode_table():
    table = vocab.byte_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_schemes(smollm, gemma, minilm_tok):
    assert vocab.tokenizer_scheme(smollm.tokenizer) == "byte-level"
    assert vocab.tokenizer_scheme(gemma.tokenizer) == "sentencepiece"
    assert vocab.tokenizer_scheme(minilm_tok) == "wordpiece"


def test_known_pairs_map_across(smollm, gemma, smol_gemma):
    strings = list(smol_gemma.strings)
    for text in (" the", " and", "\n", " Paris", "ing"):
        row = strings.index(text)
        a, b = int(smol_gemma.ids_a[row]), int(smol_gemma.ids_b[row])
        assert smollm.tokenizer.decode([a]) == text
        assert gemma.tokenizer.convert_ids_to_tokens([b])[0].replace("▁", " ") == text


def test_size_and_no_specials(smollm, gemma, smol_gemma):
    # About 45,600 strings in the methods brief; the exact count depends on the normalisation details.
    assert 44_000 < len(smol_gemma) < 48_000
    assert not set(smol_gemma.ids_a) & set(smollm.tokenizer.all_special_ids)
    assert not set(smol_gemma.ids_b) & set(gemma.tokenizer.all_special_ids)
    gem_tokens = gemma.tokenizer.convert_ids_to_tokens([int(i) for i in smol_gemma.ids_b])
    assert not any(t.startswith("<0x") or t.startswith("<unused") for t in gem_tokens)


def test_uniqueness(smol_gemma):
    assert len(set(smol_gemma.strings)) == len(smol_gemma)
    assert len(set(smol_gemma.ids_a.tolist())) == len(smol_gemma)
    assert len(set(smol_gemma.ids_b.tolist())) == len(smol_gemma)


def test_same_tokenizer_gives_identity(smollm):
    same = vocab.shared_vocabulary(smollm.tokenizer, smollm.tokenizer)
    assert same.same_tokenizer
    np.testing.assert_array_equal(same.ids_a, same.ids_b)
    assert len(same) > 48_000


def test_wordpiece_convention(smollm, minilm_tok):
    shared = vocab.shared_vocabulary(smollm.tokenizer, minilm_tok)
    strings = list(shared.strings)
    assert minilm_tok.convert_ids_to_tokens([int(shared.ids_b[strings.index(" the")])]) == ["the"]
    assert minilm_tok.convert_ids_to_tokens([int(shared.ids_b[strings.index("ing")])]) == ["##ing"]
    assert minilm_tok.convert_ids_to_tokens([int(shared.ids_b[strings.index(",")])]) == [","]
    assert all(s == s.lower() for s in strings)


def test_sample_is_seeded(smol_gemma):
    a, b = smol_gemma.sample(100, seed=1), smol_gemma.sample(100, seed=1)
    assert a.strings == b.strings and len(a) == 100


def test_token_labels():
    labels = vocab.token_labels([" the", "ing", " 1,000", "});", " \n", " Paris", "x86", " zzyzx", " king"])
    assert list(labels.kind) == ["word", "fragment", "number", "punctuation/code", "whitespace", "word", "other",
                                 "fragment", "word"]
    assert labels.capitalised.tolist() == [False, False, False, False, False, True, False, False, False]
    assert labels.analogy[5] == "capital-common-countries"
    assert labels.analogy[0] == ""


def test_analogy_file_sections():
    cats = vocab.analogy_categories()
    assert len(set(cats.values())) == 14
    assert cats["athens"] == "capital-common-countries"


def test_stratified_sample():
    strata = np.array([0] * 100 + [1] * 5 + [2] * 50)
    pick = vocab.stratified_sample(strata, 40, seed=0)
    counts = np.bincount(strata[pick], minlength=3)
    assert counts.sum() == 40 and counts[1] == 5 and abs(int(counts[0]) - int(counts[2])) <= 1
    assert len(np.unique(pick)) == 40


def test_label_agreement_and_coherence():
    labels = np.array(["a"] * 50 + ["b"] * 50)
    same = np.array([[(i + 1) % 50 + 50 * (i >= 50)] for i in range(100)])
    agree = vocab.neighbor_label_agreement(labels, same, adjust=False)
    assert np.all(agree == 1.0)
    assert np.allclose(vocab.neighbor_label_agreement(labels, same), 0.5)
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(1, 0.1, 30), rng.normal(0, 0.1, 30)])
    res = vocab.coherence_test(values, np.arange(30), np.arange(30, 60), n=200, seed=0)
    assert res.difference > 0.8 and res.p_value < 0.01
    res0 = vocab.coherence_test(values[30:], np.arange(15), np.arange(15, 30), n=200, seed=0)
    assert res0.p_value > 0.01


def test_errors():
    with pytest.raises(errors.VocabularyError, match="positive"):
        vocab.stratified_sample(np.zeros(10), 0)
