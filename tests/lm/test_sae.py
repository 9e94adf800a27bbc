"""TopK SAE (chapter 5): sparsity, unit decoder rows, determinism, a learnable dictionary, the cache."""

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoError, EmbgeoInputError
from embgeo_utils.lm import activations, corpus
from embgeo_utils.lm import sae as S


def _sparse_data(n=4000, d=24, atoms=48, k=3, seed=0):
    """Rows that are positive combinations of k atoms of a unit-norm dictionary."""
    g = np.random.default_rng(seed)
    dictionary = g.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    idx = np.stack([g.choice(atoms, k, replace=False) for _ in range(n)])
    coef = g.uniform(0.5, 1.5, size=(n, k))
    return np.einsum("nk,nkd->nd", coef, dictionary[idx]).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    x = _sparse_data(n=2500, d=16, atoms=32, k=2)
    sae, history = S.train_sae(x[:2000], 64, 2, epochs=8, batch_size=64, lr=2e-2, seed=0, device="cpu", progress=False)
    return x, sae, history


def test_encode_has_at_most_k_nonzeros_and_shapes(device):
    sae = S.TopKSAE(16, 40, 5, seed=1).to(device)
    x = torch.randn(50, 16, device=device)
    z = sae.encode(x)
    assert z.shape == (50, 40) and int((z != 0).sum(dim=1).max()) <= 5 and bool((z >= 0).all())
    x_hat, z2 = sae(x)
    assert x_hat.shape == x.shape and torch.equal(z, z2)
    assert sae.W_enc.shape == (16, 40) and sae.W_dec.shape == (40, 16)
    assert torch.allclose(sae.W_dec.T, sae.W_enc)  # decoder starts as the encoder's transpose


def test_training_keeps_unit_rows_and_learns_a_sparse_dictionary(trained):
    x, sae, history = trained
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    held_out = S.sae_metrics(sae, x[2000:])
    assert held_out["fvu"] < 0.1, held_out  # the data lie in a 2-sparse dictionary the SAE can learn
    assert held_out["l0"] <= 2
    assert history.fvu[-1] < history.fvu[0]
    # the stored scale makes the mean squared norm of the scaled inputs equal to d_in
    scaled = torch.as_tensor(x[:2000]) * sae.input_scale
    assert float(scaled.pow(2).sum(dim=1).mean()) == pytest.approx(16, rel=1e-4)


def test_same_seed_same_weights():
    x = _sparse_data(n=600)
    a, _ = S.train_sae(x, 32, 3, epochs=2, batch_size=64, seed=7, device="cpu", progress=False)
    b, _ = S.train_sae(x, 32, 3, epochs=2, batch_size=64, seed=7, device="cpu", progress=False)
    c, _ = S.train_sae(x, 32, 3, epochs=2, batch_size=64, seed=8, device="cpu", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_enc, c.W_enc)


def test_reads_large_activations_from_disk(tmp_path):
    x = _sparse_data(n=600)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    mem, _ = S.train_sae(x, 32, 3, epochs=1, batch_size=64, seed=2, device="cpu", progress=False)
    disk, _ = S.train_sae(path, 32, 3, epochs=1, batch_size=64, seed=2, device="cpu", progress=False, memory_budget=1)
    # rows are read sorted within each batch: the same batches, summed in another order
    assert torch.allclose(mem.W_enc, disk.W_enc, atol=1e-4)


def test_cache_hit_and_corruption_retrains(tmp_cache):
    x = _sparse_data(n=400)
    key = {"model": "synthetic", "layer": 1}
    first, h1 = S.cached_sae(x, 32, 3, key, epochs=1, batch_size=64, seed=0, device="cpu", progress=False)
    again, h2 = S.cached_sae(x, 32, 3, key, epochs=1, batch_size=64, seed=0, device="cpu", progress=False)
    assert not h1.from_cache and h2.from_cache and torch.equal(first.W_dec, again.W_dec)
    weights = max((tmp_cache / "sae").rglob("*.npy"), key=lambda f: f.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    third, h3 = S.cached_sae(x, 32, 3, key, epochs=1, batch_size=64, seed=0, device="cpu", progress=False)
    assert not h3.from_cache and torch.equal(third.W_dec, first.W_dec)


def test_clear_errors():
    with pytest.raises(EmbgeoError, match="cannot exceed"):
        S.TopKSAE(8, 4, 5)
    x = _sparse_data(n=100)
    x[3, 2] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        S.train_sae(x, 16, 2, epochs=1, device="cpu", progress=False)
    with pytest.raises(EmbgeoInputError, match="2-D"):
        S.train_sae(np.zeros(10), 16, 2, device="cpu", progress=False)


@pytest.mark.slow
def test_loss_recovered_on_a_real_model(smollm, device):

    passages = corpus.load_passages(3, smollm.tokenizer, min_tokens=48, max_tokens=48, seed=0)
    ids = np.stack([p.token_ids for p in passages])
    acts = activations.hidden_states(smollm, ids, 48, progress=False, layers=[10])
    x = acts.hidden[:, 0, 1:].reshape(-1, acts.hidden.shape[-1])
    sae, _ = S.train_sae(x, 4 * x.shape[1], 16, epochs=3, batch_size=32, seed=0, device=device, progress=False)
    out = S.loss_recovered(smollm, ids, 10, sae, x.mean(axis=0))
    assert out["clean"] < out["spliced"] < out["ablated"]
    # identity splice: an SAE that reconstructs perfectly would give the clean loss; ours recovers part of the gap
    assert 0 < out["recovered"] <= 1
    with pytest.raises(EmbgeoInputError, match="layer must lie"):
        S.loss_recovered(smollm, ids, 99, sae, x.mean(axis=0))


def test_a_saved_sae_reads_back_and_a_damaged_one_is_refused(tmp_path):
    x = _sparse_data(n=200)
    sae, history = S.train_sae(x, 16, 2, epochs=1, batch_size=64, seed=0, device="cpu", progress=False)
    folder = S.save_sae(sae, tmp_path / "sae", history)
    again, again_history = S.load_sae(folder)
    assert torch.equal(again.W_dec, sae.W_dec) and again_history is not None and again_history.fvu == history.fvu
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(EmbgeoInputError, match="checksum"):
        S.load_sae(folder)
