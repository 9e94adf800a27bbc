"""Shared vocabulary across tokenizers (embgeo_utils.lm.vocab; chapters 1-3), on the real packaged tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from embgeo_utils.core import errors
from embgeo_utils.lm import models, vocab


@pytest.fixture(scope="module")
def minilm_tok(device):

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
    assert not any(t.startswith(("<0x", "<unused")) for t in gem_tokens)


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


def test_common_strings_sorted_and_seeded():
    a = {" the": 0, " cat": 1, "ing": 2, "x": 3}
    b = {" cat": 10, " the": 11, "ing": 12, "y": 13}
    c = {"ing": 5, " the": 6, " cat": 7}
    assert vocab.common_strings([a, b, c]) == [" cat", " the", "ing"]
    pick = vocab.common_strings([a, b, c], n=2, seed=3)
    assert len(pick) == 2 and pick == sorted(pick) and pick == vocab.common_strings([a, b, c], n=2, seed=3)
    assert vocab.common_strings([a, b], n=10) == [" cat", " the", "ing"]
    # A generator is advanced, so two draws from one generator continue one stream.
    rng = np.random.default_rng(0)
    first = vocab.common_strings([a, b], n=1, seed=rng)
    assert rng.random() != np.random.default_rng(0).random() and len(first) == 1


def test_common_strings_errors():
    with pytest.raises(errors.VocabularyError, match="at least one"):
        vocab.common_strings([])
    with pytest.raises(errors.VocabularyError, match="share no string"):
        vocab.common_strings([{"a": 0}, {"b": 0}])
    with pytest.raises(errors.VocabularyError, match="positive"):
        vocab.common_strings([{"a": 0}], n=0)
