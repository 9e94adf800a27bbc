from __future__ import annotations

import numpy as np
import pytest

from embgeo_utils.core import errors
from embgeo_utils.lm import corpus


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm.tokenizer


def test_passages_are_deterministic_and_balanced(tok):
    a = corpus.load_passages(12, tok, min_tokens=128, max_tokens=200, seed=3)
    b = corpus.load_passages(12, tok, min_tokens=128, max_tokens=200, seed=3)
    c = corpus.load_passages(12, tok, min_tokens=128, max_tokens=200, seed=4)
    assert [p.token_ids for p in a] == [p.token_ids for p in b]
    assert [p.text for p in a] != [p.text for p in c]
    assert {p.source for p in a} == set(corpus.SOURCES)
    assert all(128 <= p.n_tokens <= 200 for p in a)
    assert all(p.token_ids == corpus.encode(tok, p.text)[:200] for p in a)


def test_every_passage_keeps_provenance_and_licence(tok):
    for p in corpus.load_passages(8, tok, min_tokens=64, max_tokens=64, seed=0):
        assert p.licence == corpus.SOURCES[p.source].licence and p.licence
        assert p.title and p.domain and p.text.strip()


def test_wiki_passages_have_one_topic():
    topics = {r["topic"] for r in corpus.wiki_summaries()}
    assert len(topics) == 12 and len(corpus.wiki_summaries()) > 10_000
    for p in corpus.load_passages(5, None, min_tokens=100, max_tokens=400, sources=["wiki-summaries"]):
        assert p.domain in topics


def test_enwiki_markup_is_stripped():
    text = " ".join(" ".join(paras) for _, _, paras in corpus.documents("enwiki-articles")[:5])
    assert "[[" not in text and "{{" not in text and "<ref" not in text


def test_bad_requests_are_explained(tok):
    with pytest.raises(errors.CorpusError, match="Only .* passages"):
        corpus.load_passages(10_000, tok, min_tokens=900, max_tokens=1000, sources=["lee-news"])
    with pytest.raises(errors.CorpusError, match="Unknown text source"):
        corpus.load_passages(2, tok, sources=["reddit"])
    with pytest.raises(ValueError, match="min_tokens"):
        corpus.load_passages(2, tok, min_tokens=500, max_tokens=100)


def _runs(seq: np.ndarray) -> int:
    """Number of maximal runs of consecutive integers."""
    return 1 + int(np.sum(np.diff(seq) != 1))


@pytest.mark.parametrize("T", [64, 100, 512])
def test_shuffle_is_a_block_permutation(T):
    ids = np.arange(T)
    assert np.array_equal(corpus.shuffle_tokens(ids, 0), ids)
    for S in range(1, 6):
        out = corpus.shuffle_tokens(ids, S, seed=7)
        K = min(4**S, T)
        assert np.array_equal(np.sort(out), ids)  # same tokens
        blocks = np.array_split(ids, K)
        starts = {int(b[0]) for b in blocks}
        # every block stays contiguous and in order: cut points only at block starts
        cuts = [int(out[i]) for i in range(1, T) if out[i] != out[i - 1] + 1]
        assert set(cuts) <= starts
        assert _runs(out) <= K
        assert np.array_equal(out, corpus.shuffle_tokens(ids, S, seed=7))
    assert not np.array_equal(corpus.shuffle_tokens(ids, 3, seed=1), corpus.shuffle_tokens(ids, 3, seed=2))


def test_shuffle_caps_blocks_at_length():
    ids = np.arange(10)
    out = corpus.shuffle_tokens(ids, 5, seed=0)
    assert np.array_equal(np.sort(out), ids) and not np.array_equal(out, ids)
    with pytest.raises(ValueError, match="non-negative"):
        corpus.shuffle_tokens(ids, -1)
    with pytest.raises(ValueError, match="1-D"):
        corpus.shuffle_tokens(np.zeros((2, 3)), 1)
