"""Under-trained-token detection (embgeo_utils.lm.undertrained; chapter 3), on planted tables and a real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import undertrained


def _planted(seed: int = 0, n: int = 2000, d: int = 32, n_bad: int = 100, n_reserved: int = 30):
    """Trained rows: spread out, seen in text. Under-trained rows: a tight clump near a common point, never seen.

    Reserved rows belong to the clump; a further set of never-seen rows is spread like the trained ones
    (tokens of a language the corpus lacks), which the detector must *not* flag.
    """
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n, d))
    centre = rng.normal(size=d) * 0.3
    bad = np.arange(n - n_bad, n)
    table[bad] = centre + 0.02 * rng.normal(size=(n_bad, d))
    counts = rng.integers(10, 1000, size=n)
    counts[bad] = 0
    foreign = np.arange(n - n_bad - 200, n - n_bad)
    counts[foreign] = 0
    reference = np.zeros(n, dtype=bool)
    reference[bad[:n_reserved]] = True
    return table, counts, reference, bad, foreign


def test_indicator_separates_the_planted_clump():
    table, counts, reference, bad, foreign = _planted()
    ind = undertrained.embedding_indicator(table, reference)
    assert ind.shape == (len(table),)
    assert ind[bad].min() > 0.9 and np.abs(np.median(ind[:1000])) < 0.1
    flagged, ind_t, norm_t = undertrained.flag_tokens(counts, np.linalg.norm(table, axis=1), ind, reference)
    assert flagged[bad].all() and flagged[: len(table) - len(bad) - len(foreign)].sum() == 0  # seen: never flagged
    # Unseen but spread-out rows: only the norm rule's chance share (1 % quantile) of them.
    assert flagged[foreign].mean() <= 0.03 and 0.3 < ind_t < 0.7 and norm_t > 0


def test_norm_criterion_without_reference():
    table, counts, _, bad, foreign = _planted(n_reserved=0)
    table[bad] *= 0.01  # collapsed towards zero (weight decay) instead
    norm = np.linalg.norm(table, axis=1)
    flagged, ind_t, _ = undertrained.flag_tokens(counts, norm, None, np.zeros(len(table), dtype=bool))
    assert np.isnan(ind_t) and flagged[bad].all() and flagged[foreign].mean() <= 0.03


def test_nothing_planted_nothing_flagged():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(2000, 32))
    counts = rng.integers(0, 1000, size=2000)
    counts[:300] = 0  # never seen, but trained like the rest
    reference = np.zeros(2000, dtype=bool)
    reference[:40] = True
    ind = undertrained.embedding_indicator(table, reference)
    flagged, _, _ = undertrained.flag_tokens(counts, np.linalg.norm(table, axis=1), ind, reference)
    assert flagged.sum() <= 0.05 * 300  # chance outliers of the two 1 % rules only, no mass flagging


def test_errors():
    table, counts, reference, _, _ = _planted()
    with pytest.raises(EmbgeoInputError, match="reference"):
        undertrained.embedding_indicator(table, np.zeros(len(table), dtype=bool))
    with pytest.raises(EmbgeoInputError, match="quantile"):
        undertrained.flag_tokens(counts, np.ones(len(table)), None, reference, quantile=0.7)
    with pytest.raises(EmbgeoInputError, match="min_seen"):
        undertrained.flag_tokens(np.zeros(len(table), dtype=int), np.ones(len(table)), None, reference)


def test_counts_and_flags_on_a_real_tokenizer(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path))
    tok = smollm.tokenizer
    n_rows = len(tok)
    counts = undertrained.corpus_token_counts(tok, n_rows, sources=["lee-news"])
    assert counts.shape == (n_rows,) and counts.sum() > 50_000
    the = tok.convert_tokens_to_ids("Ġthe")
    assert counts[the] == counts.max()  # " the" is the most frequent token of English news
    again = undertrained.corpus_token_counts(tok, n_rows, sources=["lee-news"])  # from the cache
    np.testing.assert_array_equal(counts, again)
    assert list(tmp_path.joinpath("token_counts").iterdir())
    reserved = undertrained.reserved_rows(tok, n_rows + 5)
    assert reserved[n_rows:].all() and not reserved[the]
    assert undertrained.RESERVED_PATTERN.match("<unused12>") and undertrained.RESERVED_PATTERN.match("[PAD151700]")
    assert not undertrained.RESERVED_PATTERN.match("unused")


def test_mark_tokens():
    import pandas as pd

    table, counts, reference, bad, _ = _planted()
    flagged, _, _ = undertrained.flag_tokens(counts, np.linalg.norm(table, axis=1), None, reference)
    found = undertrained.UndertrainedTokens("A", counts, np.ones(len(table)), np.full(len(table), np.nan), reference,
                                            flagged, float("nan"), 1.0, int(counts.sum()))  # fmt: skip
    tokens = pd.DataFrame({"model": ["A", "A", "B"], "token": [int(bad[0]), 0, int(bad[0])]})
    marked = undertrained.mark_tokens(tokens, {"A": found})
    assert marked["under-trained"].tolist() == [bool(flagged[bad[0]]), bool(flagged[0]), False]
    with pytest.raises(EmbgeoInputError, match="token"):
        undertrained.mark_tokens(tokens.drop(columns="token"), {"A": found})
