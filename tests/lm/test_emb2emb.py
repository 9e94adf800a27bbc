"""EMB2EMB maps (chapter 6): the ridge solution, a recovered rotation, clear errors."""

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import emb2emb


def test_fit_linear_map_equals_numpy_ridge_and_lstsq():
    g = np.random.default_rng(0)
    a = g.normal(size=(400, 12))
    b = a @ g.normal(size=(12, 9)) + 0.1 * g.normal(size=(400, 9)) + 3.0
    m = emb2emb.fit_linear_map(a, b, ridge=0.05, holdout=0.0, min_rows=2)
    ac, bc = a - a.mean(0), b - b.mean(0)
    lam = 0.05 * np.trace(ac.T @ ac) / 12
    ref = np.linalg.solve(ac.T @ ac + lam * np.eye(12), ac.T @ bc)
    assert np.allclose(m.matrix.numpy(), ref, atol=1e-10)
    plain = emb2emb.fit_linear_map(a, b, ridge=0.0, holdout=0.0, min_rows=2)
    assert np.allclose(plain.matrix.numpy(), np.linalg.lstsq(ac, bc, rcond=None)[0], atol=1e-9)
    # apply() maps directions without the offset; predict() maps points with it
    v = g.normal(size=12)
    assert np.allclose(m.apply(v).numpy(), (v @ ref).astype(np.float32), atol=1e-5)
    assert np.allclose(m.predict(a[:3]).numpy(), (a[:3] - a.mean(0)) @ ref + b.mean(0), atol=1e-9)


def test_map_recovers_an_orthogonal_matrix_and_reports_heldout_r2():
    g = np.random.default_rng(1)
    b = g.normal(size=(2000, 16))
    r, _ = np.linalg.qr(g.normal(size=(16, 16)))
    a = b @ r
    m = emb2emb.fit_linear_map(b, a, ridge=0.0, holdout=0.1)
    assert np.allclose(m.matrix.numpy(), r, atol=1e-8)
    assert m.r2_heldout == pytest.approx(1.0, abs=1e-10) and m.n_heldout == 200
    noisy = emb2emb.fit_linear_map(b, g.normal(size=(2000, 16)), holdout=0.2)
    assert noisy.r2_heldout < 0.05


def test_clear_errors():
    g = np.random.default_rng(2)
    with pytest.raises(EmbgeoInputError, match="shared vocabulary is this small"):
        emb2emb.fit_linear_map(g.normal(size=(50, 8)), g.normal(size=(50, 8)))
    with pytest.raises(EmbgeoInputError, match="paired row for row"):
        emb2emb.fit_linear_map(g.normal(size=(50, 8)), g.normal(size=(40, 8)), min_rows=2)
    bad = g.normal(size=(50, 8))
    bad[0, 0] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        emb2emb.fit_linear_map(bad, g.normal(size=(50, 8)), min_rows=2)
    m = emb2emb.fit_linear_map(g.normal(size=(50, 8)), g.normal(size=(50, 5)), min_rows=2, holdout=0)
    with pytest.raises(EmbgeoInputError, match="width"):
        m.apply(torch.ones(7))
    assert emb2emb.matching_layer(12, 24, 28) == 14
    with pytest.raises(EmbgeoInputError):
        emb2emb.matching_layer(0, 24, 28)


def test_embedding_pairs_across_tokenizers(smollm, gemma):
    xa, xb, shared = emb2emb.embedding_pairs(smollm, gemma, "input")
    assert xa.shape == (len(shared), 576) and xb.shape == (len(shared), 640)
    assert len(shared) > 40_000
    i = shared.strings.index(" the")
    assert torch.equal(xa[i], smollm.model.get_input_embeddings().weight[shared.ids_a[i]].float())


def test_residual_pairs_pair_the_same_characters(smollm, gemma, tmp_cache):
    texts = ["The violin concerto was first performed in Leipzig in 1845.", "Rain fell on the quiet town."]
    xa, xa2 = emb2emb.residual_pairs(smollm, smollm, texts, 4, 4, max_tokens=32)
    assert torch.equal(xa, xa2) and xa.shape[1] == 576  # one tokenizer: every position pairs with itself
    ra, rb = emb2emb.residual_pairs(smollm, gemma, texts, 15, 9, max_tokens=32)
    assert ra.shape[0] == rb.shape[0] and 0 < ra.shape[0] <= xa.shape[0] and rb.shape[1] == 640
    again = emb2emb.residual_pairs(smollm, gemma, texts, 15, 9, max_tokens=32)  # from the cache
    assert torch.equal(again[0], ra) and torch.equal(again[1], rb)


def test_clean_rows_drop_undertrained_tokens_and_repeated_rows():
    g = np.random.default_rng(3)
    a, b = g.normal(size=(8, 4)).astype(np.float32), g.normal(size=(8, 5)).astype(np.float32)
    a[5] = a[2]  # a repeated row of A
    b[7] = b[1]  # a repeated row of B
    ids_a, ids_b = np.arange(8) + 10, np.arange(8)
    flag_a, flag_b = np.zeros(20, bool), np.zeros(8, bool)
    flag_a[13] = True  # pair 3 is under-trained in A
    flag_b[4] = True  # pair 4 in B
    keep, counts = emb2emb.clean_rows(a, b, ids_a, ids_b, flag_a, flag_b)
    assert keep.tolist() == [True, True, True, False, False, False, True, False]
    assert counts == {"pairs": 8, "under-trained": 2, "duplicates": 2, "kept": 4}
    with pytest.raises(EmbgeoInputError, match="paired"):
        emb2emb.clean_rows(a, b[:5], ids_a, ids_b, flag_a, flag_b)
